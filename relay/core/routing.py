"""Which Claude account (subscription) takes a run: usability, headroom and the chooser. Pure.

An account's state comes from the CLI's own `rate_limit_event`s (utilization, reset, status and
surpassed threshold of the 5-hour and weekly windows and of the per-model weekly bucket
`seven_day_overage_included`, overage) and from the errors the relay saw (limits, broken logins).
`usability()` says whether an account may take a run now (for a model family: a rejection in the
per-model bucket takes the account out for that family only) and, if not, why and until when;
`choose()` orders the usable accounts for a conversation: its own account first (its CLI session
and prompt cache live there), then by priority (1 = first choice), headroom as a burn rate, and the
conversations and runs each already holds, so new conversations spread over accounts of equal
priority. An account at its `reserve` in any window takes no new conversation (its own go on).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import RelayError, SubscriptionLimited, Unavailable
from .share_estimate import would_cross
from .upstream import LOGIN_HINT

RATE_STEP = 1.25      # burn-rate headrooms within a factor of this count as equal, so load spreads by what each holds
UNKNOWN_LIMIT_S = 3600.0  # an account refused for overage with no known reset is retried after this
MAX_RATE = 10.0       # a burn-rate headroom above this (a window about to reset) counts as this
# the windows of the unified rate-limit headers, and how long each lasts
WINDOW_S = {"five_hour": 5 * 3600, "seven_day": 7 * 86400, "seven_day_overage_included": 7 * 86400}
WINDOWS = tuple(WINDOW_S)
MODEL_WINDOW = "seven_day_overage_included"   # the per-model weekly bucket (header family `7d_oi`)
BUCKET_FAMILIES = ("opus",)   # the families the relay assumes that bucket counts (its reserve and ranking)
FAMILIES = ("opus", "sonnet", "haiku")
STATUSES = ("allowed", "allowed_warning", "rejected")


@dataclass(frozen=True)
class AccountSpec:
    """One configured account: `accounts[]` in the config (the implicit host login when none)."""
    name: str
    config_dir: str = ""              # CLAUDE_CONFIG_DIR where `claude` was logged in ("" = the relay's)
    oauth_token_env: str = ""         # environment variable holding a `claude setup-token` token
    max_concurrent: int = 0
    priority: int = 1
    implicit: bool = False            # the host's own login (no accounts configured)
    reserve: float = 0.0              # no new conversations at/over this utilization of any window (0 = none)

    @classmethod
    def from_config(cls, item: dict[str, Any]) -> AccountSpec:
        return cls(name=item["name"], config_dir=item.get("config_dir") or "",
                   oauth_token_env=item.get("oauth_token_env") or "",
                   max_concurrent=int(item.get("max_concurrent") or 0), priority=int(item.get("priority") or 1),
                   reserve=float(item.get("reserve") or 0.0))


@dataclass
class AccountView:
    """What the chooser needs to know about one account right now."""
    name: str
    priority: int = 1
    max_concurrent: int = 0           # 0 = only the host's limit applies
    state: dict[str, Any] = field(default_factory=dict)   # as stored (see state/accounts.py)
    in_flight: int = 0
    conversations: int = 0
    reserve: float = 0.0              # AccountSpec.reserve


@dataclass
class Usability:
    usable: bool
    kind: str = ""                    # "" | "limit" | "overage" | "login"
    reason: str = ""
    until: float | None = None        # when it may be usable again (None: needs the operator)


def _num(v: Any) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def model_family(model: str | None) -> str:
    """`opus`, `sonnet` or `haiku` from a model id or alias (`claude-opus-4-1`, `opus`); "" otherwise."""
    low = (model or "").lower()
    return next((f for f in FAMILIES if f in low), "")


def family_key(family: str) -> str:
    """The account hash's field holding until when the per-model bucket refuses `family`."""
    return f"family_{family}_until"


def usability(state: dict[str, Any], now: float | None = None, family: str = "") -> Usability:
    """Whether an account may take a run now (its stored state; the overage policy was applied
    when the state was written); with a model `family`, also whether the per-model bucket refuses it."""
    now = time.time() if now is None else now
    if state.get("login_problem") and (_num(state.get("login_until")) or float("inf")) > now:
        until = _num(state.get("login_until"))
        return Usability(False, "login", str(state["login_problem"]), until if until != float("inf") else None)
    until = _num(state.get("cooldown_until")) or 0.0
    if until > now:
        return Usability(False, str(state.get("cooldown_kind") or "limit"), str(state.get("cooldown_reason") or ""),
                         until)
    fam_until = (_num(state.get(family_key(family))) or 0.0) if family else 0.0
    if fam_until > now:
        return Usability(False, "model_limit", f"the per-model weekly bucket ({MODEL_WINDOW}) refuses {family} "
                         "models; other models are still served", fam_until)
    return Usability(True)


def window(state: dict[str, Any], w: str, now: float) -> dict[str, Any] | None:
    """One window as stored: {utilization, resets_at, status, surpassed, stale}; None when never reported.
    A window whose reset has passed with no turn since is stale: its utilization is unknown (None), not 0."""
    util, reset = _num(state.get(f"{w}_util")), _num(state.get(f"{w}_reset"))
    status, surpassed = state.get(f"{w}_status") or None, _num(state.get(f"{w}_surpassed"))
    if util is None and reset is None and status is None:
        return None
    stale = bool(reset and reset <= now)
    return {"utilization": None if stale else util, "resets_at": reset, "status": None if stale else status,
            "surpassed_threshold": None if stale else surpassed, "stale": stale}


def counted(w: str, family: str) -> bool:
    """Whether window `w` bounds a run of `family`: the per-model bucket only for the families it counts."""
    return w != MODEL_WINDOW or family in BUCKET_FAMILIES


def headroom(state: dict[str, Any], now: float | None = None, family: str = "") -> float:
    """1 - the fullest window (a stale window, whose reset has passed, counts as unknown; 1.0 when the
    CLI has not reported any)."""
    now = time.time() if now is None else now
    used = [win["utilization"] for w in WINDOWS if counted(w, family)
            if (win := window(state, w, now)) and win["utilization"] is not None]
    return max(0.0, 1.0 - max(used)) if used else 1.0


def burn_headroom(state: dict[str, Any], now: float | None = None, family: str = "") -> float:
    """Headroom as a burn rate: for each window, the share left per share of the window's time left,
    (1 - utilization) / remaining; the account's is its tightest window's (at most MAX_RATE). 1.0 means
    the account may go on at an even pace until the reset; a window about to reset gives more (what is
    left would be lost), one filled early in its period less. 1.0 when no window is known."""
    now = time.time() if now is None else now
    rates = []
    for w in WINDOWS:
        win = window(state, w, now) if counted(w, family) else None
        if not win or win["utilization"] is None:
            continue
        left = 1.0 - min(max(win["utilization"], 0.0), 1.0)
        remaining = ((win["resets_at"] - now) / WINDOW_S[w]) if win["resets_at"] else 1.0
        remaining = min(max(remaining, 1.0 / MAX_RATE), 1.0)
        rates.append(min(left / remaining, MAX_RATE))
    return min(rates) if rates else 1.0


def at_reserve(state: dict[str, Any], reserve: float, now: float | None = None, family: str = "") -> str:
    """The first window at or over the account's reserve ("" when none, or no reserve is set)."""
    if not reserve:
        return ""
    now = time.time() if now is None else now
    for w in WINDOWS:
        win = window(state, w, now) if counted(w, family) else None
        if win and win["utilization"] is not None and win["utilization"] >= reserve:
            return w
    return ""


def crossing(state: dict[str, Any], reserve: float, estimate: int, own: bool, now: float | None = None,
             family: str = "") -> tuple[str, float, float]:
    """The first window this request's estimated share (`estimate` tokens at the account's learnt
    utilization per token, core/share_estimate.py) would take to its line: the reserve for a new
    conversation, the limit for one the account holds (`own`). ("", 0, 0) when none would cross."""
    if estimate <= 0:
        return "", 0.0, 0.0
    now = time.time() if now is None else now
    line = 1.0 if own or not reserve else reserve
    for w in WINDOWS:
        win = window(state, w, now) if counted(w, family) else None
        rate = _num(state.get(f"{w}_upt"))
        if win and win["utilization"] is not None and win["utilization"] < line \
                and would_cross(win["utilization"], rate, estimate, line):
            return w, line, (rate or 0.0) * estimate
    return "", 0.0, 0.0


def choose(views: Iterable[AccountView], sticky: str | None = None, exclude: Iterable[str] = (),
           now: float | None = None, family: str = "", estimate: int = 0) -> list[AccountView]:
    """Usable accounts in the order to try them: the conversation's own account first, then by
    priority, burn-rate headroom (in steps), conversations held, runs in flight, name. An account at
    its reserve takes only the conversations it already holds; with `estimate` (the overage policy
    blocks), none is chosen that this request's estimated share would take past its reserve or limit."""
    skip = set(exclude)
    usable = [v for v in views if v.name not in skip and usability(v.state, now, family).usable
              and (v.name == sticky or not at_reserve(v.state, v.reserve, now, family))
              and not crossing(v.state, v.reserve, estimate, v.name == sticky, now, family)[0]]

    def rank(v: AccountView) -> tuple[Any, ...]:
        steps = math.floor(math.log(max(burn_headroom(v.state, now, family), 1e-3)) / math.log(RATE_STEP) + 1e-9)
        return (v.name != sticky, v.priority, -steps, v.conversations, v.in_flight, v.name)
    return sorted(usable, key=rank)


def clock(ts: float, now: float | None = None) -> str:
    """When a limit resets, for people: `09:00 UTC` today, `Mon 14 Dec 09:00 UTC` on any other day (a weekly
    window may be days away), UTC throughout."""
    now = time.time() if now is None else now
    same_day = time.gmtime(ts)[:3] == time.gmtime(now)[:3]
    return time.strftime("%H:%M UTC" if same_day else "%a %d %b %H:%M UTC", time.gmtime(ts))


def blocked_summary(views: Iterable[AccountView], now: float | None = None,
                    family: str = "", estimate: int = 0) -> tuple[str, float | None, bool]:
    """Why no account is usable: (message, earliest reset or None, True if only logins are broken)."""
    now = time.time() if now is None else now
    parts, resets, only_login = [], [], True
    for v in views:
        u = usability(v.state, now, family)
        if u.usable:
            w = at_reserve(v.state, v.reserve, now, family)
            cw, line, share = crossing(v.state, v.reserve, estimate, False, now, family) if not w else ("", 0, 0)
            if not w and not cw:
                continue
            win = window(v.state, w or cw, now) or {}
            u = Usability(False, "reserve", f"{w} at {win.get('utilization', 0):.0%}, its reserve is "
                          f"{v.reserve:.0%}", win.get("resets_at")) if w else \
                Usability(False, "crossing", f"{cw} at {win.get('utilization', 0):.0%}; this request's estimated "
                          f"share (about {share:.1%}) would take it past {line:.0%}", win.get("resets_at"))
        when = f" until {clock(u.until, now)}" if u.until and u.kind != "login" else ""
        label = {"limit": "usage limit reached", "overage": "would draw on extra usage (overage policy: block)",
                 "login": "login not working", "reserve": "at its reserve (no new conversations)",
                 "crossing": "too close to its reserve or limit for this request (overage policy: block)",
                 "model_limit": f"usage limit reached for {family} models"}.get(u.kind, u.kind)
        parts.append(f"{v.name}: {label}{when} ({u.reason})" if u.reason else f"{v.name}: {label}{when}")
        if u.kind != "login":
            only_login = False
            if u.until:
                resets.append(u.until)
    return "; ".join(parts), (min(resets) if resets else None), only_login


def no_account_error(views: list[AccountView], single: bool, exclude: list[str] | None = None,
                     now: float | None = None, family: str = "", estimate: int = 0) -> RelayError:
    """No account can take the run: 429 with the earliest reset (a date when it is not today), or 503 when
    only logins are broken. `single`: the relay has one account (the message speaks of "the subscription")."""
    now = time.time() if now is None else now
    summary, earliest, only_login = blocked_summary(views, now, family, estimate)
    if not summary:
        return Unavailable(f"No Claude account could take this request (tried: {', '.join(exclude or [])}).",
                           code="no_account_available", retry_after=5)
    if only_login:
        return Unavailable(f"{'The' if single else 'No'} Claude account{'' if single else ' has a working login'}"
                           f"{' has no working login' if single else ''}: {summary}. {LOGIN_HINT}",
                           code="cli_login_required", retry_after=30)
    wait = max(1.0, (earliest or now + UNKNOWN_LIMIT_S) - now)
    lead = ("The Claude subscription behind this relay hit its usage limit" if single else
            "Every Claude account behind this relay is at its usage limit or unusable")
    if family and any(usability(v.state, now, family).kind == "model_limit" for v in views):
        lead += f" for {family} models (other models may still be served)"
    return SubscriptionLimited(f"{lead}; no request is sent upstream until {clock(now + wait, now)}: {summary}",
                               retry_after=wait, headers={"x-should-retry": "false"} if wait > 120 else None)


def windows_of(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every window from a `rate_limit_info`: {"five_hour": {"utilization", "resets_at", "status",
    "surpassed"}, "seven_day": ..., "seven_day_overage_included": ...} (the fields reported).

    The pinned CLI (2.1.330) reports `unifiedWindows` from the `anthropic-ratelimit-unified-5h-*`, `-7d-*`
    and `-7d_oi-*` headers; older ones only the representative window (`rateLimitType`, `utilization`,
    `resetsAt`, `surpassedThreshold`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, w in (info.get("unifiedWindows") or {}).items():
        if name in WINDOWS and isinstance(w, dict):
            out[name] = _fields(w)
    kind = info.get("rateLimitType")
    if kind in WINDOWS and kind not in out:
        vals = _fields(info)
        if info.get("status") == "rejected" and "utilization" not in vals:
            vals["utilization"] = 1.0
        out[kind] = vals
    return out


def _fields(w: dict[str, Any]) -> dict[str, Any]:
    status = w.get("status") if w.get("status") in STATUSES else None
    return {k: v for k, v in (("utilization", _num(w.get("utilization"))), ("resets_at", _num(w.get("resetsAt"))),
                              ("status", status), ("surpassed", _num(w.get("surpassedThreshold"))))
            if v is not None}


def model_rejection(info: dict[str, Any] | None) -> float | None:
    """The reset of the per-model bucket when it, and not the account's own windows, refused the turn:
    the CLI names it in `rateLimitType` (observed with 2.1.330: "seven_day_overage_included", status
    rejected), or, without one, only that bucket is rejected. None otherwise."""
    if not info or info.get("status") != "rejected":
        return None
    wins = windows_of(info)
    kind = info.get("rateLimitType")
    bucket = wins.get(MODEL_WINDOW, {})
    if kind == MODEL_WINDOW or (not kind and bucket.get("status") == "rejected" and not any(
            wins.get(w, {}).get("status") == "rejected" for w in ("five_hour", "seven_day"))):
        return _num(info.get("resetsAt")) if kind == MODEL_WINDOW and info.get("resetsAt") else \
            bucket.get("resets_at")
    return None


def uses_overage(info: dict[str, Any]) -> bool:
    """The CLI says this account is drawing on overage (extra usage): its own flags for it."""
    return bool(info.get("isUsingOverage") or info.get("overageInUse"))


def limit_reset(info: dict[str, Any], now: float) -> float | None:
    """When a rejected (or overage-drawing) account's binding window resets."""
    reset = _num(info.get("resetsAt"))
    if reset and reset > now:
        return reset
    wins = windows_of(info)
    later = [w["resets_at"] for n, w in wins.items() if n != MODEL_WINDOW and w.get("utilization", 0) >= 1.0
             and w.get("resets_at", 0) > now]
    return max(later) if later else None

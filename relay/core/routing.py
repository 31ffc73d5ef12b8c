"""Which Claude account (subscription) takes a run: usability, headroom and the chooser. Pure.

An account's state comes from the CLI's own `rate_limit_event`s (utilization and resets of the
5-hour and weekly windows, overage) and from the errors the relay saw (limits, broken logins).
`usability()` says whether an account may take a run now and, if not, why and until when;
`choose()` orders the usable accounts for a conversation: its own account first (its CLI session
and prompt cache live there), then by priority (1 = first choice), headroom, and the conversations
and runs each already holds, so new conversations spread over accounts of equal priority.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import RelayError, SubscriptionLimited, Unavailable
from .upstream import LOGIN_HINT

HEADROOM_STEP = 0.1   # headroom within one step counts as equal, so load spreads by what each holds
UNKNOWN_LIMIT_S = 3600.0  # an account refused for overage with no known reset is retried after this


@dataclass(frozen=True)
class AccountSpec:
    """One configured account: `accounts[]` in the config (the implicit host login when none)."""
    name: str
    config_dir: str = ""              # CLAUDE_CONFIG_DIR where `claude` was logged in ("" = the relay's)
    oauth_token_env: str = ""         # environment variable holding a `claude setup-token` token
    max_concurrent: int = 0
    priority: int = 1
    implicit: bool = False            # the host's own login (no accounts configured)

    @classmethod
    def from_config(cls, item: dict[str, Any]) -> AccountSpec:
        return cls(name=item["name"], config_dir=item.get("config_dir") or "",
                   oauth_token_env=item.get("oauth_token_env") or "",
                   max_concurrent=int(item.get("max_concurrent") or 0), priority=int(item.get("priority") or 1))


@dataclass
class AccountView:
    """What the chooser needs to know about one account right now."""
    name: str
    priority: int = 1
    max_concurrent: int = 0           # 0 = only the host's limit applies
    state: dict[str, Any] = field(default_factory=dict)   # as stored (see state/accounts.py)
    in_flight: int = 0
    conversations: int = 0


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


def usability(state: dict[str, Any], now: float | None = None) -> Usability:
    """Whether an account may take a run now (its stored state; the overage policy was applied
    when the state was written)."""
    now = time.time() if now is None else now
    if state.get("login_problem") and (_num(state.get("login_until")) or float("inf")) > now:
        until = _num(state.get("login_until"))
        return Usability(False, "login", str(state["login_problem"]), until if until != float("inf") else None)
    until = _num(state.get("cooldown_until")) or 0.0
    if until > now:
        return Usability(False, str(state.get("cooldown_kind") or "limit"), str(state.get("cooldown_reason") or ""),
                         until)
    return Usability(True)


def headroom(state: dict[str, Any], now: float | None = None) -> float:
    """1 - the fuller of the two windows (a window whose reset has passed is empty again; 1.0 when
    the CLI has not reported them yet)."""
    now = time.time() if now is None else now
    used = []
    for w in ("five_hour", "seven_day"):
        util, reset = _num(state.get(f"{w}_util")), _num(state.get(f"{w}_reset"))
        if util is not None and not (reset and reset <= now):
            used.append(util)
    return max(0.0, 1.0 - max(used)) if used else 1.0


def choose(views: Iterable[AccountView], sticky: str | None = None, exclude: Iterable[str] = (),
           now: float | None = None) -> list[AccountView]:
    """Usable accounts in the order to try them: the conversation's own account first, then by
    priority, headroom (in steps), conversations held, runs in flight, name."""
    skip = set(exclude)
    usable = [v for v in views if v.name not in skip and usability(v.state, now).usable]

    def rank(v: AccountView) -> tuple[Any, ...]:
        steps = int(headroom(v.state, now) / HEADROOM_STEP + 1e-9)
        return (v.name != sticky, v.priority, -steps, v.conversations, v.in_flight, v.name)
    return sorted(usable, key=rank)


def clock(ts: float, now: float | None = None) -> str:
    """When a limit resets, for people: `09:00 UTC` today, `Mon 14 Dec 09:00 UTC` on any other day (a weekly
    window may be days away), UTC throughout."""
    now = time.time() if now is None else now
    same_day = time.gmtime(ts)[:3] == time.gmtime(now)[:3]
    return time.strftime("%H:%M UTC" if same_day else "%a %d %b %H:%M UTC", time.gmtime(ts))


def blocked_summary(views: Iterable[AccountView], now: float | None = None) -> tuple[str, float | None, bool]:
    """Why no account is usable: (message, earliest reset or None, True if only logins are broken)."""
    now = time.time() if now is None else now
    parts, resets, only_login = [], [], True
    for v in views:
        u = usability(v.state, now)
        if u.usable:
            continue
        when = f" until {clock(u.until, now)}" if u.until and u.kind != "login" else ""
        label = {"limit": "usage limit reached", "overage": "would draw on extra usage (overage policy: block)",
                 "login": "login not working"}.get(u.kind, u.kind)
        parts.append(f"{v.name}: {label}{when} ({u.reason})" if u.reason else f"{v.name}: {label}{when}")
        if u.kind != "login":
            only_login = False
            if u.until:
                resets.append(u.until)
    return "; ".join(parts), (min(resets) if resets else None), only_login


def no_account_error(views: list[AccountView], single: bool, exclude: list[str] | None = None,
                     now: float | None = None) -> RelayError:
    """No account can take the run: 429 with the earliest reset (a date when it is not today), or 503 when
    only logins are broken. `single`: the relay has one account (the message speaks of "the subscription")."""
    now = time.time() if now is None else now
    summary, earliest, only_login = blocked_summary(views, now)
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
    return SubscriptionLimited(f"{lead}; no request is sent upstream until {clock(now + wait, now)}: {summary}",
                               retry_after=wait, headers={"x-should-retry": "false"} if wait > 120 else None)


def windows_of(info: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The 5-hour and weekly windows from a `rate_limit_info`: {"five_hour": {"utilization", "resets_at"}}.

    The pinned CLI (2.1.330) reports `unifiedWindows` from the `anthropic-ratelimit-unified-5h-*` and
    `-7d-*` headers; older ones only the representative window (`rateLimitType`, `utilization`, `resetsAt`)."""
    out: dict[str, dict[str, float]] = {}
    for name, w in (info.get("unifiedWindows") or {}).items():
        if name in ("five_hour", "seven_day") and isinstance(w, dict):
            util, reset = _num(w.get("utilization")), _num(w.get("resetsAt"))
            out[name] = {k: v for k, v in (("utilization", util), ("resets_at", reset)) if v is not None}
    kind = info.get("rateLimitType")
    if kind in ("five_hour", "seven_day") and kind not in out:
        util, reset = _num(info.get("utilization")), _num(info.get("resetsAt"))
        if info.get("status") == "rejected" and util is None:
            util = 1.0
        out[kind] = {k: v for k, v in (("utilization", util), ("resets_at", reset)) if v is not None}
    return out


def uses_overage(info: dict[str, Any]) -> bool:
    """The CLI says this account is drawing on overage (extra usage): its own flags for it."""
    return bool(info.get("isUsingOverage") or info.get("overageInUse"))


def limit_reset(info: dict[str, Any], now: float) -> float | None:
    """When a rejected (or overage-drawing) account's binding window resets."""
    reset = _num(info.get("resetsAt"))
    if reset and reset > now:
        return reset
    wins = windows_of(info)
    later = [w["resets_at"] for w in wins.values() if w.get("utilization", 0) >= 1.0 and w.get("resets_at", 0) > now]
    return max(later) if later else None

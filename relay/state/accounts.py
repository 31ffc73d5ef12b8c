"""Every Claude account's state, shared in Redis by all workers and hosts: the quota meter.

Per account: the 5-hour and weekly windows and the per-model weekly bucket (utilization, reset,
status, surpassed threshold: `{window}_util`, `_reset`, `_status`, `_surpassed`) and overage state as
the CLI last reported them, until when the per-model bucket refuses a model family, a cooldown until the reset when the account is limited (or drawing on extra usage
under the `block` overage policy), a broken login, the last error, the runs in flight (leased
slots, which also cap its concurrency) and the conversations whose CLI session it holds.
State changes worth telling the operator about are handed to `emit` (the alert outbox).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.metrics import AccountStatus
from ..core.routing import (
    UNKNOWN_LIMIT_S,
    AccountSpec,
    AccountView,
    choose,
    family_key,
    limit_reset,
    model_rejection,
    no_account_error,
    usability,
    uses_overage,
    windows_of,
)
from ..core.share_estimate import learnt_fields
from ..errors import RateLimited, RelayError, SubscriptionLimited
from .account_alerts import AccountAlerts, Forget
from .account_meter import iso as _iso
from .account_meter import meter_entry, status_of
from .connection import PREFIX
from .leases import Leases
from .storm import FailoverRamp

log = logging.getLogger("relay.accounts")
Emit = Callable[..., bool]
NO_SLOT_LIMIT = 10**6       # an account without max_concurrent still counts its runs
MAX_COOLDOWN_S = 7 * 86400 + 3600   # the weekly window, and an hour: no real limit lasts longer
# what `clear` removes: the cooldown (limit or overage), a broken login, the overage flags and the last error
CLEARED = ("cooldown_until", "cooldown_kind", "cooldown_reason", "recovered_alerted", "login_problem", "login_until",
           "overage_in_use", "status", "last_error", "last_error_at")


class Accounts:
    def __init__(self, r: Any, leases: Leases, specs: list[AccountSpec], host: str, login_recheck_s: float,
                 overage_policy: str, thresholds: list[float], emit: Emit | None = None,
                 repeat_s: float = 3600.0, forget: Forget | None = None) -> None:
        self.r, self.leases, self.specs = r, leases, specs
        self.by_name = {s.name: s for s in specs}
        self.host = host
        self.login_recheck_s = login_recheck_s
        self.overage_policy = overage_policy
        self.emit: Emit = emit or (lambda *a, **k: False)
        self.notices = AccountAlerts(self.emit, thresholds, repeat_s, forget)
        self.ramp = FailoverRamp(r)   # storm control (the runtime sets its figures)

    # -- keys ------------------------------------------------------------------------------------
    def _id(self, name: str) -> str:
        spec = self.by_name.get(name)
        # the host's own login is per host; configured accounts are the same subscription everywhere
        return f"@{self.host}" if spec is not None and spec.implicit else name

    def key(self, name: str) -> str:
        return f"{PREFIX}acct:{self._id(name)}"

    def slot_key(self, name: str) -> str:
        return f"{PREFIX}acctslots:{self._id(name)}"

    def convs_key(self, name: str) -> str:
        return f"{PREFIX}acctconvs:{self._id(name)}"

    # -- reading ---------------------------------------------------------------------------------
    def state(self, name: str) -> dict[str, Any]:
        return dict(self.r.hgetall(self.key(name)))

    def views(self, conv_ttl_s: float = 86400, problems: dict[str, str] | None = None) -> list[AccountView]:
        """Every account as the chooser sees it; `problems` are broken logins this host knows of."""
        now = time.time()
        pipe = self.r.pipeline()
        for s in self.specs:
            pipe.hgetall(self.key(s.name))
            pipe.zremrangebyscore(self.slot_key(s.name), "-inf", now)
            pipe.zcard(self.slot_key(s.name))
            pipe.zcount(self.convs_key(s.name), now - conv_ttl_s, "+inf")
        res = pipe.execute()
        out = []
        for i, s in enumerate(self.specs):
            st, _, runs, convs = res[4 * i: 4 * i + 4]
            state = dict(st)
            if problems and s.name in problems:
                state.update(login_problem=problems[s.name], login_until="")
            out.append(AccountView(s.name, s.priority, s.max_concurrent, state, int(runs), int(convs), s.reserve))
        return out

    def snapshot(self, conv_ttl_s: float = 86400, problems: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The quota meter: every account's windows, overage, runs, conversations and last error."""
        now = time.time()
        return [meter_entry(v, now, self.overage_policy) for v in self.views(conv_ttl_s, problems)]

    def statuses(self, problems: dict[str, str] | None = None) -> list[AccountStatus]:
        """Every account as the metrics and the dashboard see it (`account_meter.status_of`)."""
        now = time.time()
        return [status_of(v, now) for v in self.views(problems=problems)]

    def legacy(self, name: str) -> dict[str, Any]:
        """The single-account view `/health` has always shown under `account`."""
        u = usability(self.state(name))
        if u.usable:
            return {}
        if u.kind == "login":
            return {"login_problem": u.reason}
        return {"cooldown_until": u.until, "cooldown_reason": u.reason}

    # -- conversations ---------------------------------------------------------------------------
    def hold(self, name: str, conv_key: str, previous: str | None) -> None:
        """`name` now holds the CLI session of `conv_key` (moved from `previous`, if another)."""
        pipe = self.r.pipeline()
        if previous and previous != name and previous in self.by_name:
            pipe.zrem(self.convs_key(previous), conv_key)
        pipe.zadd(self.convs_key(name), {conv_key: time.time()})
        pipe.expire(self.convs_key(name), 8 * 86400)
        pipe.execute()

    def release(self, name: str | None, conv_key: str) -> None:
        if name in self.by_name:
            self.r.zrem(self.convs_key(name), conv_key)

    # -- what the CLI reported -------------------------------------------------------------------
    def note_turn(self, name: str, info: dict[str, Any] | None, ok: bool, family: str = "", tokens: int = 0) -> None:
        """Record a turn's `rate_limit_event` (the meter), apply the overage policy, raise alerts. A turn
        of a model `family` that succeeded ends that family's refusal by the per-model bucket."""
        now = time.time()
        key = self.key(name)
        fields: dict[str, Any] = {"updated": now}
        gone: list[str] = []
        if ok:
            gone += ["login_problem", "login_until", *([family_key(family)] if family else [])]
        if info:
            for w, vals in windows_of(info).items():
                if "resets_at" in vals and "utilization" not in vals:
                    gone.append(f"{w}_util")  # a period whose use was not reported: unknown, not the old one's
                for field, suffix in (("utilization", "util"), ("resets_at", "reset"), ("status", "status"),
                                      ("surpassed", "surpassed")):
                    if field in vals:
                        fields[f"{w}_{suffix}"] = vals[field]
                    elif field in ("status", "surpassed"):
                        gone.append(f"{w}_{suffix}")  # what this turn did not report is not the last one's
            fields.update(learnt_fields(self.r.hgetall(key), windows_of(info), tokens))
            fields["status"] = info.get("status") or ""
            fields["overage_status"] = info.get("overageStatus") or ""
            fields["overage_in_use"] = "1" if uses_overage(info) else "0"
        pipe = self.r.pipeline()
        if gone:
            pipe.hdel(key, *gone)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, 8 * 86400)
        pipe.execute()
        if not info:
            return
        self.notices.thresholds_crossed(name, info, now)
        if uses_overage(info):
            reset = limit_reset(info, now) or now + UNKNOWN_LIMIT_S
            what = f"account {name} is drawing on overage (extra usage) until {_iso(reset)}"
            self.notices.overage(name, f"Claude account {name}: the CLI reports it is drawing on extra usage "
                                 f"(overage); policy {self.overage_policy}.", reset, now,
                                 {"resets_at": _iso(reset), "policy": self.overage_policy})
            if self.overage_policy == "block":
                self._cool_down(name, reset, "overage", what + "; blocked by the overage policy")

    def note_error(self, name: str, err: RelayError, info: dict[str, Any] | None = None, family: str = "") -> None:
        """A failed turn: a limit cools the account down until its reset (a refusal by the per-model bucket
        only for the turn's model `family`), a broken login takes it out for `login_recheck_s`, a refusal
        for extra usage counts as overage."""
        now = time.time()
        code = getattr(err, "code", None)
        self.r.hset(self.key(name), mapping={"last_error": f"{code or type(err).__name__}: {err.message}"[:500],
                                             "last_error_at": now})
        if info:
            self.note_turn(name, info, ok=False)
        model_reset = model_rejection(info) if isinstance(err, SubscriptionLimited) and family else None
        if model_reset is not None or (isinstance(err, SubscriptionLimited) and family and info
                                       and info.get("rateLimitType") == "seven_day_overage_included"):
            until = min(model_reset or now + (err.retry_after or UNKNOWN_LIMIT_S), now + MAX_COOLDOWN_S)
            self.r.hset(self.key(name), family_key(family), until)
            self.emit("model_limited", name, f"Claude account {name}: its per-model weekly bucket refuses "
                      f"{family} models until {_iso(until)}; it still serves other models.",
                      f"model_limited:{name}:{family}", ttl=max(60, int(until - now)),
                      details={"family": family, "window": "seven_day_overage_included", "until": _iso(until)})
            log.warning("account %s: %s models refused by the per-model bucket until %s", name, family, _iso(until))
        elif isinstance(err, SubscriptionLimited):
            until = now + (err.retry_after or UNKNOWN_LIMIT_S)
            self._cool_down(name, until, "limit", err.message)
        elif code == "extra_usage_required":
            reset = limit_reset(info or {}, now) or now + UNKNOWN_LIMIT_S
            self.notices.overage(name, f"Claude account {name}: Anthropic asks for extra usage to answer "
                                 "(\"Third-party apps now draw from your extra usage\").", reset, now,
                                 {"policy": self.overage_policy})
            self._cool_down(name, reset, "overage", f"account {name} would draw on extra usage: {err.message}")
        elif code == "cli_login_required":
            until = now + self.login_recheck_s
            self.r.hset(self.key(name), mapping={"login_until": until, "login_problem": err.message[:500]})
            self.emit("login_failing", name, f"Claude account {name}: its login does not work: {err.message}",
                      f"login:{name}", ttl=int(self.login_recheck_s) + 1)
            log.error("account %s: login failed; not used for %.0f s", name, self.login_recheck_s)

    def note_login_problem(self, name: str, problem: str) -> None:
        """A login known to be broken without a run (e.g. its token variable is not set)."""
        self.r.hset(self.key(name), mapping={"login_until": time.time() + 10 * 365 * 86400,
                                             "login_problem": problem})

    def _cool_down(self, name: str, until: float, kind: str, reason: str) -> None:
        """Out until `until` (at most MAX_COOLDOWN_S: no window lasts longer, whatever reset the CLI gave);
        the operator hears of it when the account goes from usable to limited, not at every refusal."""
        key, now = self.key(name), time.time()
        until = min(until, now + MAX_COOLDOWN_S)
        old = float(self.r.hget(key, "cooldown_until") or 0)
        self.r.hset(key, mapping={"cooldown_until": max(until, old), "cooldown_kind": kind,
                                  "cooldown_reason": reason[:500]})
        self.r.expire(key, max(8 * 86400, int(until - now) + 60))
        log.warning("account %s limited (%s) until %s", name, kind, _iso(until))
        if old <= now:
            self.notices.limited(name, until, kind, reason, now)

    def clear(self, name: str) -> dict[str, Any]:
        """An admin's reset of the account's limit, overage and login state (the windows stay as the CLI
        last reported them); the state as it was, for the log. Raises KeyError for an unknown account."""
        if name not in self.by_name:
            raise KeyError(name)
        key = self.key(name)
        before = self.state(name)
        self.r.hdel(key, *CLEARED)
        self.notices.cleared(name)
        log.warning("account %s: state cleared by an admin (was: %s)", name,
                    usability(before).kind or "usable")
        return before

    def recoveries(self) -> None:
        """Raise `account_recovered` for accounts whose cooldown ended (called by the alert loop)."""
        now = time.time()
        for s in self.specs:
            st = self.state(s.name)
            until = float(st.get("cooldown_until") or 0)
            if until and until <= now and not st.get("recovered_alerted") == str(int(until)):
                self.r.hset(self.key(s.name), "recovered_alerted", str(int(until)))
                self.notices.recovered(s.name, until)

    # -- choosing --------------------------------------------------------------------------------
    def try_slot(self, name: str, member: str, moving: bool = False) -> bool:
        """`moving`: the run's conversation moves here from another account (within the failover ramp)."""
        spec = self.by_name[name]
        cap = self.ramp.cap(self._id(name), spec.max_concurrent) if moving else spec.max_concurrent or NO_SLOT_LIMIT
        return self.leases.try_slot(self.slot_key(name), cap, member)

    def acquire(self, sticky: str | None, exclude: list[str], member: str, wait_s: float,
                problems: dict[str, str], conv_ttl_s: float, family: str = "", estimate: int = 0) -> str:
        """Choose the account for a run and take one of its slots (held by `member`); waits up to
        `wait_s` for a slot. A conversation waits for its own account's slot (its prompt cache is
        there) and moves only at the deadline. Raises when no account can take the run."""
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            views = self.views(conv_ttl_s, problems)
            estimate = estimate if self.overage_policy == "block" else 0  # never into extra usage unnoticed
            order = choose(views, sticky, exclude, family=family, estimate=estimate)
            if not order:
                raise self.unusable_error(views, exclude, family, estimate)
            last = time.monotonic() >= deadline
            if sticky and order[0].name == sticky and not last:
                order = order[:1]
            for v in order:
                if self.try_slot(v.name, member, moving=bool(exclude) or bool(sticky and sticky != v.name)):
                    return v.name
            if last:
                caps = ", ".join(f"{v.name} ({v.max_concurrent})" for v in order)
                raise RateLimited(f"Every usable Claude account is running as many requests as it may at once: "
                                  f"{caps}; retry shortly.", retry_after=max(1.0, wait_s / 2))
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.25)

    def unusable_error(self, views: list[AccountView], exclude: list[str] | None = None,
                       family: str = "", estimate: int = 0) -> RelayError:
        """No account can take the run: 429 with the earliest reset, or 503 when only logins are broken."""
        return no_account_error(views, len(self.specs) == 1, exclude, time.time(), family, estimate)

"""The alerts of the accounts' state changes, deduplicated on the state, never on what the CLI reported.

A reset time, a utilization or a reason comes from the CLI's events, which a forged line or a changed
upstream could vary at will; were they part of an alert's id, every variant would be a new alert. So the
ids name only the account and the state (`limited:<account>`), and each is claimed for a window. A
threshold alert's id also names the window's period, `threshold:<account>:<window>:<threshold>:<period>`,
where the period is the reset to the hour, and only a reset within the window's length from now counts
(any other names the period "?"): the claim is a Redis SET NX, so of all workers and hosts exactly one
sends it, once per window period (the next period's crossing is news again), and a forged reset can name
at most the hours of one window length. Anthropic's own `surpassedThreshold` counts as one more threshold.
The claims: an account's limit is announced when it starts (not again while it lasts,
whatever the next refusal says), its recovery when it ends, and each of them at most once per
`alerts.repeat_window_s`, however often a forged reset makes the account flip. An admin's `clear` ends the
claims, so the account's next state change is news again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..core.routing import WINDOW_S, windows_of

Emit = Callable[..., bool]
Forget = Callable[..., None]
LABEL = {"five_hour": "5-hour", "seven_day": "weekly", "seven_day_overage_included": "per-model weekly"}
MAX_TTL_S = 8 * 86400


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class AccountAlerts:
    def __init__(self, emit: Emit, thresholds: list[float], repeat_s: float = 3600.0,
                 forget: Forget | None = None) -> None:
        self.emit, self.thresholds, self.repeat_s = emit, sorted(thresholds), repeat_s
        self.forget: Forget = forget or (lambda *ids: None)

    def _ttl(self, until: float | None, now: float, longest: float = MAX_TTL_S) -> int:
        """An alert's claim lasts until the state it names may have changed (the reset the CLI gave, within
        what the window can be), and never less than the repeat window."""
        left = (until - now) if until else longest
        return int(max(self.repeat_s, min(max(left, 0.0), longest, MAX_TTL_S)))

    def thresholds_crossed(self, name: str, info: dict[str, Any], now: float) -> None:
        for w, vals in windows_of(info).items():
            util, reset = vals.get("utilization"), vals.get("resets_at")
            if util is None:
                continue
            util = min(max(util, 0.0), 1.0)  # a report above 100 % is still "full"
            period = str(int(reset // 3600)) if reset and now < reset <= now + WINDOW_S[w] else "?"
            marks = set(self.thresholds)
            if vals.get("surpassed") is not None and 0 < vals["surpassed"] <= 1:
                marks.add(float(vals["surpassed"]))
            for t in sorted(marks):
                if util >= t:  # once per window period and threshold, whichever worker saw it first
                    self.emit("utilization_threshold", name,
                              f"Claude account {name}: {LABEL[w]} window at {util:.0%} (threshold {t:.0%})",
                              f"threshold:{name}:{w}:{t}:{period}", ttl=self._ttl(reset, now, WINDOW_S[w]),
                              details={"window": w, "utilization": util, "threshold": t,
                                       "status": vals.get("status"), "surpassed_threshold": vals.get("surpassed"),
                                       "resets_at": _iso(reset) if reset else None})

    def overage(self, name: str, text: str, reset: float, now: float, details: dict[str, Any]) -> None:
        self.emit("overage_detected", name, text, f"overage:{name}", ttl=self._ttl(reset, now),
                  details=details)

    def limited(self, name: str, until: float, kind: str, reason: str, now: float) -> None:
        """The account just became limited (the caller saw it usable before)."""
        self.emit("account_limited", name, f"Claude account {name} is limited until {_iso(until)}: {reason}",
                  f"limited:{name}", ttl=self._ttl(until, now), details={"kind": kind, "until": _iso(until)})

    def recovered(self, name: str, until: float) -> None:
        """Its cooldown ended (the caller saw it limited before)."""
        self.emit("account_recovered", name, f"Claude account {name} is usable again "
                  f"(its limit reset at {_iso(until)}).", f"recovered:{name}", ttl=int(self.repeat_s))

    def cleared(self, name: str) -> None:
        """An admin cleared the account's state: its next limit, overage or recovery is news again."""
        self.forget(f"limited:{name}", f"overage:{name}", f"recovered:{name}")

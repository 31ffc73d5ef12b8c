"""The quota meter as people and monitors read it: one account's entry for `GET /v1/accounts` and
`/health`, and its status for the metrics and the dashboard, from its stored state (state/accounts.py)."""

from __future__ import annotations

import time
from typing import Any

from ..core.metrics import AccountStatus, WindowStatus
from ..core.routing import WINDOWS, AccountView, at_reserve, family_key, usability, window


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def meter_entry(v: AccountView, now: float, overage_policy: str) -> dict[str, Any]:
    st, u = v.state, usability(v.state, now)
    windows = {}
    for w in WINDOWS:
        win = window(st, w, now)
        if win is None and w not in ("five_hour", "seven_day"):
            continue  # the per-model bucket: only on plans whose answers report it
        win = win or {"utilization": None, "resets_at": None, "status": None, "surpassed_threshold": None,
                      "stale": False}
        reset = win["resets_at"]
        windows[w] = dict(win, resets_at=iso(reset) if reset else None,
                          resets_in_s=max(0, round(reset - now)) if reset else None)
    families = {f: iso(float(st[family_key(f)])) for f in ("opus", "sonnet", "haiku")
                if float(st.get(family_key(f)) or 0) > now}
    return {
        "name": v.name, "priority": v.priority, "max_concurrent": v.max_concurrent or None,
        "usable": u.usable, "state": "ok" if u.usable else u.kind, "reason": u.reason or None,
        "until": iso(u.until) if u.until and not u.usable else None,
        "retry_after_s": round(u.until - now) if u.until and not u.usable else None,
        "windows": windows, "status": st.get("status") or None,
        "reserve": v.reserve or None, "at_reserve": at_reserve(st, v.reserve, now) or None,
        "model_limits": families,
        "overage": {"status": st.get("overage_status") or None, "in_use": st.get("overage_in_use") == "1",
                    "policy": overage_policy},
        "in_flight": v.in_flight, "conversations": v.conversations,
        "last_error": st.get("last_error") or None,
        "last_error_at": iso(float(st["last_error_at"])) if st.get("last_error_at") else None,
        "updated_at": iso(float(st["updated"])) if st.get("updated") else None,
    }


def status_of(v: AccountView, now: float) -> AccountStatus:
    """Limited or not, each window (a stale one without utilization), the fuller window's utilization and
    when the limit or that window resets."""
    u = usability(v.state, now)
    wins = []
    for w in WINDOWS:
        win = window(v.state, w, now)
        if win is not None:
            wins.append(WindowStatus(w, win["utilization"], win["resets_at"], win["status"] or "", win["stale"]))
    known = [x for x in wins if x.utilization is not None and x.name != "seven_day_overage_included"]
    fullest = max(known, key=lambda x: x.utilization or 0.0) if known else None
    resets = u.until if not u.usable else (fullest.resets_at if fullest else None)
    return AccountStatus(name=v.name, limited=not u.usable, utilization=fullest.utilization if fullest else None,
                         resets_at=resets, reason=u.reason or "", windows=tuple(wins))

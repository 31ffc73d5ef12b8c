"""What the dashboard and the self-service page show, assembled from the stores behind `/v1/usage` and `/metrics`.

Both read the same stores as `/v1/usage` (`Stats.usage`) and the quotas (`Quotas`), so the numbers match.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .. import health
from ..core.charts import meter, stacked_bars
from ..core.metrics import AccountStatus, WindowStatus, pivot
from ..runtime import Relay
from ..state.apikeys import ApiKey

HOURS, DAYS = 24, 14


WINDOW_LABEL = {"five_hour": "5-hour", "seven_day": "weekly", "seven_day_overage_included": "per-model wk"}


def _until(ts: float | None, now: float) -> str:
    """`resets in 3 h 12 min` (or `in 2 d 4 h` for a weekly window)."""
    if not ts:
        return "reset time not reported"
    left = max(0, int(ts - now))
    d, h, m = left // 86400, left % 86400 // 3600, left % 3600 // 60
    return "resets in " + (f"{d} d {h} h" if d else f"{h} h {m} min" if h else f"{m} min")


def _window_bar(account: str, w: WindowStatus, now: float) -> str:
    """One window as a bar with the time to its reset; a stale window (its reset passed with no turn since)
    says so with an empty track, never as 0 %."""
    label = f"{account} {WINDOW_LABEL.get(w.name, w.name)}"
    if w.stale or w.utilization is None:
        return meter(label, 0, 100, "no turn since its reset" if w.stale else "", shown="unknown (stale)"
                     if w.stale else "not reported")
    status = f" · {w.status.replace('_', ' ')}" if w.status and w.status != "allowed" else ""
    return meter(label, w.utilization * 100, 100, _until(w.resets_at, now),
                 shown=f"{w.utilization * 100:.0f} %{status}")


def _account(a: AccountStatus) -> dict[str, Any]:
    now = time.time()
    if a.limited:
        pct, shown, note = 100.0, "limited", "until " + time.strftime("%H:%M UTC", time.gmtime(a.resets_at or 0))
    elif a.utilization is None:
        stale = any(w.stale for w in a.windows)
        pct, shown, note = 0.0, "usable", "stale: no turn since the reset" if stale else "no window reported yet"
    else:
        pct, shown, note = a.utilization * 100, f"{a.utilization * 100:.0f} % of the fuller window", ""
    return dict(a.__dict__, windows=[dict(w.__dict__) for w in a.windows],
                meter=meter(a.name, pct, 100, note, shown=shown),
                window_meters=[_window_bar(a.name, w, now) for w in a.windows])


def _charts(relay: Relay, key: ApiKey | None = None) -> list[dict[str, str]]:
    hours, days = relay.metrics.hours(HOURS), relay.metrics.days(DAYS)
    h_labels = [h[-2:] + "h" for h, _ in hours]
    d_labels = [d[5:] for d, _ in days]
    out = []
    dims = ("key", "model", "account") if key is None else ("key_id",)
    for dim in dims:
        by_hour = pivot(hours, "requests", dim)
        by_day = pivot(days, "tokens", dim)
        if key is not None:  # a key's own page: its own series only, by its id (not a predecessor's name)
            by_hour = {key.name: by_hour[key.id]} if key.id in by_hour else {}
            by_day = {key.name: by_day[key.id]} if key.id in by_day else {}
        shown = "key" if dim == "key_id" else dim
        out.append({"name": f"hour_{shown}", "svg": stacked_bars(
            f"Requests per hour (UTC, last {HOURS} h) by {shown}", h_labels, by_hour, tick_every=3)})
        out.append({"name": f"day_{shown}", "svg": stacked_bars(
            f"Tokens per day (last {DAYS} days) by {shown}", d_labels, by_day, tick_every=2)})
    return out


def _errors(relay: Relay) -> dict[str, Any]:
    stored = relay.metrics.counters()
    by_status: dict[str, int] = {}
    by_endpoint: dict[str, dict[str, int]] = {}
    for field, n in stored.get("requests", {}).items():
        endpoint, status = json.loads(field)[:2]
        by_status[status] = by_status.get(status, 0) + int(n)
        e = by_endpoint.setdefault(endpoint, {"requests": 0, "errors": 0})
        e["requests"] += int(n)
        e["errors"] += int(n) if status not in ("200", "499") else 0
    for e in by_endpoint.values():
        e["error_rate"] = round(e["errors"] / e["requests"], 4) if e["requests"] else 0.0  # type: ignore[assignment]

    def flat(family: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for field, n in stored.get(family, {}).items():
            label = json.loads(field)[0]
            out[label] = out.get(label, 0) + int(n)
        return out
    total = sum(by_status.values())
    errors = sum(n for s, n in by_status.items() if s not in ("200", "499"))
    return {"by_status": dict(sorted(by_status.items())), "by_endpoint": by_endpoint,
            "error_rate": round(errors / total, 4) if total else 0.0,
            "rejections": flat("rejections"), "cli_failures": flat("cli_failures")}


def _key_row(relay: Relay, key: ApiKey, used: int) -> dict[str, Any]:
    return {"name": key.name, "admin": key.admin, "rpm": key.rpm, "tokens_per_day": key.tokens_per_day,
            "max_concurrent": key.max_concurrent, "models": list(key.models) if key.models else None,
            "tokens_today": used, "running": relay.slots.key_in_use(key.name),
            "meter": meter(key.name, used, key.tokens_per_day, "tokens today")}


def dashboard(relay: Relay) -> dict[str, Any]:
    live = health.live(relay)
    used_all, _ = relay.quotas.used_today(None)
    global_limit = relay.settings["rate_limit.max_tokens_per_day"]
    accounts = [_account(a) for a in live.accounts]
    by_name: dict[str, list[ApiKey]] = {}
    for k in relay.keys.keys:
        by_name.setdefault(k.name, []).append(k)
    # one row per name; its tokens are those of the keys it has now (a revoked predecessor's are not)
    keys = [_key_row(relay, same[0], sum(relay.quotas.used_today(k.id)[1] for k in {k.id: k for k in same}.values()))
            for same in by_name.values()]
    return {
        "object": "dashboard", "host": live.host, "generated_at": time.time(),
        "usage": relay.stats.usage(),
        "charts": _charts(relay),
        "accounts": accounts,
        "relay_quota": {"tokens_today": used_all, "tokens_per_day": global_limit or None,
                        "meter": meter("whole relay", used_all, global_limit or None, "tokens today")},
        "keys": keys,
        "live": {"active_runs": live.active_runs, "max_concurrent_runs": live.max_runs, "queued": live.queued,
                 "oldest_wait_s": live.oldest_wait_s, "warm": dict(live.warm.__dict__),
                 "runs": relay.slots.running(),
                 "meter": meter("run slots", live.active_runs, live.max_runs, f"{live.queued} waiting")},
        "recent": relay.stats.recent(50),
        "errors": _errors(relay),
    }


def own_usage(relay: Relay, key: ApiKey) -> dict[str, Any]:
    """One key's own view: usage (as /v1/usage shows it to that key), limits and what is left today."""
    _, used = relay.quotas.used_today(key.id)  # by id: a re-issued name starts afresh
    budget = relay.quotas.state(key)
    return {
        "object": "key_usage", "key": key.name, "generated_at": time.time(),
        "usage": relay.stats.usage(key=key.name, key_id=key.id),  # by id: a re-issued name starts afresh
        "limits": {"rpm": key.rpm, "tokens_per_day": key.tokens_per_day, "max_concurrent": key.max_concurrent,
                   "models": list(key.models) if key.models else None},
        "today": {"tokens_used": used,
                  "tokens_left": budget["remaining"] if budget else None,
                  "limited_by": budget["who"] if budget else None,
                  "resets_in_s": round(budget["reset_s"]) if budget else None,
                  "running": relay.slots.key_in_use(key.name),
                  "meter": meter("tokens today", used, key.tokens_per_day, "resets at midnight UTC")},
        "charts": _charts(relay, key=key),
        "recent": relay.stats.recent(20, key=key.name, key_id=key.id),
        # its share of each subscription window (api_keys[].window_share), per account
        "window_shares": {"limit": key.window_share, "windows": relay.shares.of_key(relay.accounts, key.id,
                                                                                     key.window_share)},
    }

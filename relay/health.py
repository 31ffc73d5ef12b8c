"""What operators see of a host, read now: the accounts' meters, why none can answer, the gauges, uptime."""

from __future__ import annotations

import time
from typing import Any

import psutil

from .core.metrics import Live
from .runtime import Relay


def account_meter(relay: Relay) -> list[dict[str, Any]]:
    return relay.accounts.snapshot(relay.settings["sessions.ttl_hours"] * 3600, relay.account_problems)


def account_summary(relay: Relay) -> dict[str, Any]:
    """Why no account can answer (cooldown until the earliest reset, or the broken login)."""
    views = relay.accounts.views(problems=relay.account_problems)
    err = relay.accounts.unusable_error(views)
    if err.code == "cli_login_required":
        return {"login_problem": err.message}
    until = time.time() + (err.retry_after or 0)
    return {"cooldown_until": until, "cooldown_reason": err.message}


def uptime(relay: Relay) -> float:
    """Seconds since the gunicorn master started (a bare worker counts from its own start)."""
    try:
        parent = psutil.Process().parent()
        if parent and "gunicorn" in " ".join(parent.cmdline()):
            return time.time() - parent.create_time()
    except psutil.Error:
        pass
    return time.time() - relay.started


def live(relay: Relay) -> Live:
    """The gauges of this host: runs, the queue, the warm pool, every account with its limit state."""
    queued, oldest = relay.slots.waiting(relay.settings["queue_timeout_s"])
    return Live(host=relay.host, active_runs=relay.slots.in_use(), max_runs=relay.settings["max_concurrent_runs"],
                queued=queued, oldest_wait_s=round(oldest, 3), warm=relay.pool.warm_stats(),
                accounts=relay.accounts.statuses(problems=relay.account_problems))

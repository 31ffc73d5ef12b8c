"""What operators see of a host, read now: the accounts' meters, why none can answer, the gauges, uptime,
what is down (the master's helpers, Redis) and the alerts that say so."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import psutil

from .core.metrics import Live
from .runtime import Relay
from .supervise import read_status

log = logging.getLogger("relay.health")


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


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def helpers(relay: Relay) -> dict[str, Any]:
    """The gunicorn master's helpers (private Redis, pool server) as its supervisor last described
    them; {} when it supervises none (an external Redis and no pool, or a worker without gunicorn)."""
    found = read_status(relay.settings.path("var_dir"), os.getppid()).get("helpers")
    return found if isinstance(found, dict) else {}


def outages(relay: Relay, helper_view: dict[str, Any], redis_ok: bool) -> dict[str, Any]:
    """What is down right now and since when: a helper of the master, or Redis as this worker sees it."""
    down: dict[str, Any] = {}
    for name, h in helper_view.items():
        if h.get("state") != "up":
            down[name] = {"since": _iso(h.get("since")), "state": h.get("state"),
                          "restarts_last_minute": h.get("restarts_last_minute")}
    since = relay.redis_down_since()
    if not redis_ok and "redis" not in down:
        down["redis"] = {"since": _iso(since), "state": "unreachable"}
    return down


class OutageAlerts:
    """Tells the operator (the alert outbox) when a helper of the master died: once it is back (with how
    long it was away), or while it stays down longer than `slow_s` (crash-looping). Every worker reads the
    supervisor's file; the alert id makes it one alert per outage and host. An alert Redis cannot take
    yet (its own outage) is offered again until it can."""

    def __init__(self, relay: Relay, slow_s: float = 10.0) -> None:
        self.relay, self.slow_s = relay, slow_s
        self.done: set[str] = set()

    def tick(self) -> None:
        now = time.time()
        for name, h in helpers(self.relay).items():
            out = h.get("last_outage") or {}
            if not out.get("down_since"):
                continue
            label = "The private Redis" if name == "redis" else "The pool server" if name == "pool" else name
            base = f"helper:{self.relay.host}:{name}:{int(out['down_since'] * 1000)}"
            details = dict(out, helper=name, restarts=h.get("restarts"))
            if out.get("back_at"):
                alert_id, event = base + ":back", "helper_restarted"
                text = (f"{label} on {self.relay.host} went down at {_iso(out['down_since'])} ({out.get('exit')}) "
                        f"and was restarted after {out.get('downtime_s')} s.")
            elif now - out["down_since"] >= self.slow_s:
                alert_id, event = base + ":down", "helper_down"
                text = (f"{label} on {self.relay.host} is down since {_iso(out['down_since'])} "
                        f"({h.get('restarts_last_minute')} restarts in the last minute; {h.get('problem') or 'retrying'}).")
            else:
                continue
            if alert_id in self.done:
                continue
            try:
                self.relay.alerts.offer(event, None, text, alert_id, details=details)
            except Exception as exc:  # Redis away: offered again on the next tick
                log.debug("outage alert %s waits: %s", alert_id, exc)
                return
            self.done.add(alert_id)

    def run(self, interval: float = 1.0) -> None:
        def loop() -> None:
            while True:
                time.sleep(interval)
                try:
                    self.tick()
                except Exception as exc:  # keep watching
                    log.warning("outage alerts: %s", exc)
        threading.Thread(target=loop, daemon=True, name="outage-alerts").start()

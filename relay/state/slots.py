"""Run slots: how many CLI runs this host and each API key may have at once, who is waiting, what is running."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from .connection import PREFIX
from .leases import Leases

STALE_GRACE_S = 60.0  # a waiter left behind by a killed worker is forgotten this long after its time-out


class RunSlots:
    def __init__(self, r: Any, leases: Leases, host: str) -> None:
        self.r, self.leases, self.host = r, leases, host
        self.host_key = f"{PREFIX}slots:{host}"
        self.queue_key = PREFIX + "queued"
        self.waiting_key = f"{PREFIX}waiting:{host}"  # member -> when it started waiting for a host slot
        self.runs_key = f"{PREFIX}runs:{host}"       # slot member -> what it runs (for the dashboard)

    def key_slots(self, key_name: str) -> str:
        return f"{PREFIX}keyslots:{key_name}"

    def wait(self, key: str, limit: int, member: str, timeout: float, count_waiter: bool = False) -> bool:
        attempt: Callable[[], bool] = lambda: self.leases.try_slot(key, limit, member)  # noqa: E731
        if not count_waiter:
            return self.leases.wait_for(attempt, timeout)
        if attempt():
            return True
        if timeout <= 0:
            return False
        self.r.zadd(self.waiting_key, {member: time.time()})
        try:
            return self.leases.wait_for(attempt, timeout, queued_key=self.queue_key)
        finally:
            self.r.zrem(self.waiting_key, member)

    def in_use(self) -> int:
        return self.leases.slot_count(self.host_key)

    def key_in_use(self, key_name: str) -> int:
        return self.leases.slot_count(self.key_slots(key_name))

    def queued(self) -> int:
        return max(0, int(self.r.get(self.queue_key) or 0))

    def waiting(self, max_wait_s: float) -> tuple[int, float]:
        """Requests waiting for a host slot on this host, and the longest wait in seconds (0 when none).
        Nobody waits longer than `max_wait_s` (queue_timeout_s), so older entries are a killed worker's."""
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.zremrangebyscore(self.waiting_key, "-inf", now - max_wait_s - STALE_GRACE_S)
        pipe.zcard(self.waiting_key)
        pipe.zrange(self.waiting_key, 0, 0, withscores=True)
        _, count, first = pipe.execute()
        return int(count), (max(0.0, now - float(first[0][1])) if first else 0.0)

    # -- what runs, for the dashboard ---------------------------------------------------------------
    def describe(self, member: str, info: dict[str, Any]) -> None:
        self.r.hset(self.runs_key, member, json.dumps(info, separators=(",", ":")))
        self.r.expire(self.runs_key, 86400)

    def forget(self, member: str) -> None:
        self.r.hdel(self.runs_key, member)

    def running(self) -> list[dict[str, Any]]:
        """Runs holding a live host slot (entries of a killed worker vanish with its lease)."""
        held = set(self.r.zrangebyscore(self.host_key, time.time(), "+inf"))
        out = []
        for member, raw in self.r.hgetall(self.runs_key).items():
            if member in held:
                out.append(json.loads(raw))
            else:
                self.r.hdel(self.runs_key, member)
        return sorted(out, key=lambda i: i.get("started", 0))

"""Run slots: how many CLI runs this host and each API key may have at once, and who is waiting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .connection import PREFIX
from .leases import Leases


class RunSlots:
    def __init__(self, r: Any, leases: Leases, host: str) -> None:
        self.r, self.leases, self.host = r, leases, host
        self.host_key = f"{PREFIX}slots:{host}"
        self.queue_key = PREFIX + "queued"

    def key_slots(self, key_name: str) -> str:
        return f"{PREFIX}keyslots:{key_name}"

    def wait(self, key: str, limit: int, member: str, timeout: float, count_waiter: bool = False) -> bool:
        attempt: Callable[[], bool] = lambda: self.leases.try_slot(key, limit, member)  # noqa: E731
        return self.leases.wait_for(attempt, timeout, queued_key=self.queue_key if count_waiter else None)

    def in_use(self) -> int:
        return self.leases.slot_count(self.host_key)

    def queued(self) -> int:
        return max(0, int(self.r.get(self.queue_key) or 0))

"""Failover storm control's shared state: when each receiving account's ramp began (core/storm.py)."""

from __future__ import annotations

import time
from typing import Any

from ..core.storm import ramp_cap
from .connection import PREFIX

NO_LIMIT = 10**6


class FailoverRamp:
    """A receiving account's runs for moving conversations start at `start` at once and reach its limit
    (or the host's, `full`) over `ramp_s` seconds; the first mover starts the ramp, for every worker."""

    def __init__(self, r: Any, ramp_s: float = 0.0, start: int = 1, full: int = NO_LIMIT) -> None:
        self.r, self.ramp_s, self.start, self.full = r, ramp_s, start, full

    def cap(self, account_id: str, max_concurrent: int) -> int:
        full = max_concurrent or self.full
        if self.ramp_s <= 0:
            return full
        key, now = f"{PREFIX}acctramp:{account_id}", time.time()
        self.r.set(key, now, nx=True, ex=max(1, int(self.ramp_s)))
        began = float(self.r.get(key) or now)
        return ramp_cap(now - began, self.ramp_s, self.start, full)

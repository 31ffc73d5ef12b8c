"""The witness of one agent run: every API answer its credential proxy forwarded, summed (thread-safe:
the proxy serves each call in a thread of its own). What is read of each answer: core/witness.py."""

from __future__ import annotations

import threading
from typing import Any

from ..core.events import USAGE_KEYS, Turn
from ..core.witness import CallMeter


class Witness:
    """Every API call of one agent run, as its proxy forwarded it (thread-safe: one thread per call)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0                     # answered /v1/messages calls
        self.usage = {k: 0 for k in USAGE_KEYS}
        self.info: dict[str, Any] | None = None   # the newest unified rate-limit headers
        self.last_status = 0
        self.last_error = ""

    def record(self, meter: CallMeter) -> None:
        with self._lock:
            if meter.info is not None:
                self.info = meter.info
            if not meter.billed:
                return
            self.calls += 1
            self.last_status = meter.status
            self.last_error = meter.error_text() if meter.status >= 400 else ""
            for k, v in meter.usage.items():
                self.usage[k] += v

    def total(self) -> dict[str, int]:
        with self._lock:
            return dict(self.usage, reasoning_tokens=0)

    def turn(self) -> Turn:
        """What the run's last call says for the account, in the terms `upstream.classify` reads: the
        headers as the rate-limit event, and an error answer as a failed result with its status."""
        with self._lock:
            t = Turn(rate_limit=dict(self.info) if self.info else None, done=True)
            if self.last_status >= 400:
                t.result = {"is_error": True, "api_error_status": self.last_status,
                            "result": f"API Error: {self.last_status} {self.last_error}"}
            return t

"""Writes that met a Redis outage, kept in this worker and replayed in order once Redis answers again.

A run that finishes while Redis is down (restarting, or an external Redis away) still gets its usage
counted: the record, the metrics and the quota charge each wait here as one write. Only writes that
failed to reach Redis wait (a write that failed for any other reason is not retried), so nothing is
counted twice. The backlog lives in the worker's memory: a worker killed outright loses it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from ..errors import RedisUnavailable

log = logging.getLogger("relay.stats")
MAX_WAITING = 20000   # about an hour of a busy host's records; beyond it the oldest are dropped


class Backlog:
    def __init__(self, limit: int = MAX_WAITING) -> None:
        self._waiting: deque[tuple[str, Callable[[], None]]] = deque()
        self.limit = limit
        self.dropped = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __len__(self) -> int:
        return len(self._waiting)

    def write(self, what: str, write: Callable[[], None]) -> bool:
        """Run `write` now; if Redis is unreachable, keep it for later (False). Other errors raise."""
        if self._waiting:  # keep the order: earlier writes first
            self.flush()
        if not self._waiting:
            try:
                write()
                return True
            except RedisUnavailable:
                pass
        with self._lock:
            if len(self._waiting) >= self.limit:
                self._waiting.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("Redis backlog full: %d writes dropped so far", self.dropped)
            if not self._waiting:
                log.warning("Redis unreachable: keeping this worker's records until it is back")
            self._waiting.append((what, write))
        return False

    def flush(self) -> int:
        """Replay what waits, oldest first, until Redis fails again; how many went through."""
        done = 0
        while True:
            with self._lock:
                if not self._waiting:
                    break
                what, write = self._waiting[0]
                try:
                    write()
                except RedisUnavailable:
                    return done
                except Exception as exc:  # a write Redis refuses for good: never block the others on it
                    log.error("backlog: dropping a %s write Redis refused: %s", what, exc)
                self._waiting.popleft()
                done += 1
        if done:
            log.info("Redis is back: %d delayed writes recorded", done)
        return done

    def run(self, interval: float = 1.0) -> None:
        """Retry in the background, every `interval` seconds while anything waits."""
        def loop() -> None:
            while not self._stop.wait(interval):
                if self._waiting:
                    self.flush()
        threading.Thread(target=loop, daemon=True, name="redis-backlog").start()

    def stop(self) -> None:
        """At the worker's exit: one last try."""
        self._stop.set()
        if self._waiting:
            self.flush()
            if self._waiting:
                log.error("worker exits with %d writes Redis never took (it was unreachable)", len(self._waiting))

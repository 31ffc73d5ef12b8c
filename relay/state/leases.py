"""Leases (run slots and conversation locks) that expire on their own.

A lease is held by a live run and renewed by a heartbeat; if the worker dies (even by SIGKILL) the
lease lapses after `LEASE_TTL` seconds, so nothing stays stuck.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .connection import PREFIX, TROUBLE

log = logging.getLogger("relay.store")
LEASE_TTL = 15.0          # seconds a lease survives without renewal

_ACQUIRE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('EXPIRE', KEYS[1], 3600)
  return 1
end
return 0
"""
_RENEW_SLOT = "if redis.call('ZSCORE', KEYS[1], ARGV[2]) then redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) " \
              "return 1 end return 0"
_RELEASE_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) " \
              "end return 0"


class Leases:
    """Slot sets (at most N members) and exclusive locks, all expiring without a heartbeat."""

    def __init__(self, r: Any, ttl: float = LEASE_TTL) -> None:
        self.r = r
        self.ttl = ttl
        self._acquire = r.register_script(_ACQUIRE_SLOT)
        self._renew_slot = r.register_script(_RENEW_SLOT)
        self._release_lock = r.register_script(_RELEASE_LOCK)
        self._renew_lock = r.register_script(_RENEW_LOCK)

    # slots ---------------------------------------------------------------------------------------
    def try_slot(self, key: str, limit: int, member: str) -> bool:
        now = time.time()
        return bool(self._acquire(keys=[key], args=[now, limit, now + self.ttl, member]))

    def slot_count(self, key: str) -> int:
        self.r.zremrangebyscore(key, "-inf", time.time())
        return int(self.r.zcard(key))

    def release_slot(self, key: str, member: str) -> None:
        self.r.zrem(key, member)

    # locks ---------------------------------------------------------------------------------------
    def try_lock(self, key: str, token: str) -> bool:
        return bool(self.r.set(key, token, nx=True, px=int(self.ttl * 1000)))

    def release_lock(self, key: str, token: str) -> None:
        self._release_lock(keys=[key], args=[token])

    def renew(self, kind: str, key: str, member: str) -> bool:
        if kind == "slot":
            return bool(self._renew_slot(keys=[key], args=[time.time() + self.ttl, member]))
        return bool(self._renew_lock(keys=[key], args=[member, int(self.ttl * 1000)]))

    def once_per(self, seconds: int, job: str) -> bool:
        """True for exactly one caller (worker or host) per `seconds` for this job."""
        return bool(self.r.set(f"{PREFIX}once:{job}", "1", nx=True, ex=max(1, seconds)))

    def wait_for(self, attempt: Callable[[], bool], timeout: float, queued_key: str | None = None) -> bool:
        """Retry `attempt` until it succeeds or `timeout` passes; counts waiters in `queued_key`."""
        if attempt():
            return True
        if timeout <= 0:
            return False
        if queued_key:
            self.r.incr(queued_key)
        try:
            deadline = time.monotonic() + timeout
            delay = 0.02
            while time.monotonic() < deadline:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                if attempt():
                    return True
                delay = min(delay * 1.5, 0.25)
            return False
        finally:
            if queued_key:
                self.r.decr(queued_key)


class Heartbeat:
    """Renews a run's leases every few seconds until stopped."""

    def __init__(self, leases: Leases, on_lost: Callable[[str], None] | None = None) -> None:
        self.leases = leases
        self.on_lost = on_lost  # called once if a lease lapsed (the worker stalled past its TTL)
        self.held: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, kind: str, key: str, member: str) -> None:
        self.held.append((kind, key, member))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.leases.ttl / 3):
            for kind, key, member in list(self.held):
                try:
                    kept = self.leases.renew(kind, key, member)
                except TROUBLE as exc:  # pragma: no cover - logged, lease may lapse
                    log.warning("lease renewal failed for %s: %s", key, exc)
                    continue
                if not kept and self.on_lost and not self._stop.is_set():
                    log.error("lease %s lapsed: stopping the run that held it", key)
                    lost, self.on_lost = self.on_lost, None
                    lost(key)

    def drop(self, key: str, member: str) -> None:
        """Release one lease now (e.g. an account's slot when the run moves to another account)."""
        for item in [h for h in self.held if h[1] == key and h[2] == member]:
            self.held.remove(item)
            try:
                if item[0] == "slot":
                    self.leases.release_slot(key, member)
                else:
                    self.leases.release_lock(key, member)
            except TROUBLE as exc:
                log.warning("lease release failed for %s: %s (it expires by itself)", key, exc)

    def release(self) -> None:
        self._stop.set()
        for kind, key, member in reversed(self.held):
            try:
                if kind == "slot":
                    self.leases.release_slot(key, member)
                else:
                    self.leases.release_lock(key, member)
            except TROUBLE as exc:
                log.warning("lease release failed for %s: %s (it expires by itself)", key, exc)
        self.held.clear()


def new_token() -> str:
    return uuid.uuid4().hex

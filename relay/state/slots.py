"""Run slots: how many CLI runs this host and each API key may have at once, the queue for them, and
what is running (for the dashboard).

A request that finds the host's slots busy takes a ticket in a Redis queue shared by every worker of
the host and waits (up to `queue_timeout_s`). A freed slot goes to the waiter first in line, where
the line is fair between API keys: a waiter's rank is the number of slots its key already holds plus
the number of its key's waiters ahead of it; equal ranks go by arrival. So a key that keeps the host
busy still gets its turn, but cannot keep another key waiting behind all of its queued requests.

Slot and ticket members are `<token>|<owner>` (the owner is the API key's name, or "anon"), so the
script can count slots per key without another structure to keep in step. A waiter refreshes its
ticket on every try; a ticket not refreshed for a lease TTL belongs to a dead worker and is dropped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from .connection import PREFIX
from .leases import Leases

# KEYS: slots, queue (ticket -> arrival), seen (ticket -> last try)
# ARGV: now, limit, ticket, lease expiry, stale-before, arrival (to re-file a ticket dropped as stale)
_TAKE_TURN = """
local now, limit, ticket = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[5])) do
  redis.call('ZREM', KEYS[2], t)
  redis.call('ZREM', KEYS[3], t)
end
if not redis.call('ZSCORE', KEYS[2], ticket) then
  redis.call('ZADD', KEYS[2], ARGV[6], ticket)
end
redis.call('ZADD', KEYS[3], now, ticket)
redis.call('EXPIRE', KEYS[2], 3600)
redis.call('EXPIRE', KEYS[3], 3600)
local running = redis.call('ZRANGE', KEYS[1], 0, -1)
local free = limit - #running
if free <= 0 then return 0 end
local function owner(m) return string.match(m, '^[^|]*|(.*)$') or '' end
local held = {}
for _, m in ipairs(running) do
  local o = owner(m)
  held[o] = (held[o] or 0) + 1
end
local waiting = redis.call('ZRANGE', KEYS[2], 0, -1)
local nth, ranks, mine, pos = {}, {}, nil, nil
for i, t in ipairs(waiting) do
  local o = owner(t)
  nth[o] = (nth[o] or 0) + 1
  ranks[i] = (held[o] or 0) + nth[o] - 1
  if t == ticket then mine, pos = ranks[i], i end
end
local ahead = 0
for i, r in ipairs(ranks) do
  if r < mine or (r == mine and i < pos) then ahead = ahead + 1 end
end
if ahead >= free then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ticket)
redis.call('EXPIRE', KEYS[1], 3600)
redis.call('ZREM', KEYS[2], ticket)
redis.call('ZREM', KEYS[3], ticket)
return 1
"""


class RunSlots:
    def __init__(self, r: Any, leases: Leases, host: str) -> None:
        self.r, self.leases, self.host = r, leases, host
        self.host_key = f"{PREFIX}slots:{host}"
        self.queue_key = f"{PREFIX}queue:{host}"
        self.seen_key = f"{PREFIX}queue-seen:{host}"
        self.runs_key = f"{PREFIX}runs:{host}"       # slot member -> what it runs (for the dashboard)
        self._take_turn = r.register_script(_TAKE_TURN)

    @staticmethod
    def member(token: str, owner: str) -> str:
        """A slot's (and its ticket's) name: who holds it, readable by the queue's script."""
        return f"{token.replace('|', '-')}|{owner or 'anon'}"

    def key_slots(self, key_name: str) -> str:
        return f"{PREFIX}keyslots:{key_name}"

    def wait(self, key: str, limit: int, member: str, timeout: float) -> bool:
        """A slot of a plain slot set (an API key's own `max_concurrent`), retried until `timeout`."""
        attempt: Callable[[], bool] = lambda: self.leases.try_slot(key, limit, member)  # noqa: E731
        return self.leases.wait_for(attempt, timeout)

    def queue_for_host(self, limit: int, member: str, timeout: float,
                       gone: Callable[[], bool] = lambda: False) -> bool:
        """Wait in the host's queue for one of its `limit` slots; False after `timeout` seconds, or
        as soon as `gone()` says the client hung up (its place goes to the next waiter)."""
        arrival = time.time()
        deadline = time.monotonic() + timeout
        delay = 0.02
        try:
            while True:
                now = time.time()
                got = self._take_turn(keys=[self.host_key, self.queue_key, self.seen_key],
                                      args=[now, limit, member, now + self.leases.ttl, now - self.leases.ttl, arrival])
                if got:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or gone():
                    return False
                time.sleep(min(delay, left))
                delay = min(delay * 1.5, 0.2)
        finally:
            pipe = self.r.pipeline()
            pipe.zrem(self.queue_key, member)
            pipe.zrem(self.seen_key, member)
            pipe.execute()

    def in_use(self) -> int:
        return self.leases.slot_count(self.host_key)

    def key_in_use(self, key_name: str) -> int:
        return self.leases.slot_count(self.key_slots(key_name))

    def waiting(self, max_wait_s: float = 0.0) -> tuple[int, float]:
        """Requests waiting in this host's queue, and the longest wait in seconds (0 when none). A ticket
        not refreshed for a lease TTL is a killed worker's and is not counted."""
        now = time.time()
        pipe = self.r.pipeline()
        pipe.zrange(self.queue_key, 0, -1, withscores=True)
        pipe.zrangebyscore(self.seen_key, now - self.leases.ttl, "+inf")
        tickets, alive = pipe.execute()
        live = set(alive)
        arrivals = [t for m, t in tickets if m in live]
        return len(arrivals), (max(0.0, now - min(arrivals)) if arrivals else 0.0)

    def queue(self) -> dict[str, Any]:
        """The host's queue as /stats shows it: how many wait, and for how long the first has waited."""
        length, oldest = self.waiting()
        return {"length": length, "oldest_wait_s": round(oldest, 1)}

    def queued(self) -> int:
        return self.waiting()[0]

    def retry_after(self, limit: int, avg_run_s: float) -> float:
        """An honest Retry-After for a request refused after its wait: the time the runs now waiting
        and running need to get through `limit` slots at their average length."""
        waiting = self.queued()
        return float(max(1, math.ceil((waiting + 1) / max(1, limit) * max(1.0, avg_run_s))))

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

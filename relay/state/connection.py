"""The Redis connection and this host's name in shared state; every Redis key name is spelled under `state/`.

This is where Redis meets the relay: a connection error or timeout on any command or pipeline leaves
here as `RedisUnavailable` (503 `redis_unavailable`, with Retry-After), never as a 500; a write refused
because Redis is at its `maxmemory` (policy noeviction, see docs/operations.md) as `RedisFull` (503
`redis_full`). redis-py reconnects by itself on the next command, so the relay recovers as soon as Redis
answers again.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import redis
import redis.client

from ..errors import RedisFull, RedisUnavailable, RelayError, Unavailable

PREFIX = "relay:"
LIMITER_PREFIX = "relay-limits"  # flask-limiter's counters
DOWN = (redis.ConnectionError, redis.TimeoutError)   # BusyLoadingError (Redis reading its file) is one too
TROUBLE = (redis.RedisError, RedisUnavailable)     # what a store that carries on anyway catches
RETRY_AFTER_S = 2.0   # a restarted private Redis answers again within a second or two
FULL_RETRY_AFTER_S = 30.0  # a full Redis frees memory as stored data expires (or an operator raises maxmemory)
OOM_MARK = "OOM command not allowed"  # how Redis 6 reports a refused write inside a script (a plain ResponseError)


def unavailable(exc: BaseException) -> RedisUnavailable:
    """What a client is told while Redis is unreachable (without the socket path or address)."""
    what = "is loading its data" if isinstance(exc, redis.BusyLoadingError) else "is unreachable"
    return RedisUnavailable(f"The relay's Redis {what}; retry in a moment.", retry_after=RETRY_AFTER_S)


def is_full(exc: BaseException) -> bool:
    """Redis refused a write because it is at its maxmemory."""
    return isinstance(exc, redis.OutOfMemoryError) or (isinstance(exc, redis.ResponseError) and OOM_MARK in str(exc))


def full() -> RedisFull:
    return RedisFull("The relay's Redis is full (at its maxmemory) and refuses writes; retry later.",
                     retry_after=FULL_RETRY_AFTER_S)


def as_relay_error(exc: BaseException) -> RelayError | None:
    """A Redis outage or a full Redis met outside the relay's own client (flask-limiter's storage), as
    the relay's error; None for anything else. Follows the exception's cause chain."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, RedisUnavailable):
            return seen
        if isinstance(seen, DOWN):
            return unavailable(seen)
        if is_full(seen):
            return full()
        seen = seen.__cause__ or seen.__context__
    return None


class _Pipeline(redis.client.Pipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            out = super().execute(raise_on_error)
        except DOWN as exc:
            raise _note_down(self, exc) from exc
        except redis.ResponseError as exc:
            if is_full(exc):
                raise full() from exc
            raise
        _note_up(self)
        return out


class RelayRedis(redis.Redis):
    """redis.Redis whose outages are the relay's `RedisUnavailable`; `down_since` says since when
    (None while it answers)."""

    down_since: float | None = None

    def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            out = super().execute_command(*args, **options)
        except DOWN as exc:
            raise _note_down(self, exc) from exc
        except redis.ResponseError as exc:
            if is_full(exc):
                raise full() from exc
            raise
        _note_up(self)
        return out

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.owner = self  # type: ignore[attr-defined]
        return pipe


def _owner(client: Any) -> Any:
    return getattr(client, "owner", client)


def _note_down(client: Any, exc: BaseException) -> RedisUnavailable:
    owner = _owner(client)
    if owner.__dict__.get("down_since") is None:
        owner.down_since = time.time()
    return unavailable(exc)


def _note_up(client: Any) -> None:
    owner = _owner(client)
    if owner.__dict__.get("down_since") is not None:
        owner.down_since = None


def connect(url: str) -> Any:
    if not url:
        raise Unavailable("No Redis configured: start the relay with `make run` (which starts a private "
                          "Redis) or set REDIS_URL.", code="redis_unconfigured")
    return RelayRedis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                               health_check_interval=30)


def host_id() -> str:
    return socket.gethostname()


def eviction_risk(r: Any) -> str | None:
    """Why this Redis could drop the counters that enforce limits (rate-limit windows, quotas, leases,
    locks, the queue: they all carry TTLs, so volatile-* policies take them first), or None when it
    cannot: policy noeviction, or no maxmemory. Read from INFO, which managed Redis services allow."""
    info = r.info("memory")
    policy, limit = str(info.get("maxmemory_policy", "")), int(info.get("maxmemory") or 0)
    if not limit or policy == "noeviction":
        return None
    return (f"its maxmemory-policy is {policy} (maxmemory {limit / 1048576:.0f} MB): once full it evicts keys, and the "
            "rate-limit windows, quota counters, leases and locks go with them, so limits stop holding; set "
            "`maxmemory-policy noeviction` (docs/operations.md, Redis memory)")

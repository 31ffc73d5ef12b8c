"""The Redis connection and this host's name in shared state; every Redis key name is spelled under `state/`.

This is where Redis meets the relay: a connection error or timeout on any command or pipeline leaves
here as `RedisUnavailable` (503 `redis_unavailable`, with Retry-After), never as a 500. redis-py
reconnects by itself on the next command, so the relay recovers as soon as Redis answers again.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import redis
import redis.client

from ..errors import RedisUnavailable, RelayError, Unavailable

PREFIX = "relay:"
LIMITER_PREFIX = "relay-limits"  # flask-limiter's counters
DOWN = (redis.ConnectionError, redis.TimeoutError)   # BusyLoadingError (Redis reading its file) is one too
TROUBLE = (redis.RedisError, RedisUnavailable)     # what a store that carries on anyway catches
RETRY_AFTER_S = 2.0   # a restarted private Redis answers again within a second or two


def unavailable(exc: BaseException) -> RedisUnavailable:
    """What a client is told while Redis is unreachable (without the socket path or address)."""
    what = "is loading its data" if isinstance(exc, redis.BusyLoadingError) else "is unreachable"
    return RedisUnavailable(f"The relay's Redis {what}; retry in a moment.", retry_after=RETRY_AFTER_S)


def as_relay_error(exc: BaseException) -> RelayError | None:
    """A Redis outage met outside the relay's own client (flask-limiter's storage), as the relay's
    error; None for anything else. Follows the exception's cause chain."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, RedisUnavailable):
            return seen
        if isinstance(seen, DOWN):
            return unavailable(seen)
        seen = seen.__cause__ or seen.__context__
    return None


class _Pipeline(redis.client.Pipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            out = super().execute(raise_on_error)
        except DOWN as exc:
            raise _note_down(self, exc) from exc
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

"""The Redis connection and this host's name in shared state; every Redis key name is spelled under `state/`."""

from __future__ import annotations

import socket
from typing import Any

import redis

from ..errors import Unavailable

PREFIX = "relay:"
LIMITER_PREFIX = "relay-limits"  # flask-limiter's counters


def connect(url: str) -> Any:
    if not url:
        raise Unavailable("No Redis configured: start the relay with `make run` (which starts a private "
                          "Redis) or set REDIS_URL.", code="redis_unconfigured")
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                                health_check_interval=30)


def host_id() -> str:
    return socket.gethostname()



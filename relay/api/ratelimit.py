"""Requests per minute with flask-limiter on Redis (global, per key, per client address without auth; token
counting per key or address), and the `x-ratelimit-*` headers for requests and tokens on every completion answer."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flask import Blueprint, Flask, Response, g
from flask_limiter import Limiter, RateLimitExceeded

from ..errors import RateLimited
from ..state.connection import LIMITER_PREFIX

if TYPE_CHECKING:
    from ..runtime import Relay


def limits_storage_uri(redis_url: str) -> str:
    """flask-limiter (the `limits` package) spells a unix socket `redis+unix://`."""
    if redis_url.startswith("unix://"):
        return "redis+unix://" + redis_url[len("unix://"):]
    return redis_url


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `23h18m29.144s`."""
    seconds = max(0.0, seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    out = ""
    if h >= 1:
        out += f"{int(h)}h"
    if h >= 1 or m >= 1:
        out += f"{int(m)}m"
    return out + (f"{s:.3f}".rstrip("0").rstrip(".") or "0") + "s"


def setup_limiter(app: Flask, relay: Relay, blueprints: list[Blueprint], counting: list[Blueprint]) -> Limiter:
    """Requests per minute on the completion endpoints: global, per key, and per client IP without auth;
    on the token counting endpoints (`counting`) their own limit per key, or per client IP without auth.

    Call after the auth hook is registered: flask-limiter checks in its own before_request hook,
    which must run once `g.api_key` and `g.client_ip` are known.
    """
    settings = relay.settings

    def global_limit() -> str:
        return f"{settings['rate_limit.max_requests_per_minute']}/minute"

    def key_limit() -> str:
        key = getattr(g, "api_key", None)
        return f"{key.rpm}/minute" if key is not None and key.rpm else "1000000/minute"

    def ip_limit() -> str:
        return f"{settings['rate_limit.max_requests_per_minute_per_ip']}/minute"

    limiter = Limiter(key_func=lambda: "all", app=app, storage_uri=limits_storage_uri(settings["redis_url"]),
                      strategy="fixed-window", headers_enabled=False, key_prefix=LIMITER_PREFIX,
                      swallow_errors=False)
    limits = [
        limiter.shared_limit(global_limit, scope="global", key_func=lambda: "all",
                             exempt_when=lambda: not settings["rate_limit.max_requests_per_minute"]),
        limiter.shared_limit(key_limit, scope="per-key",
                             key_func=lambda: "key:" + (g.api_key.name if getattr(g, "api_key", None) else "-"),
                             exempt_when=lambda: not (getattr(g, "api_key", None) and g.api_key.rpm)),
        limiter.shared_limit(ip_limit, scope="per-ip", key_func=lambda: "ip:" + str(getattr(g, "client_ip", "-")),
                             exempt_when=lambda: bool(settings["auth.enabled"])
                             or not settings["rate_limit.max_requests_per_minute_per_ip"]),
    ]
    for bp in blueprints:
        for lim in limits:
            lim(bp)
    count_limit = limiter.shared_limit(
        lambda: f"{settings['rate_limit.count_tokens_per_minute']}/minute", scope="count-tokens",
        key_func=lambda: "key:" + g.api_key.id if getattr(g, "api_key", None) else "ip:" + str(getattr(g, "client_ip", "-")),
        exempt_when=lambda: not settings["rate_limit.count_tokens_per_minute"])
    for bp in counting:
        count_limit(bp)
    return limiter


def rate_limited_error(limiter: Limiter) -> RateLimited:
    current = limiter.current_limit
    wait = max(1.0, (current.reset_at - time.time()) if current else 60.0)
    key = str(current.key) if current else ""
    scope = "this API key" if "per-key" in key or "count-tokens/key:" in key else \
        "this client address" if "per-ip" in key or "count-tokens/ip:" in key else "the relay"
    amount = current.limit.amount if current else 0
    what = "token counting requests" if "count-tokens" in key else "requests"
    return RateLimited(f"Rate limit reached for {scope}: {amount} {what} per minute. Retry after "
                       f"{int(wait)} s.", retry_after=wait)


def add_headers(resp: Response, limiter: Limiter | None) -> None:
    """`x-ratelimit-*` for requests and tokens, on successes and refusals alike."""
    current = limiter.current_limit if limiter is not None else None
    if current is not None:
        resp.headers["x-ratelimit-limit-requests"] = str(current.limit.amount)
        resp.headers["x-ratelimit-remaining-requests"] = str(max(0, current.remaining))
        resp.headers["x-ratelimit-reset-requests"] = go_duration(current.reset_at - time.time())
    tokens = getattr(g, "token_budget", None)
    if tokens is not None:
        resp.headers["x-ratelimit-limit-tokens"] = str(tokens["limit"])
        resp.headers["x-ratelimit-remaining-tokens"] = str(tokens["remaining"])
        resp.headers["x-ratelimit-reset-tokens"] = go_duration(tokens["reset_s"])


__all__ = ["RateLimitExceeded", "setup_limiter", "add_headers", "rate_limited_error", "go_duration"]

"""Tokens-per-day quotas, global and per key (requests per minute are flask-limiter's, in `api/ratelimit.py`).

Both are shared by every worker and host using the same Redis. Every refusal is an OpenAI 429
(`rate_limit_exceeded` or `insufficient_quota`) with `Retry-After`; every answer carries the
`x-ratelimit-*` headers for requests and tokens.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import QuotaExceeded
from .connection import PREFIX


def _seconds_to_midnight(now: float) -> float:
    d = datetime.fromtimestamp(now, UTC)
    nxt = (d + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (nxt - d).total_seconds()


class Quotas:
    """Tokens per UTC day: checked with an estimate before a run, charged with actual usage after."""

    def __init__(self, r: Any, global_limit: int) -> None:
        self.r = r
        self.global_limit = global_limit

    def _keys(self, key_id: str | None) -> tuple[str, str]:
        """Today's counters: the whole relay's, and the key's by its id (a key re-issued under the same name
        starts afresh)."""
        day = time.strftime("%Y-%m-%d", time.gmtime())
        return f"{PREFIX}tokens:{day}:all", f"{PREFIX}tokens:{day}:id:{key_id or '-'}"

    def state(self, key: Any) -> dict[str, Any] | None:
        """The tightest token budget for this caller: limit, remaining, reset (None if unlimited)."""
        g_key, k_key = self._keys(key.id if key else None)
        used_all, used_key = (int(x or 0) for x in self.r.mget(g_key, k_key))
        budgets = []
        if self.global_limit:
            budgets.append((self.global_limit, self.global_limit - used_all, "the relay"))
        if key is not None and key.tokens_per_day:
            budgets.append((key.tokens_per_day, key.tokens_per_day - used_key, "this API key"))
        if not budgets:
            return None
        limit, remaining, who = min(budgets, key=lambda b: b[1])
        return {"limit": limit, "remaining": max(0, remaining), "who": who,
                "reset_s": _seconds_to_midnight(time.time())}

    def used_today(self, key_id: str | None) -> tuple[int, int]:
        """Tokens charged today (UTC): (the whole relay, the key with this id)."""
        g_key, k_key = self._keys(key_id)
        used_all, used_key = (int(x or 0) for x in self.r.mget(g_key, k_key))
        return used_all, used_key

    def check(self, key: Any, estimate: int | None) -> dict[str, Any] | None:
        """Refuse when the prompt's `estimate` exceeds what is left; `None` (before the body is read)
        refuses only a budget already spent."""
        st = self.state(key)
        if st is not None and (st["remaining"] <= 0 if estimate is None else estimate > st["remaining"]):
            need = "" if estimate is None else f", this request needs about {estimate}"
            raise QuotaExceeded(
                f"Daily token quota of {st['who']} exhausted: {st['remaining']} of {st['limit']} tokens "
                f"left{need}. It resets at midnight UTC.",
                retry_after=st["reset_s"], headers={"x-should-retry": "false"})
        return st

    def charge(self, key_id: str | None, tokens: int) -> None:
        if tokens <= 0:
            return
        g_key, k_key = self._keys(key_id)
        pipe = self.r.pipeline(transaction=True)
        for k in (g_key, k_key):
            pipe.incrby(k, tokens)
            pipe.expire(k, 3 * 86400)
        pipe.execute()



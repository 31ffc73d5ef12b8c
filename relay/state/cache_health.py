"""Prompt-cache health in Redis: 15-minute counts of each account's and each key's answered requests,
and an alert (`cache_health`, once an hour per account or key, across workers and hosts) when the last
hour's hit rate falls far below the previous day's (core/cache_health.py says when and why)."""

from __future__ import annotations

import time
from typing import Any

from ..core.cache_health import Counts, Rules, verdict
from ..core.record import RequestRecord

PREFIX = "relay:cachehealth:"
CHECKED = "relay:cachehealth-checked:"
BUCKET_S = 900
LAST_HOUR = 4                     # buckets in the last hour
USUAL = 96                        # the 24 hours before it
CHECK_EVERY_S = 60                # one check per account or key in each such slot (across workers)
FIELDS = ("read", "total", "requests", "resumed", "moved")


class CacheHealth:
    def __init__(self, r: Any, alerts: Any, rules: Rules = Rules()) -> None:
        self.r, self.alerts, self.rules = r, alerts, rules

    def _key(self, kind: str, name: str, bucket: int) -> str:
        return f"{PREFIX}{kind}:{name}:{bucket}"

    def record(self, rec: RequestRecord, moved: bool = False, now: float | None = None) -> None:
        """Count an answered request with the CLI's real usage, then check its account and key."""
        now = time.time() if now is None else now
        if self.count(rec, moved, now):
            for kind, name in self._subjects(rec):
                self.check(kind, name, now)

    def count(self, rec: RequestRecord, moved: bool, now: float) -> bool:
        if rec.status != 200 or rec.estimated:
            return False
        total = rec.input_tokens + rec.cache_read_tokens + rec.cache_creation_tokens
        if not total:
            return False
        bucket = int(now // BUCKET_S)
        pipe = self.r.pipeline()
        for kind, name in self._subjects(rec):
            k = self._key(kind, name, bucket)
            pipe.hincrby(k, "read", rec.cache_read_tokens)
            pipe.hincrby(k, "total", total)
            pipe.hincrby(k, "requests", 1)
            pipe.hincrby(k, "resumed", int(rec.resumed))
            pipe.hincrby(k, "moved", int(moved))
            pipe.expire(k, (LAST_HOUR + USUAL + 2) * BUCKET_S)
        pipe.execute()
        return True

    @staticmethod
    def _subjects(rec: RequestRecord) -> list[tuple[str, str]]:
        out = []
        if rec.account:
            out.append(("account", rec.account))
        if rec.key_id:
            out.append(("key", rec.key_id))
        return out

    def counts(self, kind: str, name: str, now: float) -> tuple[Counts, Counts]:
        """(the last hour, the 24 hours before it)."""
        last = int(now // BUCKET_S)
        pipe = self.r.pipeline()
        for b in range(last - LAST_HOUR - USUAL + 1, last + 1):
            pipe.hmget(self._key(kind, name, b), *FIELDS)
        rows = [Counts(*(int(v or 0) for v in row)) for row in pipe.execute()]
        usual, recent = rows[:USUAL], rows[USUAL:]
        return sum(recent, Counts()), sum(usual, Counts())

    def check(self, kind: str, name: str, now: float) -> bool:
        """True if this call raised the alert."""
        slot = int(now // CHECK_EVERY_S)
        if not self.r.set(f"{CHECKED}{kind}:{name}:{slot}", "1", nx=True, ex=2 * CHECK_EVERY_S):
            return False
        last_hour, usual = self.counts(kind, name, now)
        v = verdict(last_hour, usual, self.rules)
        if v is None:
            return False
        who = f"account {name}" if kind == "account" else f"API key {name}"
        text = (f"Prompt-cache hit rate of {who} fell to {v.rate:.0%} over the last hour, against {v.usual:.0%} "
                f"usually. Likely cause: {v.cause}.")
        hour = int(now // 3600)
        return self.alerts.emit("cache_health", name if kind == "account" else None, text,
                                f"cache_health:{kind}:{name}:{hour}", ttl=3600,
                                details={kind: name, "hit_rate": round(v.rate, 4), "usual_hit_rate": round(v.usual, 4),
                                         "cause": v.cause})

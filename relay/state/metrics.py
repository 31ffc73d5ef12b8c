"""Prometheus counters, histogram buckets and the dashboard's hourly and daily usage series, in Redis.

Kept in Redis (not in each worker's memory) so a scrape of any worker sees every worker's requests, a
restarted worker loses nothing, and hosts sharing a Redis share the counts. What each request adds is
decided in `core/metrics.py`; this module only adds and reads.
"""

from __future__ import annotations

import time
from typing import Any

from ..core.metrics import COUNTERS, record_updates, series_buckets, series_updates
from ..core.record import RequestRecord
from .connection import PREFIX

M = PREFIX + "metrics:"
SERIES = PREFIX + "series:"
HOUR_TTL_S = 8 * 86400      # hourly series: a week back, plus a day
DAY_TTL_S = 400 * 86400     # daily series: a year back


class MetricsStore:
    def __init__(self, r: Any) -> None:
        self.r = r

    def record(self, rec: RequestRecord) -> None:
        """Add one finished request to the counters and series, in one transaction."""
        hour, day = series_buckets(rec.timestamp)
        pipe = self.r.pipeline(transaction=True)
        for (family, field), amount in record_updates(rec).items():
            if isinstance(amount, float):  # histogram sums: always float, or HINCRBY would refuse the field
                pipe.hincrbyfloat(M + family, field, amount)
            else:
                pipe.hincrby(M + family, field, amount)
        for name, ttl in ((f"{SERIES}hour:{hour}", HOUR_TTL_S), (f"{SERIES}day:{day}", DAY_TTL_S)):
            for field, n in series_updates(rec).items():
                if n:
                    pipe.hincrby(name, field, n)
            pipe.expire(name, ttl)
        pipe.execute()

    def counters(self) -> dict[str, dict[str, float]]:
        """{family: {field: value}} for every family in core.metrics.COUNTERS."""
        pipe = self.r.pipeline(transaction=False)
        for family in COUNTERS:
            pipe.hgetall(M + family)
        return {family: {f: float(v) for f, v in raw.items()} for family, raw in zip(COUNTERS, pipe.execute())}

    def hours(self, n: int, now: float | None = None) -> list[tuple[str, dict[str, int]]]:
        """The last `n` hours (oldest first) as (hour, {field: value})."""
        now = time.time() if now is None else now
        names = [series_buckets(now - 3600 * i)[0] for i in range(n - 1, -1, -1)]
        return self._read("hour", names)

    def days(self, n: int, now: float | None = None) -> list[tuple[str, dict[str, int]]]:
        """The last `n` days (oldest first) as (day, {field: value})."""
        now = time.time() if now is None else now
        names = [series_buckets(now - 86400 * i)[1] for i in range(n - 1, -1, -1)]
        return self._read("day", names)

    def _read(self, kind: str, names: list[str]) -> list[tuple[str, dict[str, int]]]:
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(f"{SERIES}{kind}:{name}")
        return [(name, {f: int(v) for f, v in raw.items()}) for name, raw in zip(names, pipe.execute())]


class PoolTally:
    """Runs a host's pool was never asked about (agent mode, function calling...), by reason: counted
    by the worker that ran them, read by whichever serves /stats (`cli/pool/source.Tally`)."""

    def __init__(self, r: Any, host: str) -> None:
        self.r = r
        self.key = f"{M}pool_local:{host}"

    def add(self, reason: str) -> None:
        self.r.hincrby(self.key, reason, 1)

    def counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.r.hgetall(self.key).items()}

"""What the Prometheus metrics and the usage charts count, and how one request record adds to them. Pure.

A finished request becomes a set of increments (`record_updates`, `series_updates`) that the store in
`state/metrics.py` adds to Redis, so the counts are shared by every worker and host and outlive a worker.
`families` turns what the store holds, plus the live gauges, into `prometheus_client` metric families.
Histogram buckets are stored non-cumulative (one counter per bucket) and summed up when exposed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .record import RequestRecord, figure

NAME_PREFIX = "relay_"
# seconds; time to first token and request duration share them (TTFT sits at the low end)
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
TOKEN_KINDS = (("input", "input_tokens"), ("output", "output_tokens"), ("cache_read", "cache_read_tokens"),
               ("cache_creation", "cache_creation_tokens"))
CLI_FAILURES = {"cli_crashed": "crash", "first_token_timeout": "first_token_timeout",
                "idle_timeout": "idle_timeout", "total_timeout": "total_timeout"}
REJECTIONS = {"insufficient_quota": "quota", "runaway_conversation": "runaway"}  # any other refusal: rate_limit

# family -> (kind, label names, help); the store keeps one Redis hash per family
COUNTERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "requests": ("counter", ("endpoint", "status", "model", "key", "account"),
                 "Finished requests (refusals and errors included)."),
    "tokens": ("counter", ("type", "model", "key", "account"), "Tokens by type, from the CLI's own usage report."),
    "rejections": ("counter", ("reason", "key"), "Requests refused by the relay's rate limits (rate_limit) or "
                                                  "token quotas (quota)."),
    "cli_failures": ("counter", ("kind",), "CLI runs that crashed or were stopped by a timeout."),
    "time_to_first_token_seconds": ("histogram", ("endpoint", "model"),
                                    "Time from the request to the model's first output."),
    "request_duration_seconds": ("histogram", ("endpoint", "model"), "Time from the request to its last byte."),
}


@dataclass(frozen=True)
class WarmStats:
    """What the warm CLI pool reports (all zero until a pool exists)."""
    processes: int = 0     # warm CLI processes alive on this host
    spares: int = 0        # of those, idle and ready for the next request
    hits: int = 0          # requests served by a warm process (since the pool started, all workers)
    misses: int = 0        # requests that had to start a cold CLI


@dataclass(frozen=True)
class WindowStatus:
    """One usage window of an account: `five_hour`, `seven_day` or `seven_day_overage_included`."""
    name: str
    utilization: float | None = None  # 0..1; None when stale (its reset passed with no turn since)
    resets_at: float | None = None
    status: str = ""                  # allowed | allowed_warning | rejected ("" when stale or unknown)
    stale: bool = False


@dataclass(frozen=True)
class AccountStatus:
    """One Claude account as the metrics and the dashboard see it."""
    name: str
    limited: bool = False             # refusing runs until `resets_at`
    utilization: float | None = None  # 0..1 of the fuller usage window, when known
    resets_at: float | None = None    # epoch seconds the window (or cooldown) resets, when known
    reason: str = ""
    windows: tuple[WindowStatus, ...] = ()


@dataclass(frozen=True)
class Live:
    """Gauges read at scrape time."""
    host: str
    active_runs: int
    max_runs: int
    queued: int
    oldest_wait_s: float
    warm: WarmStats
    accounts: list[AccountStatus]


def _field(*labels: str) -> str:
    return json.dumps(list(labels), separators=(",", ":"))


def _bucket(seconds: float) -> str:
    for b in BUCKETS:
        if seconds <= b:
            return repr(b)
    return "+Inf"


def _observe(out: dict[tuple[str, str], int | float], family: str, labels: tuple[str, ...], seconds: float) -> None:
    for f, n in ((_field(*labels, "le", _bucket(seconds)), 1), (_field(*labels, "sum"), float(seconds)),
                 (_field(*labels, "count"), 1)):
        out[(family, f)] = out.get((family, f), 0) + n


def record_updates(rec: RequestRecord) -> dict[tuple[str, str], int | float]:
    """(family, field) -> amount for one finished request; fields encode the label values. Counts are
    ints, histogram sums floats (always, even when whole: the store adds floats with HINCRBYFLOAT)."""
    key, model, account = rec.key or "none", rec.model or "none", rec.account or "none"
    endpoint = rec.endpoint or "none"
    out: dict[tuple[str, str], int | float] = {("requests", _field(endpoint, str(rec.status), model, key, account)): 1}
    for kind, attr in TOKEN_KINDS:
        n = figure(getattr(rec, attr))  # never negative: a counter only grows
        if n:
            out[("tokens", _field(kind, model, key, account))] = n
    if rec.status == 429 and not rec.account:  # refused by the relay itself, before any CLI run
        out[("rejections", _field(REJECTIONS.get(rec.error or "", "rate_limit"), key))] = 1
    if rec.error in CLI_FAILURES:
        out[("cli_failures", _field(CLI_FAILURES[rec.error]))] = 1
    if rec.ttft_ms is not None:
        _observe(out, "time_to_first_token_seconds", (endpoint, model), rec.ttft_ms / 1000)
    _observe(out, "request_duration_seconds", (endpoint, model), rec.response_time_ms / 1000)
    return out


def series_updates(rec: RequestRecord) -> dict[str, int]:
    """Field -> amount in the hour's and the day's usage series (what the dashboard charts)."""
    tokens = figure(rec.tokens_spent)
    out: dict[str, int] = {"requests|all|": 1, "errors|all|": int(rec.status not in (200, 499))}
    # by key name for the dashboard; by key id for a key's own page (a re-issued name starts afresh)
    for dim, value in (("key", rec.key or "none"), ("key_id", rec.key_id or "none"), ("model", rec.model or "none"),
                       ("account", rec.account or "none")):
        out[f"requests|{dim}|{value}"] = 1
        if tokens:
            out[f"tokens|{dim}|{value}"] = tokens
    if tokens:
        out["tokens|all|"] = tokens
    return out


def series_buckets(ts: float) -> tuple[str, str]:
    """The hour and the day a timestamp falls in (UTC), as the series name them."""
    d = datetime.fromtimestamp(ts, UTC)
    return d.strftime("%Y-%m-%dT%H"), d.strftime("%Y-%m-%d")


def pivot(rows: list[tuple[str, dict[str, int]]], measure: str, dim: str) -> dict[str, list[int]]:
    """Series rows (bucket, fields) -> {label: [value per bucket]} for one measure and dimension."""
    labels = sorted({f.split("|", 2)[2] for _, fields in rows for f in fields
                     if f.startswith(f"{measure}|{dim}|")})
    return {lab: [int(fields.get(f"{measure}|{dim}|{lab}", 0)) for _, fields in rows] for lab in labels}


def _labels(field: str) -> list[str]:
    out = json.loads(field)
    return [str(x) for x in out]


def families(stored: dict[str, dict[str, float]], live: Live) -> Iterator[Metric]:
    """Metric families from the stored counters (`{family: {field: value}}`) and the live gauges."""
    for family, (kind, names, doc) in COUNTERS.items():
        raw = stored.get(family) or {}
        name = NAME_PREFIX + family
        if kind == "counter":
            c = CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(names))
            for f, v in sorted(raw.items()):
                c.add_metric(_labels(f), v)
            yield c
            continue
        h = HistogramMetricFamily(name, doc, labels=list(names))
        series: dict[tuple[str, ...], dict[str, float]] = {}
        for f, v in raw.items():
            parts = _labels(f)
            labels = tuple(parts[:len(names)])
            rest = parts[len(names):]
            slot = series.setdefault(labels, {})
            slot["le:" + rest[1] if rest[0] == "le" else rest[0]] = v
        for labels, slot in sorted(series.items()):
            acc, buckets = 0.0, []
            for b in (*[repr(b) for b in BUCKETS], "+Inf"):
                acc += slot.get("le:" + b, 0.0)
                buckets.append((b, acc))
            h.add_metric(list(labels), buckets, slot.get("sum", 0.0))
        yield h
    host = [live.host]

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(NAME_PREFIX + name, doc, labels=["host"])
        g.add_metric(host, value)
        return g
    yield gauge("active_runs", "CLI runs in progress on this host.", live.active_runs)
    yield gauge("max_concurrent_runs", "Run slots on this host (max_concurrent_runs).", live.max_runs)
    yield gauge("queue_length", "Requests waiting for a run slot on this host.", live.queued)
    yield gauge("queue_oldest_wait_seconds", "How long the longest-waiting request has waited (0 if none).",
                live.oldest_wait_s)
    yield gauge("warm_processes", "Warm CLI processes alive on this host.", live.warm.processes)
    yield gauge("warm_spares", "Warm CLI processes idle and ready.", live.warm.spares)
    for name, doc, value in (("warm_hits", "Requests served by a warm CLI process.", live.warm.hits),
                             ("warm_misses", "Requests that started a cold CLI process.", live.warm.misses)):
        c = CounterMetricFamily(NAME_PREFIX + name, doc, labels=["host"])
        c.add_metric(host, value)
        yield c
    yield from account_families(live.accounts)


def account_families(accounts: Iterable[AccountStatus]) -> Iterator[Metric]:
    """Each account: limited or not and until when, and each window's utilization, reset and staleness."""
    util = GaugeMetricFamily(NAME_PREFIX + "account_window_utilization",
                             "Share of the account's usage window used, per window (five_hour, seven_day, "
                             "seven_day_overage_included); absent while unknown or stale.",
                             labels=["account", "window"])
    limited = GaugeMetricFamily(NAME_PREFIX + "account_limited", "1 while the account refuses runs.", labels=["account"])
    reset = GaugeMetricFamily(NAME_PREFIX + "account_window_reset_timestamp_seconds",
                              "When the account's window resets (epoch seconds), per window.",
                              labels=["account", "window"])
    stale = GaugeMetricFamily(NAME_PREFIX + "account_window_stale",
                              "1 when the window's reset passed with no turn since (its use is unknown).",
                              labels=["account", "window"])
    until = GaugeMetricFamily(NAME_PREFIX + "account_limited_until_timestamp_seconds",
                              "When a limited account may be used again (epoch seconds; 0 when not limited).",
                              labels=["account"])
    for a in accounts:
        limited.add_metric([a.name], 1.0 if a.limited else 0.0)
        until.add_metric([a.name], (a.resets_at or 0.0) if a.limited else 0.0)
        for w in a.windows:
            if w.utilization is not None:
                util.add_metric([a.name, w.name], w.utilization)
            if w.resets_at:
                reset.add_metric([a.name, w.name], w.resets_at)
            stale.add_metric([a.name, w.name], 1.0 if w.stale else 0.0)
    yield util
    yield limited
    yield reset
    yield stale
    yield until

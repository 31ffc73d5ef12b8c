"""Usage statistics in Redis (atomic, shared by every worker) and their `log/stats.json` snapshot.

Each finished request is recorded once in one MULTI transaction: counters for total, month, day,
key and model, plus the request itself in the day's capped list. One worker at a time (a Redis lock)
writes the snapshot every few seconds and at shutdown; an empty Redis is refilled from it.

Bounded: the model a request counts under is a label (`state/labels.py`: a listed model, one that
answered, or "other"); per-day breakdowns expire after DETAIL_TTL_S and each day's request list after
`stats.request_days`; only the small total, month and day summaries are kept for good.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.pricing import cost_usd
from ..core.record import FIGURES, figure
from .connection import PREFIX

log = logging.getLogger("relay.stats")
S = PREFIX + "stats:"
COUNTERS = ("requests", "successful", "errors", "cancelled", "input_tokens", "output_tokens",
            "cache_read_tokens", "cache_creation_tokens", "total_tokens", "estimated_requests",
            "cache_hit_requests", "response_time_ms", "stream_requests", "response_cache_hits",
            "response_cache_tokens_saved")
LATENCY_KEEP = 2000
RECENT_KEEP = 1000
DETAIL_TTL_S = 400 * 86400   # a day's breakdown by key, key id, model and account: a year back


def _day(ts: float) -> tuple[str, str, str]:
    d = datetime.fromtimestamp(ts, UTC)
    return d.strftime("%Y-%m"), d.strftime("%d"), d.strftime("%Y-%m-%d")


def iso_time(ts: float) -> str:
    """The original relay's timestamps: ISO-8601 UTC with milliseconds, `2026-02-24T12:00:00.000Z`."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def summary(h: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: int(float(h.get(k) or 0)) for k in COUNTERS}
    out["avg_response_time_ms"] = round(out["response_time_ms"] / out["requests"]) if out["requests"] else 0
    out["cache_write_tokens"] = out["cache_creation_tokens"]  # the original relay's name
    return out


def cache_stats(s: dict[str, Any]) -> dict[str, Any]:
    """Cache figures; `cache_hits`, `total_requests` and `hit_rate` (a percentage as a string with two
    decimals, "45.00") keep the original relay's names and types."""
    req = s["requests"] or 0
    hits = s["cache_hit_requests"] + s["response_cache_hits"]
    return {"cache_hits": hits, "total_requests": req, "hit_rate": f"{100 * hits / req:.2f}" if req else "0.00",
            "requests_with_cache_hits": hits,
            "tokens_saved": s["cache_read_tokens"] + s["response_cache_tokens_saved"],
            "prompt_cache_read_tokens": s["cache_read_tokens"], "cache_creation_tokens": s["cache_creation_tokens"],
            "response_cache_hits": s["response_cache_hits"],
            "response_cache_tokens_saved": s["response_cache_tokens_saved"]}


def _hashes(rec: dict[str, Any], month: str, date: str, key: str, model: str) -> list[str]:
    """The aggregate hashes one request counts in."""
    hashes = [S + "total", S + "month:" + month, S + "day:" + date, S + "model:" + model,
              S + f"day:{date}:model:{model}"]
    if key:
        hashes += [S + "key:" + key, S + f"day:{date}:key:{key}"]
    if rec.get("key_id"):  # the key's own view: a re-issued name starts from nothing
        hashes += [S + "kid:" + rec["key_id"], S + f"day:{date}:kid:{rec['key_id']}"]
    account = rec.get("account") or ""
    if account:
        hashes += [S + "account:" + account, S + f"day:{date}:account:{account}"]
        if key:
            hashes.append(S + f"key:{key}:account:{account}")
    return hashes


class Stats:
    def __init__(self, r: Any, snapshot_path: Path, max_per_day: int,
                 log_first_message: bool, prices: dict[str, Any], request_days: int = 30) -> None:
        self.r = r
        self.request_ttl_s = request_days * 86400
        self.path = snapshot_path
        self.max_per_day = max_per_day
        self.log_first_message = log_first_message
        self.prices = prices
        self._stop = threading.Event()

    # -- recording -------------------------------------------------------------------------------
    def record(self, rec: dict[str, Any], model_label: str | None = None) -> None:
        """Count one finished request (called exactly once per request, from any worker); the aggregates
        count it under `model_label` (else its model), the request's own entry keeps its model."""
        ts = float(rec.get("timestamp") or time.time())
        month, day, date = _day(ts)
        status = int(rec.get("status") or 0)
        key, model = rec.get("key") or "", model_label or rec.get("model") or "unknown"
        # the original relay's per-request names and types, next to the relay's own
        rec = dict(rec, timestamp=iso_time(ts), stream=bool(rec.get("stream")),
                   cache_read_input_tokens=figure(rec.get("cache_read_tokens")),
                   cache_creation_input_tokens=figure(rec.get("cache_creation_tokens")),
                   response_time_ms=figure(rec.get("response_time_ms")))
        rec["first_message"] = (rec.get("first_message") or "") if self.log_first_message else None
        n = {f: figure(rec.get(f)) for f in FIGURES}
        inc = {  # figures forged or broken count as 0: nothing here can lower a total (core.record.figure)
            "requests": 1, "successful": int(status == 200), "cancelled": int(status == 499),
            "errors": int(status not in (200, 499)),
            "input_tokens": n["input_tokens"], "output_tokens": n["output_tokens"],
            "cache_read_tokens": n["cache_read_tokens"], "cache_creation_tokens": n["cache_creation_tokens"],
            "estimated_requests": int(bool(rec.get("estimated"))),
            "cache_hit_requests": int(n["cache_read_tokens"] > 0),
            "response_time_ms": n["response_time_ms"], "stream_requests": int(bool(rec.get("stream"))),
            "response_cache_hits": int(bool(rec.get("response_cache_hit"))),
            "response_cache_tokens_saved": n["tokens_saved"],
        }
        inc["total_tokens"] = sum(inc[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens",
                                                   "cache_creation_tokens"))
        hashes = _hashes(rec, month, date, key, model)
        account = rec.get("account") or ""
        body = json.dumps(rec, separators=(",", ":"), default=str)
        pipe = self.r.pipeline(transaction=True)
        for h in hashes:
            for field, amount in inc.items():
                if amount:
                    pipe.hincrby(h, field, amount)
            if h.startswith(f"{S}day:{date}:"):
                pipe.expire(h, DETAIL_TTL_S)
        pipe.sadd(S + "days", date)
        pipe.sadd(S + "models", model)
        if key:
            pipe.sadd(S + "keys", key)
        if account:
            pipe.sadd(S + "accounts", account)
        pipe.lpush(S + "req:" + date, body)
        pipe.ltrim(S + "req:" + date, 0, max(0, self.max_per_day - 1))
        pipe.expire(S + "req:" + date, self.request_ttl_s)
        pipe.lpush(S + "recent", body)
        pipe.ltrim(S + "recent", 0, RECENT_KEEP - 1)
        pipe.lpush(S + "lat", n["response_time_ms"])
        pipe.ltrim(S + "lat", 0, LATENCY_KEEP - 1)
        if rec.get("ttft_ms") is not None:
            pipe.lpush(S + "ttft", figure(rec["ttft_ms"]))
            pipe.ltrim(S + "ttft", 0, LATENCY_KEEP - 1)
        pipe.incr(S + "version")
        pipe.execute()

    # -- reading ---------------------------------------------------------------------------------
    def _h(self, name: str) -> dict[str, Any]:
        return summary(self.r.hgetall(S + name))

    def totals(self) -> dict[str, Any]:
        return self._h("total")

    def _with_cost(self, s: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        return dict(s, estimated_cost_usd=cost_usd(s, model, self.prices))

    def usage(self, key: str | None = None, days: int = 31, key_id: str | None = None) -> dict[str, Any]:
        """Totals, per day, per key and per model; `key` (named `key`, with id `key_id`) limits it
        all to that one key's view."""
        dates = sorted(self.r.smembers(S + "days"), reverse=True)[:days]
        models = sorted(self.r.smembers(S + "models"))
        if key is not None:
            kind, ident = ("kid", key_id) if key_id else ("key", key)
            total = self._h(f"{kind}:{ident}")
            per_day = {d: self._h(f"day:{d}:{kind}:{ident}") for d in dates}
            per_day = {d: v for d, v in per_day.items() if v["requests"]}
            per_key = {key: total}
            per_model: dict[str, Any] = {}
            per_account = {a: self._h(f"key:{key}:account:{a}") for a in sorted(self.r.smembers(S + "accounts"))}
            per_account = {a: v for a, v in per_account.items() if v["requests"]}
        else:
            total = self.totals()
            per_day = {d: self._h("day:" + d) for d in dates}
            per_key = {k: self._h("key:" + k) for k in sorted(self.r.smembers(S + "keys"))}
            per_model = {m: self._with_cost(self._h("model:" + m), m) for m in models}
            per_account = self.accounts()
        cost = sum(v["estimated_cost_usd"] for v in per_model.values()) if per_model else \
            cost_usd(total, None, self.prices)
        return {"object": "usage", "total": dict(total, estimated_cost_usd=round(cost, 6)),
                "cache_stats": cache_stats(total), "days": per_day, "keys": per_key, "models": per_model,
                "accounts": per_account,
                "pricing_note": "estimated_cost_usd is what the same tokens would cost at Anthropic API "
                                "list prices; a subscription is billed differently."}

    def accounts(self) -> dict[str, Any]:
        """Usage per Claude account (which subscription served the requests)."""
        return {a: self._h("account:" + a) for a in sorted(self.r.smembers(S + "accounts"))}

    def recent(self, limit: int = 50, key: str | None = None, key_id: str | None = None) -> list[dict[str, Any]]:
        """The latest requests; `key_id` (else `key`, a name) keeps only that key's own."""
        out = []
        for raw in self.r.lrange(S + "recent", 0, RECENT_KEEP - 1):
            rec = json.loads(raw)
            if (key is None and key_id is None) or (rec.get("key_id") == key_id if key_id else rec.get("key") == key):
                out.append(rec)
            if len(out) >= limit:
                break
        return out

    def latency(self) -> dict[str, Any]:
        def pct(name: str) -> dict[str, Any]:
            vals = sorted(int(x) for x in self.r.lrange(S + name, 0, -1))
            if not vals:
                return {"avg_ms": 0, "p95_ms": 0, "samples": 0}
            return {"avg_ms": round(sum(vals) / len(vals)), "p95_ms": vals[min(len(vals) - 1, int(len(vals) * 0.95))],
                    "samples": len(vals)}
        return {"latency": pct("lat"), "time_to_first_token": pct("ttft")}

    # -- snapshot --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        total = self.totals()
        months: dict[str, Any] = {}
        for date in sorted(self.r.smembers(S + "days")):
            month, day = date[:7], date[8:]
            m = months.setdefault(month, {"summary": self._h("month:" + month), "days": {}})
            reqs = [json.loads(x) for x in reversed(self.r.lrange(S + "req:" + date, 0, self.max_per_day - 1))]
            m["days"][day] = {"summary": self._h("day:" + date), "requests": reqs}
        return {"total": total, "cache_stats": cache_stats(total), "months": months,
                "keys": {k: self._h("key:" + k) for k in sorted(self.r.smembers(S + "keys"))},
                "models": {m: self._h("model:" + m) for m in sorted(self.r.smembers(S + "models"))},
                "accounts": self.accounts(),
                "generated_at": datetime.now(UTC).isoformat()}

    def write_snapshot(self, force: bool = False) -> bool:
        """Write log/stats.json if anything changed, by one worker at a time. False only while another
        worker holds the snapshot lock (the file may then miss this worker's latest requests)."""
        token = str(os.getpid())
        if not self.r.set(S + "snapshot_lock", token, nx=True, px=10000):
            return False
        try:
            version = self.r.get(S + "version") or "0"
            if not force and version == self.r.get(S + "snapshot_version") and self.path.exists():
                return True
            data = json.dumps(self.snapshot(), indent=1, default=str)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".stats-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.r.set(S + "snapshot_version", version)
            return True
        finally:
            if self.r.get(S + "snapshot_lock") == token:
                self.r.delete(S + "snapshot_lock")

    def restore_if_empty(self) -> bool:
        """A new machine (empty Redis) with an old snapshot: load the history back, once."""
        if self.r.exists(S + "total") or not self.path.exists():
            return False
        if not self.r.set(S + "restore_lock", "1", nx=True, ex=60):
            return False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.error("stats: cannot read snapshot %s: %s", self.path, exc)
            return False
        pipe = self.r.pipeline(transaction=True)

        def put(name: str, s: dict[str, Any]) -> None:
            vals = {k: int(s.get(k) or 0) for k in COUNTERS if s.get(k)}
            if vals:
                pipe.hset(S + name, mapping=vals)
        put("total", data.get("total") or {})
        for month, m in (data.get("months") or {}).items():
            put("month:" + month, m.get("summary") or {})
            for day, d in (m.get("days") or {}).items():
                date = f"{month}-{day}"
                pipe.sadd(S + "days", date)
                put("day:" + date, d.get("summary") or {})
                for req in d.get("requests") or []:
                    pipe.lpush(S + "req:" + date, json.dumps(req, separators=(",", ":")))
                pipe.expire(S + "req:" + date, self.request_ttl_s)
        for k, s in (data.get("keys") or {}).items():
            pipe.sadd(S + "keys", k)
            put("key:" + k, s)
        for m, s in (data.get("models") or {}).items():
            pipe.sadd(S + "models", m)
            put("model:" + m, s)
        for a, s in (data.get("accounts") or {}).items():
            pipe.sadd(S + "accounts", a)
            put("account:" + a, s)
        pipe.execute()
        log.info("stats: restored history from %s", self.path)
        return True

    def run_snapshots(self, interval: float) -> None:
        """Background loop in each worker; the Redis lock makes one of them write at a time."""
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.write_snapshot()
                except Exception as exc:  # keep the loop alive whatever Redis or the disk do
                    log.warning("stats: snapshot failed: %s", exc)
        threading.Thread(target=loop, daemon=True).start()

    def stop(self, wait_s: float = 10.0) -> None:
        """The last snapshot at shutdown: waits (boundedly) for a worker that is writing one, so the
        requests this worker answered last are in the file; one failure is logged, never retried."""
        self._stop.set()
        deadline = time.monotonic() + wait_s
        try:
            while not self.write_snapshot() and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception as exc:
            log.warning("stats: final snapshot failed: %s", exc)

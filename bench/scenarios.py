"""The four measurements of the benchmark. Each takes running servers and returns plain dicts."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
import requests
from common import MODEL, BareCli, fetch_record, pct, relay_stream, rss_mb, sse_lines, summary_ms, user_msg, wait_for

WORDS = "MOCK:words=40"


# -- 1. time to first token: relay vs bare CLI ------------------------------------------------------
def latency(variants: dict[str, Callable[[str], dict[str, Any]]], runs: int, warmup: int = 2,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every variant `runs` times, sequentially, rotating which one goes first in each round."""
    names = list(variants)
    samples: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "total": [], "inner": []} for n in names}
    for i in range(warmup):
        for name in names:
            variants[name](f"Warm-up {i} for {name}. {WORDS}")
    for i in range(runs):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            res = variants[name](f"Benchmark run {i}: please answer briefly. {WORDS}")
            samples[name]["ttft"].append(res["ttft"])
            samples[name]["total"].append(res["total"])
            if res.get("relay_ttft_ms") is not None:  # client TTFT minus the CLI's own part
                samples[name]["inner"].append(res["ttft"] - res["relay_ttft_ms"] / 1000.0)
        if (i + 1) % 5 == 0:
            log(f"  latency: {i + 1}/{runs} rounds")
    out: dict[str, Any] = {"runs": runs, "warmup": warmup, "prompt_marker": WORDS}
    for name in names:
        out[name] = {"ttft": summary_ms(samples[name]["ttft"]), "total": summary_ms(samples[name]["total"]),
                     "raw_ttft_ms": [round(x * 1000, 1) for x in samples[name]["ttft"]]}
        if samples[name]["inner"]:
            out[name]["outside_cli"] = summary_ms(samples[name]["inner"])
    return out


def relay_variant(url: str) -> Callable[[str], dict[str, Any]]:
    """One relay run, plus the relay's own TTFT (CLI spawn to first token) from its request record."""
    def run(text: str) -> dict[str, Any]:
        res = relay_stream(url, [user_msg(text)])
        res["relay_ttft_ms"] = fetch_record(url, res["request_id"]).get("ttft_ms")
        return res
    return run


def bare_variant(bare: BareCli) -> Callable[[str], dict[str, Any]]:
    return bare.run


# -- 2. worker memory per in-flight stream ---------------------------------------------------------
def _sample_rss(pid: int, n: int = 5, every: float = 0.2) -> float:
    vals = []
    for _ in range(n):
        vals.append(rss_mb(pid))
        time.sleep(every)
    return statistics.median(vals)


def _has_content(chunk: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


def memory(url: str, worker_pid: int, streams: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Worker RSS idle vs. with `streams` streams open (each past its first token); CLIs apart."""
    worker = psutil.Process(worker_pid)
    relay_stream(url, [user_msg("Memory warm-up. MOCK:words=5")])
    wait_for(lambda: not worker.children(), 10)
    time.sleep(1.0)
    idle = _sample_rss(worker_pid)

    ready = [threading.Event() for _ in range(streams)]
    release = threading.Event()
    errors: list[str] = []

    def hold(i: int) -> None:
        body = {"model": MODEL, "stream": True,
                "messages": [user_msg(f"Memory stream {i}. MOCK:slow=300 MOCK:words=60")]}
        try:
            with requests.post(url + "/v1/chat/completions", data=json.dumps(body), stream=True,
                               headers={"Content-Type": "application/json"}, timeout=(10, 120)) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"status {resp.status_code}: {resp.text[:300]}")
                # Keep a reference to the line iterator: a discarded one is closed, and that
                # closes the connection (the relay would see a hang-up and stop the run).
                lines = sse_lines(resp)
                for line in lines:
                    if line.startswith(b"data: {") and _has_content(json.loads(line[6:])):
                        break
                else:
                    raise RuntimeError("stream ended before any content")
                ready[i].set()
                release.wait(120)  # hold the stream open; closing the response hangs up
                del lines
        except Exception as exc:  # reported below
            errors.append(f"stream {i}: {exc}")
            ready[i].set()

    threads = [threading.Thread(target=hold, args=(i,), daemon=True) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    try:
        if not all(ev.wait(max(0.1, 90 - (time.perf_counter() - t0))) for ev in ready):
            raise RuntimeError("not every memory stream produced a first token within 90 s")
        if errors:
            raise RuntimeError("memory streams failed: " + "; ".join(errors[:3]))
        all_open_s = time.perf_counter() - t0
        log(f"  memory: {streams} streams open after {all_open_s:.1f} s")
        time.sleep(0.5)
        clis = worker.children()
        cli_rss = []
        for c in clis:
            try:
                cli_rss.append(rss_mb(c.pid, with_children=True))
            except psutil.Error:
                pass
        loaded = _sample_rss(worker_pid)
        in_flight = min(len(clis), len(worker.children()))  # a stream that already ended has no CLI
        if in_flight < streams:
            log(f"  memory: WARNING only {in_flight} of {streams} streams were still in flight when sampled")
    finally:
        release.set()
        for t in threads:
            t.join(30)
    gone = wait_for(lambda: not worker.children(), 20)
    time.sleep(1.0)
    after = _sample_rss(worker_pid)
    return {"streams": streams, "worker_pid": worker_pid, "seconds_until_all_streaming": round(all_open_s, 2),
            "worker_rss_idle_mb": round(idle, 2), "worker_rss_loaded_mb": round(loaded, 2),
            "worker_rss_after_close_mb": round(after, 2),
            "in_flight_at_sample": in_flight, "worker_mb_per_stream": round((loaded - idle) / max(1, in_flight), 3),
            "cli_processes": len(clis), "cli_rss_avg_mb": round(statistics.mean(cli_rss), 1) if cli_rss else None,
            "cli_rss_total_mb": round(sum(cli_rss), 1), "clis_gone_after_close": gone}


# -- 3. GET /v1/models throughput ------------------------------------------------------------------
def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def models_rps(url: str, worker_pids: list[int], threads: int = 8, duration: float = 5.0,
               max_requests: int = 50000) -> dict[str, Any]:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = [0]
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker() -> None:
        s = requests.Session()
        s.get(url + "/v1/models", timeout=10)  # connect before the clock starts
        mine: list[float] = []
        start.wait()
        try:
            while time.perf_counter() < stop_at[0]:
                with lock:
                    if issued[0] >= max_requests:
                        break
                    issued[0] += 1
                t = time.perf_counter()
                r = s.get(url + "/v1/models", timeout=10)
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}")
                mine.append(time.perf_counter() - t)
        except Exception as exc:
            errors.append(str(exc))
        finally:
            with lock:
                lat.extend(mine)
            s.close()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    stop_at[0] = time.perf_counter() + duration + 0.01
    cpu0 = _cpu_s(worker_pids), _cpu_s([psutil.Process().pid])
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join(duration + 30)
    elapsed = time.perf_counter() - t0
    server_cpu, client_cpu = _cpu_s(worker_pids) - cpu0[0], _cpu_s([psutil.Process().pid]) - cpu0[1]
    if errors:
        raise RuntimeError("GET /v1/models failed: " + "; ".join(errors[:3]))
    ms = [x * 1000 for x in lat]
    return {"threads": threads, "duration_s": round(elapsed, 2), "requests": len(lat),
            "rps": round(len(lat) / elapsed, 1), "p50_ms": round(pct(ms, 50) or 0, 2),
            "p95_ms": round(pct(ms, 95) or 0, 2), "p99_ms": round(pct(ms, 99) or 0, 2),
            "workers": len(worker_pids), "server_cpu_cores": round(server_cpu / elapsed, 2),
            "client_cpu_cores": round(client_cpu / elapsed, 2)}


# -- 4. conversations: resume vs full-history replay -----------------------------------------------
FILLER = ("The quick brown fox jumps over the lazy dog while the relay keeps the conversation in a CLI "
          "session, so only the newest message has to be written to the process on every turn. ")


def long_user_text(conv: int, turn: int, size: int = 400) -> str:
    """A user message of about `size` characters that asks the mock for 40 words."""
    head = f"Conversation {conv}, turn {turn}. "
    tail = f" {WORDS}"
    body = (FILLER * (size // len(FILLER) + 1))[: size - len(head) - len(tail)]
    return head + body + tail


def conversation(resume_url: str, replay_url: str, checkpoints: tuple[int, ...], conversations: int,
                 replay_repeats: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build `conversations` conversations turn by turn (X-Session-Id, sessions on), in lockstep.

    At each checkpoint turn N, the same N-turn history is also sent `replay_repeats` times to the
    relay with sessions disabled (which replays the whole history to a fresh CLI every time).
    """
    last = max(checkpoints)
    sids = [f"bench-conv-{uuid.uuid4().hex[:12]}" for _ in range(conversations)]
    histories: list[list[dict[str, Any]]] = [[] for _ in range(conversations)]
    turns: list[dict[str, Any]] = []
    at: dict[int, dict[str, list[dict[str, Any]]]] = {n: {"resume": [], "replay": []} for n in checkpoints}
    for k in range(1, last + 1):
        for c in range(conversations):
            hist = histories[c]
            hist.append(user_msg(long_user_text(c, k)))
            res = relay_stream(resume_url, hist, headers={"X-Session-Id": sids[c]})
            rec = fetch_record(resume_url, res["request_id"])
            row = {"conversation": c, "turn": k, "mode": "resume", "ttft_ms": round(res["ttft"] * 1000, 1),
                   "total_ms": round(res["total"] * 1000, 1), "relay_ttft_ms": rec.get("ttft_ms"),
                   "bytes_to_cli": rec.get("bytes_to_cli"), "resumed": rec.get("resumed"),
                   "history_chars": sum(len(m["content"]) for m in hist)}
            turns.append(row)
            if k in at:
                at[k]["resume"].append(row)
                if c == 0:
                    for _ in range(replay_repeats):
                        rp = relay_stream(replay_url, hist)
                        rrec = fetch_record(replay_url, rp["request_id"])
                        at[k]["replay"].append({
                            "conversation": c, "turn": k, "mode": "replay", "ttft_ms": round(rp["ttft"] * 1000, 1),
                            "total_ms": round(rp["total"] * 1000, 1), "relay_ttft_ms": rrec.get("ttft_ms"),
                            "bytes_to_cli": rrec.get("bytes_to_cli"), "resumed": rrec.get("resumed"),
                            "same_answer": rp["content"] == res["content"]})
            hist.append({"role": "assistant", "content": res["content"]})  # exactly as received
        if k % 10 == 0:
            log(f"  conversation: turn {k}/{last}")
    summary = {}
    for n, modes in at.items():
        summary[str(n)] = {mode: _conv_summary(rows) for mode, rows in modes.items()}
    return {"checkpoints": list(checkpoints), "conversations": conversations, "replay_repeats": replay_repeats,
            "user_message_chars": len(long_user_text(0, 1)), "at_turn": summary,
            "turns": turns, "replay_rows": [r for m in at.values() for r in m["replay"]]}


def _conv_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    return {"samples": len(rows), "ttft_p50_ms": round(statistics.median(r["ttft_ms"] for r in rows), 1),
            "relay_ttft_p50_ms": statistics.median(r["relay_ttft_ms"] or 0 for r in rows),
            "total_p50_ms": round(statistics.median(r["total_ms"] for r in rows), 1),
            "bytes_to_cli": int(statistics.median(r["bytes_to_cli"] or 0 for r in rows)),
            "resumed": all(bool(r["resumed"]) for r in rows)}

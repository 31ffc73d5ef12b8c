"""Benchmark of the relay against the real Claude Code CLI and a mock Anthropic API.

Starts its own Redis, the mock API and the relay under gunicorn (gevent workers), then measures:
  1. time to first token and total time, relay vs. the same CLI run bare (p50/p95, ratio, overhead);
  2. worker memory per in-flight stream (1 worker, N streams held open), and CLI process memory;
  3. requests/second on GET /v1/models (2 workers, threaded client);
  4. conversations: resume (X-Session-Id) vs. full-history replay (sessions off) at turns 2, 10, 30;
  5. warm processes: bare cold CLI, bare warm process, the relay with its pool and without (bench/warm.py);
  6. tool steps: agent loops through the relay (pool on, held steps) vs. the same client straight at the
     mock, for chat completions, Messages and Claude Code itself as the client (bench/tools.py);
  7. follow-ups with 16 live conversations on the pool's defaults vs. a cold CLI run (bench/warm.py).
Sections 1-4 run the relay with the pool off (one CLI per run); sections 5-7 with the pool on.
Prints Markdown tables and writes every figure to bench/results.json.

Run with `make bench`. Knobs: BENCH_SECTIONS (default "latency,rps,conversation,memory,warm,tools,followups"),
BENCH_WARM_RUNS (rounds of the warm comparison, default 20), BENCH_RUNS (runs per latency variant, default 20), BENCH_STREAMS (10),
BENCH_CONVERSATIONS (3), BENCH_REPLAY_REPEATS (3), BENCH_RPS_SECONDS (5), BENCH_TURNS (2,10,30),
BENCH_TOOL_ROUNDS (SDK tool loops per variant, 10), BENCH_TOOL_STEPS (tool calls per loop, 6),
BENCH_CC_ROUNDS (Claude Code runs each way, 6), BENCH_MODEL_MS (the mock's time per answer in the model-time
tool loops, 1000; 0 skips them), BENCH_MODEL_ROUNDS (2), BENCH_LIVE_CONVERSATIONS (16), BENCH_FOLLOWUP_ROUNDS (2).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
from common import BareCli, kill_tree, processes_under  # noqa: E402
from harness import RedisServer, RelayServer, default_cli_bin, relay_env  # noqa: E402
from mock_anthropic import MockAnthropic  # noqa: E402
from report import footer, markdown  # noqa: E402
from scenarios import bare_variant, conversation, latency, memory, models_rps, relay_variant  # noqa: E402
from tools import (  # noqa: E402
    BareHeld,
    ClaudeCodeClient,
    claude_code_loops,
    model_time_loops,
    sdk_loops,
    tools_markdown,
)
from warm import many_followups, many_markdown, warm_bench, warm_markdown  # noqa: E402

RESULTS = BENCH / "results.json"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


class Servers:
    """Everything the bench starts, stopped in reverse order whatever happens."""

    def __init__(self, tmp: Path, cli_bin: str) -> None:
        self.tmp = tmp
        self.cli_bin = cli_bin
        self._stops: list[tuple[str, Callable[[], Any]]] = []
        self.bares: list[BareCli] = []

    def start(self) -> Servers:
        (self.tmp / "redis").mkdir(parents=True)
        self.redis = RedisServer(self.tmp / "redis")
        self._stops.append(("redis", self.redis.stop))
        self.mock = MockAnthropic().start()
        self._stops.append(("mock API", self.mock.stop))
        return self

    def relay(self, name: str, extra: dict[str, str]) -> RelayServer:
        d = self.tmp / name
        d.mkdir()
        srv = RelayServer(d, relay_env(self.redis.fresh_db(), self.cli_bin, self.mock.url, d, extra))
        self._stops.append((f"relay {name}", srv.stop))
        t = time.perf_counter()
        srv.start()
        log(f"relay {name} up in {time.perf_counter() - t:.1f} s at {srv.url} (workers {srv.worker_pids()})")
        return srv

    def stop_relay(self, srv: RelayServer) -> None:
        srv.stop()
        self._stops = [(n, s) for n, s in self._stops if s != srv.stop]

    def bare(self, srv: RelayServer) -> BareCli:
        b = BareCli(srv.env, self.cli_bin, srv.tmp / "bare")
        self.bares.append(b)
        return b

    def stop_all(self) -> None:
        for b in self.bares:
            b.stop()
        for name, stop in reversed(self._stops):
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                log(f"stopping {name} failed: {exc}")
        self._stops.clear()
        left = processes_under(self.tmp)
        for p in left:
            kill_tree(p.pid)
        if left:
            log(f"killed {len(left)} leftover process(es) under {self.tmp}: {[p.pid for p in left]}")


def classic(servers: Servers, res: dict[str, Any], sections: set[str], runs: int) -> None:
    """Sections 1-3: the relay with the pool off (one CLI per run) against the bare CLI, /v1/models,
    conversations."""
    main_relay = servers.relay("main", {"RELAY_WORKERS": "2"})
    replay_relay = servers.relay("replay", {"RELAY_WORKERS": "2", "RELAY_SESSIONS__ENABLED": "false"})
    note_cli(res, main_relay)
    if "latency" in sections:
        latency_section(servers, res, main_relay, replay_relay, runs)
    if "rps" in sections:
        log("2/7 GET /v1/models throughput")
        res["models_rps"] = models_rps(main_relay.url, main_relay.worker_pids(), threads=8,
                                       duration=float(env_int("BENCH_RPS_SECONDS", 5)))
    if "conversation" in sections:
        log("3/7 conversations: resume vs replay")
        turns = tuple(int(x) for x in os.environ.get("BENCH_TURNS", "2,10,30").split(","))
        res["conversation"] = conversation(main_relay.url, replay_relay.url, turns,
                                           env_int("BENCH_CONVERSATIONS", 3), env_int("BENCH_REPLAY_REPEATS", 3),
                                           log=log)
    servers.stop_relay(main_relay)
    servers.stop_relay(replay_relay)


def latency_section(servers: Servers, res: dict[str, Any], main_relay: RelayServer, replay_relay: RelayServer,
                    runs: int) -> None:
    log(f"1/7 latency: {runs} runs each of relay, relay without sessions and bare CLI")
    bare = servers.bare(main_relay)
    lat = latency({"relay": relay_variant(main_relay.url), "relay_nosessions": relay_variant(replay_relay.url),
                   "bare": bare_variant(bare)}, runs, log=log)
    lat["overhead_ms"] = round(lat["relay"]["ttft"]["p50_ms"] - lat["bare"]["ttft"]["p50_ms"], 1)
    lat["overhead_nosessions_ms"] = round(lat["relay_nosessions"]["ttft"]["p50_ms"]
                                          - lat["bare"]["ttft"]["p50_ms"], 1)
    for key in ("ttft", "total"):
        lat[f"ratio_{key}_p50"] = round(lat["relay"][key]["p50_ms"] / lat["bare"][key]["p50_ms"], 3)
        lat[f"ratio_{key}_p95"] = round(lat["relay"][key]["p95_ms"] / lat["bare"][key]["p95_ms"], 3)
    lat["bare_argv"] = [a if a != bare.argv[0] else "claude" for a in bare.argv]
    res["latency"] = lat


def note_cli(res: dict[str, Any], srv: RelayServer) -> None:
    """The CLI version and path, as the relay's /health reports them."""
    health = requests.get(srv.url + "/health", timeout=10).json()
    res["environment"].update(cli_version=health["cli"]["version"], cli_path=health["cli"]["path"])


def tools_section(servers: Servers, res: dict[str, Any]) -> None:
    rounds, steps, cc_rounds = env_int("BENCH_TOOL_ROUNDS", 10), env_int("BENCH_TOOL_STEPS", 6), env_int("BENCH_CC_ROUNDS", 6)
    log(f"6/7 tool steps: {rounds} loops of {steps} calls per SDK variant, {cc_rounds} Claude Code runs each way")
    relay = servers.relay("tools", {"RELAY_WORKERS": "2", "RELAY_POOL__ENABLED": "true"})
    note_cli(res, relay)
    bare = BareHeld(relay.env, servers.cli_bin, relay.tmp / "bare-held")
    res["tools"] = {"sdk": sdk_loops(relay.url, servers.mock, rounds, steps, bare, log=log)}
    model_ms, model_rounds = env_int("BENCH_MODEL_MS", 1000), env_int("BENCH_MODEL_ROUNDS", 2)
    if model_ms and model_rounds:
        res["tools"]["model_time"] = model_time_loops(relay.url, servers.mock, model_rounds, steps, model_ms, log=log)
    client = ClaudeCodeClient(servers.cli_bin, servers.tmp / "claude-code-client")
    res["tools"]["claude_code"] = claude_code_loops(relay.url, servers.mock, client, cc_rounds, steps, log=log)
    servers.stop_relay(relay)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    cli_bin = default_cli_bin()
    if not Path(cli_bin).exists():
        print(f"bench: the Claude Code CLI is missing at {cli_bin}; run `make bench`", file=sys.stderr)
        return 2
    runs = env_int("BENCH_RUNS", 20)
    streams = env_int("BENCH_STREAMS", 10)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    res: dict[str, Any] = {}
    ok = False
    servers = Servers(tmp, cli_bin)
    try:
        servers.start()
        sections = set(os.environ.get("BENCH_SECTIONS", "latency,rps,conversation,memory,warm,tools,followups")
                       .split(","))
        res["environment"] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
        if sections & {"latency", "rps", "conversation"}:
            classic(servers, res, sections, runs)
        if "memory" in sections:
            log(f"4/7 memory: 1 worker, {streams} streams")
            mem_relay = servers.relay("memory", {"RELAY_WORKERS": "1", "RELAY_MAX_CONCURRENT_RUNS": "20"})
            workers = mem_relay.worker_pids()
            if len(workers) != 1:
                raise RuntimeError(f"expected 1 worker, found {workers}")
            res["memory"] = memory(mem_relay.url, workers[0], streams, log=log)
            servers.stop_relay(mem_relay)
        if "warm" in sections:
            warm_runs = env_int("BENCH_WARM_RUNS", 20)
            log(f"5/7 warm processes: {warm_runs} rounds")
            pool_relay = servers.relay("warm_pool", {"RELAY_WORKERS": "2", "RELAY_POOL__ENABLED": "true"})
            off_relay = servers.relay("warm_off", {"RELAY_WORKERS": "2", "RELAY_POOL__ENABLED": "false"})
            note_cli(res, pool_relay)
            res["warm"] = warm_bench(pool_relay, off_relay, servers.bare(off_relay), cli_bin, warm_runs, log=log)
            servers.stop_relay(pool_relay)
            servers.stop_relay(off_relay)
        if "tools" in sections:
            tools_section(servers, res)
        if "followups" in sections:
            live, rounds = env_int("BENCH_LIVE_CONVERSATIONS", 16), env_int("BENCH_FOLLOWUP_ROUNDS", 2)
            log(f"7/7 follow-ups with {live} live conversations, {rounds} rounds")
            many = servers.relay("followups", {"RELAY_WORKERS": "2", "RELAY_POOL__ENABLED": "true"})
            note_cli(res, many)
            res["followups"] = many_followups(many, servers.bare(many), live, rounds, log=log)
            servers.stop_relay(many)
        ok = True
    except BaseException as exc:
        log(f"FAILED: {type(exc).__name__}: {exc}")
        raise
    finally:
        log("stopping servers")
        servers.stop_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp} (gunicorn logs, CLI stderr) for inspection")
    res["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    res["environment"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(markdown(res))
    if "warm" in res:
        print("\n".join(warm_markdown(res["warm"])))
    if "tools" in res:
        print("\n" + "\n".join(tools_markdown(res["tools"])))
    if "followups" in res:
        print("\n" + "\n".join(many_markdown(res["followups"])))
    print("\n" + footer(res))
    log(f"figures written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

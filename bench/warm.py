"""Warm CLI processes (issue 11), side by side in every round: a bare cold `claude -p`, a bare warm
process (spawned, idle, then the prompt), a new conversation and a follow-up turn through the relay
with its pool (2 workers), and the same through the relay with the pool off. Prints ratios against
the bare cold CLI, CPU per turn and memory per warm process."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
import requests
from common import MODEL, BareCli, fetch_record, kill_tree, pct, relay_stream, summary_ms, user_msg, wait_for

from relay.cli.invocation import spare_argv
from relay.cli.process import _die_with_parent
from relay.core.prompt import build_prompt

WORDS = "MOCK:words=40"


class BareWarm:
    """A process spawned with the relay's flags and probed ready, left idle, then given one prompt."""

    def __init__(self, bare: BareCli, cli_bin: str) -> None:
        self.bare, self.cli_bin = bare, cli_bin
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        argv = spare_argv(self.cli_bin, MODEL, str(uuid.uuid4()))
        self.proc = subprocess.Popen(argv, cwd=self.bare.cwd, env=self.bare.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent, close_fds=True)
        self._write({"type": "control_request", "request_id": "probe", "request": {"subtype": "mcp_status"}})
        assert self.proc.stdout
        self.proc.stdout.readline()  # the probe's answer: ready

    def _write(self, obj: dict[str, Any]) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def run(self, text: str) -> dict[str, Any]:
        assert self.proc and self.proc.stdout
        line = build_prompt("", [{"role": "user", "content": [{"type": "text", "text": text}]}], "replace",
                            True).stdin_line()
        first = None
        t0 = time.perf_counter()
        # what the pool sends a spare: the system prompt (replace mode: empty) then the prompt
        self._write({"type": "control_request", "request_id": "init",
                     "request": {"subtype": "initialize", "hooks": None, "systemPrompt": ""}})
        self.proc.stdin.write(line)  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        try:
            for raw in self.proc.stdout:
                ev = json.loads(raw)
                if ev.get("type") == "stream_event" and first is None:
                    delta = (ev.get("event") or {}).get("delta") or {}
                    if delta.get("type") == "text_delta" and delta.get("text"):
                        first = time.perf_counter()
                elif ev.get("type") == "result":
                    done = time.perf_counter()
                    break
            else:
                raise RuntimeError("the bare warm process exited without a result")
        finally:
            kill_tree(self.proc.pid)
            self.proc.wait(10)
            self.proc = None
        assert first is not None
        return {"ttft": first - t0, "total": done - t0}


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process tree, including its reaped descendants."""
    total = 0.0
    try:
        procs = [psutil.Process(root_pid)] + psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def pool_stats(url: str) -> dict[str, Any]:
    return requests.get(url + "/stats", timeout=30).json()["pool"]


def warm_bench(pool_relay: Any, off_relay: Any, bare: BareCli, cli_bin: str, runs: int,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    names = ["bare_cold", "bare_warm", "relay_new", "relay_followup", "relay_off_new", "relay_off_followup"]
    ttft: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {"relay_followup": [], "relay_off_followup": [], "relay_new": [],
                                   "relay_off_new": []}
    how: dict[str, list[str]] = {"relay_new": [], "relay_followup": []}
    bw = BareWarm(bare, cli_bin)
    pending: dict[str, list[list[dict[str, Any]]]] = {"pool": [], "off": []}  # conversations awaiting turn 2

    def new_conv(url: str, key: str, i: int) -> float:
        sid = f"bench-warm-{key}-{i}-{uuid.uuid4().hex[:6]}"
        msgs = [user_msg(f"New conversation {i}: please answer briefly. {WORDS}")]
        res = relay_stream(url, msgs, {"X-Session-Id": sid})
        pending[key].append(msgs + [{"role": "assistant", "content": res["content"]}, {"sid": sid}])
        return float(res["ttft"])

    def follow(url: str, key: str, i: int) -> float:
        if not pending[key]:  # the rotation ran this relay's new conversation after its follow-up
            new_conv(url, key, i)
            if key == "pool":
                spare_ready()
        conv = pending[key].pop(0)
        sid = conv[-1]["sid"]
        msgs = conv[:-1] + [user_msg(f"Follow-up {i}: and then? {WORDS}")]
        return relay_stream(url, msgs, {"X-Session-Id": sid})["ttft"]

    def timed_cpu(root: int, name: str, fn: Callable[[], float]) -> float:
        c0 = tree_cpu_s(root)
        t = fn()
        cpu[name].append(tree_cpu_s(root) - c0)
        return t

    def last_pool_use(url: str) -> str:
        return str(requests.get(url + "/v1/usage/recent?limit=1", timeout=10).json()["data"][0].get("pool"))

    def spare_ready() -> None:
        wait_for(lambda: pool_stats(pool_relay.url)["spares"]["ready"] >= 1, timeout=60, interval=0.1)

    pool_root, off_root = pool_relay.proc.pid, off_relay.proc.pid

    def step(name: str, i: int) -> float:
        if name == "bare_cold":
            return float(bare.run(f"Cold run {i}: please answer briefly. {WORDS}")["ttft"])
        if name == "relay_followup":
            return timed_cpu(pool_root, name, lambda: follow(pool_relay.url, "pool", i))
        if name == "relay_off_followup":
            return timed_cpu(off_root, name, lambda: follow(off_relay.url, "off", i))
        if name == "relay_off_new":
            return timed_cpu(off_root, name, lambda: new_conv(off_relay.url, "off", i))
        return timed_cpu(pool_root, name, lambda: new_conv(pool_relay.url, "pool", i))
    # warm-up: one of each, and the conversations the first round's follow-ups continue
    bare.run(f"Warm-up. {WORDS}")
    spare_ready()
    new_conv(pool_relay.url, "pool", -1)
    new_conv(off_relay.url, "off", -1)
    for i in range(runs):
        bw.spawn()  # idle while the other variants run
        steps = ["bare_cold", "relay_followup", "relay_off_followup", "relay_off_new"]
        shift = i % len(steps)
        for name in steps[shift:] + steps[:shift]:
            ttft[name].append(step(name, i))
            if name == "relay_followup":
                how["relay_followup"].append(last_pool_use(pool_relay.url))
        spare_ready()  # a new conversation meets a ready spare (the pool refills it within ~1 s)
        ttft["relay_new"].append(step("relay_new", i))
        how["relay_new"].append(last_pool_use(pool_relay.url))
        spare_ready()  # its replacement's start-up must not land in another variant's CPU or time
        ttft["bare_warm"].append(bw.run(f"Warm run {i}: please answer briefly. {WORDS}")["ttft"])
        if (i + 1) % 5 == 0:
            log(f"  warm: {i + 1}/{runs} rounds")
    st = pool_stats(pool_relay.url)
    uss = []
    for w in st["warm"]:
        try:
            uss.append(psutil.Process(w["pid"]).memory_full_info().uss / 1e6)
        except psutil.Error:
            pass
    cold50, cold90 = pct(ttft["bare_cold"], 50), pct(ttft["bare_cold"], 90)
    out: dict[str, Any] = {"runs": runs, "prompt_marker": WORDS}
    for n in names:
        out[n] = {"ttft": summary_ms(ttft[n]), "p90_ms": round((pct(ttft[n], 90) or 0) * 1000, 1),
                  "ratio_p50": round((pct(ttft[n], 50) or 0) / cold50, 3) if cold50 else None,
                  "ratio_p90": round((pct(ttft[n], 90) or 0) / cold90, 3) if cold90 else None}
    out["relay_followup"]["ratio_p90_vs_cold_p50"] = round((pct(ttft["relay_followup"], 90) or 0) / cold50, 3) \
        if cold50 else None
    out["cpu_s_per_turn"] = {k: round(sum(v) / len(v), 3) if v else None for k, v in cpu.items()}
    out["served"] = {k: {x: v.count(x) for x in sorted(set(v))} for k, v in how.items()}
    out["warm_process_memory"] = {"count": len(st["warm"]),
                                  "rss_mb_avg": round(sum(w["rss_mb"] for w in st["warm"]) / len(st["warm"]), 1)
                                  if st["warm"] else None,
                                  "uss_mb_avg": round(sum(uss) / len(uss), 1) if uss else None,
                                  "turns": [w["turns"] for w in st["warm"]]}
    out["pool"] = {k: st.get(k) for k in ("hits", "misses", "killed")}
    return out


def warm_markdown(w: dict[str, Any]) -> list[str]:
    labels = {"bare_cold": "bare cold `claude -p` (spawn + prompt)",
              "bare_warm": "bare warm process (spawned, idle, then the prompt)",
              "relay_new": "relay, pool on: new conversation (spare)",
              "relay_followup": "relay, pool on: follow-up turn (2 workers)",
              "relay_off_new": "relay, pool off: new conversation",
              "relay_off_followup": "relay, pool off: follow-up turn (resume)"}
    out = [f"**Warm processes** ({w['runs']} rounds, each variant once per round in rotating order, prompt with "
           f"`{w['prompt_marker']}`; TTFT seen by the client):", "",
           "| Path | TTFT p50 | TTFT p90 | min | max | p50 / cold p50 | p90 / cold p90 |",
           "|---|---|---|---|---|---|---|"]
    for k, label in labels.items():
        t = w[k]["ttft"]
        out.append(f"| {label} | {t['p50_ms']:.0f} ms | {w[k]['p90_ms']:.0f} ms | {t['min_ms']:.0f} ms | "
                   f"{t['max_ms']:.0f} ms | {w[k]['ratio_p50']:.2f}x | {w[k]['ratio_p90']:.2f}x |")
    cpu, mem = w["cpu_s_per_turn"], w["warm_process_memory"]
    out += ["", f"Targets: new conversation p50 ≤ 0.45x cold (measured {w['relay_new']['ratio_p50']:.2f}x); "
            f"follow-up p50 ≤ 0.25x (measured {w['relay_followup']['ratio_p50']:.2f}x) and p90 ≤ 0.5x "
            f"(measured {w['relay_followup']['ratio_p90']:.2f}x of cold p90, "
            f"{w['relay_followup']['ratio_p90_vs_cold_p50']:.2f}x of cold p50).", "",
            f"CPU per turn (whole relay process tree, CLIs included): follow-up {cpu['relay_followup']} s with the pool, "
            f"{cpu['relay_off_followup']} s without; new conversation {cpu['relay_new']} s with the pool (the spare's "
            f"own start-up is paid ahead, outside the request), {cpu['relay_off_new']} s without.", "",
            f"Memory per warm process: {mem['rss_mb_avg']} MB RSS, {mem['uss_mb_avg']} MB private (USS), "
            f"{mem['count']} warm processes after turns {mem['turns']}.", "",
            f"Served: {w['served']}; pool counters: {w['pool']}."]
    return out


def many_followups(relay: Any, bare: BareCli, conversations: int, rounds: int,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """`conversations` live conversations on one relay with its pool defaults (max_warm "auto"): start
    them back to back (as clients would: nobody waits for a spare), then send each a follow-up, round
    robin, oldest first, `rounds` times. A bare cold CLI run after every second follow-up gives the
    baseline in the same stretch of time."""
    url = relay.url
    health = requests.get(url + "/health", timeout=10).json().get("pool") or {}
    convs: list[dict[str, Any]] = []
    new_ttft: list[float] = []
    new_how: list[str] = []
    bare.run(f"Warm-up. {WORDS}")
    for c in range(conversations):
        sid = f"bench-many-{c}-{uuid.uuid4().hex[:6]}"
        msgs = [user_msg(f"Conversation {c} of {conversations}: please answer briefly. {WORDS}")]
        res = relay_stream(url, msgs, {"X-Session-Id": sid})
        new_ttft.append(res["ttft"])
        new_how.append(_how(fetch_record(url, res["request_id"])))
        convs.append({"sid": sid, "msgs": msgs + [{"role": "assistant", "content": res["content"]}]})
    follow: list[float] = []
    how: list[str] = []
    cold: list[float] = []
    n = 0
    for r in range(rounds):
        for c, conv in enumerate(convs):  # oldest first
            conv["msgs"].append(user_msg(f"Follow-up {r} to conversation {c}: and then? {WORDS}"))
            res = relay_stream(url, conv["msgs"], {"X-Session-Id": conv["sid"]})
            conv["msgs"].append({"role": "assistant", "content": res["content"]})
            follow.append(res["ttft"])
            how.append(_how(fetch_record(url, res["request_id"])))
            n += 1
            if n % 2 == 0:
                cold.append(bare.run(f"Cold run {n}: please answer briefly. {WORDS}")["ttft"])
        log(f"  {conversations} conversations: follow-up round {r + 1}/{rounds}")
    st = pool_stats(url)
    cold50, f50, f90 = pct(cold, 50), pct(follow, 50), pct(follow, 90)
    return {"conversations": conversations, "rounds": rounds, "prompt_marker": WORDS,
            "max_warm": health.get("max_warm"), "max_warm_basis": health.get("max_warm_basis"),
            "new": summary_ms(new_ttft), "new_served": {x: new_how.count(x) for x in sorted(set(new_how))},
            "followup": summary_ms(follow), "followup_p90_ms": round((f90 or 0) * 1000, 1),
            "followup_served": {x: how.count(x) for x in sorted(set(how))},
            "cold": summary_ms(cold),
            "ratio_p50": round(f50 / cold50, 3) if f50 and cold50 else None,
            "ratio_p90_vs_cold_p50": round(f90 / cold50, 3) if f90 and cold50 else None,
            "warm_after": len(st.get("warm") or []), "pool": {k: st.get(k) for k in ("hits", "misses", "killed")}}


def _how(rec: dict[str, Any]) -> str:
    way = str(rec.get("pool") or "?")
    return way if len(way) <= 90 else way[:87] + "..."


def many_markdown(m: dict[str, Any]) -> list[str]:
    f, c, nw = m["followup"], m["cold"], m["new"]
    verdict = "meets" if m["ratio_p50"] is not None and m["ratio_p50"] <= 0.25 else "MISSES"
    return [f"**Follow-ups with {m['conversations']} live conversations** (one relay, 2 gevent workers, pool defaults: "
            f"max_warm {m['max_warm']} ({(m['max_warm_basis'] or {}).get('basis', '?')}), 1 spare; the "
            f"{m['conversations']} conversations started back to back, then {m['rounds']} rounds of one follow-up "
            "each, round robin, oldest first; a bare cold CLI run after every second follow-up; prompt with "
            f"`{m['prompt_marker']}`; TTFT seen by the client):", "",
            "| Path | n | TTFT p50 | TTFT p90 | min | max | p50 / cold p50 |", "|---|---|---|---|---|---|---|",
            f"| bare cold `claude -p` | {c['n']} | {c['p50_ms']:.0f} ms | - | {c['min_ms']:.0f} ms | "
            f"{c['max_ms']:.0f} ms | 1.00x |",
            f"| relay: new conversation (back to back) | {nw['n']} | {nw['p50_ms']:.0f} ms | - | {nw['min_ms']:.0f} ms | "
            f"{nw['max_ms']:.0f} ms | {nw['p50_ms'] / c['p50_ms']:.2f}x |",
            f"| relay: follow-up | {f['n']} | {f['p50_ms']:.0f} ms | {m['followup_p90_ms']:.0f} ms | "
            f"{f['min_ms']:.0f} ms | {f['max_ms']:.0f} ms | **{m['ratio_p50']:.2f}x** |", "",
            f"Target: follow-up p50 ≤ 0.25x cold; measured **{m['ratio_p50']:.2f}x** ({verdict}), p90 "
            f"{m['ratio_p90_vs_cold_p50']:.2f}x of cold p50. Follow-ups served: {m['followup_served']}; new "
            f"conversations: {m['new_served']}; warm processes after: {m['warm_after']}; pool counters: {m['pool']}."]

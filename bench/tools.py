"""Tool steps: an agent loop through the relay against the same loop straight at the mock API.

The mock is steered into a loop by markers in the task (tests/mock_anthropic.py): `MOCK:loop=<n>` with
`MOCK:tool=<name>` calls the tool again after each result until n calls were made, then answers with text,
so one loop is n + 1 model requests. Three clients:

  chat:        the openai SDK with a function (`tools`) through the relay's chat completions. The mock
               speaks only the Anthropic API, so "straight at the mock" is the same conversation as the
               equivalent Messages request (the same tool as `input_schema`, tool_use / tool_result
               blocks for the calls and results) sent by the anthropic SDK to the mock.
  messages:    the anthropic SDK with tools, through the relay's /v1/messages and straight at the mock
               (the same code, only the base URL differs).
  claude_code: the pinned Claude Code CLI itself as the client (`claude -p`, its own Bash tool run on the
               client side: `echo step0` ... `echo step<n-1>`), with ANTHROPIC_BASE_URL at the relay or
               at the mock. Per-step time = wall time / model requests.

Beside them, the relay's own CLI for a run with client functions is driven bare (`BareHeld`: the same
argv, MCP server and environment, no HTTP, worker or pool server), which says how much of a held step is
the CLI itself and how much the relay around it.

The relay runs with the pool on (the default), so the first step of a loop runs cold in the pool (a spare
declares no client functions) and every later step is "held": the process that made the calls waits in
the pool and goes on with the results. Each request's record (`pool`) says how it was served.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from common import kill_tree, pct
from harness import anthropic_client, openai_client

from relay.cli.invocation import build_spec
from relay.cli.mcp_server import RESULT_KEY
from relay.cli.process import EOF, CliProcess
from relay.cli.setup import child_env
from relay.config import load_settings
from relay.core.conversation import Plan
from relay.core.messages import parse_messages_request
from relay.core.models import ModelCatalog
from relay.core.run_description import describe, prompt_cache

MODEL = "sonnet"
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _task(tag: str, steps: int) -> str:
    model = f" MOCK:model_ms={MODEL_MS[0]}" if MODEL_MS[0] else ""
    return f"{tag} check the weather, step by step MOCK:loop={steps} MOCK:tool=get_weather{model}"


MODEL_MS = [0]  # the mock's time per answer in `model_time_loops` (0: it answers at once)


# -- one loop per client ---------------------------------------------------------------------------
def chat_relay(url: str, tag: str, steps: int) -> list[dict[str, Any]]:
    """The openai SDK through the relay: every step's wall time and request id."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": _task(tag, steps)}]
    out = []
    with openai_client(url) as c:
        for k in range(steps + 1):
            rid = f"bench-tool-{uuid.uuid4().hex[:12]}"
            t_sent, t0 = time.time(), time.perf_counter()
            msg = c.chat.completions.create(model=MODEL, tools=[{"type": "function", "function": WEATHER}],
                                            messages=msgs, extra_headers={"x-request-id": rid}).choices[0].message
            out.append({"s": time.perf_counter() - t0, "rid": rid, "sent": t_sent, "got": time.time()})
            if not msg.tool_calls:
                break
            msgs.append({"role": "assistant", "content": msg.content,
                         "tool_calls": [tc.model_dump(exclude_none=True) for tc in msg.tool_calls]})
            msgs += [{"role": "tool", "tool_call_id": tc.id, "content": f"out-{k}-{j}"}
                     for j, tc in enumerate(msg.tool_calls)]
    _check_loop(out, steps, msg.content)
    return out


def messages_loop(base_url: str, tag: str, steps: int) -> list[dict[str, Any]]:
    """The anthropic SDK with tools, at the relay or straight at the mock (the same requests)."""
    tools = [{"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}]
    msgs: list[dict[str, Any]] = [{"role": "user", "content": _task(tag, steps)}]
    out = []
    with anthropic_client(base_url) as c:
        for k in range(steps + 1):
            rid = f"bench-tool-{uuid.uuid4().hex[:12]}"
            t_sent, t0 = time.time(), time.perf_counter()
            m = c.messages.create(model=MODEL, max_tokens=256, tools=tools, messages=msgs,
                                  extra_headers={"x-request-id": rid})
            out.append({"s": time.perf_counter() - t0, "rid": rid, "sent": t_sent, "got": time.time()})
            uses = [b for b in m.content if b.type == "tool_use"]
            if not uses:
                break
            msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]})
            msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id,
                                                      "content": f"out-{k}-{j}"} for j, b in enumerate(uses)]})
    _check_loop(out, steps, "".join(b.text for b in m.content if b.type == "text"))
    return out


def _check_loop(out: list[dict[str, Any]], steps: int, last_text: str | None) -> None:
    if len(out) != steps + 1 or not (last_text or "").startswith("Tool said:"):
        raise RuntimeError(f"the tool loop did not run {steps} steps and answer: {len(out)} requests, "
                           f"last text {last_text!r:.200}")


class BareHeld:
    """The relay's CLI for a run with client functions (the same argv, MCP server and environment),
    driven here without HTTP, worker or pool server, the way the relay drives a held process: wait for
    the permission request of each call, then allow it with the client's result. Its step time is what
    the CLI itself costs per held step."""

    def __init__(self, relay_env: dict[str, str], cli_bin: str, work: Path) -> None:
        self.settings = load_settings(env=relay_env)
        self.env = child_env(dict(relay_env), self.settings["cli_max_retries"], self.settings["claude_config_dir"])
        self.cli_bin = cli_bin
        self.cwd = work / "cwd"
        self.tmp = work / "tmp"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def loop(self, tag: str, steps: int) -> list[dict[str, Any]]:
        tools = [{"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}]
        req = parse_messages_request({"model": MODEL, "max_tokens": 256, "tools": tools,
                                      "messages": [{"role": "user", "content": _task(tag, steps)}]}, ModelCatalog(MODEL))
        plan = Plan(conv_key=None, cli_session=str(uuid.uuid4()), resume=False, send=req.messages, first_turn=True)
        mode = self.settings["system_prompt_mode"]
        cache = prompt_cache(self.settings["cache.ttl"], self.settings["cache.min_tokens"], req.prompt_estimate, mode)
        desc = describe(req, plan, mode, None, cache)
        proc = CliProcess(build_spec(desc, self.cli_bin, self.env, str(self.cwd), self.tmp))
        out: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        proc.start()
        try:
            for k in range(steps + 1):
                asked = self._next_ask(proc)
                out.append({"s": time.perf_counter() - t0})
                if asked is None:
                    break
                t0 = time.perf_counter()
                proc.send({"type": "control_response", "response": {
                    "subtype": "success", "request_id": asked["request_id"], "response": {
                        "behavior": "allow", "updatedInput": dict(
                            asked["request"].get("input") or {},
                            **{RESULT_KEY: {"content": [{"type": "text", "text": f"out-{k}-0"}]}})}}})
        finally:
            if proc.pid:
                kill_tree(proc.pid)
            proc.kill()
        if len(out) != steps + 1:
            raise RuntimeError(f"the bare held CLI made {len(out)} steps, not {steps + 1}: {proc.stderr_text[-800:]}")
        return out

    @staticmethod
    def _next_ask(proc: CliProcess) -> dict[str, Any] | None:
        """The next permission request for a client function, or None when the turn's result came."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ev = proc.next_event(deadline - time.monotonic())
            if ev is None or ev is EOF:
                break
            if ev.get("type") == "control_request" and (ev.get("request") or {}).get("subtype") == "can_use_tool":
                return ev
            if ev.get("type") == "result":
                if ev.get("is_error") or not str(ev.get("result", "")).startswith("Tool said:"):
                    raise RuntimeError(f"the bare held CLI ended badly: {str(ev)[:300]}")
                return None
        raise RuntimeError(f"the bare held CLI stopped: {proc.stderr_text[-800:]}")


class ClaudeCodeClient:
    """The pinned Claude Code CLI as an API client, headless, with its own home and project folder."""

    def __init__(self, cli_bin: str, work: Path) -> None:
        self.cli_bin = cli_bin
        self.home, self.cwd = work / "home", work / "project"
        self.home.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE", "RELAY_"))}
        env.update(HOME=str(self.home), CLAUDE_CONFIG_DIR=str(self.home / ".claude"),
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1",
                   ANTHROPIC_API_KEY="sk-bench-claude-code")
        self.env = env

    def run(self, base_url: str, tag: str, steps: int) -> dict[str, Any]:
        prompt = f"{tag} run the steps MOCK:loop={steps} MOCK:tool=Bash MOCK:bash=echo_step{{step}}"
        argv = [self.cli_bin, "-p", prompt, "--output-format", "json", "--allowedTools", "Bash"]
        t_wall = time.time()
        t0 = time.perf_counter()
        p = subprocess.run(argv, cwd=self.cwd, env=dict(self.env, ANTHROPIC_BASE_URL=base_url),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"claude -p against {base_url} failed ({p.returncode}): {p.stderr[-1500:]}")
        res = json.loads(p.stdout)
        if res.get("is_error") or not str(res.get("result", "")).startswith(f"Tool said: step{steps - 1}"):
            raise RuntimeError(f"claude -p against {base_url} did not finish its steps: {p.stdout[-800:]}")
        return {"wall": wall, "started_at": t_wall, "num_turns": res.get("num_turns")}


# -- the relay's records ----------------------------------------------------------------------------
def records(url: str, limit: int = 200) -> list[dict[str, Any]]:
    return requests.get(url + f"/v1/usage/recent?limit={limit}", timeout=10).json()["data"]


def attach_records(url: str, steps: list[dict[str, Any]]) -> None:
    """Each step's request record: how the pool served it and the relay's own response time."""
    want = {s["rid"] for s in steps}
    deadline = time.time() + 10
    by_rid: dict[str, dict[str, Any]] = {}
    while time.time() < deadline:
        by_rid = {r["request_id"]: r for r in records(url) if r.get("request_id") in want}
        if len(by_rid) == len(want):
            break
        time.sleep(0.05)
    for s in steps:
        rec = by_rid.get(s["rid"]) or {}
        s["pool"] = rec.get("pool", "?")
        s["relay_ms"] = rec.get("response_time_ms")


def new_records(url: str, seen: set[str], settle_s: float = 0.4, wait_s: float = 8) -> list[dict[str, Any]]:
    """Records written since `seen` (ids), once no more arrive for `settle_s`."""
    deadline, last, stable_since = time.time() + wait_s, -1, time.time()
    fresh: list[dict[str, Any]] = []
    while time.time() < deadline:
        fresh = [r for r in records(url) if r["id"] not in seen]
        if len(fresh) != last:
            last, stable_since = len(fresh), time.time()
        elif time.time() - stable_since >= settle_s:
            break
        time.sleep(0.05)
    return fresh[::-1]  # oldest first


# -- the section ------------------------------------------------------------------------------------
def _ms(values: list[float]) -> float | None:
    p = pct([v * 1000 for v in values], 50)
    return None if p is None else round(p, 1)


def _pair(relay: list[float], direct: list[float]) -> dict[str, Any]:
    r, d = _ms(relay), _ms(direct)
    return {"relay_p50_ms": r, "direct_p50_ms": d, "n_relay": len(relay), "n_direct": len(direct),
            "ratio": round(r / d, 2) if r and d else None, "extra_ms": round(r - d, 1) if r and d else None}


def _count(ways: list[str]) -> dict[str, int]:
    return {w: ways.count(w) for w in sorted(set(ways))}


def _at_mock(mock: Any, tag: str, loop: list[dict[str, Any]]) -> None:
    """Split each step at the model request the mock saw for it (the relay's CLI's, or the direct
    client's own): before it (client → relay → CLI → request) and after it (answer → CLI → relay → client)."""
    recs = mock.records(tag)
    if len(recs) != len(loop):
        return
    for step, rec in zip(loop, recs, strict=True):
        if rec.get("end"):
            step["before_api"], step["after_api"] = rec["t"] - step["sent"], step["got"] - rec["end"]


def sdk_loops(relay_url: str, mock: Any, rounds: int, steps: int, bare: BareHeld,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Chat (openai SDK) and Messages (anthropic SDK) loops through the relay and straight at the mock,
    and the relay's CLI driven bare, every variant once per round in rotating order."""
    variants: dict[str, Callable[[str], list[dict[str, Any]]]] = {
        "bare_cli": lambda tag: bare.loop(tag, steps),
        "chat_relay": lambda tag: chat_relay(relay_url, tag, steps),
        "chat_direct": lambda tag: messages_loop(mock.url, tag, steps),  # the equivalent Messages requests
        "messages_relay": lambda tag: messages_loop(relay_url, tag, steps),
        "messages_direct": lambda tag: messages_loop(mock.url, tag, steps),
    }
    names = list(variants)
    loops: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    for n in names:  # warm-up: imports, connections, the relay's first conversation
        variants[n](f"toolwarm-{n}-{uuid.uuid4().hex[:6]}")
    for i in range(rounds):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            tag = f"tool-{n}-{i}-{uuid.uuid4().hex[:6]}"
            loop = variants[n](tag)
            if n.endswith("_relay"):
                _at_mock(mock, tag, loop)
                attach_records(relay_url, loop)
            loops[n].append(loop)
        if (i + 1) % 5 == 0:
            log(f"  tool steps (SDKs): {i + 1}/{rounds} rounds")
    out: dict[str, Any] = {"rounds": rounds, "steps": steps, "requests_per_loop": steps + 1}
    bl = loops["bare_cli"]
    out["bare_cli"] = {"first_step_p50_ms": _ms([lp[0]["s"] for lp in bl]),
                       "later_steps_p50_ms": _ms([s["s"] for lp in bl for s in lp[1:]]),
                       "per_step_p50_ms": _ms([sum(s["s"] for s in lp) / len(lp) for lp in bl])}
    for api in ("chat", "messages"):
        rl, dl = loops[f"{api}_relay"], loops[f"{api}_direct"]
        later = [s for lp in rl for s in lp[1:]]
        held = [s for s in later if s["pool"] == "held"]
        out[api] = {
            "first_step": _pair([lp[0]["s"] for lp in rl], [lp[0]["s"] for lp in dl]),
            "later_steps": _pair([s["s"] for s in later], [s["s"] for lp in dl for s in lp[1:]]),
            "held_steps": _pair([s["s"] for s in held], [s["s"] for lp in dl for s in lp[1:]]),
            "per_step": _pair([sum(s["s"] for s in lp) / len(lp) for lp in rl],
                              [sum(s["s"] for s in lp) / len(lp) for lp in dl]),
            "served_first": _count([_short(lp[0]["pool"]) for lp in rl]),
            "served_later": _count([_short(s["pool"]) for s in later]),
            "held_breakdown_p50_ms": {
                "relay_recorded": _ms([s["relay_ms"] / 1000 for s in held if s.get("relay_ms") is not None]),
                "before_api_request": _ms([s["before_api"] for s in held if "before_api" in s]),
                "after_api_answer": _ms([s["after_api"] for s in held if "after_api" in s])}}
    return out


def model_time_loops(relay_url: str, mock: Any, rounds: int, steps: int, model_ms: int,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """The same loops with a mock that takes `model_ms` per answer, as a model does: the ratio a client sees
    against a real API is the relay's fixed cost per step over the model's time, not over a 1 ms mock."""
    MODEL_MS[0] = model_ms
    try:
        variants = {"chat_relay": lambda tag: chat_relay(relay_url, tag, steps),
                    "messages_relay": lambda tag: messages_loop(relay_url, tag, steps),
                    "direct": lambda tag: messages_loop(mock.url, tag, steps)}
        loops: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in variants}
        names = list(variants)
        for i in range(rounds):
            shift = i % len(names)
            for n in names[shift:] + names[:shift]:
                tag = f"toolm-{n}-{i}-{uuid.uuid4().hex[:6]}"
                loop = variants[n](tag)
                if n.endswith("_relay"):
                    attach_records(relay_url, loop)
                loops[n].append(loop)
            log(f"  tool steps with a {model_ms} ms model: {i + 1}/{rounds} rounds")
    finally:
        MODEL_MS[0] = 0
    direct_later = [s["s"] for lp in loops["direct"] for s in lp[1:]]
    out: dict[str, Any] = {"rounds": rounds, "steps": steps, "model_ms": model_ms}
    for api in ("chat", "messages"):
        rl = loops[f"{api}_relay"]
        held = [s["s"] for lp in rl for s in lp[1:] if s.get("pool") == "held"]
        out[api] = {"held_steps": _pair(held, direct_later),
                    "per_step": _pair([sum(s["s"] for s in lp) / len(lp) for lp in rl],
                                      [sum(s["s"] for s in lp) / len(lp) for lp in loops["direct"]]),
                    "served_later": _count([_short(s["pool"]) for lp in rl for s in lp[1:]])}
    return out


def _short(way: str) -> str:
    """A request record's `pool` without the varying detail of a cold start's reason."""
    return way if len(way) <= 90 else way[:87] + "..."


def claude_code_loops(relay_url: str, mock: Any, client: ClaudeCodeClient, rounds: int, steps: int,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Claude Code as the client, its Bash loop through the relay and straight at the mock, alternating."""
    samples: dict[str, list[dict[str, Any]]] = {"relay": [], "direct": []}
    client.run(mock.url, f"ccwarm-{uuid.uuid4().hex[:6]}", 1)  # its first start writes its config folder
    client.run(relay_url, f"ccwarm-{uuid.uuid4().hex[:6]}", 1)
    for i in range(rounds):
        for way in (("relay", "direct") if i % 2 == 0 else ("direct", "relay")):
            tag = f"cc-{way}-{i}-{uuid.uuid4().hex[:6]}"
            seen = {r["id"] for r in records(relay_url)} if way == "relay" else set()
            res = client.run(relay_url if way == "relay" else mock.url, tag, steps)
            at_mock = mock.records(tag)  # direct: the client's own requests; via the relay: its CLI's
            starts = [r["t"] for r in at_mock]
            # the mock sees one model request per step either way: the time to the first one is the
            # client's start (and via the relay a cold CLI start); the gaps between their starts are the
            # steps (the model's answer back to the client, its Bash run, its next request forward)
            res["mock_requests"] = len(at_mock)
            res["to_first_request"] = starts[0] - res["started_at"] if starts else None
            res["gaps"] = [b - a for a, b in zip(starts, starts[1:], strict=False)]
            if way == "relay":
                recs = new_records(relay_url, seen)
                res["requests"] = len(recs)
                res["pool"] = [_short(r.get("pool", "?")) for r in recs]
                res["relay_ms"] = [r.get("response_time_ms") for r in recs]
            else:
                res["requests"] = len(at_mock)
            res["per_step"] = res["wall"] / max(1, res["requests"])
            samples[way].append(res)
        if (i + 1) % 2 == 0:
            log(f"  tool steps (Claude Code): {i + 1}/{rounds} rounds")
    rl, dl = samples["relay"], samples["direct"]
    direct_gaps = [g for r in dl for g in r["gaps"]]
    held_gaps, other_gaps, held_relay_ms, transitions = [], [], [], []
    for r in rl:
        if len(r["pool"]) != len(r["gaps"]) + 1:
            continue  # the records cannot be matched to the steps
        for k, g in enumerate(r["gaps"]):
            way = r["pool"][k + 1]  # the request that the gap ends with: held, or why not
            (held_gaps if way == "held" else other_gaps).append(g)
            transitions.append((k + 1, way))
            if way == "held" and r["relay_ms"][k + 1] is not None:
                held_relay_ms.append(r["relay_ms"][k + 1] / 1000)
    return {"rounds": rounds, "steps": steps,
            "per_step": _pair([r["per_step"] for r in rl], [r["per_step"] for r in dl]),
            "wall": _pair([r["wall"] for r in rl], [r["wall"] for r in dl]),
            "to_first_request": _pair([r["to_first_request"] for r in rl if r["to_first_request"]],
                                      [r["to_first_request"] for r in dl if r["to_first_request"]]),
            "later_steps": _pair([g for r in rl for g in r["gaps"]], direct_gaps),
            "held_steps": _pair(held_gaps, direct_gaps),
            "not_held_steps": _pair(other_gaps, direct_gaps),
            "held_relay_recorded_p50_ms": _ms(held_relay_ms),
            "not_held_at": _count([f"request {k + 1}: {w}" for k, w in transitions if w != "held"]),
            "requests_relay": [r["requests"] for r in rl], "requests_direct": [r["requests"] for r in dl],
            "relay_cli_requests_at_mock": [r["mock_requests"] for r in rl],
            "num_turns_relay": [r["num_turns"] for r in rl], "num_turns_direct": [r["num_turns"] for r in dl],
            "served": _count([w for r in rl for w in r["pool"]])}


TARGET, AIM = 1.5, 1.2


def _verdict(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return "meets the aim" if ratio <= AIM else "within the target" if ratio <= TARGET else "MISSES the target"


def _model_time_markdown(m: dict[str, Any]) -> list[str]:
    out = [f"**Tool steps with a model that takes {m['model_ms']} ms per answer** (the mock waits that long before "
           f"each answer; {m['rounds']} loops per variant of {m['steps']} calls, interleaved; direct: the anthropic "
           "SDK at the mock). Against a real API the relay's cost per step is added to the model's time:", "",
           "| API | Step | Relay p50 | Direct p50 | Ratio relay / direct | Relay − direct | Verdict | Relay served |",
           "|---|---|---|---|---|---|---|---|"]
    for api, label in (("chat", "chat completions (openai SDK)"), ("messages", "Messages (anthropic SDK)")):
        for key, step in (("held_steps", "later (held)"), ("per_step", "whole loop / requests")):
            p = m[api][key]
            served = _served(m[api]["served_later"]) if key == "held_steps" else ""
            out.append(f"| {label} | {step} | {_f(p['relay_p50_ms'])} | {_f(p['direct_p50_ms'])} | "
                       f"**{_x(p['ratio'])}** | {_f(p['extra_ms'])} | {_verdict(p['ratio'])} | {served} |")
    return out + [""]


def tools_markdown(t: dict[str, Any]) -> list[str]:
    out = []
    if t.get("model_time"):
        out += _model_time_markdown(t["model_time"])
    sdk = t.get("sdk")
    if sdk:
        out += [f"**Tool steps: relay vs. straight at the mock** ({sdk['rounds']} loops per variant, each "
                f"{sdk['steps']} tool calls + the final answer = {sdk['requests_per_loop']} requests; variants "
                "interleaved in rotating order; time of each request/response seen by the client, non-streaming; "
                "relay: 2 gevent workers, pool on with its defaults). \"Direct\" for chat completions: the mock "
                "speaks only the Anthropic API, so the direct client is the anthropic SDK sending the equivalent "
                "Messages request (the same function as a tool, the same calls and results as tool_use / "
                "tool_result blocks); for Messages it is the same anthropic SDK code at the mock's URL.", "",
                "| API | Step | Relay p50 | Direct p50 | Ratio relay / direct | Relay − direct | Relay served |",
                "|---|---|---|---|---|---|---|"]
        for api, label in (("chat", "chat completions (openai SDK)"), ("messages", "Messages (anthropic SDK)")):
            a = sdk[api]
            for key, step, served in (("first_step", "first (new conversation)", a["served_first"]),
                                      ("later_steps", "later (each brings the results)", a["served_later"]),
                                      ("per_step", "whole loop / requests", None)):
                p = a[key]
                out.append(f"| {label} | {step} | {_f(p['relay_p50_ms'])} | {_f(p['direct_p50_ms'])} | "
                           f"**{_x(p['ratio'])}** | {_f(p['extra_ms'])} | {_served(served)} |")
        bare = sdk["bare_cli"]
        out.append(f"| the relay's CLI driven bare (no HTTP, worker or pool server) | first (spawn) / later "
                   f"(result → next call) | {_f(bare['first_step_p50_ms'])} / {_f(bare['later_steps_p50_ms'])} | | | | |")
        out.append("")
        for api, label in (("chat", "Chat"), ("messages", "Messages")):
            b = sdk[api]["held_breakdown_p50_ms"]
            later = sdk[api]["later_steps"]["relay_p50_ms"]
            cli = bare["later_steps_p50_ms"]
            out.append(f"{label} held step, where the time goes (p50): {_f(later)} at the client; the relay's own "
                       f"recorded response time {_f(b['relay_recorded'])}; client request sent → the relay's CLI's "
                       f"API request at the mock {_f(b['before_api_request'])}; the mock's answer → the client has "
                       f"the response {_f(b['after_api_answer'])}; the same step of the CLI driven bare "
                       f"{_f(cli)}, so HTTP, the worker (Redis, files) and the pool server add about "
                       f"{_f(later - cli if later and cli else None)}.")
        out.append("")
        out.append("Against the target (issue: a step within 1.5x of direct, aim 1.2x), later (held) steps: chat "
                   f"{_x(sdk['chat']['later_steps']['ratio'])} ({_verdict(sdk['chat']['later_steps']['ratio'])}), "
                   f"Messages {_x(sdk['messages']['later_steps']['ratio'])} "
                   f"({_verdict(sdk['messages']['later_steps']['ratio'])}). The mock answers in about a millisecond, "
                   "so the direct step is almost pure HTTP and the ratio is the relay's fixed cost per step over "
                   "nearly nothing; \"relay − direct\" is that cost in absolute terms (with a real model it is "
                   "added to seconds of model time per step).")
        out.append("")
    cc = t.get("claude_code")
    if cc:
        eq = cc["requests_relay"] == cc["requests_direct"]
        out += [f"**Claude Code as the client** (the pinned CLI, `claude -p` with `--allowedTools Bash`; {cc['rounds']} "
                f"runs each way, alternating; the mock makes it run `echo step0` ... `echo step{cc['steps'] - 1}` "
                f"with its own Bash tool on the client side, then answer: {cc['steps'] + 1} model requests; "
                "ANTHROPIC_BASE_URL at the relay vs. at the mock. Per step = wall time / model requests; the "
                "other rows from the start times of the model requests at the mock, which sees one per step "
                "either way):", "",
                "| Figure | Via relay p50 | Direct p50 | Ratio relay / direct | Relay − direct |",
                "|---|---|---|---|---|"]
        for key, label in (("per_step", "per step: wall time / model requests"), ("wall", "wall time of the run"),
                           ("to_first_request", "start → first model request (first step: a cold start)"),
                           ("later_steps", "later steps: between model requests"),
                           ("held_steps", "  of which held by the relay"),
                           ("not_held_steps", "  of which not held (cold resume)")):
            p = cc[key]
            if not p["n_relay"]:
                continue
            out.append(f"| {label} (n={p['n_relay']}/{p['n_direct']}) | {_f(p['relay_p50_ms'])} | "
                       f"{_f(p['direct_p50_ms'])} | **{_x(p['ratio'])}** | {_f(p['extra_ms'])} |")
        out += ["", f"Model requests per run: Claude Code → relay {cc['requests_relay']}, Claude Code → mock "
                f"{cc['requests_direct']} ({'equal' if eq else 'NOT equal'}); the relay's CLI → mock "
                f"{cc['relay_cli_requests_at_mock']}. Claude Code's num_turns via the relay {cc['num_turns_relay']}, "
                f"direct {cc['num_turns_direct']}. Relay served: {_served(cc['served'])}. The relay's own recorded "
                f"response time of a held step: p50 {_f(cc['held_relay_recorded_p50_ms'])}.",
                "", f"Per-step ratio {_x(cc['per_step']['ratio'])} ({_verdict(cc['per_step']['ratio'])}); held "
                f"steps {_x(cc['held_steps']['ratio'])} ({_verdict(cc['held_steps']['ratio'])})."]
        if cc["not_held_at"]:
            out += ["", f"Steps the relay could not hold: {_served(cc['not_held_at'])}."]
            if any("settings changed" in k for k in cc["not_held_at"]):
                out.append("(Seen with 2.1.330: after a few tool steps Claude Code adds its own `system` message, "
                           "\"The user hasn't heard from you in a while…\", to the conversation; the relay makes "
                           "system messages part of the run's system prompt, so the held process no longer matches "
                           "the request's settings and the step resumes from the transcript in a new CLI. "
                           "CLAUDE_CODE_SILENT_TURN_REMINDER=0 in Claude Code's environment avoids it.)")
        out.append("")
    return out


def _f(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f} ms"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _served(c: dict[str, int] | None) -> str:
    return "" if not c else ", ".join(f"{k} ×{v}" for k, v in c.items())

"""Multi-step tool loops keep their whole history, on every API, held warm or resumed.

An agent's loop: the model calls a function, the client runs it and sends the result, the model calls
the next one. With the host's pool (the default) the process that made the calls waits, held, for the
request that brings the results, and goes on with the same turn ("held"). Without it, each step is
interrupted, and the CLI records that as "the user rejected this tool use"; the relay takes those records
out before the next step resumes ("resumed"). Every test looks at the model's LAST request and checks
every earlier step: each call with its id, each real result under that id, in order, none an error, no
refusal text anywhere.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import requests
from harness import anthropic_client, openai_client

POOL_ON = {"RELAY_POOL__ENABLED": "true"}  # the config default; the suite's shared relay runs without


@pytest.fixture(scope="module", params=["held", "resumed"])
def loop_relay(request: Any, relay_factory: Any, relay: Any) -> Any:
    """"held": the pool holds each step's process for the results; "resumed": every step is a new CLI."""
    srv = relay_factory(POOL_ON) if request.param == "held" else relay
    srv.mode = request.param
    return srv


def served(srv: Any) -> str:
    """How the pool served the relay's latest request ("held", "cold: …", "local: …")."""
    return latest_record(srv)["pool"]


def latest_record(srv: Any) -> dict[str, Any]:
    """The relay's latest request record. A stream's record is written just after its last event: wait
    for a record newer than the last one read."""
    from harness import wait_until

    latest: list[dict[str, Any]] = []

    def newer() -> bool:
        latest[:] = requests.get(srv.url + "/v1/usage/recent?limit=1", timeout=10).json()["data"][:1]
        return bool(latest) and latest[0]["id"] != getattr(srv, "last_record", None)
    wait_until(newer, timeout=10, interval=0.05)
    srv.last_record = latest[0]["id"]
    return latest[0]


def step_served(srv: Any, k: int, ways: list[str]) -> None:
    ways.append(served(srv))
    if srv.mode == "held" and k > 0:  # every step after the first goes on in the process that made the calls
        assert ways[-1] == "held", ways

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
REFUSAL = "doesn't want to proceed"


def history(body: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """The tool_use ids the model made and the tool_results it was given (id, text, is_error), in order."""
    uses, results = [], []
    for m in body["messages"]:
        for b in m["content"] if isinstance(m["content"], list) else []:
            if b.get("type") == "tool_use":
                uses.append(b["id"])
            elif b.get("type") == "tool_result":
                c = b.get("content")
                text = c if isinstance(c, str) else "".join(x.get("text", "") for x in c or [])
                results.append((b["tool_use_id"], text, bool(b.get("is_error"))))
    return uses, results


def check(mock_api: Any, tag: str, calls: list[list[str]], steps: int) -> None:
    body = mock_api.bodies(tag)[-1]
    uses, results = history(body)
    made = [c for step in calls for c in step]
    assert uses == made and len(calls) == steps
    assert results == [(cid, f"out-{k}-{j}", False) for k, step in enumerate(calls) for j, cid in enumerate(step)]
    assert REFUSAL not in json.dumps(body) and "Request interrupted" not in json.dumps(body)
    assert "hasn't heard from you" not in json.dumps(body)  # the CLI's own reminder in a long turn
    first = next(m for m in body["messages"] if m["role"] == "user")
    assert tag in json.dumps(first)  # the task itself is still the first thing the model reads
    # parallel calls stay parallel: each step's calls are one assistant message, its results one user message
    per_step = [m for m in body["messages"] if m["role"] == "assistant" and isinstance(m["content"], list)
                and any(b.get("type") == "tool_use" for b in m["content"])]
    assert [[b["id"] for b in m["content"] if b["type"] == "tool_use"] for m in per_step] == calls


def _marker(parallel: bool, steps: int) -> str:
    return f"MOCK:loop={steps} " + ("MOCK:tools=get_weather,get_weather" if parallel else "MOCK:tool=get_weather")


@pytest.mark.parametrize("parallel", [False, True], ids=["one-call", "two-calls"])
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_chat_loop_keeps_every_result(loop_relay: Any, mock_api: Any, parallel: bool, stream: bool) -> None:
    relay, ways = loop_relay, []
    steps, tag = (3 if parallel else 5), f"chatloop-{uuid.uuid4().hex[:8]}"
    msgs: list[dict[str, Any]] = [{"role": "user", "content": f"{tag} do the task {_marker(parallel, steps)}"}]
    calls: list[list[str]] = []
    msg = _chat_steps(relay, tag, msgs, calls, steps + 1, stream=stream,
                      after=lambda k: step_served(relay, k, ways))
    assert msg.content and msg.content.startswith("Tool said:")
    check(mock_api, tag, calls, steps)


@pytest.mark.parametrize("chain", ["previous_response_id", "full_input"])
def test_responses_loop_keeps_every_result(loop_relay: Any, mock_api: Any, chain: str) -> None:
    relay, ways = loop_relay, []
    steps, tag = 5, f"respsloop-{uuid.uuid4().hex[:8]}"
    tool = dict(WEATHER["function"], type="function")
    items: list[Any] = [{"role": "user", "content": f"{tag} do the task {_marker(False, steps)}"}]
    calls: list[list[str]] = []
    prev = None
    with openai_client(relay.url) as c:
        for k in range(steps + 1):
            if chain == "previous_response_id" and prev is not None:
                r = c.responses.create(model="sonnet", tools=[tool], input=items[-1:], previous_response_id=prev)
            else:
                r = c.responses.create(model="sonnet", tools=[tool], input=items)
            prev = r.id
            step_served(relay, k, ways)
            fcs = [i for i in r.output if i.type == "function_call"]
            if not fcs:
                break
            calls.append([i.call_id for i in fcs])
            items += [{"type": "function_call", "call_id": i.call_id, "name": i.name, "arguments": i.arguments}
                      for i in fcs]
            items += [{"type": "function_call_output", "call_id": i.call_id, "output": f"out-{k}-{j}"}
                      for j, i in enumerate(fcs)]
    assert r.output_text.startswith("Tool said:")
    check(mock_api, tag, calls, steps)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_messages_loop_keeps_every_result(loop_relay: Any, mock_api: Any, stream: bool) -> None:
    relay, ways = loop_relay, []
    steps, tag = 5, f"msgloop-{uuid.uuid4().hex[:8]}"
    fn = WEATHER["function"]
    tools = [{"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}]
    msgs: list[dict[str, Any]] = [{"role": "user", "content": f"{tag} do the task {_marker(False, steps)}"}]
    calls: list[list[str]] = []
    with anthropic_client(relay.url) as c:
        for k in range(steps + 1):
            kw: dict[str, Any] = dict(model="sonnet", max_tokens=256, tools=tools, messages=msgs,
                                      extra_headers={"X-Session-Id": tag})
            if stream:
                with c.messages.stream(**kw) as s:
                    m = s.get_final_message()
            else:
                m = c.messages.create(**kw)
            step_served(relay, k, ways)
            uses = [b for b in m.content if b.type == "tool_use"]
            if not uses:
                break
            calls.append([b.id for b in uses])
            msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]})
            msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id,
                                                      "content": f"out-{k}-{j}"} for j, b in enumerate(uses)]})
    assert m.stop_reason == "end_turn"
    check(mock_api, tag, calls, steps)


def _chat_steps(srv: Any, tag: str, msgs: list[dict[str, Any]], calls: list[list[str]], upto: int,
                between: Any = None, stream: bool = False, after: Any = None) -> Any:
    """Chat steps until the model answers or `upto` steps were made; `between(k)` runs before step k > 0,
    `after(k)` after each step's answer. The client's result for call j of step k is "out-k-j"."""
    msg = None
    with openai_client(srv.url) as c:
        for k in range(upto):
            if k and between:
                between(k)
            kw: dict[str, Any] = dict(model="sonnet", tools=[WEATHER], messages=msgs,
                                      extra_headers={"X-Session-Id": tag})
            if stream:
                with c.chat.completions.stream(**kw) as s:
                    msg = s.get_final_completion().choices[0].message
            else:
                msg = c.chat.completions.create(**kw).choices[0].message
            if after:
                after(k)
            if not msg.tool_calls:
                break
            calls.append([tc.id for tc in msg.tool_calls])
            msgs.append({"role": "assistant", "content": msg.content,
                         "tool_calls": [tc.model_dump(exclude_none=True) for tc in msg.tool_calls]})
            msgs += [{"role": "tool", "tool_call_id": tc.id, "content": f"out-{len(calls) - 1}-{j}"}
                     for j, tc in enumerate(msg.tool_calls)]
    return msg


def _held(srv: Any) -> list[dict[str, Any]]:
    return requests.get(srv.url + "/stats", timeout=10).json()["pool"].get("held") or []


def test_a_result_that_never_comes_frees_the_process(relay_factory: Any, mock_api: Any) -> None:
    """The client never sends the results: after tool_wait_s the held process is ended (nothing left
    running), and when the client comes back after all, the step resumes with the exact history."""
    import psutil
    from harness import wait_until

    srv = relay_factory(dict(POOL_ON, RELAY_TOOL_WAIT_S="2"))
    tag = f"expire-{uuid.uuid4().hex[:8]}"
    msgs: list[dict[str, Any]] = [{"role": "user", "content": f"{tag} do the task {_marker(False, 3)}"}]
    calls: list[list[str]] = []
    _chat_steps(srv, tag, msgs, calls, 1)
    (held,) = _held(srv)
    assert psutil.pid_exists(held["pid"]) and held["calls"] == 1
    assert wait_until(lambda: not _held(srv), timeout=30, interval=0.3)
    assert wait_until(lambda: not psutil.pid_exists(held["pid"]), timeout=10, interval=0.2)
    assert requests.get(srv.url + "/stats", timeout=10).json()["pool"]["killed"].get("tool_wait") == 1
    msg = _chat_steps(srv, tag, msgs, calls, 5)  # the client comes back late after all
    def recent() -> list[dict[str, Any]]:
        return requests.get(srv.url + "/v1/usage/recent?limit=4", timeout=10).json()["data"]
    assert wait_until(lambda: len(recent()) == 4, timeout=10, interval=0.05)  # the step, then 3 after the expiry
    ways = [w["pool"] for w in recent()][::-1][1:]
    # the three requests after the expiry: the one that resumed, then the steps held again
    assert ways[0].startswith("cold: ") and "resumed: held: evicted: tool_wait" in ways[0], ways
    assert ways[1:] == ["held", "held"], ways
    assert msg.content.startswith("Tool said:")
    check(mock_api, tag, calls, 3)


def test_a_killed_holder_resumes_with_the_exact_history(relay_factory: Any, mock_api: Any) -> None:
    """The held process dies (OOM killer, an operator) between steps: the next step resumes from the
    transcript with every earlier call and result, and later steps are held again."""
    import psutil

    srv = relay_factory(POOL_ON)
    tag = f"killed-{uuid.uuid4().hex[:8]}"
    msgs: list[dict[str, Any]] = [{"role": "user", "content": f"{tag} do the task {_marker(True, 4)}"}]
    calls: list[list[str]] = []
    ways: list[str] = []

    def kill_holder(k: int) -> None:
        ways.append(served(srv))
        if k == 2:
            time.sleep(0.5)  # while it waits for the client (the CLI writes its transcript ~60 ms after asking)
            for h in _held(srv):
                p = psutil.Process(h["pid"])
                p.kill()
                p.wait(10)
    msg = _chat_steps(srv, tag, msgs, calls, 6, kill_holder)
    ways.append(served(srv))
    assert ways[1] == "held" and ways[2].startswith("cold: ") and "resumed: held: " in ways[2], ways
    assert ways[3:] and set(ways[3:]) == {"held"}, ways
    assert msg.content.startswith("Tool said:")
    check(mock_api, tag, calls, 4)


def test_held_steps_are_taken_by_whichever_worker_gets_the_results(relay_factory: Any, mock_api: Any) -> None:
    """gunicorn gives each request to any of its workers, and a worker may die: the held process lives in
    the host's pool server, so a step whose results reach another worker goes on in it. Here the worker
    that made the calls is SIGKILLed after each step, so every next step lands on another one."""
    import os
    import signal

    import psutil
    from harness import wait_until

    srv = relay_factory(POOL_ON)
    tag = f"workers-{uuid.uuid4().hex[:8]}"
    msgs: list[dict[str, Any]] = [{"role": "user", "content": f"{tag} do the task {_marker(True, 3)}"}]
    calls: list[list[str]] = []
    seen: list[tuple[int, str]] = []

    def kill_worker(k: int) -> None:
        rec = latest_record(srv)
        seen.append((rec["worker"], rec["pool"]))
        os.kill(rec["worker"], signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(rec["worker"]) or
                   psutil.Process(rec["worker"]).status() == psutil.STATUS_ZOMBIE, timeout=10, interval=0.1)
        assert len(_held(srv)) == 1  # the worker's death left the held process alone
    msg = _chat_steps(srv, tag, msgs, calls, 5, kill_worker)
    rec = latest_record(srv)
    seen.append((rec["worker"], rec["pool"]))
    assert [p for _, p in seen[1:]] == ["held"] * 3, seen
    assert len({w for w, _ in seen}) == 4, seen  # four steps, four workers
    assert msg.content.startswith("Tool said:")
    check(mock_api, tag, calls, 3)

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
    return requests.get(srv.url + "/v1/usage/recent?limit=1", timeout=10).json()["data"][0]["pool"]


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
    with openai_client(relay.url) as c:
        for k in range(steps + 1):
            kw: dict[str, Any] = dict(model="sonnet", tools=[WEATHER], messages=msgs,
                                      extra_headers={"X-Session-Id": tag})
            if stream:
                with c.chat.completions.stream(**kw) as s:
                    msg = s.get_final_completion().choices[0].message
            else:
                msg = c.chat.completions.create(**kw).choices[0].message
            step_served(relay, k, ways)
            if not msg.tool_calls:
                break
            calls.append([tc.id for tc in msg.tool_calls])
            msgs.append({"role": "assistant", "content": msg.content,
                         "tool_calls": [tc.model_dump(exclude_none=True) for tc in msg.tool_calls]})
            msgs += [{"role": "tool", "tool_call_id": tc.id, "content": f"out-{k}-{j}"}
                     for j, tc in enumerate(msg.tool_calls)]
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

"""The three client formats over the same CLI turns, in-process.

Each turn is recorded from the real CLI (in front of the mock API, through the relay's own argv, MCP
server and permission handling) once per session; then every format answers it complete and
streamed, checked against the official SDKs' types: text, a tool call, a refusal, an error mid-stream.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anthropic.types as at
import openai.types.chat as oc
import openai.types.responses as orr
import pytest
from pydantic import TypeAdapter

from relay.cli.invocation import build_spec
from relay.cli.run import Limits, Run
from relay.cli.setup import child_env
from relay.core.conversation import Plan
from relay.core.events import Turn
from relay.core.formats import anthropic_messages, openai_chat, openai_responses
from relay.core.formats.base import Format, StreamHead, turn_view
from relay.core.models import ModelCatalog
from relay.core.run_description import describe
from relay.core.upstream import classify
from relay.errors import RelayError

CATALOG = ModelCatalog("sonnet", [])
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TURNS = {"text": "say hello MOCK:words=4", "tool": "the weather in Oslo MOCK:tool=get_weather",
         "refusal": "something bad MOCK:refusal", "error": "start then fail MOCK:break_stream"}
FORMATS: dict[str, Format] = {"chat": openai_chat.FORMAT, "responses": openai_responses.FORMAT,
                              "messages": anthropic_messages.FORMAT}


def _body(name: str, prompt: str, stream: bool, tools: bool) -> dict[str, Any]:
    if name == "chat":
        return {"model": "sonnet", "stream": stream, "messages": [{"role": "user", "content": prompt}],
                **({"tools": TOOLS} if tools else {})}
    if name == "responses":
        return {"model": "sonnet", "stream": stream, "input": prompt,
                **({"tools": [dict(TOOLS[0]["function"], type="function")]} if tools else {})}
    fn = TOOLS[0]["function"]
    return {"model": "sonnet", "stream": stream, "max_tokens": 100, "messages": [{"role": "user", "content": prompt}],
            **({"tools": [{"name": fn["name"], "description": fn["description"],
                           "input_schema": fn["parameters"]}]} if tools else {})}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, mock_api: Any, cli_bin: str) -> dict[str, list[Any]]:
    """Each turn's stdout events, as the real CLI printed them for a relay run."""
    tmp = tmp_path_factory.mktemp("formats")
    (tmp / "cwd").mkdir()
    (tmp / "tmp").mkdir()
    env = child_env({"PATH": "/usr/bin:/bin", "HOME": str(tmp), "ANTHROPIC_BASE_URL": mock_api.url,
                     "ANTHROPIC_API_KEY": "sk-ant-test", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"},
                    1, str(tmp / "config"))
    out: dict[str, list[Any]] = {}
    for kind, prompt in TURNS.items():
        req = openai_chat.FORMAT.parse(_body("chat", prompt, True, kind == "tool"), CATALOG).req
        plan = Plan(None, None, False, req.messages, True, req.messages, req.system, req.cli_model)
        spec = build_spec(describe(req, plan, "replace", None), cli_bin, env, str(tmp / "cwd"), tmp / "tmp")
        run = Run(spec, Limits(60, 60, 120, 30))
        events: list[Any] = []
        read = run.proc.next_event

        def recording(timeout: float, read: Any = read, events: list[Any] = events) -> Any:
            ev = read(timeout)
            if isinstance(ev, dict) and ev.get("type") != "control_request":
                events.append(ev)
            return ev
        run.proc.next_event = recording  # type: ignore[method-assign]
        run.start()
        try:
            for _ in run.pump():
                pass
        except RelayError:
            pass
        finally:
            run.finish()
        # the relay interrupts the CLI at the client's tool calls: the turn remembers that
        out[kind] = events + [{"type": "relay_interrupted"}] if run.turn.interrupted_for_tools else events
    return out


def _sse(raw: bytes) -> list[tuple[str | None, Any]]:
    frames = []
    for block in raw.decode().split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = lines["data"]
        frames.append((lines.get("event"), data if data == "[DONE]" else json.loads(data)))
    return frames


def _answer(kind: str, name: str, events: list[Any]) -> tuple[Any, list[tuple[str | None, Any]]]:
    """The complete answer (or the error) and the streamed frames of one turn in one format."""
    fmt, prompt = FORMATS[name], TURNS[kind]
    turn, deltas = Turn(), []
    for ev in events:
        if ev["type"] == "relay_interrupted":
            turn.interrupted_for_tools = True
        deltas += [d for d in turn.feed(ev) if d.kind != "reasoning"]
    err = classify(turn, time.time(), 5)
    parsed = fmt.parse(_body(name, prompt, True, kind == "tool"), CATALOG)
    stream = fmt.stream(StreamHead(parsed.id, 1, "claude-sonnet", turn.start_usage or {}), parsed)
    raw = stream.start() + b"".join(stream.delta(d) for d in deltas)
    if err is not None:
        return err, _sse(raw + stream.error(err))
    view = turn_view(turn, id=parsed.id, created=1, model="claude-sonnet", content=turn.text, expose_reasoning=False,
                     usage=turn.usage or {}, estimated=False)
    return fmt.complete(view, parsed), _sse(raw + stream.finish(view))


CHUNK = TypeAdapter(oc.ChatCompletionChunk)
RESPONSE_EVENT: TypeAdapter[Any] = TypeAdapter(orr.ResponseStreamEvent)
MESSAGE_EVENT: TypeAdapter[Any] = TypeAdapter(at.RawMessageStreamEvent)


def _check_stream(name: str, frames: list[tuple[str | None, Any]], failed: bool) -> None:
    if name == "chat":
        body = [d for _, d in frames if d != "[DONE]"]
        for d in body[:-1] if failed else body:
            CHUNK.validate_python(d)
        assert (frames[-1][1] == "[DONE]") is not failed
        if failed:
            assert "error" in frames[-1][1] and not any(c["choices"][0]["finish_reason"] for c in body[:-1])
    elif name == "responses":
        for kind, d in frames:
            RESPONSE_EVENT.validate_python(d)
            assert kind == d["type"]
        assert frames[-1][0] == ("response.failed" if failed else "response.completed")
    else:
        for kind, d in frames[:-1] if failed else frames:
            MESSAGE_EVENT.validate_python(d)
            assert kind == d["type"]
        assert frames[-1][0] == ("error" if failed else "message_stop")
        if failed:
            assert frames[-1][1]["type"] == "error" and "message_stop" not in [k for k, _ in frames]


def test_every_format_answers_every_recorded_turn(recorded: dict[str, list[Any]]) -> None:
    assert any(e.get("type") == "result" for e in recorded["text"])  # the CLI really ran
    texts, calls = {}, {}
    for kind in TURNS:
        for name in FORMATS:
            answer, frames = _answer(kind, name, recorded[kind])
            _check_stream(name, frames, kind == "error")
            if kind == "error":
                assert isinstance(answer, RelayError) and answer.status >= 500
                assert "partial te" in json.dumps([f[1] for f in frames])  # text reached the client before the failure
                continue
            if name == "chat":
                c = oc.ChatCompletion.model_validate(answer)
                msg = c.choices[0]
                texts[(kind, name)] = msg.message.content or msg.message.refusal
                calls[(kind, name)] = [(t.id, t.function.name, json.loads(t.function.arguments))
                                       for t in msg.message.tool_calls or []]
                assert msg.finish_reason == {"text": "stop", "tool": "tool_calls", "refusal": "content_filter"}[kind]
            elif name == "responses":
                r = orr.Response.model_validate(answer)
                texts[(kind, name)] = r.output_text or None
                calls[(kind, name)] = [(i.call_id, i.name, json.loads(i.arguments)) for i in r.output
                                       if i.type == "function_call"]
                assert r.status == "completed"
            else:
                m = at.Message.model_validate(answer)
                texts[(kind, name)] = "".join(b.text for b in m.content if b.type == "text") or None
                calls[(kind, name)] = [(b.id, b.name, b.input) for b in m.content if b.type == "tool_use"]
                assert m.stop_reason == {"text": "end_turn", "tool": "tool_use", "refusal": "refusal"}[kind]
    assert texts[("text", "chat")] == texts[("text", "responses")] == texts[("text", "messages")]
    assert texts[("text", "chat")] == "w0 w1 w2 w3"
    tool = calls[("tool", "chat")]
    assert len(tool) == 1 and tool[0][1] == "get_weather" and tool[0][0].startswith("toolu_")
    assert calls[("tool", "responses")] == calls[("tool", "messages")] == tool
    assert calls[("text", "chat")] == calls[("refusal", "messages")] == []
    assert texts[("refusal", "chat")]  # the refusal is reported as one, not as an answer
    assert texts[("refusal", "responses")] is None


def test_one_protocol_and_one_id_maker() -> None:
    root = Path(__file__).resolve().parent.parent / "relay"
    makers = [p for p in root.rglob("*.py") if "def new_id(" in p.read_text()]
    assert makers == [root / "core" / "formats" / "base.py"]
    assert {f.endpoint for f in FORMATS.values()} == {"/v1/chat/completions", "/v1/responses", "/v1/messages"}
    assert [f.cacheable for f in FORMATS.values()] == [True, False, False]  # the cache rule, stated by each format


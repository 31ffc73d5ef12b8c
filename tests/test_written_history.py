"""A history the CLI never held reaches the model as structured turns, never as one flattened text.

A conversation that arrives where its CLI session is not (another host, another account, a vanished or
rewritten history, sessions off) is written as a CLI transcript from the client's own messages and
resumed: every earlier turn, each tool call under its id, each result (errors and images included),
in order, and the CLI's "# Environment" text naming the relay host is blanked (replace mode).
Each test reads the model's whole request, not only its newest message.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from harness import anthropic_client, cli_cwd, openai_client
from mock_anthropic import all_text

from relay.core.history import write_history
from relay.core.prompt import HISTORY_INTRO, NOT_RUN

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002000154a24f5d"
    "0000000049454e44ae426082")).decode()


def turns(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation the model was given: its user and assistant messages, content as blocks."""
    out = []
    for m in body["messages"]:
        if m["role"] == "system":
            continue
        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        out.append({"role": m["role"], "content": [{k: v for k, v in b.items() if k != "cache_control"}
                                                    for b in content]})
    return out


def result_text(block: dict[str, Any]) -> str:
    c = block.get("content")
    return c if isinstance(c, str) else "".join(x.get("text", "") for x in c or [] if x.get("type") == "text")


def no_relay_host(srv: Any, body: dict[str, Any]) -> None:
    text = json.dumps(body)
    assert HISTORY_INTRO.strip() not in all_text(body) and "<tool_result" not in text
    assert "Primary working directory" not in text and str(cli_cwd(srv)) not in text
    assert "doesn't want to proceed" not in text and "Request interrupted" not in text


def chat_history(tag: str) -> list[dict[str, Any]]:
    """Two parallel calls answered, a text answer, a new question, then one more call awaiting its result."""
    return [
        {"role": "system", "content": f"SYS-{tag} you are a weather bot"},
        {"role": "user", "content": f"{tag} weather in two cities"},
        {"role": "assistant", "content": "Looking both up.", "tool_calls": [
            {"id": f"call_a_{tag}", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": f"call_b_{tag}", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": f"call_a_{tag}", "content": "out-a snow"},
        {"role": "tool", "tool_call_id": f"call_b_{tag}", "content": "out-b sun"},
        {"role": "assistant", "content": "Oslo has snow, Rome has sun."},
        {"role": "user", "content": f"{tag} and Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_c_{tag}", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": f"call_c_{tag}", "content": "out-c rain"},
    ]


def expected_chat_turns(tag: str) -> list[dict[str, Any]]:
    name = "mcp__client__get_weather"
    return [
        {"role": "user", "content": [{"type": "text", "text": f"{tag} weather in two cities"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Looking both up."},
            {"type": "tool_use", "id": f"call_a_{tag}", "name": name, "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": f"call_b_{tag}", "name": name, "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"call_a_{tag}", "content": [{"type": "text", "text": "out-a snow"}]},
            {"type": "tool_result", "tool_use_id": f"call_b_{tag}", "content": [{"type": "text", "text": "out-b sun"}]}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Oslo has snow, Rome has sun."}]},
        {"role": "user", "content": [{"type": "text", "text": f"{tag} and Paris?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": f"call_c_{tag}", "name": name,
                                           "input": {"city": "Paris"}}]},
    ]


def test_a_tool_loop_the_cli_never_held_reaches_the_model_as_it_was(relay: Any, mock_api: Any) -> None:
    """A chat tool loop sent whole to a conversation the relay has never seen (as after a host move), then
    continued: both model requests carry every call and result under its id, in order, and the system
    text once."""
    tag = uuid.uuid4().hex[:8]
    msgs = chat_history(tag)
    with openai_client(relay.url) as c:
        r = c.chat.completions.create(model="sonnet", tools=[WEATHER], messages=msgs,
                                      extra_headers={"X-Session-Id": f"wh-{tag}"})
        body = mock_api.bodies("out-c rain")[-1]
        assert r.choices[0].message.content == "Tool said: out-c rain"
        got = turns(body)
        assert got[:6] == expected_chat_turns(tag)
        assert len(got) == 7 and [b["tool_use_id"] for b in got[6]["content"]] == [f"call_c_{tag}"]
        assert result_text(got[6]["content"][0]) == "out-c rain" and not got[6]["content"][0].get("is_error")
        assert json.dumps(body["system"]).count(f"SYS-{tag}") == 1
        no_relay_host(relay, body)
        # the next turn resumes the session the relay wrote (and the CLI went on with): nothing is replayed
        msgs += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": f"{tag} thanks, bye"}]
        c.chat.completions.create(model="sonnet", tools=[WEATHER], messages=msgs,
                                  extra_headers={"X-Session-Id": f"wh-{tag}"})
    body = mock_api.bodies(f"{tag} thanks, bye")[-1]
    got = turns(body)
    assert got[:6] == expected_chat_turns(tag)
    assert result_text(got[6]["content"][0]) == "out-c rain"
    assert got[7] == {"role": "assistant", "content": [{"type": "text", "text": "Tool said: out-c rain"}]}
    assert got[8]["content"][-1]["text"] == f"{tag} thanks, bye" and len(got) == 9
    no_relay_host(relay, body)


def test_messages_history_keeps_errors_images_and_parallel_results(relay: Any, mock_api: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    tool = {"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {
        "city": {"type": "string"}}}}
    messages = [
        {"role": "user", "content": f"{tag} check three cities"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": f"toolu_1_{tag}", "name": "get_weather", "input": {"city": "A"}},
            {"type": "tool_use", "id": f"toolu_2_{tag}", "name": "get_weather", "input": {"city": "B"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_1_{tag}", "is_error": True, "content": "out-1 failed"},
            {"type": "tool_result", "tool_use_id": f"toolu_2_{tag}", "content": [
                {"type": "text", "text": "out-2 map"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]},
        {"role": "assistant", "content": [{"type": "text", "text": "One failed; retrying."},
                                          {"type": "tool_use", "id": f"toolu_3_{tag}", "name": "get_weather",
                                           "input": {"city": "A"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_3_{tag}", "content": "out-3 ok"}]},
    ]
    with anthropic_client(relay.url) as c:
        r = c.messages.create(model="sonnet", max_tokens=256, tools=[tool], messages=messages,
                              extra_headers={"X-Session-Id": f"whm-{tag}"})
    assert r.content[0].text == "Tool said: out-3 ok"
    body = mock_api.bodies("out-3 ok")[-1]
    got = turns(body)
    assert [m["role"] for m in got] == ["user", "assistant", "user", "assistant", "user"]
    assert got[0]["content"][-1]["text"] == f"{tag} check three cities"
    assert [(b["id"], b["name"], b["input"]) for b in got[1]["content"]] == [
        (f"toolu_1_{tag}", "mcp__client__get_weather", {"city": "A"}),
        (f"toolu_2_{tag}", "mcp__client__get_weather", {"city": "B"})]
    first, second = got[2]["content"]
    assert (first["tool_use_id"], result_text(first), first.get("is_error")) == (f"toolu_1_{tag}", "out-1 failed", True)
    assert second["tool_use_id"] == f"toolu_2_{tag}" and not second.get("is_error")
    assert [b["type"] for b in second["content"]] == ["text", "image"] and second["content"][1]["source"]["data"] == PNG
    assert got[3]["content"][0] == {"type": "text", "text": "One failed; retrying."}
    assert got[3]["content"][1]["id"] == f"toolu_3_{tag}"
    assert [(b["tool_use_id"], result_text(b)) for b in got[4]["content"]] == [(f"toolu_3_{tag}", "out-3 ok")]
    no_relay_host(relay, body)


@pytest.fixture(scope="module")
def sessions_off(relay_factory: Any) -> Any:
    return relay_factory({"RELAY_SESSIONS__ENABLED": "false"})


def test_without_sessions_every_request_is_written_and_nothing_is_left(sessions_off: Any, mock_api: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    with openai_client(sessions_off.url) as c:
        r = c.chat.completions.create(model="sonnet", tools=[WEATHER], messages=chat_history(tag))
    assert r.choices[0].message.content == "Tool said: out-c rain"
    body = mock_api.bodies("out-c rain")[-1]
    assert turns(body)[:6] == expected_chat_turns(tag)
    no_relay_host(sessions_off, body)
    left = list((sessions_off.tmp / "claude-config" / "projects").rglob("*.jsonl"))
    assert left == []  # the transcript lived for that one run


def test_a_rewritten_history_is_written_not_flattened(relay: Any, mock_api: Any) -> None:
    """A client that edits an earlier turn: the CLI session no longer matches, so the new history is written."""
    tag = uuid.uuid4().hex[:8]
    sid = {"X-Session-Id": f"wr-{tag}"}
    with openai_client(relay.url) as c:
        first = c.chat.completions.create(model="sonnet", extra_headers=sid,
                                          messages=[{"role": "user", "content": f"{tag} original"}])
        c.chat.completions.create(model="sonnet", extra_headers=sid, messages=[
            {"role": "user", "content": f"{tag} EDITED"}, {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": f"{tag} follow-up"}])
    body = mock_api.bodies(f"{tag} follow-up")[-1]
    got = turns(body)
    assert [m["role"] for m in got] == ["user", "assistant", "user"]
    assert got[0]["content"][-1]["text"] == f"{tag} EDITED" and len(got[0]["content"]) == 1
    assert got[1]["content"] == [{"type": "text", "text": first.choices[0].message.content}]
    no_relay_host(relay, body)


def test_a_resumed_session_no_longer_names_the_relay_host(relay: Any, mock_api: Any) -> None:
    """The CLI's own transcript: its first turn told the model the relay's folder and OS (the CLI offers no
    switch for that on a subscription); from the next cold resume on, that text is blank."""
    tag = uuid.uuid4().hex[:8]
    sid = {"X-Session-Id": f"env-{tag}"}
    msgs = [{"role": "user", "content": f"{tag} one"}]
    with openai_client(relay.url) as c:
        for k in ("two", "three"):
            r = c.chat.completions.create(model="sonnet", extra_headers=sid, messages=msgs)
            msgs += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": f"{tag} {k}"}]
        c.chat.completions.create(model="sonnet", extra_headers=sid, messages=msgs)
    assert "Primary working directory" in json.dumps(mock_api.bodies(f"{tag} one")[0])  # the first turn: the CLI's
    for n, k in enumerate(("two", "three"), start=1):
        body = mock_api.bodies(f"{tag} {k}")[0]  # the request that brought it
        assert [m["role"] for m in turns(body)] == ["user", "assistant"] * n + ["user"]  # resumed, not replayed
        no_relay_host(relay, body)


# -- the pure writer ---------------------------------------------------------------------------------

def _msgs(*items: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(m, content=[{"type": "text", "text": m["content"]}] if isinstance(m.get("content"), str)
                 else m.get("content") or []) for m in items]


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_an_unanswered_call_gets_an_error_result_and_the_environment_follows_the_first_turn() -> None:
    msgs = _msgs({"role": "user", "content": "u1"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                 {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u2"})
    w = write_history(msgs, True, {"workingDirectory": "/x"}, system_embed="S")
    assert w is not None and w.resume_at is None and w.pending_calls == []
    kinds = [(r["type"], (r.get("message") or r.get("attachment"))) for r in w.records]
    assert kinds[0][0] == "user" and kinds[0][1]["content"][0]["text"].startswith("<system_instructions>\nS")
    assert kinds[1][0] == "attachment" and kinds[1][1]["type"] == "environment"
    assert kinds[3][1]["content"] == [{"type": "tool_result", "tool_use_id": "c1", "is_error": True, "content": NOT_RUN}]
    assert [r["parentUuid"] for r in w.records[1:]] == [r["uuid"] for r in w.records[:-1]]
    assert w.tail == _msgs({"role": "user", "content": "u2"})


def test_histories_that_cannot_be_written_are_refused() -> None:
    user, answer = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
    assert write_history(_msgs(user), True, None) is None                      # nothing said yet
    assert write_history(_msgs(user, answer), True, None) is None              # ends with the model
    call = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "r"}
    assert write_history(_msgs(user, call, result), False, None) is None       # tool blocks need tools
    assert write_history(_msgs(user, call, result), True, None) is not None
    stray = {"role": "tool", "tool_call_id": "nope", "content": "r"}
    assert write_history(_msgs(user, call, stray, answer, user), True, None) is None  # a result for no call
    bad = dict(call, tool_calls=[dict(CALL, function={"name": "f", "arguments": "not json"})])
    assert write_history(_msgs(user, bad, result), True, None) is None


@pytest.mark.parametrize("shell,git", [(None, False), ("/bin/bash", False), ("/bin/sh", False), ("/bin/bash", True)])
def test_the_worked_out_environment_is_what_the_cli_records(cli_bin: str, tmp_path: Any, monkeypatch: Any,
                                                            shell: str | None, git: bool) -> None:
    """With sessions off the CLI records no environment to copy, so the relay works it out; any
    difference from the CLI's own makes it add an "# Environment update" naming the host (seen in CI,
    which runs with no $SHELL). Compared with what the real CLI records for the same folder and $SHELL."""
    import os
    import subprocess

    from relay.cli.conformance.lab import env_for
    from relay.cli.conformance.mock_api import MockApi
    from relay.cli.session_files import live_environment

    if shell is None:
        monkeypatch.delenv("SHELL", raising=False)
    else:
        monkeypatch.setenv("SHELL", shell)
    cwd = tmp_path / "state" / "cwd-x"
    cwd.mkdir(parents=True)
    if git:
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with MockApi() as api:
        env = env_for(dict(os.environ), api.url, str(tmp_path / "cfg"))
        if shell is None:
            env.pop("SHELL", None)
        subprocess.run([cli_bin, "-p", "hi", "--output-format", "json"], env=env, cwd=cwd, capture_output=True,
                       timeout=90, check=True)
    recorded = [r["attachment"]["snapshot"] for f in (tmp_path / "cfg").rglob("*.jsonl")
                for r in map(json.loads, f.read_text().splitlines())
                if r.get("type") == "attachment" and (r.get("attachment") or {}).get("type") == "environment"]
    assert recorded and live_environment(tmp_path / "nothing-here", cwd.resolve()) == recorded[0]

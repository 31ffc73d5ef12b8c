"""Chat completions through the relay (gunicorn, 2 gevent workers) → real CLI → mock API, seen by the
official openai SDK in strict mode; and what the model actually received."""

import json

import openai
import pytest
import requests
from harness import openai_client
from mock_anthropic import all_text


def ask(client, text, **kw):
    return client.chat.completions.create(model=kw.pop("model", "sonnet"),
                                          messages=[{"role": "user", "content": text}], **kw)


def test_non_streaming_completion_is_complete_and_strict(client, mock_api):
    raw = client.chat.completions.with_raw_response.create(
        model="claude-max/sonnet", messages=[{"role": "user", "content": "hello nonstream-1"}])
    assert raw.headers["x-request-id"]
    r = raw.parse()
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and isinstance(r.created, int)
    assert r.model == "claude-sonnet-5-5"  # what the CLI used, not what was asked
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.index == 0 and c.logprobs is None
    assert c.message.content == "Hello from mock. You said: hello nonstream-1"
    assert c.message.refusal is None and c.message.role == "assistant"
    assert r.usage.prompt_tokens == 600 and r.usage.prompt_tokens_details.cached_tokens == 300
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == 607
    assert isinstance(r.system_fingerprint, str)


def test_streaming_follows_the_openai_contract(client):
    chunks = list(ask(client, "stream-1 MOCK:words=10", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 10  # real token streaming, not one lump
    assert "".join(c.choices[0].delta.content for c in content) == " ".join(f"w{k}" for k in range(10))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert {c.model for c in chunks} == {"claude-sonnet-5-5"}


def test_stream_helper_accumulates_role_once(client):
    with client.chat.completions.stream(model="sonnet", messages=[{"role": "user", "content": "acc MOCK:words=5"}]) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == "w0 w1 w2 w3 w4"


def test_sse_framing_byte_by_byte(relay):
    body = {"model": "sonnet", "stream": True, "messages": [{"role": "user", "content": "raw MOCK:words=3"}]}
    with requests.post(relay.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Accel-Buffering"] == "no" and r.headers["x-request-id"]
        raw = r.raw.read()
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    assert not any(f.startswith(b"event:") for f in frames)
    data = [json.loads(f[6:]) for f in frames[:-2] if f.startswith(b"data: ")]
    assert all("usage" not in d for d in data)  # no include_usage: no usage key at all
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert data[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_client_request_id_is_echoed(relay):
    r = requests.get(relay.url + "/v1/models", headers={"x-request-id": "my-trace-42"})
    assert r.headers["x-request-id"] == "my-trace-42"


def test_system_prompt_replaces_the_cli_default(client, mock_api):
    client.chat.completions.create(model="sonnet", messages=[{"role": "system", "content": "You are SYS-REPLACE-7."},
                                                             {"role": "user", "content": "sysprobe-replace"}])
    body = mock_api.bodies("sysprobe-replace")[-1]
    system = [b["text"] for b in body["system"]]
    assert "You are SYS-REPLACE-7." in system
    assert not any("Claude Code" in s and "official CLI" in s for s in system)  # the coding-agent prompt is gone


@pytest.mark.parametrize("mode", ["append", "embed"])
def test_system_prompt_modes(relay_factory, mock_api, mode):
    srv = relay_factory({"RELAY_SYSTEM_PROMPT_MODE": mode})
    with openai_client(srv.url) as c:
        c.chat.completions.create(model="sonnet", messages=[{"role": "system", "content": f"Speak like MODE-{mode}."},
                                                            {"role": "user", "content": f"sysprobe-{mode}"}])
    body = mock_api.bodies(f"sysprobe-{mode}")[-1]
    system = "\n".join(b["text"] for b in body["system"])
    assert "Claude Code" in system  # the CLI's default prompt is kept
    user = body["messages"][0]
    user_text = user["content"] if isinstance(user["content"], str) else "".join(
        b.get("text", "") for b in user["content"])
    if mode == "append":
        assert f"Speak like MODE-{mode}." in system and "MODE-" not in user_text
    else:
        assert f"Speak like MODE-{mode}." not in system
        assert f"<system_instructions>\nSpeak like MODE-{mode}.\n</system_instructions>" in user_text


def test_a_3mb_system_prompt_reaches_the_model(client, mock_api):
    big = ("0123456789abcdef" * 64 + "\n") * 3000  # ~3.1 MB: far beyond the argv limit
    r = client.chat.completions.create(model="sonnet", messages=[{"role": "system", "content": big},
                                                                 {"role": "user", "content": "bigsys-probe"}])
    assert r.choices[0].message.content.endswith("bigsys-probe")
    body = mock_api.bodies("bigsys-probe")[-1]
    assert any(b["text"] == big for b in body["system"])


def test_at_file_mentions_are_never_read(client, mock_api, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT-91")
    r = ask(client, f"summarise @{secret} and @/etc/passwd please")
    assert "TOP-SECRET-CONTENT-91" not in json.dumps(mock_api.bodies(str(secret))[-1])
    assert "root:x:0:0" not in json.dumps(mock_api.bodies(str(secret))[-1])
    assert r.choices[0].message.content.endswith(f"summarise @{secret} and @/etc/passwd please")


def test_slash_commands_are_sent_as_text(client, mock_api):
    r = ask(client, "/cost")
    assert r.choices[0].message.content == "Hello from mock. You said: /cost"
    assert mock_api.bodies("/cost")


def test_history_reaches_the_model_for_a_new_conversation(client, mock_api):
    client.chat.completions.create(model="sonnet", messages=[
        {"role": "user", "content": "My name is HIST-BOB."}, {"role": "assistant", "content": "Hi HIST-BOB."},
        {"role": "user", "content": "What is my name? hist-q"}])
    text = all_text(mock_api.bodies("hist-q")[-1])
    assert text.index("My name is HIST-BOB.") < text.index("Hi HIST-BOB.") < text.index("What is my name? hist-q")


def test_the_cli_runs_isolated(relay, client, mock_api):
    # Host customisations the CLI must ignore: CLAUDE.md next to and above its working directory and in
    # its config dir, and a hook in the user settings.
    cfg = relay.tmp / "claude-config"
    marker = relay.tmp / "hook-ran"
    for place in (relay.tmp / "CLAUDE.md", relay.tmp / "var" / "CLAUDE.md", cfg / "CLAUDE.md"):
        place.write_text("HOST-CLAUDE-MD-MUST-NOT-LEAK")
    (cfg / "settings.json").write_text(json.dumps({"hooks": {"UserPromptSubmit": [{"hooks": [
        {"type": "command", "command": f"touch {marker}"}]}]}}))
    ask(client, "isolation-probe")
    body = mock_api.bodies("isolation-probe")[-1]
    assert body["tools"] == []  # the CLI's own tools are off
    assert "HOST-CLAUDE-MD-MUST-NOT-LEAK" not in json.dumps(body)
    assert not marker.exists()
    cwd = relay.tmp / "var" / "cli-cwd"
    assert f"Primary working directory: {cwd}" in all_text(body)
    assert list(cwd.iterdir()) == []


def test_cli_retries_follow_cli_max_retries(client, mock_api):
    with pytest.raises(openai.InternalServerError) as e:
        ask(client, "retry-probe MOCK:error=500")
    assert e.value.status_code == 502
    assert len(mock_api.bodies("retry-probe")) == 2  # cli_max_retries=1: one try plus one retry


def test_models_endpoints(client, relay):
    ids = [m.id for m in client.models.list()]
    assert {"opus", "sonnet", "haiku", "claude-opus-4", "claude-sonnet-4", "claude-haiku-4"} <= set(ids)
    assert client.models.retrieve("claude-sonnet-4").id == "claude-sonnet-4"
    assert client.models.retrieve("anthropic/sonnet").owned_by == "anthropic"  # sent as anthropic%2Fsonnet
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.code == "model_not_found"


def test_extra_models_are_listed_with_slashes(relay_factory):
    srv = relay_factory({"RELAY_EXTRA_MODELS": json.dumps(["team/fast-one", {"id": "big", "cli_model": "opus"}])})
    with openai_client(srv.url) as c:
        assert {"team/fast-one", "big"} <= {m.id for m in c.models.list()}
        assert c.models.retrieve("team/fast-one").id == "team/fast-one"


def test_health_reports_cli_redis_and_runs(relay):
    h = requests.get(relay.url + "/health").json()
    assert h["status"] == "ok" and h["redis"]["ok"] is True
    assert h["cli"]["ok"] is True and h["cli"]["version"] >= "2.1.330" and h["cli"]["path"].endswith("claude")
    assert h["active_runs"] == 0


def test_responses_shaped_bodies_on_chat_completions_get_chat_chunks(relay):
    body = {"model": "gpt-5", "input": [{"role": "user", "content": [{"type": "input_text", "text": "cursor-1"}]}],
            "instructions": "Be terse.", "reasoning": {"effort": "low"}, "stream": True}
    with requests.post(relay.url + "/v1/chat/completions", json=body, stream=True) as r:
        raw = r.raw.read().decode()
    assert r.status_code == 200 and '"object":"chat.completion.chunk"' in raw and raw.endswith("data: [DONE]\n\n")
    assert "cursor-1" in raw


def test_a_refusal_is_content_filter_even_after_the_clis_continuation(client):
    r = client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "ca-ref MOCK:refusal"}])
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content is None and choice.message.refusal

"""The Anthropic Messages API through the relay: the official `anthropic` SDK (strict validation), raw SSE
where the exact event sequence matters, and the pinned Claude Code CLI itself as a client."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import pytest
import requests
from harness import anthropic_client, default_cli_bin, wait_until
from mock_anthropic import all_text

PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360f8cf"
    "c0f01f0005000201d3ae6d3b0000000049454e44ae426082")).decode()
PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n").decode()
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture()
def ac(relay):
    c = anthropic_client(relay.url)
    yield c
    c.close()


def sse_events(raw: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of an Anthropic SSE stream; every frame must name its event."""
    out = []
    for frame in raw.split("\n\n"):
        if not frame.strip():
            continue
        lines = frame.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        data = json.loads(lines[1][len("data: "):])
        assert data["type"] == lines[0][len("event: "):]
        out.append((data["type"], data))
    return out


def post_stream(relay, body, headers=None):
    with requests.post(relay.url + "/v1/messages", json=dict(body, stream=True), stream=True, timeout=60,
                       headers=dict({"anthropic-version": "2023-06-01"}, **(headers or {}))) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.raw.read().decode())


# -- answers ---------------------------------------------------------------------------------------
def test_create_answers_with_a_message_and_claude_usage(ac, mock_api):
    m = ac.messages.create(model="claude-sonnet-4-5", max_tokens=1024,
                           system=[{"type": "text", "text": "Answer like MSG-SYS-1."},
                                   {"type": "text", "text": "Second block.", "cache_control": {"type": "ephemeral"}}],
                           messages=[{"role": "user", "content": "ms1 hello"}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == "Hello from mock. You said: ms1 hello"
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    u = m.usage  # the CLI's own figures: input excludes the cache
    assert (u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens, u.output_tokens) == (100, 200, 300, 7)
    body = mock_api.bodies("ms1 hello")[-1]
    texts = [b["text"] for b in body["system"]]
    assert any("Answer like MSG-SYS-1.\n\nSecond block." in t for t in texts)


def test_stream_is_the_exact_anthropic_event_sequence(relay):
    events = post_stream(relay, {"model": "sonnet", "max_tokens": 100,
                                 "messages": [{"role": "user", "content": "ms2 MOCK:words=4"}]})
    kinds = [k for k, _ in events if k != "ping"]
    assert kinds == ["message_start", "content_block_start"] + ["content_block_delta"] * 4 + \
        ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    # what Claude Code reads: every usage field present and numeric in message_start and message_delta
    assert start["usage"] == {"input_tokens": 100, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 300,
                              "output_tokens": 1, "service_tier": "standard"}
    delta = next(d for k, d in events if k == "message_delta")
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 100, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 300,
                              "output_tokens": 4}
    texts = [d["delta"]["text"] for k, d in events if k == "content_block_delta"]
    assert "".join(texts) == "w0 w1 w2 w3"
    assert all(d["index"] == 0 for k, d in events if k.startswith("content_block"))


def test_sdk_stream_helper_accumulates_the_message(ac):
    with ac.messages.stream(model="sonnet", max_tokens=100,
                            messages=[{"role": "user", "content": "ms3 MOCK:words=5"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "w0 w1 w2 w3 w4" == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5
    assert final.usage.cache_read_input_tokens == 300


def test_images_documents_and_history_reach_the_model(ac, mock_api):
    ac.messages.create(model="sonnet", max_tokens=100, messages=[
        {"role": "user", "content": "ms4 my name is ZED"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi ZED."}]},
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
             "title": "spec"},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "ms4 plain doc"}},
            {"type": "text", "text": "ms4 what is this?"}]}])
    body = mock_api.bodies("ms4 what is this?")[-1]
    blocks = [b for m in body["messages"] for b in (m["content"] if isinstance(m["content"], list) else [])]
    assert any(b["type"] == "image" and b["source"]["data"] == PNG for b in blocks)
    docs = [b for b in blocks if b["type"] == "document"]
    assert docs[0]["source"]["media_type"] == "application/pdf" and docs[0]["title"] == "spec"
    assert docs[1]["source"] == {"type": "text", "media_type": "text/plain", "data": "ms4 plain doc"}
    assert "ms4 my name is ZED" in all_text(body) and "Hi ZED." in all_text(body)
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model="sonnet", max_tokens=100, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "bm90IGFuIGltYWdl"}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"


# -- tools -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_round_trip_resumes_the_session(relay, ac, mock_api, stream):
    tag = f"ms5-{stream}"
    msgs: list = [{"role": "user", "content": f"{tag} weather in two cities MOCK:tools=get_weather,get_weather"}]
    kw = dict(model="sonnet", max_tokens=500, tools=[WEATHER], metadata={"user_id": f"user-{tag}"})
    if stream:
        with ac.messages.stream(messages=msgs, **kw) as s:
            first = s.get_final_message()
    else:
        first = ac.messages.create(messages=msgs, **kw)
    offered = {t["name"]: t for t in mock_api.bodies(tag)[-1]["tools"]}
    assert offered["mcp__client__get_weather"]["input_schema"]["required"] == ["city"]
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "City0"}), ("get_weather", {"city": "City1"})]
    msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    msgs.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": uses[0].id, "content": [
            {"type": "text", "text": f"{tag} sunny in City0"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
        {"type": "tool_result", "tool_use_id": uses[1].id, "is_error": True, "content": f"{tag} no data"}]})
    second = ac.messages.create(messages=msgs, **kw)
    assert second.stop_reason == "end_turn" and second.content[0].text.startswith("Tool said:")
    body = mock_api.bodies(f"{tag} no data")[-1]
    last = body["messages"][-1]["content"]  # resumed: real tool_result blocks tied to the model's tool_use ids
    results = {b["tool_use_id"]: b for b in last if b["type"] == "tool_result"}
    assert set(results) == {uses[0].id, uses[1].id}
    assert results[uses[1].id].get("is_error") is True
    assert any(c["type"] == "image" for c in results[uses[0].id]["content"])
    rec = requests.get(relay.url + "/v1/usage/recent?limit=1").json()["data"][0]
    assert rec["resumed"] is True and rec["endpoint"] == "/v1/messages"


def test_streamed_tool_use_arrives_as_input_json_deltas(relay):
    events = post_stream(relay, {"model": "sonnet", "max_tokens": 100, "tools": [WEATHER],
                                 "messages": [{"role": "user", "content": "ms6 MOCK:tool=get_weather"}]})
    start = next(d for k, d in events if k == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get_weather"
    assert start["content_block"]["input"] == {}
    partial = "".join(d["delta"]["partial_json"] for k, d in events
                      if k == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "City0"}
    assert next(d for k, d in events if k == "message_delta")["delta"]["stop_reason"] == "tool_use"


def test_tool_choice_and_server_tools(ac, mock_api):
    ac.messages.create(model="sonnet", max_tokens=100, tools=[WEATHER],
                       tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                       messages=[{"role": "user", "content": "ms7 go"}])
    text = all_text(mock_api.bodies("ms7 go")[-1])
    assert "You must answer by calling the tool `get_weather`." in text and "at most one tool" in text
    ac.messages.create(model="sonnet", max_tokens=100, tools=[WEATHER], tool_choice={"type": "none"},
                       messages=[{"role": "user", "content": "ms7b none"}])
    assert not [t for t in mock_api.bodies("ms7b none")[-1].get("tools", []) if t["name"].startswith("mcp__client__")]
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model="sonnet", max_tokens=100, messages=[{"role": "user", "content": "x"}],
                           tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "not supported" in e.value.message


# -- thinking ----------------------------------------------------------------------------------------
def test_thinking_comes_back_as_thinking_blocks_when_asked(ac, mock_api):
    with ac.messages.stream(model="sonnet", max_tokens=20000, thinking={"type": "enabled", "budget_tokens": 10000},
                            messages=[{"role": "user", "content": "ms8 MOCK:thinking"}]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think step by step about this."
    assert "thinking" in kinds
    assert mock_api.bodies("ms8 MOCK:thinking")[-1]["output_config"]["effort"] == "medium"  # from the budget
    plain = ac.messages.create(model="sonnet", max_tokens=100, messages=[{"role": "user", "content": "ms8b MOCK:thinking"}])
    assert [b.type for b in plain.content] == ["text"]  # not asked for: no thinking blocks
    made = ac.messages.create(model="sonnet", max_tokens=20000, thinking={"type": "adaptive"},
                              messages=[{"role": "user", "content": "ms8c MOCK:thinking"}])
    assert made.content[0].type == "thinking" and made.content[0].signature == ""


def test_refusal_is_the_refusal_stop_reason_even_after_the_clis_continuation(relay, ac):
    # the CLI continues once after a refused message ("safeguards stopped the response above"): still a refusal
    r = ac.messages.create(model="sonnet", max_tokens=100, messages=[{"role": "user", "content": "ms9b MOCK:refusal"}])
    assert r.stop_reason == "refusal"
    events = post_stream(relay, {"model": "sonnet", "max_tokens": 100,
                                 "messages": [{"role": "user", "content": "ms9c MOCK:refusal"}]})
    assert next(d for k, d in events if k == "message_delta")["delta"]["stop_reason"] == "refusal"


# -- errors --------------------------------------------------------------------------------------------
def test_errors_are_anthropic_shaped_and_typed_in_the_sdk(relay, ac):
    r = requests.post(relay.url + "/v1/messages", json={"model": "sonnet", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required (a positive integer)"}}
    assert r.headers["request-id"] == r.headers["x-request-id"]
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model="sonnet", max_tokens=10, messages=[{"role": "user", "content": [{"type": "audio"}]}])
    assert "messages.0.content.0.type" in e.value.message
    with pytest.raises(anthropic.NotFoundError) as nf:
        ac.post("/v1/messages/batches", body={}, cast_to=object)
    assert nf.value.body["error"]["type"] == "not_found_error"
    r = requests.get(relay.url + "/v1/messages", headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = requests.post(relay.url + "/v1/messages", data=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("marker,exc,status,kind", [
    ("MOCK:error=500", anthropic.InternalServerError, 502, "api_error"),
    ("MOCK:error=529", anthropic.OverloadedError, 529, "overloaded_error"),
    ("MOCK:error=429", anthropic.RateLimitError, 429, "rate_limit_error"),
    ("MOCK:error=400", anthropic.BadRequestError, 400, "invalid_request_error"),
])
def test_upstream_errors_reach_the_sdk_as_its_typed_exceptions(ac, marker, exc, status, kind):
    with pytest.raises(exc) as e:
        ac.messages.create(model="sonnet", max_tokens=10, messages=[{"role": "user", "content": f"ms10 {marker}"}])
    assert e.value.status_code == status and e.value.body["error"]["type"] == kind
    if status in (429, 529):
        assert int(e.value.response.headers["retry-after"]) >= 1


def test_error_after_the_stream_began_is_an_error_event_without_message_stop(relay, ac):
    events = post_stream(relay, {"model": "sonnet", "max_tokens": 10,
                                 "messages": [{"role": "user", "content": "ms11 MOCK:break_stream"}]})
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-1] == "error" and "message_stop" not in kinds
    assert events[-1][1]["error"]["type"] == "api_error"
    with pytest.raises(anthropic.APIStatusError):
        with ac.messages.stream(model="sonnet", max_tokens=10,
                                messages=[{"role": "user", "content": "ms11b MOCK:break_stream"}]) as s:
            s.get_final_message()


def test_sdk_retries_honour_retry_after(relay_factory, mock_api):
    srv = relay_factory({"RELAY_CLI_MAX_RETRIES": "0", "RELAY_UPSTREAM_RETRY_AFTER_S": "1"})
    with anthropic_client(srv.url, max_retries=2) as c:
        m = c.messages.create(model="sonnet", max_tokens=10,
                              messages=[{"role": "user", "content": "ms12 MOCK:fail_first=1:429"}])
    assert m.content[0].text.endswith("ms12 MOCK:fail_first=1:429")
    tries = mock_api.records("ms12 MOCK:fail_first")
    assert len(tries) == 2
    assert tries[1]["t"] - tries[0]["t"] >= 1.0  # the SDK waited as long as Retry-After said


# -- count_tokens and models -------------------------------------------------------------------------
def test_count_tokens_is_answered_locally_and_stands_a_burst(relay_factory, mock_api):
    srv = relay_factory({"RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE": "5"})
    system = "You are a coding agent. " * 2000
    body = {"model": "claude-sonnet-4-5", "system": system, "tools": [WEATHER],
            "messages": [{"role": "user", "content": "ms13 count me"}]}
    with anthropic_client(srv.url) as c:
        n = c.messages.count_tokens(**body).input_tokens
        small = c.messages.count_tokens(model="sonnet", messages=[{"role": "user", "content": "ms13 count me"}])
    assert n > 10000 and 0 < small.input_tokens < 100
    t0 = time.monotonic()
    with ThreadPoolExecutor(10) as pool:  # an editor's start-up burst: 50 at once, past the 5/minute limit
        codes = list(pool.map(lambda _: requests.post(srv.url + "/v1/messages/count_tokens", json=body).status_code,
                              range(50)))
    took = time.monotonic() - t0
    print(f"count_tokens: 50 requests with a {len(system)}-character system prompt in {took:.2f} s")
    assert codes == [200] * 50
    assert mock_api.records("ms13 count me") == []  # no CLI run, nothing upstream
    r = requests.post(srv.url + "/v1/messages/count_tokens", json={"messages": "nope"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_models_in_anthropic_shape_when_anthropic_version_is_sent(relay, ac):
    models = list(ac.models.list())
    assert {"sonnet", "claude-opus-4"} <= {m.id for m in models}
    assert all(m.type == "model" and m.display_name.startswith("Claude") for m in models)
    assert ac.models.retrieve("claude-sonnet-4").id == "claude-sonnet-4"
    with pytest.raises(anthropic.NotFoundError):
        ac.models.retrieve("nope")
    assert requests.get(relay.url + "/v1/models").json()["object"] == "list"  # OpenAI clients unchanged


def test_cors_preflight_and_body_limit_on_the_messages_routes(relay_factory):
    srv = relay_factory({"RELAY_CORS__ALLOWED_ORIGINS": '["https://app.example"]', "RELAY_MAX_BODY_MB": "0.01"})
    big = requests.post(srv.url + "/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                                        "messages": [{"role": "user", "content": "x" * 20000}]})
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
    r = requests.options(srv.url + "/v1/messages", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "anthropic-version,anthropic-beta,x-api-key"})
    allowed = r.headers["Access-Control-Allow-Headers"].lower()
    assert r.status_code == 204 and "anthropic-version" in allowed and "anthropic-beta" in allowed


# -- Claude Code itself as a client ------------------------------------------------------------------
TEAM_KEY = "sk-team-claude-code-1"


@pytest.fixture(scope="module")
def team(relay_factory):
    return relay_factory({"RELAY_AUTH__ENABLED": "true", "RELAY_AUTH__API_KEYS": json.dumps([
        {"name": "dev", "key": TEAM_KEY}, {"name": "ops", "key": "sk-team-admin-1", "admin": True}])})


def claude_code(srv, prompt: str, cwd: Path, auth: str = "api_key", *args: str) -> dict:
    """Run the pinned Claude Code CLI headless with ANTHROPIC_BASE_URL at the relay; its JSON result."""
    home = cwd.parent / (cwd.name + "-home")
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE", "RELAY_"))}
    env.update(HOME=str(home), CLAUDE_CONFIG_DIR=str(home / ".claude"), ANTHROPIC_BASE_URL=srv.url,
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
    env["ANTHROPIC_API_KEY" if auth == "api_key" else "ANTHROPIC_AUTH_TOKEN"] = TEAM_KEY
    p = subprocess.run([default_cli_bin(), "-p", prompt, "--output-format", "json", *args], cwd=cwd, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:], srv.log()[-3000:])
    return json.loads(p.stdout)


def admin_get(srv, path: str) -> dict:
    return requests.get(srv.url + path, headers={"x-api-key": "sk-team-admin-1"}, timeout=10).json()


@pytest.mark.slow
@pytest.mark.parametrize("auth", ["api_key", "auth_token"])
def test_claude_code_headless_gets_its_answer_and_reads_the_usage(team, mock_api, tmp_path, auth):
    out = claude_code(team, f"ms20-{auth} Say hi", tmp_path, auth)
    assert out["is_error"] is False and out["result"] == f"Hello from mock. You said: ms20-{auth} Say hi"
    # Claude Code read the usage of message_start/message_delta: the relay's CLI reported 100/200/300 and 7
    u = out["usage"]
    assert (u["input_tokens"], u["cache_creation_input_tokens"], u["cache_read_input_tokens"]) == (100, 200, 300)
    assert u["output_tokens"] == 8 and out["total_cost_usd"] > 0
    body = mock_api.bodies(f"ms20-{auth} Say hi")[-1]  # Claude Code's own system prompt reached the model
    assert "You are an agent working with the user" in all_text(body)
    assert "x-anthropic-billing-header: cc_version" not in json.dumps(body["system"][1:])
    recent = admin_get(team, "/v1/usage/recent?limit=5")["data"]
    mine = [r for r in recent if r["first_message"] and f"ms20-{auth}" in r["first_message"]]
    assert mine and mine[0]["endpoint"] == "/v1/messages" and mine[0]["key"] == "dev" and mine[0]["status"] == 200


@pytest.mark.slow
def test_claude_code_runs_its_own_tool_and_the_relay_resumes_the_session(team, mock_api, tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("ms21-secret-content\n")
    before = admin_get(team, "/stats")["requests"]["total"]
    out = claude_code(team, f"ms21 read my notes MOCK:tool=Read MOCK:read={work / 'notes.txt'}", work)
    # the relay answered tool_use; Claude Code ran Read in its own cwd and sent the tool_result back
    assert out["result"].startswith("Tool said:") and "ms21-secret-content" in out["result"]
    assert out["num_turns"] == 2
    first, second = mock_api.bodies("ms21 read my notes")[-2:]
    offered = {t["name"] for t in first["tools"]}
    assert {"mcp__client__Read", "mcp__client__Bash", "mcp__client__Edit"} <= offered  # its tools, as real tools
    results = [b for b in second["messages"][-1]["content"] if b["type"] == "tool_result"]
    assert "ms21-secret-content" in json.dumps(results)  # resumed: a real tool_result, not a transcript
    recent = admin_get(team, "/v1/usage/recent?limit=10")["data"]
    turns = [r for r in recent if r["first_message"] and "ms21 read my notes" in r["first_message"]]
    assert len(turns) == 2 and turns[0]["resumed"] is True and {r["endpoint"] for r in turns} == {"/v1/messages"}
    assert admin_get(team, "/stats")["requests"]["total"] >= before + 2
    convs = [c for c in admin_get(team, "/v1/sessions")["data"] if c["scope"].startswith("dev~") and c["turns"] >= 2]
    assert convs  # one conversation across both requests


@pytest.mark.slow
def test_a_continued_claude_code_session_is_one_resumed_conversation(team, mock_api, tmp_path):
    claude_code(team, "ms22 first question", tmp_path)
    out = claude_code(team, "ms22 second question", tmp_path, "api_key", "--continue")
    assert out["result"] == "Hello from mock. You said: ms22 second question"
    rec = admin_get(team, "/v1/usage/recent?limit=1")["data"][0]
    assert rec["resumed"] is True and rec["first_message"].startswith("ms22 first question")
    body = mock_api.bodies("ms22 second question")[-1]
    history = [m for m in body["messages"] if m["role"] == "assistant"]
    assert history[-1]["content"][-1]["text"] == "Hello from mock. You said: ms22 first question"  # the CLI's session


# -- limits, quotas, keys, keep-alives -------------------------------------------------------------
def test_keys_limits_and_quotas_apply_in_anthropic_shape(relay_factory):
    srv = relay_factory({"RELAY_AUTH__ENABLED": "true", "RELAY_AUTH__API_KEYS": json.dumps([
        {"name": "amy", "key": "sk-amy-123456", "rpm": 2, "models": ["haiku"]},
        {"name": "quota", "key": "sk-quota-123456", "tokens_per_day": 500}])})
    with pytest.raises(anthropic.AuthenticationError) as e:  # 401 from the auth hook
        anthropic_client(srv.url, api_key="sk-wrong").messages.create(
            model="haiku", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    bearer = requests.post(srv.url + "/v1/messages/count_tokens", headers={"Authorization": "Bearer sk-amy-123456"},
                           json={"model": "haiku", "messages": [{"role": "user", "content": "hi"}]})
    assert bearer.status_code == 200  # Authorization: Bearer works as well as x-api-key
    amy = anthropic_client(srv.url, api_key="sk-amy-123456")
    with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
        amy.messages.create(model="opus", max_tokens=10, messages=[{"role": "user", "content": "ms30 opus?"}])
    assert forbidden.value.body["error"]["type"] == "permission_error"
    amy.messages.create(model="haiku", max_tokens=10, messages=[{"role": "user", "content": "ms30 one"}])
    with pytest.raises(anthropic.RateLimitError) as limited:  # flask-limiter's 429 (the 403 above counted too)
        amy.messages.create(model="haiku", max_tokens=10, messages=[{"role": "user", "content": "ms30 two"}])
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    q = anthropic_client(srv.url, api_key="sk-quota-123456")
    q.messages.create(model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "ms31 spend"}])  # 607 tokens
    with pytest.raises(anthropic.RateLimitError) as quota:
        q.messages.create(model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "ms31 more"}])
    assert quota.value.response.headers["x-should-retry"] == "false"
    usage = requests.get(srv.url + "/v1/usage", headers={"x-api-key": "sk-quota-123456"}).json()
    assert usage["total"]["input_tokens"] == 100 and usage["total"]["cache_read_tokens"] == 300  # recorded like chat


def test_silence_is_filled_with_ping_events(relay_factory):
    srv = relay_factory({"RELAY_KEEPALIVE_S": "0.2"})
    events = post_stream(srv, {"model": "sonnet", "max_tokens": 10,
                               "messages": [{"role": "user", "content": "ms32 MOCK:words=3 MOCK:slow=700"}]})
    kinds = [k for k, _ in events]
    assert "ping" in kinds[kinds.index("content_block_start"):kinds.index("message_stop")]
    assert kinds[-1] == "message_stop"


def test_a_silent_model_before_its_first_block_is_covered_by_pings(relay_factory):
    """Claude Code's stall watchdog: a model that thinks a while before its first block (a long tool-less
    wait) must not look like a dead stream."""
    srv = relay_factory({"RELAY_KEEPALIVE_S": "0.2"})
    events = post_stream(srv, {"model": "sonnet", "max_tokens": 10,
                               "messages": [{"role": "user", "content": "ms33 MOCK:words=2 MOCK:think=1.5"}]})
    kinds = [k for k, _ in events]
    before_content = kinds[kinds.index("message_start"):kinds.index("content_block_start")]
    assert before_content.count("ping") >= 3, kinds
    assert kinds[-1] == "message_stop"


# -- sessions and JSON output --------------------------------------------------------------------------
def test_a_conversation_resumes_and_metadata_user_id_keeps_sessions_apart(relay, ac, mock_api):
    def turn(user_id, messages):
        m = ac.messages.create(model="sonnet", max_tokens=50, metadata={"user_id": user_id}, messages=messages)
        rec = requests.get(relay.url + "/v1/usage/recent?limit=1").json()["data"][0]
        return m.content[0].text, rec["resumed"]

    opening = [{"role": "user", "content": "ms40 my name is ZED"}]
    a1, resumed = turn("sess-1", opening)
    assert resumed is False
    history = opening + [{"role": "assistant", "content": a1}, {"role": "user", "content": "ms40 who am I?"}]
    assert turn("sess-1", history)[1] is True  # only the new message went to the CLI
    assert mock_api.bodies("ms40 who am I?")[-1]["messages"][-1]["content"][-1]["text"] == "ms40 who am I?"
    assert turn("sess-2", history)[1] is False  # another client session with the same opening: its own


def test_output_format_json_schema_answers_json(ac):
    m = ac.messages.create(model="sonnet", max_tokens=100, messages=[{"role": "user", "content": "ms41 MOCK:structured"}],
                           extra_body={"output_config": {"format": {"type": "json_schema", "schema": {
                               "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                               "required": ["name", "age"]}}}})
    assert json.loads(m.content[0].text) == {"name": "Alice", "age": 30}


# -- the pure translation ---------------------------------------------------------------------------
def test_translation_of_blocks_roles_and_options():
    from relay.core.messages import to_chat_body

    chat = to_chat_body({
        "model": "sonnet", "max_tokens": 10, "temperature": 0.2, "stop_sequences": ["END"],
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1;"}, {"type": "text", "text": "S"}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "system", "content": [{"type": "text", "text": "env"}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                              {"type": "text", "text": "let me"},
                                              {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"},
                                         {"type": "text", "text": "and then?"}]}],
        "tool_choice": {"type": "any"}, "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 2048}, "metadata": {"user_id": "u1"}})
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["system", "user", "system", "assistant", "tool", "user"]
    assert chat["messages"][0]["content"] == "S"  # Claude Code's billing line is not an instruction
    assistant = chat["messages"][3]
    assert assistant["content"] == [{"type": "text", "text": "let me"}]  # thinking dropped
    assert assistant["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert chat["messages"][4] == {"role": "tool", "tool_call_id": "t1", "content": "r"}
    assert chat["tool_choice"] == "required" and chat["reasoning_effort"] == "low" and chat["expose_reasoning"]
    assert chat["user"] == "u1" and "temperature" not in chat and "stop" not in chat


def test_stream_fills_in_whole_tool_input_and_maps_stop_reasons():
    from relay.core.events import Delta, Turn
    from relay.core.formats.anthropic_messages import MessageStream, stop_reason

    # a tool call that arrived whole (the CLI's non-streaming fallback): the turn hands its input on as one delta
    turn = Turn()
    whole = turn.feed({"type": "assistant", "uuid": "u1", "message": {"id": "m1", "model": "m", "content": [
        {"type": "tool_use", "id": "t1", "name": "mcp__client__w", "input": {"city": "Oslo"}}]}})
    assert [d.kind for d in whole] == ["tool_start", "tool_args"] and turn.tool_calls[0].arguments == '{"city": "Oslo"}'
    s = MessageStream("msg_1", "m")
    usage = {"input_tokens": 1, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3, "output_tokens": 4}
    events = s.start(dict(usage, service_tier="standard")) + s.delta(Delta("reasoning", "hm")) + \
        s.delta(Delta("text", "hi")) + [e for d in whole for e in s.delta(d)] + s.finish("tool_calls", usage)
    kinds = [(k, d.get("delta", {}).get("type") or d.get("delta", {}).get("stop_reason")) for k, d in events]
    assert kinds == [("message_start", None), ("content_block_start", None), ("content_block_delta", "thinking_delta"),
                     ("content_block_delta", "signature_delta"), ("content_block_stop", None),
                     ("content_block_start", None), ("content_block_delta", "text_delta"), ("content_block_stop", None),
                     ("content_block_start", None), ("content_block_delta", "input_json_delta"),
                     ("content_block_stop", None), ("message_delta", "tool_use"), ("message_stop", None)]
    assert events[9][1]["delta"]["partial_json"] == '{"city": "Oslo"}' and events[9][1]["index"] == 2
    assert events[0][1]["message"]["usage"]["output_tokens"] == 1
    assert [stop_reason(f) for f in ("stop", "length", "tool_calls", "content_filter")] == \
        ["end_turn", "max_tokens", "tool_use", "refusal"]


def test_relay_errors_render_with_anthropic_types_and_statuses():
    from relay import errors

    cases = [(errors.BadRequest("b"), 400, "invalid_request_error"), (errors.Unauthorized("u"), 401, "authentication_error"),
             (errors.Forbidden("f"), 403, "permission_error"), (errors.NotFound("n"), 404, "not_found_error"),
             (errors.PayloadTooLarge("p"), 413, "request_too_large"), (errors.RateLimited("r"), 429, "rate_limit_error"),
             (errors.QuotaExceeded("q"), 429, "rate_limit_error"), (errors.RelayError("e"), 500, "api_error"),
             (errors.UpstreamError("x"), 502, "api_error"), (errors.Timeout("t"), 504, "timeout_error"),
             (errors.Unavailable("o", code="overloaded"), 529, "overloaded_error"),
             (errors.Conflict("c"), 409, "invalid_request_error")]
    for err, status, kind in cases:
        assert err.anthropic_status() == status
        assert err.anthropic_body() == {"type": "error", "error": {"type": kind, "message": err.message}}


def test_fuzzed_messages_bodies_are_clear_400s_or_valid_prompts():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from relay.core.conversation import conversation_id
    from relay.core.images import check_limits
    from relay.core.messages import parse_messages_request
    from relay.core.models import ModelCatalog
    from relay.core.prompt import build_prompt
    from relay.errors import BadRequest

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(alphabet="ab /{}\"é\x00", max_size=5))
    anything = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                        st.dictionaries(st.text(max_size=4), c, max_size=3)), max_leaves=6)
    source = st.fixed_dictionaries({"type": st.sampled_from(["base64", "url", "text", "x"])},
                                   optional={"media_type": st.sampled_from(["image/png", "application/pdf", "x"]),
                                             "data": st.one_of(st.just(PNG), anything), "url": anything})
    text = st.text(alphabet="ab <>/@\n", max_size=6)
    block = st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "text", "image", "document", "tool_use", "tool_result", "thinking", "x"])},
        optional={"text": st.one_of(text, anything), "source": source, "id": st.one_of(st.just("t1"), anything),
                  "name": st.one_of(st.just("f"), anything), "input": st.one_of(st.just({"a": 1}), anything),
                  "tool_use_id": st.one_of(st.just("t1"), anything), "is_error": anything,
                  "content": st.one_of(text, st.lists(st.one_of(st.just({"type": "text", "text": "r"}), anything),
                                                      max_size=2))})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "assistant", "system", "bogus"]),
                                     "content": st.one_of(text, text, st.lists(block, max_size=3), anything)})
    def mostly(value, other=anything):
        return st.one_of(st.just(value), st.just(value), st.just(value), other)

    body = st.fixed_dictionaries({"model": mostly("sonnet"), "max_tokens": mostly(100),
                                  "messages": st.lists(message, min_size=1, max_size=4)},
                                 optional={"system": st.one_of(text, anything),
                                           "tools": mostly([{"name": "f", "input_schema": {"type": "object"}}]),
                                           "tool_choice": mostly({"type": "any"}), "metadata": mostly({"user_id": "u"}),
                                           "thinking": mostly({"type": "enabled", "budget_tokens": 2048}),
                                           "output_config": mostly({"effort": "low"}), "stream": mostly(True),
                                           "stop_sequences": mostly(["x"])})
    catalog = ModelCatalog("sonnet")
    valid: list[int] = []

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fuzz=body)
    def check(fuzz):
        try:
            req = parse_messages_request(fuzz, catalog)
            check_limits(req.messages, 20, 5_000_000)
            conversation_id(None, req.user, req.system, req.messages)
            build_prompt(req.system, req.messages, "replace", True).stdin_line()
            valid.append(1)
        except BadRequest as exc:
            assert exc.anthropic_body()["error"]["type"] == "invalid_request_error" and exc.message

    check()
    print(f"fuzz: {len(valid)} of 400 bodies became prompts")
    assert valid  # the fuzz reached prompt building, not only the first check


def test_a_client_hanging_up_mid_stream_stops_the_cli(relay):
    import socket

    s = socket.create_connection(("127.0.0.1", relay.port))
    data = json.dumps({"model": "sonnet", "max_tokens": 10, "stream": True,
                       "messages": [{"role": "user", "content": "ms50 MOCK:slow=300 MOCK:words=60"}]}).encode()
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(data)).encode() + b"\r\n\r\n" + data)
    got = b""
    while b"text_delta" not in got:
        chunk = s.recv(65536)
        assert chunk
        got += chunk
    s.close()

    def cancelled():
        recent = requests.get(relay.url + "/v1/usage/recent?limit=5").json()["data"]
        return any(r["first_message"] == "ms50 MOCK:slow=300 MOCK:words=60" and r["status"] == 499 for r in recent)
    assert wait_until(cancelled, 15)
    assert wait_until(lambda: not relay.cli_pids(), 15)  # nothing left running

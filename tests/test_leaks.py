"""What the model and the clients never learn about the relay host (issue 20 items 7 and 11): an image names
no path of the host, a mislabelled image or document is refused, a crashed CLI's stderr stays in the log,
and with accounts the pool keeps no spare that no request can use and no credential it does not need."""

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from harness import ROOT, anthropic_client, cli_cwd, openai_client, wait_until
from test_hygiene import fake_cli
from test_surface import PNG

POOL_ON = {"RELAY_POOL__ENABLED": "true"}
DATA_URL = f"data:image/png;base64,{PNG}"
SHOT = {"type": "function", "function": {"name": "shot", "description": "A screenshot",
                                         "parameters": {"type": "object", "properties": {}}}}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture(scope="module", params=["cold", "pool"])
def img_relay(request: Any, relay_factory: Any, relay: Any) -> Any:
    """"cold": a CLI per run; "pool": spares, warm and held processes of the host's pool."""
    srv = relay_factory(POOL_ON) if request.param == "pool" else relay
    srv.mode = request.param
    return srv


def sessions_of(srv: Any) -> set[str]:
    """Every CLI session id this relay's runs used (its transcripts' names)."""
    return {p.stem for p in (srv.tmp / "claude-config" / "projects").rglob("*.jsonl")}


def assert_no_host_path(srv: Any, body: dict[str, Any]) -> None:
    """The whole body the model received names nothing of the relay host, and the image is in it."""
    sent = json.dumps(body)
    # documented (docs/limits.md): a conversation's first turn carries the CLI's environment section with
    # the CLI's working folder; it is the one place the host shows, and only that folder
    sent = sent.replace(f"Primary working directory: {cli_cwd(srv)}", "Primary working directory: <cwd>")
    for host_path in (str(srv.tmp), str(ROOT), "/root", "/run-", "/tmp/", f"claude-{os.getuid()}", "images/",
                      "[Image: source", "[Image source"):
        assert host_path not in sent, (host_path, sent[:3000])
    # the session id: nowhere but the API's `metadata.user_id` (the CLI's own field, never the model's input)
    model_input = json.dumps({k: v for k, v in body.items() if k != "metadata"})
    assert not set(UUID.findall(model_input)) & sessions_of(srv), model_input[:3000]
    blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
    blocks += [c for b in blocks if b.get("type") == "tool_result" and isinstance(b.get("content"), list)
               for c in b["content"]]
    images = [b for b in blocks if b.get("type") == "image"]
    assert images and all(base64.b64decode(b["source"]["data"]).startswith(b"\x89PNG") for b in images), sent[:2000]


def chat(srv: Any, messages: list[dict[str, Any]], session: str | None = None, **kw: Any) -> Any:
    extra = {"extra_headers": {"X-Session-Id": session}} if session else {}
    return openai_client(srv.url, timeout=120).chat.completions.create(model="sonnet", messages=messages,
                                                                       **extra, **kw)


def test_a_chat_image_names_no_path_on_a_new_and_a_resumed_turn(img_relay, mock_api):
    tag = f"lk1{img_relay.mode}"
    first = [{"role": "user", "content": [{"type": "text", "text": f"{tag} first"},
                                          {"type": "image_url", "image_url": {"url": DATA_URL}}]}]
    answer = chat(img_relay, first, session=f"{tag}-conv").choices[0].message.content
    assert_no_host_path(img_relay, mock_api.bodies(f"{tag} first")[-1])
    second = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": [{"type": "text", "text": f"{tag} second"},
                                                   {"type": "image_url", "image_url": {"url": DATA_URL}}]}]
    chat(img_relay, second, session=f"{tag}-conv")  # the same CLI session, resumed or warm
    assert_no_host_path(img_relay, mock_api.bodies(f"{tag} second")[-1])


def test_a_messages_image_block_names_no_path(img_relay, mock_api):
    tag = f"lk2{img_relay.mode}"
    anthropic_client(img_relay.url, timeout=120).messages.create(model="sonnet", max_tokens=50, messages=[
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": PNG}},
                                     {"type": "text", "text": f"{tag} what is it?"}]}])
    assert_no_host_path(img_relay, mock_api.bodies(f"{tag} what is it?")[-1])


def test_a_responses_input_image_names_no_path(img_relay, mock_api):
    tag = f"lk3{img_relay.mode}"
    openai_client(img_relay.url, timeout=120).responses.create(model="sonnet", input=[
        {"role": "user", "content": [{"type": "input_text", "text": f"{tag} describe"},
                                     {"type": "input_image", "image_url": DATA_URL}]}])
    assert_no_host_path(img_relay, mock_api.bodies(f"{tag} describe")[-1])


def test_an_image_in_a_tool_result_names_no_path(img_relay, mock_api):
    """The client's result holds a screenshot. With the pool the step that made the call is held; an image
    result resumes from the transcript instead (the CLI would save an MCP image and name its file)."""
    tag = f"lk4{img_relay.mode}"
    msgs: list[dict[str, Any]] = [{"role": "user", "content": f"{tag} look MOCK:tool=shot"}]
    call = chat(img_relay, msgs, session=f"{tag}-conv", tools=[SHOT]).choices[0].message
    assert call.tool_calls
    msgs += [call.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.tool_calls[0].id,
              "content": [{"type": "text", "text": f"{tag} shot"}, {"type": "image_url", "image_url": {"url": DATA_URL}}]}]
    assert "Tool said" in chat(img_relay, msgs, session=f"{tag}-conv", tools=[SHOT]).choices[0].message.content
    assert_no_host_path(img_relay, mock_api.bodies(f"{tag} shot")[-1])
    # Anthropic shape: a tool_result block with an image, in a history the CLI session never saw
    ac = anthropic_client(img_relay.url, timeout=120)
    ac.messages.create(model="sonnet", max_tokens=50, tools=[{"name": "shot", "input_schema": {"type": "object"}}],
                       messages=[{"role": "user", "content": f"{tag} again"},
                                 {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_lk4", "name": "shot",
                                                                    "input": {}}]},
                                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_lk4", "content": [
                                     {"type": "text", "text": f"{tag} result"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": PNG}}]}]}])
    assert_no_host_path(img_relay, mock_api.bodies(f"{tag} result")[-1])


# -- declared media type against the bytes ----------------------------------------------------------------

GIF = base64.b64encode(b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
                       b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;").decode()
WAV = base64.b64encode(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 24).decode()
PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n").decode()


@pytest.mark.parametrize("media, data", [("application/pdf", PNG), ("application/pdf", GIF)])
def test_an_image_labelled_a_pdf_is_refused_in_each_shape(relay, media, data):
    r = requests.post(relay.url + "/v1/chat/completions", timeout=30, json={"model": "sonnet", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "lk5"},
                                     {"type": "file", "file": {"file_data": f"data:{media};base64,{data}",
                                                               "filename": "x.pdf"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_format", r.text
    assert r.json()["error"]["param"]
    with pytest.raises(anthropic.BadRequestError) as e:
        anthropic_client(relay.url).messages.create(model="sonnet", max_tokens=50, messages=[
            {"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": media,
                                                                         "data": data}},
                                         {"type": "text", "text": "lk5"}]}])
    assert e.value.status_code == 400 and e.value.body["error"]["type"] == "invalid_request_error"
    assert "not a PDF" in e.value.body["error"]["message"]


@pytest.mark.parametrize("media, data", [("image/webp", WAV), ("image/png", PDF), ("image/jpeg", WAV)])
def test_bytes_that_are_no_image_are_refused_whatever_the_label(relay, media, data):
    r = requests.post(relay.url + "/v1/responses", timeout=30, json={"model": "sonnet", "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": f"data:{media};base64,{data}"}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image_format", r.text


def test_one_image_type_labelled_as_another_takes_the_type_of_its_bytes(relay, mock_api):
    anthropic_client(relay.url, timeout=120).messages.create(model="sonnet", max_tokens=50, messages=[
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                                   "data": PNG}},
                                     {"type": "text", "text": "lk6 which type?"}]}])
    body = mock_api.bodies("lk6 which type?")[-1]
    (image,) = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]
                if b.get("type") == "image"]
    assert image["source"]["media_type"] == "image/png"


# -- a crashed CLI's stderr ----------------------------------------------------------------------------------

SECRET = "sk-ant-oat01-LEAKED-TOKEN /root/relay/var/tmp/run-1-x"


def test_a_crashed_clis_stderr_reaches_the_log_never_the_client(relay_factory, tmp_path):
    script = f"sys.stderr.write('Error: cannot read {SECRET}\\n'); sys.exit(3)\n"
    srv = relay_factory({"CLAUDE_BIN": fake_cli(tmp_path, script)})
    seen = []
    for stream in (False, True):
        r = requests.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "sonnet", "stream": stream, "messages": [{"role": "user", "content": "lk7"}]})
        text = r.text
        assert r.status_code == 502 and "LEAKED" not in text and "/root" not in text, text
        rid = r.headers["x-request-id"]
        error = r.json()["error"]  # before the first event even a stream answers with an HTTP error
        assert error["code"] == "cli_crashed" and rid in error["message"], error
        seen.append(rid)
    with pytest.raises(anthropic.InternalServerError) as e:
        anthropic_client(srv.url).messages.create(model="sonnet", max_tokens=50,
                                                  messages=[{"role": "user", "content": "lk7"}])
    assert e.value.status_code == 502 and "LEAKED" not in json.dumps(e.value.body)
    assert e.value.body["error"]["type"] == "api_error"
    log = srv.log()
    assert all(f"{rid}: the CLI exited without a result" in log for rid in seen) and "LEAKED-TOKEN" in log


# -- the pool with accounts ----------------------------------------------------------------------------------

def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_with_accounts_the_pool_keeps_no_spare_and_no_credential_it_does_not_need(relay_factory):
    host_key = "sk-ant-api03-HOST-SECRET-lk8"
    toks = ["oat-lk8-account-0", "oat-lk8-account-1"]
    accounts = [{"name": "a0", "oauth_token_env": "CLAUDE_TOKEN_0"}, {"name": "a1", "oauth_token_env": "CLAUDE_TOKEN_1"}]
    srv = relay_factory({**POOL_ON, "RELAY_ACCOUNTS": json.dumps(accounts), "ANTHROPIC_API_KEY": host_key,
                         "CLAUDE_TOKEN_0": toks[0], "CLAUDE_TOKEN_1": toks[1]})
    secrets = [host_key, *toks]
    pool = srv.pool_server_pid()
    assert pool and not any(s in v for v in environ(pool).values() for s in secrets)
    assert "ANTHROPIC_API_KEY" not in environ(pool) and "CLAUDE_TOKEN_0" not in environ(pool)
    stats = requests.get(srv.url + "/stats", timeout=10).json()["pool"]
    assert stats["spares"]["target"] == 0 and stats["spares"]["ready"] == stats["spares"]["starting"] == 0
    # a conversation runs cold in the pool on its account's login and stays warm: that process holds its
    # own account's token only
    c = openai_client(srv.url, timeout=120)
    c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "lk8 hi"}],
                              extra_headers={"X-Session-Id": "lk8-conv"})
    assert wait_until(lambda: requests.get(srv.url + "/stats", timeout=10).json()["pool"]["warm"], timeout=20)
    import psutil

    clis = [p.pid for p in psutil.Process(pool).children()]
    assert clis and requests.get(srv.url + "/stats", timeout=10).json()["pool"]["spares"]["ready"] == 0
    for pid in clis:
        env = environ(pid)
        held = [s for s in secrets if s in env.values()]
        assert len(held) == 1 and held[0] in toks and env.get("CLAUDE_CODE_OAUTH_TOKEN") == held[0], held
        assert "ANTHROPIC_API_KEY" not in env and "CLAUDE_TOKEN_0" not in env and "CLAUDE_TOKEN_1" not in env

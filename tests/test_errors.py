"""Every failure is an OpenAI error object with the right status, before or during a stream."""

import json
import os
import stat
import time

import openai
import pytest
import requests
from harness import openai_client


def post(relay, body, **kw):
    return requests.post(relay.url + "/v1/chat/completions", timeout=60, **kw,
                         **({"data": body} if isinstance(body, (str, bytes)) else {"json": body}))


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("body, param", [
    ("{not json", "body"),
    (b"\xff\xfe{}", "body"),
    ("", "body"),
    ('{"model": "sonnet"}', "messages"),
    ('[1, 2]', "body"),
    ('{"messages": [{"role": "user", "content": "x"}], "n": 3}', "n"),
    ("[" * 100000 + "]" * 100000, "body"),
])
def test_malformed_requests_get_400_with_param(relay, body, param):
    r = post(relay, body, headers={"Content-Type": "application/json"})
    assert_error(r, 400, param=param)


def test_unknown_route_and_method(relay):
    assert_error(requests.get(relay.url + "/v1/nope"), 404, code="unknown_url")
    assert requests.get(relay.url + "/v1/chat/completions").status_code == 405
    assert "error" in requests.get(relay.url + "/v1/chat/completions").json()


@pytest.mark.parametrize("marker, exc, status, code", [
    ("MOCK:error=429", openai.RateLimitError, 429, "rate_limit_exceeded"),
    ("MOCK:error=529", openai.InternalServerError, 503, "overloaded"),
    ("MOCK:error=500", openai.InternalServerError, 502, "upstream_server_error"),
    ("MOCK:error=404", openai.NotFoundError, 404, "model_not_found"),
    ("MOCK:error=400", openai.BadRequestError, 400, "upstream_invalid_request"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_reach_the_sdk_as_the_right_class(client, marker, exc, status, code, stream):
    with pytest.raises(exc) as e:
        r = client.chat.completions.create(model="sonnet", stream=stream,
                                           messages=[{"role": "user", "content": f"err {marker}"}])
        list(r) if stream else None
    assert e.value.status_code == status and e.value.code == code
    if status in (429, 503):
        assert int(e.value.response.headers["retry-after"]) >= 1


def test_error_after_streaming_began_is_an_error_frame_without_done(relay):
    body = {"model": "sonnet", "stream": True, "messages": [{"role": "user", "content": "midstream MOCK:break_stream"}]}
    with requests.post(relay.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        raw = r.raw.read().decode()
    frames = [f for f in raw.split("\n\n") if f.startswith("data: ")]
    assert "partial te" in frames[1]
    last = json.loads(frames[-1][6:])
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert "[DONE]" not in raw and '"finish_reason":"stop"' not in raw


def test_mid_stream_error_raises_api_error_in_the_sdk(client):
    with pytest.raises(openai.APIError) as e:
        list(client.chat.completions.create(model="sonnet", stream=True,
                                            messages=[{"role": "user", "content": "sdk MOCK:break_stream"}]))
    assert not isinstance(e.value, openai.APIStatusError)


def test_missing_cli_gives_503_telling_the_operator_what_to_do(relay_factory):
    srv = relay_factory({"CLAUDE_BIN": "/nonexistent/claude"})
    h = requests.get(srv.url + "/health")
    assert h.status_code == 503 and h.json()["cli"]["ok"] is False
    assert "not found" in h.json()["cli"]["problem"]
    r = requests.post(srv.url + "/v1/chat/completions", json={"model": "s", "messages": [{"role": "user", "content": "x"}]})
    err = assert_error(r, 503, code="cli_unavailable")
    assert "install" in err["message"].lower() or "claude_bin" in err["message"]


def test_a_cli_too_old_for_verbatim_prompts_is_refused_at_start(relay_factory, tmp_path):
    fake = tmp_path / "claude"
    fake.write_text("#!/bin/sh\necho '2.1.197 (Claude Code)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    srv = relay_factory({"CLAUDE_BIN": str(fake)}, start=False)
    with pytest.raises(RuntimeError) as e:
        srv.start()
    assert "2.1.197 is too old" in str(e.value) and "client_composed" in str(e.value)
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "relay", "check"], env=srv.env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 2 and "too old" in out.stderr


def test_subscription_limit_cools_down_every_worker_without_spawning(relay_factory, mock_api):
    srv = relay_factory({"ANTHROPIC_API_KEY": "", "CLAUDE_CODE_OAUTH_TOKEN": "oat-test"})
    with openai_client(srv.url) as c:
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "MOCK:subscription_limit"}])
        assert "usage limit" in e.value.message
        assert 3000 < int(e.value.response.headers["retry-after"]) <= 3601
        before = len(mock_api.bodies("cooldown-probe"))
        for i in range(4):  # lands on both workers: none of them spawns the CLI
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": f"cooldown-probe {i}"}])
            assert 3000 < int(e.value.response.headers["retry-after"]) <= 3601
        assert len(mock_api.bodies("cooldown-probe")) == before
    h = requests.get(srv.url + "/health").json()
    assert 3000 < h["account"]["cooldown_remaining_s"] <= 3601 and h["account"]["cooldown_until_iso"]


def test_a_broken_login_stops_spawning_until_rechecked(relay_factory, mock_api):
    srv = relay_factory({"RELAY_LOGIN_RECHECK_S": "2"})
    with openai_client(srv.url) as c:
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "MOCK:error=401"}])
        assert e.value.status_code == 503 and e.value.code == "cli_login_required"
        assert "log in" in e.value.message and "claude" in e.value.message
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "login-probe-1"}])
        assert e.value.code == "cli_login_required" and not mock_api.bodies("login-probe-1")
        assert requests.get(srv.url + "/health").json()["account"]["login_problem"]
        time.sleep(2.2)  # the operator logged in again: the next request tries once more
        r = c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "login-probe-2"}])
        assert r.choices[0].message.content.endswith("login-probe-2")

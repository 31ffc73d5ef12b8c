"""The agent credential proxy's admission, tested directly against the suite's mock API over its unix
socket: only POST /v1/messages and /v1/messages/count_tokens, capped bodies, capped connections, a
read deadline and the key's models. (Under bubblewrap, from a real agent run: tests/test_agent.py.)"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from harness import wait_until

from relay.cli.credproxy import Credential, CredProxy
from relay.cli.credproxy_guard import model_allowed
from relay.core.agent import ProxyLimits


@pytest.fixture
def make_proxy(tmp_path, mock_api):
    made: list[CredProxy] = []

    def make(limits=ProxyLimits(), models=(), max_requests=50):
        cred = Credential("ANTHROPIC_API_KEY", {"x-api-key": "sk-ant-test"}, mock_api.url)
        p = CredProxy(str(tmp_path / f"p{len(made)}.sock"), cred, max_requests, limits=limits, models=models)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def connect(proxy):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(proxy.path)
    return s


def answer(s):
    """(status, parsed JSON body or raw bytes) of one response; the connection is read to its end."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:  # a unix socket closed with our unread bytes in it: the answer came first
        pass
    s.close()
    if not data:
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def send(proxy, raw):
    s = connect(proxy)
    try:
        s.sendall(raw)
    except BrokenPipeError:  # refused before the whole body went: the answer is still there to read
        pass
    return answer(s)


def request(proxy, path="/v1/messages", body=None, method="POST", key=None, extra=b""):
    data = body if isinstance(body, bytes) else json.dumps(body or {
        "model": "claude-sonnet-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": "cp"}]}).encode()
    return send(proxy, f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key or proxy.placeholder}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n".encode() + extra
                + b"\r\n" + data)


def forwarded(mock_api):
    with mock_api.lock:
        return [r["path"] for r in mock_api.requests]


SMUGGLED = ["/v1/messages/batches", "/v1/messages/batches/msgbatch_1/cancel", "/v1/messages/batches/msgbatch_1",
            "/v1/messages_anything", "/v1/messages/../../v1/files", "/v1/messages/%2e%2e/%2e%2e/v1/files",
            "/v1/messages/%2E%2E/%2E%2E/v1/files", "/v1/messages/.%2e/.%2e/v1/files", "/v1/messages%2fbatches",
            "/v1/messages%2Fbatches", "/v1/%6dessages", "/v1/messages/count_tokens/../batches", "/v1/messages/",
            "//v1/messages/batches", "/v1/messages;batches", "/v1/messages/count_tokens%2f..%2fbatches", "/v1/files",
            "/v1/models", "/v1/complete", "http://localhost/v1/messages/batches", "/V1/MESSAGES", "*"]


def test_only_the_two_paths_are_forwarded_exactly(make_proxy, mock_api):
    proxy = make_proxy()
    before = forwarded(mock_api)
    for path in SMUGGLED:
        status, body = request(proxy, path)
        assert status == 404, path
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error", path
        assert body["error"]["message"].startswith("relay proxy:"), path
    assert forwarded(mock_api) == before  # none of them reached the API
    assert request(proxy, "/v1/messages?beta=true")[0] == 200
    assert request(proxy, "/v1/messages/count_tokens?beta=true")[1] == {"input_tokens": 10}
    assert request(proxy, "/v1/messages?x=/../batches")[0] == 200  # the query is dropped, not followed
    assert request(proxy, "/v1/messages")[0] == 200
    assert forwarded(mock_api)[len(before):] == ["/v1/messages?beta=true", "/v1/messages/count_tokens?beta=true",
                                                 "/v1/messages", "/v1/messages"]


def test_every_method_but_post_is_refused(make_proxy, mock_api):
    proxy = make_proxy()
    before = forwarded(mock_api)
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW"):
        status, body = request(proxy, "/v1/messages", method=method)
        assert status == 405, method
        assert body["error"]["type"] == "invalid_request_error" and "only POST" in body["error"]["message"]
    assert forwarded(mock_api) == before


def test_oversized_bodies_are_refused_without_reading_them(make_proxy, mock_api):
    proxy = make_proxy(ProxyLimits(max_body_bytes=4096))
    before = forwarded(mock_api)
    big = json.dumps({"model": "claude-sonnet-5-5", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    status, body = request(proxy, body=big)
    assert status == 413 and body["error"]["type"] == "request_too_large"
    assert "agent.proxy_max_body_mb" in body["error"]["message"]
    # a declared length far beyond the cap is refused from the headers alone
    s = connect(proxy)
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nx-api-key: " + proxy.placeholder.encode()
              + b"\r\nContent-Length: 900000000000\r\n\r\n")
    assert answer(s)[0] == 413
    # chunked: counted as it arrives, refused once past the cap
    chunks = b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    status, _ = send(proxy, b"POST /v1/messages HTTP/1.1\r\nx-api-key: " + proxy.placeholder.encode()
                     + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert status == 413
    for bad in (b"Content-Length: -5\r\n", b"Content-Length: 5\r\nContent-Length: 6\r\n"):
        assert send(proxy, b"POST /v1/messages HTTP/1.1\r\nx-api-key: " + proxy.placeholder.encode() + b"\r\n"
                    + bad + b"\r\n{}")[0] == 400
    assert forwarded(mock_api) == before
    assert request(proxy)[0] == 200  # a body under the cap goes through


def test_connections_beyond_the_cap_are_refused_then_closed(make_proxy):
    proxy = make_proxy(ProxyLimits(max_connections=2, read_timeout_s=60))
    idle = [connect(proxy) for _ in range(2)]
    assert wait_until(lambda: len(proxy.gate.served) == 2)
    status, body = request(proxy)  # served connections full: answered 429
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert "agent.proxy_max_connections" in body["error"]["message"]
    refusing = [connect(proxy) for _ in range(2)]  # the refusers' places (each waits for its head)
    assert wait_until(lambda: len(proxy.gate.refusing) == 2)
    s = connect(proxy)  # beyond both: closed at once, unanswered and without a handler
    assert answer(s) == (None, b"")
    for c in idle + refusing:
        c.close()
    assert wait_until(lambda: not proxy.gate.served and not proxy.gate.refusing)
    assert request(proxy)[0] == 200  # the places are free again
    assert proxy.gate.turned_away == 4


def test_idle_and_slow_connections_end_at_the_read_deadline(make_proxy, mock_api):
    proxy = make_proxy(ProxyLimits(read_timeout_s=1.0))
    before = forwarded(mock_api)
    status, body = answer(connect(proxy))  # says nothing
    assert status == 408 and "agent.proxy_read_timeout_s" in body["error"]["message"]
    sent = []

    def trickle(s, data):
        try:
            for i in range(len(data)):
                s.send(data[i:i + 1])
                sent.append(i)
                time.sleep(0.1)
        except OSError:
            pass
    head = (b"POST /v1/messages HTTP/1.1\r\nx-api-key: " + proxy.placeholder.encode()
            + b"\r\nContent-Length: 40\r\n" + b"X-Pad: " + b"a" * 400 + b"\r\n\r\n")
    s = connect(proxy)
    t = threading.Thread(target=trickle, args=(s, head), daemon=True)
    t.start()
    status, _ = answer(s)  # a byte at a time never resets the deadline
    assert status == 408 and len(sent) < len(head)
    s = connect(proxy)  # whole headers, then a body that stops half way
    s.sendall(head.replace(b"a" * 400, b"b") + b'{"model": "x"')
    assert answer(s)[0] == 408
    assert forwarded(mock_api) == before


def test_a_model_outside_the_keys_models_is_refused(make_proxy, mock_api):
    proxy = make_proxy(models=("sonnet", "claude-haiku-4-5"))
    before = forwarded(mock_api)

    def ask(model_json):
        return request(proxy, body=b'{"max_tokens": 5, "messages": [{"role": "user", "content": "cp"}], '
                       + model_json + b"}")
    for refused in (b'"model": "claude-opus-4-1"', b'"model": "claude-haiku-5-5"',
                    b'"model": "claude-sonnet-5-5", "model": "claude-opus-4-1"', b'"stream": false', b'"model": 5'):
        status, body = ask(refused)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", refused
        assert "model" in body["error"]["message"]
    assert request(proxy, body=b"not json")[0] == 400
    assert forwarded(mock_api) == before
    assert ask(b'"model": "claude-sonnet-5-5"')[0] == 200   # the sonnet family
    assert ask(b'"model": "claude-haiku-4-5"')[0] == 200    # named exactly
    status, body = request(make_proxy(), body=b"not json")  # no list: the body is not even parsed
    assert "relay proxy" not in json.dumps(body if isinstance(body, dict) else {})


def test_model_matching():
    assert model_allowed("claude-sonnet-5-5", ("sonnet",)) and model_allowed("claude-3-5-sonnet-20241022", ("sonnet",))
    assert model_allowed("claude-sonnet-5-5[1m]", ("sonnet[1m]",))
    assert not model_allowed("claude-opus-4-1", ("sonnet", "claude-sonnet-4"))
    assert not model_allowed("claude-sonnetx-1", ("sonnet",))
    assert model_allowed("claude-opus-4-1", ("anthropic/claude-opus-4-1",))


def test_wrong_credential_and_used_up_requests(make_proxy, mock_api):
    proxy = make_proxy(max_requests=1)
    status, body = request(proxy, key="sk-ant-guess")
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert request(proxy)[0] == 200
    status, body = request(proxy)
    assert status == 429 and "used up" in body["error"]["message"]


def test_closing_the_proxy_ends_its_open_connections(make_proxy):
    proxy = make_proxy(ProxyLimits(read_timeout_s=600))
    s = connect(proxy)
    assert wait_until(lambda: len(proxy.gate.served) == 1)
    proxy.close()
    s.settimeout(10)
    assert s.recv(100) == b""
    assert wait_until(lambda: not proxy.gate.served)


def test_the_witness_keeps_each_answers_usage_and_headers(tmp_path, mock_api):
    """What the relay bills and believes of an agent run: read from the answers as they pass."""
    token = "oat-witness-1"
    mock_api.set_account(token, five_hour=0.42, seven_day=0.13, seven_day_oi=0.3, warn_threshold=0.4)
    cred = Credential("CLAUDE_CODE_OAUTH_TOKEN", {"authorization": f"Bearer {token}"}, mock_api.url)
    p = CredProxy(str(tmp_path / "w.sock"), cred, 10)
    try:
        for stream in (True, False):
            status, _ = request(p, body={"model": "claude-sonnet-5-5", "max_tokens": 5, "stream": stream,
                                         "messages": [{"role": "user", "content": "wt MOCK:usage=70,8,9,6"}]})
            assert status == 200
        status, _ = request(p, "/v1/messages/count_tokens")
        assert status == 200
        assert p.witness.calls == 2
        assert p.witness.total() == {"input_tokens": 140, "cache_creation_input_tokens": 16,
                                     "cache_read_input_tokens": 18, "output_tokens": 12, "reasoning_tokens": 0}
        wins = p.witness.info["unifiedWindows"]
        assert wins["five_hour"]["utilization"] == 0.42 and wins["five_hour"]["status"] == "allowed_warning"
        assert wins["five_hour"]["surpassedThreshold"] == 0.4
        assert wins["seven_day"] == {"utilization": 0.13, "resetsAt": mock_api.accounts[token].seven_day_reset,
                                     "status": "allowed"}
        assert wins["seven_day_overage_included"]["utilization"] == 0.3
        assert len(mock_api.by_token(token)) == 3          # the real credential reached the API
    finally:
        p.close()

"""Hostile and broken input: clear 4xx in OpenAI format, never a 5xx, a hang or a leftover process."""

import json
import socket
import time

import psutil
import pytest
import requests
from harness import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def small(relay_factory):
    return relay_factory({"RELAY_MAX_BODY_MB": "1", "RELAY_CORS__ALLOWED_ORIGINS": '["https://chat.example.com"]',
                          "RELAY_MAX_CONCURRENT_RUNS": "8"})


def test_oversized_body_is_413_without_reading_it(small):
    s = socket.create_connection(("127.0.0.1", small.port))
    s.settimeout(10)
    t = time.time()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: 60000000\r\n\r\n{\"messages\": [")
    head = s.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413") and time.time() - t < 3  # answered before the 60 MB arrived
    while "\r\n\r\n" not in head or not head.rstrip().endswith("}"):
        head += s.recv(65536).decode()
    body = json.loads(head.split("\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_too_large" and body["error"]["param"] == "body"
    s.close()
    r = requests.post(small.url + "/v1/chat/completions", data=b"x" * (2 * 1024 * 1024),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_mb" in r.json()["error"]["message"]


def test_chunked_oversized_body_is_413(small):
    def chunks():
        for _ in range(40):
            yield b"a" * 65536
    r = requests.post(small.url + "/v1/chat/completions", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_absurd_headers_get_clear_answers(small):
    junk = "x" * 10000
    r = requests.get(small.url + "/v1/models", headers={"x-request-id": junk, "Authorization": "Bearer " + junk})
    assert r.status_code == 200 and r.headers["x-request-id"].startswith("req_")  # replaced, not echoed
    r = requests.post(small.url + "/v1/chat/completions", headers={"X-Session-Id": "../../../etc/passwd"},
                      json={"model": "s", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-Id"
    r = requests.post(small.url + "/v1/chat/completions", headers={"Content-Type": "text/plain; charset=klingon"},
                      data="{}")
    assert r.status_code == 415 and r.headers["x-request-id"]  # not JSON: refused (no drive-by form posts)


def test_cors_preflight_and_exposed_headers(small):
    r = requests.options(small.url + "/v1/chat/completions", headers={
        "Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
    allowed = r.headers["Access-Control-Allow-Headers"].lower()
    for h in ("authorization", "content-type", "x-stainless-os", "x-stainless-retry-count", "x-stainless-timeout"):
        assert h in allowed
    r = requests.get(small.url + "/v1/models", headers={"Origin": "https://chat.example.com"})
    assert "x-request-id" in r.headers["Access-Control-Expose-Headers"]
    assert "retry-after" in r.headers["Access-Control-Expose-Headers"]
    r = requests.get(small.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_every_response_carries_a_request_id(small):
    for r in (requests.get(small.url + "/nope"), requests.post(small.url + "/v1/chat/completions", data="{"),
              requests.get(small.url + "/health"), requests.delete(small.url + "/v1/models")):
        assert r.headers["x-request-id"]


scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=16),
                   st.text(alphabet="ab /@{}[]\"\\é\x00", max_size=6))
anything = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c,
                                                                                              max_size=3)), max_leaves=8)
part = st.one_of(anything, st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "x"]),
                                                  "text": anything, "image_url": anything}))
message = st.one_of(anything, st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer", "bogus"]), anything),
    "content": st.one_of(st.text(max_size=10), st.lists(part, max_size=3), anything)},
    optional={"tool_calls": anything, "tool_call_id": anything, "name": anything}))
body = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["sonnet", "gpt-4o", "anthropic/x"]), anything),
    "messages": st.one_of(st.lists(message, max_size=3), anything),
    "stream": st.one_of(st.booleans(), anything), "n": anything, "temperature": anything, "max_tokens": anything,
    "stream_options": anything, "tools": anything, "tool_choice": anything, "response_format": anything,
    "user": anything, "stop": anything, "reasoning_effort": anything, "logprobs": anything})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(fuzz_body=body)
def test_fuzzed_requests_never_5xx_or_hang(small, fuzz_body):
    r = requests.post(small.url + "/v1/chat/completions", data=json.dumps(fuzz_body), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (fuzz_body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}



def test_no_cli_process_is_left_after_the_fuzz(small):
    def left():
        out = []
        for w in small.worker_pids():
            out += [c for c in psutil.Process(w).children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
        return out
    assert wait_until(lambda: not left(), 10)


def test_review_regressions_are_clear_4xx(small):
    cases = [
        ("/v1/responses", {"input": "x", "stream": True, "reasoning": "high"}, "reasoning"),
        ("/v1/chat/completions", {"model": "m" * 300, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",
                                  "tool_calls": [{"id": "1", "function": "x"}]}, {"role": "user", "content": "z"}]},
         "messages[1].tool_calls[0]"),
    ]
    for path, body, param in cases:
        r = requests.post(small.url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for q in ("/v1/usage?days=\u00b2", "/v1/usage/recent?limit=\u00b2"):
        assert requests.get(small.url + q).status_code == 200
    big_pdf = "data:application/pdf;base64," + "A" * (8 * 1024 * 1024)
    r = requests.post(small.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": big_pdf, "filename": "x.pdf"}}]}]})
    assert r.status_code in (400, 413)
    assert requests.get(small.url + "/health").json()["active_runs"] == 0  # nothing leaked a run slot

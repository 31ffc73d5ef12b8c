"""Hold instead of refuse (`accounts_hold_s`): every account at its limit with the reset near, a request
waits for it and is answered after it; a stream sends its head and keep-alive comments while it waits."""

from __future__ import annotations

import json
import time

import pytest
import requests
from harness import openai_client
from test_accounts import start, tokens

pytestmark = pytest.mark.slow
RESET_IN = 6


@pytest.fixture(scope="module")
def held(relay_factory, mock_api):
    (tok,) = tokens(1)
    mock_api.set_account(tok, five_hour=0.2)
    return start(relay_factory, [tok], env={"RELAY_ACCOUNTS_HOLD_S": "40"}), tok


def limit(mock_api, tok, seconds=RESET_IN):
    """The account's 5-hour window full until `seconds` from now (the mock starts it over at its reset)."""
    reset = int(time.time()) + seconds
    mock_api.set_account(tok, five_hour=1.0, five_hour_reset=reset)
    return reset


def test_a_request_waits_for_the_reset_instead_of_a_429(held, mock_api):
    srv, tok = held
    reset = limit(mock_api, tok)
    t0 = time.time()
    out = openai_client(srv.url).chat.completions.create(model="sonnet",
                                                     messages=[{"role": "user", "content": "hd1 hello"}])
    assert out.choices[0].message.content == "Hello from mock. You said: hd1 hello"
    assert time.time() >= reset                           # answered after the reset, not before
    assert time.time() - t0 < 40
    sent = mock_api.by_token(tok, "hd1")
    assert len(sent) == 2                                 # refused once (the limit), answered once after the reset


def test_a_held_stream_keeps_alive_then_answers(held, mock_api):
    srv, tok = held
    reset = limit(mock_api, tok)
    t0 = time.time()
    r = requests.post(srv.url + "/v1/chat/completions", stream=True, timeout=60,
                      json={"model": "sonnet", "stream": True, "messages": [{"role": "user", "content": "hd2 hi"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    comments, data, first_data_at = 0, [], None
    for line in r.iter_lines():
        if line.startswith(b": keep-alive"):                # (the after-turn receipt is a comment too)
            comments += 1
            assert not data                               # keep-alives come before the answer
        elif line.startswith(b"data: "):
            first_data_at = first_data_at or time.time()
            data.append(line[6:])
    assert comments >= 2, comments                        # one at least each keepalive_s while it waited
    assert first_data_at is not None and first_data_at >= reset - 0.5
    assert data[-1] == b"[DONE]"
    text = "".join((json.loads(d)["choices"] or [{}])[0].get("delta", {}).get("content") or "" for d in data[:-1])
    assert text == "Hello from mock. You said: hd2 hi"
    assert time.time() - t0 < 40


def test_a_reset_beyond_the_hold_is_refused_at_once(held, mock_api):
    srv, tok = held
    limit(mock_api, tok, seconds=600)
    t0 = time.time()
    r = requests.post(srv.url + "/v1/chat/completions", timeout=60,
                      json={"model": "sonnet", "messages": [{"role": "user", "content": "hd3 hi"}]})
    assert r.status_code == 429 and "usage limit" in r.json()["error"]["message"]
    assert time.time() - t0 < 20
    assert 500 <= int(r.headers["Retry-After"]) <= 601
    mock_api.set_account(tok, five_hour=0.1, five_hour_reset=int(time.time()) + 3600)

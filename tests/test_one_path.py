"""One request, one path: the three client APIs get the same treatment from the shared handler.

The drifts the shared handler fixed, each checked on every API, streamed and not: the token-budget
headers, and the conversation committed (and its lock free) before a stream's last event.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import requests
from test_auth import ALICE, keys_config

LAST = {"chat": b"data: [DONE]", "responses": b"event: response.completed", "messages": b"event: message_stop"}


def _post(url: str, api: str, text: str, stream: bool, headers: dict[str, str] | None = None) -> requests.Response:
    if api == "chat":
        path, body = "/v1/chat/completions", {"model": "sonnet", "messages": [{"role": "user", "content": text}]}
    elif api == "responses":
        path, body = "/v1/responses", {"model": "sonnet", "input": text}
    else:
        path, body = "/v1/messages", {"model": "sonnet", "max_tokens": 64,
                                      "messages": [{"role": "user", "content": text}]}
    return requests.post(url + path, json=dict(body, stream=stream), headers=headers or {}, stream=stream, timeout=60)


@pytest.fixture(scope="module")
def budgeted(relay_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("budget")
    path = keys_config(tmp, alice_rpm=100)
    cfg = json.loads(path.read_text())
    for key in cfg["auth"]["api_keys"]:
        if isinstance(key, dict) and key.get("name") == "alice":
            key["tokens_per_day"] = 100_000  # room for every request of this module
    path.write_text(json.dumps(cfg))
    return relay_factory({"RELAY_CONFIG": str(path)})


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
@pytest.mark.parametrize("stream", [False, True])
def test_budget_headers_on_every_api(budgeted: Any, api: str, stream: bool) -> None:
    r = _post(budgeted.url, api, f"budget {api} {stream}", stream, {"Authorization": f"Bearer {ALICE}"})
    assert r.status_code == 200, r.text
    body = r.content  # read to the end: the request is charged when it finishes
    assert r.headers["x-ratelimit-limit-tokens"] == "100000"
    left = int(r.headers["x-ratelimit-remaining-tokens"])
    assert 0 <= left < 100_000  # this prompt's estimate (streams) or its real usage (complete answers) is taken off
    assert r.headers["x-ratelimit-limit-requests"] == "100"
    assert body


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
def test_the_conversation_is_committed_before_the_last_event(relay: Any, api: str) -> None:
    sid = f"commit-{api}-{uuid.uuid4().hex[:8]}"
    r = _post(relay.url, api, f"commit first turn {api}", True, {"X-Session-Id": sid})
    assert r.status_code == 200
    seen = b""
    for chunk in r.iter_content(chunk_size=None):
        seen += chunk
        if LAST[api] in seen:
            break  # the client has the last event; the stream's connection is still open
    assert LAST[api] in seen
    # what a follow-up sent this instant would find: the turn is held, and no lock stands in its way
    conv = next(c for c in requests.get(relay.url + "/v1/sessions", timeout=10).json()["data"] if c["id"] == "s:" + sid)
    assert conv["messages"] == 2
    follow = _post(relay.url, api, "commit second turn", False, {"X-Session-Id": sid})
    r.close()
    assert follow.status_code == 200, follow.text

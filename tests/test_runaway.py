"""The runaway guard (issue 18): a conversation that replays its whole history turn after turn, or burns far
more tokens than its history explains, is refused with 429 `runaway_conversation` in the client's API shape
(never to be retried before its Retry-After), and one alert goes out per stop.

A replay is made the way a misbehaving client makes it: the history it sends back differs from what the
relay answered, so the CLI session cannot be resumed and a new one reads everything again.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import openai
import pytest
import requests
from harness import anthropic_client, free_port, openai_client, wait_until

from relay.core import runaway
from relay.core.conversation import named
from relay.core.metrics import record_updates
from relay.core.record import RequestRecord
from relay.core.runaway import Counters, Limits

MAX = 3  # replays in a row the test relays allow


class Hook:
    """A webhook that records the alerts it is sent."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/alerts"
        got = self.got

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                got.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def about(self, conv: str) -> list[dict[str, Any]]:
        return [a for a in self.got if a["details"].get("conversation") == conv]


@pytest.fixture(scope="module")
def hook() -> Any:
    h = Hook()
    yield h
    h.server.shutdown()
    h.server.server_close()


def guarded_env(hook: Hook, **more: str) -> dict[str, str]:
    env = {"RELAY_RUNAWAY__MAX_REPLAYS_IN_A_ROW": str(MAX), "RELAY_ALERTS__RETRY_BASE_S": "0.3",
           "RELAY_ALERTS__WEBHOOKS": json.dumps([{"url": hook.url, "events": ["runaway_conversation"]}])}
    return dict(env, **{f"RELAY_RUNAWAY__{k.upper()}": v for k, v in more.items()})


@pytest.fixture(scope="module")
def guarded(relay_factory: Any, hook: Hook) -> Any:
    return relay_factory(guarded_env(hook))


def replay_messages(tag: str, k: int) -> list[dict[str, Any]]:
    """A history whose answer was never the relay's: every turn it reads differently."""
    return [{"role": "user", "content": f"{tag} start"}, {"role": "assistant", "content": f"an edited answer {k}"},
            {"role": "user", "content": f"{tag} turn {k}"}]


def chat(c: Any, sid: str, messages: list[dict[str, Any]]) -> str:
    return c.chat.completions.create(model="sonnet", messages=messages,
                                     extra_headers={"X-Session-Id": sid}).choices[0].message.content


def recent(srv: Any, n: int = 20) -> list[dict[str, Any]]:
    return requests.get(srv.url + f"/v1/usage/recent?limit={n}", timeout=10).json()["data"]


def test_a_history_that_changes_every_turn_is_stopped_in_openai_shape_with_one_alert(guarded, mock_api, hook):
    tag, sid = f"rw-{uuid.uuid4().hex[:8]}", f"runaway-{uuid.uuid4().hex[:8]}"
    with openai_client(guarded.url) as c:
        chat(c, sid, [{"role": "user", "content": f"{tag} start"}])   # a first turn: nothing replayed
        for k in range(MAX):
            chat(c, sid, replay_messages(tag, k))
        with pytest.raises(openai.RateLimitError) as e:
            chat(c, sid, replay_messages(tag, MAX))
        err = e.value
        assert err.status_code == 429 and err.code == "runaway_conversation"
        assert err.response.headers["x-should-retry"] == "false"
        assert 890 <= int(err.response.headers["retry-after"]) <= 900
        assert f"last {MAX} turns in a row" in err.message and "runaway.max_replays_in_a_row" in err.message
        assert len(mock_api.records(tag)) == 1 + MAX   # the refused turn never reached the API

        # the conversation stays refused, whatever it sends and on whichever OpenAI route
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": f"{tag} again"}],
                                      extra_headers={"X-Session-Id": sid}, stream=True)
        assert e.value.code == "runaway_conversation"
        with pytest.raises(openai.RateLimitError) as e:
            c.responses.create(model="sonnet", input=f"{tag} via responses", extra_headers={"X-Session-Id": sid})
        assert e.value.code == "runaway_conversation" and e.value.body["type"] == "requests"
    assert len(mock_api.records(tag)) == 1 + MAX

    refused = [r for r in recent(guarded) if r["error"] == "runaway_conversation"]
    assert len(refused) >= 3 and all(r["status"] == 429 for r in refused)
    stats = requests.get(guarded.url + "/stats", timeout=10).json()["runaway"]
    assert f"anon:s:{sid}" in [s["conversation"] for s in stats["conversations"]] and stats["stops"] >= 1

    conv = f"s:{sid}"
    assert wait_until(lambda: hook.about(conv), 20, 0.2)
    time.sleep(1.5)                     # three refusals, one stop: one alert
    [alert] = hook.about(conv)
    assert alert["event"] == "runaway_conversation" and alert["details"]["kind"] == "replays"
    assert alert["details"]["replays_in_a_row"] == MAX and conv in alert["text"]


def test_a_replaying_conversation_is_stopped_in_anthropic_shape(guarded, mock_api):
    tag, sid = f"rwa-{uuid.uuid4().hex[:8]}", f"runaway-a-{uuid.uuid4().hex[:8]}"
    headers = {"X-Session-Id": sid}
    with anthropic_client(guarded.url) as c:
        c.messages.create(model="sonnet", max_tokens=50, messages=[{"role": "user", "content": f"{tag} start"}],
                          extra_headers=headers)
        for k in range(MAX):
            c.messages.create(model="sonnet", max_tokens=50, messages=replay_messages(tag, k), extra_headers=headers)
        with pytest.raises(anthropic.RateLimitError) as e:
            c.messages.create(model="sonnet", max_tokens=50, messages=replay_messages(tag, MAX),
                              extra_headers=headers)
    err = e.value
    assert err.status_code == 429 and err.response.headers["x-should-retry"] == "false"
    assert err.body["type"] == "error" and err.body["error"]["type"] == "rate_limit_error"
    assert "runaway guard" in err.body["error"]["message"]
    assert int(err.response.headers["retry-after"]) > 800
    assert len(mock_api.records(tag)) == 1 + MAX


def test_a_conversation_that_resumes_is_never_stopped(guarded, mock_api):
    tag, sid = f"steady-{uuid.uuid4().hex[:8]}", f"steady-{uuid.uuid4().hex[:8]}"
    history: list[dict[str, Any]] = []
    with openai_client(guarded.url) as c:
        for k in range(2 * MAX + 2):
            history.append({"role": "user", "content": f"{tag} turn {k}"})
            history.append({"role": "assistant", "content": chat(c, sid, history)})
    mine = [r for r in recent(guarded) if r["first_message"] == f"{tag} turn 0"]
    assert len(mine) == 2 * MAX + 2 and all(r["status"] == 200 for r in mine)
    assert sum(r["resumed"] for r in mine) == 2 * MAX + 1


def test_conversations_that_only_share_their_opening_are_not_taken_for_replays(guarded, mock_api):
    tag = f"opening-{uuid.uuid4().hex[:8]}"   # no X-Session-Id, no user: the opening names the conversation
    with openai_client(guarded.url) as c:
        for k in range(MAX + 2):
            c.chat.completions.create(model="sonnet", messages=replay_messages(tag, k))
    assert len(mock_api.records(tag)) == MAX + 2


def test_a_conversation_burning_far_more_than_its_history_is_stopped(guarded, mock_api, hook):
    sid = f"burner-{uuid.uuid4().hex[:8]}"
    history: list[dict[str, Any]] = []
    with openai_client(guarded.url) as c:
        for k in range(2):  # each turn reports 150,000 prompt tokens for a history of a few dozen
            history.append({"role": "user", "content": f"burn turn {k} MOCK:usage=120000,20000,10000,5"})
            history.append({"role": "assistant", "content": chat(c, sid, history)})
        history.append({"role": "user", "content": "burn turn 2"})
        with pytest.raises(openai.RateLimitError) as e:
            chat(c, sid, history)               # a resume, refused: the last two turns burnt 300,000
    assert e.value.code == "runaway_conversation" and "burnt 300,000 prompt tokens" in e.value.message
    assert not mock_api.records("burn turn 2")
    assert wait_until(lambda: hook.about(f"s:{sid}"), 20, 0.2)
    [alert] = hook.about(f"s:{sid}")
    assert alert["details"]["kind"] == "burn" and alert["details"]["burnt_tokens"] == 300000


def test_the_cooldown_ends_and_the_conversation_starts_afresh(relay_factory, mock_api, hook):
    srv = relay_factory(guarded_env(hook, cooldown_s="2", max_replays_in_a_row="1"))
    tag, sid = f"rwc-{uuid.uuid4().hex[:8]}", f"cool-{uuid.uuid4().hex[:8]}"
    with openai_client(srv.url) as c:
        chat(c, sid, replay_messages(tag, 0))           # a replay from the start
        with pytest.raises(openai.RateLimitError) as e:
            chat(c, sid, replay_messages(tag, 1))
        assert e.value.response.headers["retry-after"] == "2"
        time.sleep(2.2)
        assert chat(c, sid, replay_messages(tag, 2))      # afresh: one replay may run again
        with pytest.raises(openai.RateLimitError):
            chat(c, sid, replay_messages(tag, 3))
    assert len(mock_api.records(tag)) == 2
    assert wait_until(lambda: len(hook.about(f"s:{sid}")) == 2, 20, 0.2)   # two stops, two alerts


# -- the pure decisions ---------------------------------------------------------------------------------------
def test_what_counts_as_a_replay():
    assert runaway.kind_of(True, 9) == "resume" and runaway.kind_of(False, 3) == "replay"
    assert runaway.kind_of(False, 1) == "first"
    assert runaway.kind_of(False, 3, named=False) == "first"   # an implicit id: shared by same openings
    assert named("s:ticket-1") and named("u:abc") and not named("h:0123abcd")


def test_replays_in_a_row_end_with_a_resume_and_a_first_message_leaves_them():
    lim, c, now = Limits(max_replays=2), Counters(), 1000.0
    kinds: tuple[runaway.Kind, ...] = ("replay", "first", "replay")
    for kind in kinds:
        assert runaway.record(c, lim, kind, 10, 10, now) is None
    assert c.replays == 2 and runaway.admit(c, lim, "replay", now) is not None
    assert runaway.admit(c, lim, "resume", now) is None
    runaway.record(c, lim, "resume", 10, 10, now)
    assert c.replays == 0 and runaway.admit(c, lim, "replay", now) is None


def test_a_burn_needs_both_the_ratio_and_the_floor_and_the_window_forgets():
    lim = Limits(burn_ratio=20, burn_min_tokens=1000, window_s=60)
    c = Counters()
    assert runaway.record(c, lim, "resume", 900, 10, 0.0) is None        # far beyond the ratio, under the floor
    stop = runaway.record(c, lim, "resume", 200, 10, 1.0)
    assert stop is not None and stop.kind == "burn" and stop.until == 1.0 + lim.cooldown_s
    c = Counters()
    assert runaway.record(c, lim, "resume", 900, 10, 0.0) is None
    assert runaway.record(c, lim, "resume", 900, 10, 100.0) is None     # the first turn left the window
    assert runaway.record(Counters(), lim, "resume", 5000, 300, 0.0) is None   # 17 times: explained enough


def test_zero_turns_the_guard_off_and_a_stop_outlasts_nothing_but_its_cooldown():
    assert not Limits(max_replays=0, burn_ratio=0).enabled
    c = Counters(replays=50)
    assert runaway.admit(c, Limits(max_replays=0), "replay", 0.0) is None
    stop = runaway.admit(c, Limits(max_replays=5, cooldown_s=10), "replay", 0.0)
    assert stop is not None and stop.new
    after = runaway.stopped(stop)
    again = runaway.admit(after, Limits(), "resume", 5.0)
    assert again is not None and not again.new and again.retry_after(5.0) == 5.0
    assert runaway.admit(after, Limits(), "replay", 10.0) is None and after.replays == 0


def test_a_refusal_by_the_guard_counts_as_a_runaway_rejection_in_the_metrics():
    refused = record_updates(RequestRecord(id="r", request_id="r", status=429, error="runaway_conversation"))
    assert refused[("rejections", '["runaway","none"]')] == 1

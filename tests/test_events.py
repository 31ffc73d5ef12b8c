"""Folding the real CLI's stream-json output into a turn: deltas, full text, usage, errors.

The events come from the real Claude Code CLI run against the mock API (recorded per test run),
never from hand-written imitations.
"""

import json
import os
import subprocess
import time

import pytest

from relay.cli.invocation import base_argv
from relay.cli.setup import child_env
from relay.core.events import Turn
from relay.core.formats.openai_chat import ChunkMaker, openai_usage
from relay.core.upstream import classify, finish_reason, reset_seconds
from relay.errors import NotFound, RateLimited, Unavailable, UpstreamError


@pytest.fixture(scope="module")
def record(cli_bin, mock_api, tmp_path_factory):
    cache = {}
    cwd = tmp_path_factory.mktemp("cwd")
    cfg = tmp_path_factory.mktemp("cfg")

    def run(text, extra_env=None):
        if text in cache:
            return cache[text]
        env = child_env(dict(os.environ, ANTHROPIC_BASE_URL=mock_api.url, ANTHROPIC_API_KEY="sk-test",
                             CLAUDE_CONFIG_DIR=str(cfg), CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1"), 0)
        env.update(extra_env or {})
        line = {"type": "user", "client_composed": True, "message": {"role": "user", "content": text}}
        out = subprocess.run(base_argv(cli_bin, "sonnet") + ["--no-session-persistence"], input=json.dumps(line) + "\n",
                             capture_output=True, text=True, env=env, cwd=cwd, timeout=60)
        cache[text] = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
        return cache[text]
    return run


def fold(events):
    turn, deltas = Turn(), []
    for ev in events:
        deltas += turn.feed(ev)
    return turn, deltas


def test_text_deltas_rebuild_the_answer_and_usage_comes_from_result(record):
    turn, deltas = fold(record("Say hi MOCK:words=12"))
    streamed = "".join(d.text for d in deltas if d.kind == "text")
    assert streamed == turn.text == " ".join(f"w{k}" for k in range(12))
    assert len([d for d in deltas if d.kind == "text"]) == 12
    assert turn.done and turn.committed and turn.model and turn.session_id
    assert turn.usage == {"input_tokens": 100, "output_tokens": 12, "cache_read_input_tokens": 300,
                          "cache_creation_input_tokens": 200, "reasoning_tokens": 0}
    u = openai_usage(turn.usage)
    assert u["prompt_tokens"] == 600 and u["prompt_tokens_details"]["cached_tokens"] == 300
    assert u["completion_tokens"] == 12 and u["total_tokens"] == 612
    assert classify(turn, time.time(), 30) is None and finish_reason(turn) == "stop"


def test_thinking_is_a_separate_reasoning_stream(record):
    turn, deltas = fold(record("MOCK:thinking question"))
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    assert "think step by step" in reasoning
    assert "step by step" not in turn.text and turn.reasoning


def test_max_tokens_continuation_is_joined_without_a_gap(record):
    turn, deltas = fold(record("MOCK:max_tokens"))
    assert "max_tokens" in turn.stop_reasons
    assert "".join(d.text for d in deltas if d.kind == "text") == turn.text
    assert len([m for m in turn.messages if m]) == 2  # the CLI's hidden continuation


@pytest.mark.parametrize("marker, cls, status, code", [
    ("MOCK:error=429", RateLimited, 429, "rate_limit_exceeded"),
    ("MOCK:error=401", Unavailable, 503, "cli_login_required"),
    ("MOCK:error=403", Unavailable, 503, "upstream_forbidden"),
    ("MOCK:error=404", NotFound, 404, "model_not_found"),
    ("MOCK:error=400", None, 400, "upstream_invalid_request"),
    ("MOCK:error=500", UpstreamError, 502, "upstream_server_error"),
    ("MOCK:error=529", Unavailable, 503, "overloaded"),
])
def test_upstream_errors_map_to_openai_statuses(record, marker, cls, status, code):
    turn, deltas = fold(record(marker))
    assert turn.result["is_error"] is True and not deltas and turn.text == ""
    err = classify(turn, time.time(), 30)
    assert err is not None and err.status == status and err.code == code
    if cls:
        assert isinstance(err, cls)
    if status in (429, 503) and code != "cli_login_required" and code != "upstream_forbidden":
        assert err.retry_after and err.retry_after >= 1


def test_subscription_limit_gives_the_reset_time(record):
    events = record("MOCK:subscription_limit", {"ANTHROPIC_API_KEY": "", "CLAUDE_CODE_OAUTH_TOKEN": "oat-test"})
    turn, _ = fold(events)
    assert turn.rate_limit and turn.rate_limit["status"] == "rejected"
    err = classify(turn, time.time(), 30)
    assert isinstance(err, RateLimited) and "usage limit" in err.message
    assert 3000 < err.retry_after <= 3601  # the mock resets in an hour


def test_reset_parsed_from_text_when_no_event():
    turn = Turn()
    turn.result = {"is_error": True, "result": "You've hit your session limit · resets 7:57pm (UTC)"}
    now = time.mktime((2026, 11, 21, 19, 0, 0, 0, 0, -1)) - time.timezone
    assert 56 * 60 < reset_seconds(turn, now) <= 58 * 60


def test_chunks_send_role_once_and_finish_last():
    maker = ChunkMaker("chatcmpl-x", 1, "m", include_usage=True)
    first = maker.first()
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None and first["usage"] is None
    last = maker.final("stop")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    u = maker.usage_chunk({"prompt_tokens": 1})
    assert u["choices"] == [] and u["usage"] == {"prompt_tokens": 1}


def test_huge_texts_are_estimated_quickly():
    from relay.core.tokens import count_text
    t = time.time()
    n = count_text("word " * 2_000_000)
    assert time.time() - t < 30 and 1_500_000 < n < 2_500_000  # bounded, not tiktoken on 10 MB

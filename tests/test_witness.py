"""What the credential proxy reads of an agent run's API answers (relay/core/witness.py): the unified
rate-limit headers in the CLI's own shape, every message's usage, an error's status and text."""

import json

from relay.cli.witness import Witness
from relay.core.upstream import classify
from relay.core.witness import CallMeter, rate_limit_info
from relay.errors import SubscriptionLimited

P = "anthropic-ratelimit-unified-"


def sse(*events):
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)


def test_headers_become_the_clis_rate_limit_info_with_every_window():
    info = rate_limit_info([(P + "status", "allowed_warning"), (P + "reset", "1796593208"),
                            (P + "representative-claim", "five_hour"), (P + "overage-status", "rejected"),
                            (P + "overage-disabled-reason", "org_level_disabled"),
                            (P + "5h-utilization", "0.42"), (P + "5h-reset", "1796593208"), (P + "5h-status", "allowed"),
                            (P + "7d-utilization", "0.91"), (P + "7d-reset", "1796848808.4"),
                            (P + "7d-status", "allowed_warning"), (P + "7d-surpassed-threshold", "0.9"),
                            (P + "7d_oi-utilization", "0.3"), (P + "7d_oi-reset", "1796700000"),
                            (P + "7d_oi-status", "bogus"), ("content-type", "text/event-stream")])
    assert info == {"status": "allowed_warning", "resetsAt": 1796593208, "rateLimitType": "five_hour",
                    "overageStatus": "rejected", "overageDisabledReason": "org_level_disabled",
                    "isUsingOverage": False,
                    "unifiedWindows": {
                        "five_hour": {"utilization": 0.42, "resetsAt": 1796593208, "status": "allowed"},
                        "seven_day": {"utilization": 0.91, "resetsAt": 1796848808, "status": "allowed_warning",
                                      "surpassedThreshold": 0.9},
                        "seven_day_overage_included": {"utilization": 0.3, "resetsAt": 1796700000}}}
    assert rate_limit_info([("content-type", "application/json")]) is None     # an API key: no headers
    over = rate_limit_info([(P + "status", "rejected"), (P + "overage-status", "allowed")])
    assert over and over["isUsingOverage"] is True
    assert rate_limit_info([(P + "status", "allowed"), (P + "overage-in-use", "true")])["isUsingOverage"] is True
    odd = rate_limit_info([(P + "status", "allowed"), (P + "5h-utilization", "-3"), (P + "7d-utilization", "nan")])
    assert odd["unifiedWindows"] == {"five_hour": {"utilization": 0.0}}


def test_a_stream_split_anywhere_gives_the_messages_usage():
    body = sse({"type": "message_start", "message": {"id": "m", "usage": {
                    "input_tokens": 11, "cache_creation_input_tokens": 22, "cache_read_input_tokens": 33,
                    "output_tokens": 1}}},
               {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * 5000}},
               {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 44}})
    for size in (1, 7, 4096, len(body)):
        m = CallMeter("/v1/messages?beta=true", 200, [("Content-Type", "text/event-stream")])
        for i in range(0, len(body), size):
            m.feed(body[i:i + size])
        m.close()
        assert m.usage == {"input_tokens": 11, "cache_creation_input_tokens": 22, "cache_read_input_tokens": 33,
                           "output_tokens": 44}, size


def test_json_bodies_errors_and_forged_figures():
    m = CallMeter("/v1/messages", 200, [("content-type", "application/json")])
    m.feed(json.dumps({"usage": {"input_tokens": 5, "output_tokens": -7, "cache_read_input_tokens": "lots"}}).encode())
    m.close()
    assert m.usage == {"input_tokens": 5, "output_tokens": 0, "cache_read_input_tokens": 0}  # never below zero
    counted = CallMeter("/v1/messages/count_tokens", 200, [("content-type", "application/json")])
    counted.feed(b'{"input_tokens": 9000}')
    counted.close()
    w = Witness()
    w.record(m)
    w.record(counted)                    # a count is not usage
    assert w.calls == 1 and w.total()["input_tokens"] == 5
    limited = CallMeter("/v1/messages", 429, [(P + "status", "rejected"), (P + "reset", "4102444800"),
                                              (P + "representative-claim", "five_hour"),
                                              ("content-type", "application/json")])
    limited.feed(b'{"type":"error","error":{"type":"rate_limit_error","message":"limit"}}')
    limited.close()
    w.record(limited)
    turn = w.turn()
    assert turn.result["api_error_status"] == 429 and "limit" in turn.result["result"]
    assert turn.rate_limit["status"] == "rejected"
    assert isinstance(classify(turn, 4102444000, 60), SubscriptionLimited)
    ok = CallMeter("/v1/messages", 200, [(P + "status", "allowed")])
    ok.close()
    w.record(ok)                         # the newest answer decides: the account answers again
    assert classify(w.turn(), 4102444000, 60) is None and w.turn().rate_limit["status"] == "allowed"

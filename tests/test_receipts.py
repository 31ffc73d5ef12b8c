"""Issue 21: a receipt on every answer (chat, Responses, Messages; stream and not), a served model that is not
the one asked for (header and alert), and api_keys[].window_share: each key's share of each window,
attributed from the real CLI's rate_limit_event in subscription mode against the mock's unified headers.

The mock reports an account's utilization as it stood when the request arrived, then adds `per_request`:
a turn's figures are what every earlier turn spent (the real API sends them in the answer's head too).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
from harness import ROOT, anthropic_client, free_port, openai_client, wait_until
from test_accounts import Receiver, start, tokens

from relay.state.apikeys import digest

pytestmark = pytest.mark.slow

ALICE, BOB = "sk-alice-receipts-0123", "sk-bob-receipts-0123"
DOWNGRADE = "claude-haiku-4-5-20251001"


def receipt_headers(h: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in h.items() if k.lower().startswith("x-relay-")}


def sse_receipt(lines: list[str]) -> dict[str, str]:
    found = [ln for ln in lines if ln.startswith(": x-relay-receipt ")]
    assert len(found) == 1, lines
    return json.loads(found[0].removeprefix(": x-relay-receipt "))


def keys_env(tmp: Any, share: float | None = None) -> dict[str, str]:
    cfg = json.loads((ROOT / "config.json").read_text())
    alice: dict[str, Any] = {"name": "alice", "key_sha256": digest(ALICE)}
    if share is not None:
        alice["window_share"] = share
    cfg["auth"] = {"enabled": True, "api_keys": [alice, {"name": "bob", "key": BOB}]}
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return {"RELAY_CONFIG": str(path)}


def expected(util5: float, util7: float, share: float, when: str = "after_turn", resets: str = "") -> dict[str, str]:
    out = {"x-relay-account": "a0", "x-relay-receipt": when,
           "x-relay-window-utilization": f"five_hour={util5:g}, seven_day={util7:g}",
           "x-relay-overage-in-use": "false", "x-relay-key-window-share": f"five_hour={share:g}, seven_day={share:g}"}
    if resets:
        out["x-relay-window-reset"] = resets
    return out


def test_a_receipt_on_every_api_stream_and_not(relay_factory, mock_api, tmp_path):
    """Six turns of one key on one account (42 % / 13 %, +5 % a request): each answer's headers say where
    the windows stand after it and the key's share; a stream's head says where they stood before it, its
    last SSE comment after it; the request records say the same."""
    (tok,) = tokens(1)
    win = mock_api.set_account(tok, five_hour=0.42, seven_day=0.13, per_request=0.05)
    resets = f"five_hour={win.five_hour_reset}, seven_day={win.seven_day_reset}"
    srv = start(relay_factory, [tok], env=keys_env(tmp_path))
    url, auth = srv.url, {"Authorization": f"Bearer {ALICE}"}
    body = {"model": "sonnet", "messages": [{"role": "user", "content": "receipt 1"}]}

    # 1. chat, not streamed: the account's first report, so no rise can be told yet (share 0)
    r = requests.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60)
    assert r.status_code == 200
    assert receipt_headers(r.headers) == expected(0.42, 0.13, 0, resets=resets)
    # 2. chat, streamed (raw SSE): the head from before the turn, the last comment from after it
    body2 = dict(body, stream=True, messages=[{"role": "user", "content": "receipt 2"}])
    with requests.post(url + "/v1/chat/completions", json=body2, headers=auth, stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert receipt_headers(r.headers) == expected(0.42, 0.13, 0, "before_turn", resets)
        lines = [ln.decode() for ln in r.iter_lines() if ln]
    assert sse_receipt(lines) == expected(0.47, 0.18, 0.05, resets=resets)
    assert lines[-1] == "data: [DONE]"
    # 3. Responses, not streamed (the official SDK, strict)
    with openai_client(url, ALICE) as c:
        raw = c.responses.with_raw_response.create(model="sonnet", input="receipt 3")
        assert raw.parse().output_text
        assert receipt_headers(raw.headers) == expected(0.52, 0.23, 0.1, resets=resets)
        # 4. Responses, streamed: the SDK parses the stream with its receipt comment
        with c.responses.with_streaming_response.create(model="sonnet", input="receipt 4", stream=True) as s:
            assert receipt_headers(s.headers) == expected(0.52, 0.23, 0.1, "before_turn", resets)
            kinds = [ev.type for ev in s.parse()]
        assert kinds[-1] == "response.completed"
    # 5. Messages, not streamed (the Anthropic SDK)
    with anthropic_client(url, ALICE) as a:
        raw_m = a.messages.with_raw_response.create(model="sonnet", max_tokens=64,
                                                    messages=[{"role": "user", "content": "receipt 5"}])
        assert raw_m.parse().content[0].text
        assert receipt_headers(raw_m.headers) == expected(0.62, 0.33, 0.2, resets=resets)
        # 6. Messages, streamed
        with a.messages.with_streaming_response.create(model="sonnet", max_tokens=64, stream=True,
                                                       messages=[{"role": "user", "content": "receipt 6"}]) as s:
            assert receipt_headers(s.headers) == expected(0.62, 0.33, 0.2, "before_turn", resets)
            events = [ev.type for ev in s.parse()]
        assert events[-1] == "message_stop"
    assert len(mock_api.by_token(tok)) == 6
    recent = requests.get(url + "/v1/usage/recent?limit=6", headers=auth, timeout=10).json()["data"]
    got = {r["first_message"]: r["receipt"] for r in recent}
    shares = {"receipt 1": (0.42, 0.13, 0), "receipt 2": (0.47, 0.18, 0.05), "receipt 3": (0.52, 0.23, 0.1),
              "receipt 4": (0.57, 0.28, 0.15), "receipt 5": (0.62, 0.33, 0.2), "receipt 6": (0.67, 0.38, 0.25)}
    for text, (u5, u7, share) in shares.items():
        assert got[text] == {"account": "a0", "when": "after_turn", "utilization": {"five_hour": u5, "seven_day": u7},
                             "resets_at": {"five_hour": win.five_hour_reset, "seven_day": win.seven_day_reset},
                             "overage_in_use": False, "key_share": {"five_hour": share, "seven_day": share},
                             "window_share": None, "served_model": None}, text
    assert {r["endpoint"] for r in recent} == {"/v1/chat/completions", "/v1/responses", "/v1/messages"}
    assert all("sonnet" in r["model"] for r in recent)


def test_a_served_model_that_differs_gives_a_header_and_one_alert(relay_factory, mock_api):
    """The mock answers a request for sonnet as haiku: the real CLI's message_start and assistant message name
    haiku (its result's modelUsage still names the model it asked for), so the relay says so and alerts once."""
    (tok,) = tokens(1)
    mock_api.set_account(tok, five_hour=0.2, seven_day=0.1)
    port = free_port()
    hook = Receiver(port)
    try:
        srv = start(relay_factory, [tok], env={"RELAY_ALERTS__WEBHOOKS": json.dumps(
            [{"url": f"http://127.0.0.1:{port}/hook", "events": ["model_mismatch"]}])})
        body = {"model": "sonnet", "messages": [{"role": "user", "content": f"downgrade MOCK:served_model={DOWNGRADE}"}]}
        r = requests.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == DOWNGRADE
        assert r.headers["x-relay-served-model"] == DOWNGRADE and r.headers["x-relay-requested-model"] == "sonnet"
        with requests.post(srv.url + "/v1/messages", json=dict(body, max_tokens=64, stream=True), timeout=60,
                           stream=True) as s:  # a stream's head knows it: message_start came before it
            assert s.headers["x-relay-served-model"] == DOWNGRADE
            assert s.headers["x-relay-requested-model"] == "sonnet"
            list(s.iter_lines())
        plain = requests.post(srv.url + "/v1/chat/completions", timeout=60,
                              json={"model": "sonnet", "messages": [{"role": "user", "content": "same model"}]})
        assert plain.status_code == 200 and "x-relay-served-model" not in plain.headers  # an alias: no mismatch
        assert "sonnet" in plain.json()["model"] and plain.json()["model"] != "sonnet"
        assert [b["body"]["model"] for b in mock_api.by_token(tok)] == [plain.json()["model"]] * 3  # the CLI asked for sonnet
        assert wait_until(lambda: len(hook.got) >= 1, 15)
        time.sleep(1.5)  # a second alert would have arrived by now
        assert len(hook.got) == 1
        alert = hook.got[0][1]
        assert alert["event"] == "model_mismatch" and alert["account"] == "a0"
        assert alert["details"]["served_model"] == DOWNGRADE and alert["details"]["requested_model"] == "sonnet"
        assert alert["details"]["cli_model"] == "sonnet"
        recent = requests.get(srv.url + "/v1/usage/recent?limit=3", timeout=10).json()["data"]
        assert [r["receipt"]["served_model"] for r in recent] == [None, DOWNGRADE, DOWNGRADE]  # newest first
        assert [r["model"] for r in recent][1:] == [DOWNGRADE, DOWNGRADE]
        assert {r["requested_model"] for r in recent} == {"sonnet"}
    finally:
        hook.stop()


def test_window_share_refuses_a_key_over_its_share_while_another_key_is_served(relay_factory, mock_api, tmp_path):
    """alice may use 0.1 of each window: two turns of hers raise the 5-hour window by 0.1 (10 % → 20 %), so
    her third is a 429 in her API's shape naming the window, Retry-After to its reset; bob is still served."""
    (tok,) = tokens(1)
    win = mock_api.set_account(tok, five_hour=0.1, seven_day=0.05, per_request=0.05, per_request_7d=0.01,
                               five_hour_reset=int(time.time()) + 1800)
    srv = start(relay_factory, [tok], env=keys_env(tmp_path, share=0.1))
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    body = {"model": "sonnet", "messages": [{"role": "user", "content": "share"}]}
    for i in range(3):   # shares after each: 0 (first report), 0.05, 0.1
        r = requests.post(srv.url + "/v1/chat/completions", headers=alice, timeout=60,
                          json=dict(body, messages=[{"role": "user", "content": f"share {i}"}]))
        assert r.status_code == 200, r.text
        assert r.headers["x-relay-key-window-share-limit"] == "0.1"
    assert r.headers["x-relay-key-window-share"] == "five_hour=0.1, seven_day=0.02"
    refused = requests.post(srv.url + "/v1/chat/completions", json=body, headers=alice, timeout=60)
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "window_share_exceeded" and err["type"] == "requests"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(win.five_hour_reset))
    assert err["message"] == (f"This API key used its share (0.1) of the five-hour window; it is served again "
                              f"when that window resets at {stamp}.")
    assert abs(int(refused.headers["Retry-After"]) - (win.five_hour_reset - time.time())) <= 3
    # in the Anthropic shape on the Messages API
    m = requests.post(srv.url + "/v1/messages", json=dict(body, max_tokens=64), timeout=60,
                      headers={"x-api-key": ALICE, "anthropic-version": "2023-06-01"})
    assert m.status_code == 429
    assert m.json()["type"] == "error" and m.json()["error"]["type"] == "rate_limit_error"
    assert "five-hour window" in m.json()["error"]["message"]
    ok = requests.post(srv.url + "/v1/chat/completions", json=body, headers=bob, timeout=60)
    assert ok.status_code == 200 and ok.headers["x-relay-key-window-share"] == "five_hour=0.05, seven_day=0.01"
    assert len(mock_api.by_token(tok)) == 4   # the refusals never reached the API
    me = requests.get(srv.url + "/me/data", headers=alice, timeout=10).json()["window_shares"]
    assert me["limit"] == 0.1
    assert [(w["account"], w["window"], w["share"], w["left"]) for w in me["windows"]] == \
        [("a0", "five_hour", 0.1, 0), ("a0", "seven_day", 0.02, 0.08)]
    assert me["windows"][0]["resets_at"] == stamp
    bob_me = requests.get(srv.url + "/me/data", headers=bob, timeout=10).json()["window_shares"]
    assert bob_me["limit"] is None and [w["share"] for w in bob_me["windows"]] == [0.05, 0.01]
    recent = requests.get(srv.url + "/v1/usage/recent?limit=2", headers=alice, timeout=10).json()["data"]
    assert recent[0]["error"] == "window_share_exceeded" and recent[0]["status"] == 429


def test_shares_are_counted_once_across_workers_when_turns_overlap(relay_factory, mock_api, tmp_path):
    """Two keys, three turns each at once on one account (both gevent workers): the windows rose by 6 × 5 %
    after the first report, and the keys' shares add up to exactly that, never counting one rise twice."""
    (tok,) = tokens(1)
    mock_api.set_account(tok, five_hour=0.3, seven_day=0.1, per_request=0.05)
    srv = start(relay_factory, [tok], env=keys_env(tmp_path, share=0.9))
    keys = {"alice": ALICE, "bob": BOB}

    def ask(who: str, text: str) -> requests.Response:
        return requests.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {keys[who]}"},
                             json={"model": "sonnet", "messages": [{"role": "user", "content": text}]}, timeout=60)
    assert ask("bob", "overlap prime").status_code == 200      # the first report: 30 %
    from concurrent.futures import ThreadPoolExecutor
    jobs = [(who, f"overlap {who} {i} MOCK:delay=0.5") for who in keys for i in range(3)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda job: ask(*job), jobs))
    assert [a.status_code for a in answers] == [200] * 6
    assert len(mock_api.by_token(tok)) == 7
    me = {who: requests.get(srv.url + "/me/data", headers={"Authorization": f"Bearer {k}"},
                            timeout=10).json()["window_shares"]["windows"] for who, k in keys.items()}
    total = {w: round(me["alice"][i]["share"] + me["bob"][i]["share"], 6)
             for i, w in enumerate(("five_hour", "seven_day"))}
    assert total == {"five_hour": 0.3, "seven_day": 0.3}
    recent = requests.get(srv.url + "/v1/usage/recent?limit=7", headers={"Authorization": f"Bearer {ALICE}"},
                          timeout=10).json()["data"]
    assert len(recent) == 3 and all(r["receipt"]["window_share"] == 0.9 for r in recent)


def test_an_account_without_windows_sets_no_share_limit(relay_factory, mock_api, tmp_path):
    """The host's own login with an API key (no unified headers): the receipt names the account only, and a
    key's window_share cannot be exceeded there (no window is reported, so no share is measured)."""
    srv = relay_factory(keys_env(tmp_path, share=0.01))
    for i in range(3):
        r = requests.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"},
                          json={"model": "sonnet", "messages": [{"role": "user", "content": f"no windows {i}"}]},
                          timeout=60)
        assert r.status_code == 200
        assert receipt_headers(r.headers) == {"x-relay-account": r.headers["x-relay-account"],
                                              "x-relay-key-window-share-limit": "0.01"}
    me = requests.get(srv.url + "/me/data", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10).json()
    assert me["window_shares"] == {"limit": 0.01, "windows": []}


def test_window_share_must_be_above_0_and_at_most_1(tmp_path):
    from relay.config import ConfigError, load_settings
    for bad in (0, 1.5, "0.5", True):
        cfg = json.loads((ROOT / "config.json").read_text())
        cfg["auth"] = {"enabled": True, "api_keys": [{"name": "alice", "key": ALICE, "window_share": bad}]}
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match="window_share must be a number above 0 and at most 1"):
            load_settings(path, env={})
    cfg["auth"]["api_keys"][0]["window_share"] = 1
    path.write_text(json.dumps(cfg))
    assert load_settings(path, env={})["auth.api_keys"][0]["window_share"] == 1


def test_the_served_model_rule_knows_aliases():
    from relay.core.receipt import served_differs
    assert not served_differs("sonnet", "claude-sonnet-4-5-20250929")
    assert not served_differs("sonnet[1m]", "claude-sonnet-4-5-20250929")
    assert not served_differs("claude-sonnet-4-5", "claude-sonnet-4-5-20250929")
    assert not served_differs("claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929")
    assert not served_differs("opus", None) and not served_differs("opus", "<synthetic>")
    assert served_differs("sonnet", DOWNGRADE)
    assert served_differs("opus", "claude-sonnet-4-5-20250929")
    assert served_differs("claude-sonnet-4-5-20250929", "claude-sonnet-4-20250514")


def test_windows_and_deltas_are_read_from_the_meter_as_it_is():
    from relay.core.receipt import Window, receipt_of, turn_delta, windows
    state = {"five_hour_util": "0.42", "five_hour_reset": "1796593208", "seven_day_util": "0.13",
             "seven_day_overage_included_util": "0.5", "bogus_util": "nan", "_util": "1", "status": "allowed",
             "overage_in_use": "1"}
    assert windows(state) == {"five_hour": Window(0.42, 1796593208.0), "seven_day": Window(0.13, None),
                              "seven_day_overage_included": Window(0.5, None)}
    assert turn_delta(None, Window(0.5, 10)) is None                      # nothing known before: not told
    assert turn_delta(Window(0.4, 10), Window(0.45, 10)) == pytest.approx(0.05)
    assert turn_delta(Window(0.4, 10), Window(0.3, 10)) == 0               # clamped
    assert turn_delta(Window(0.9, 10), Window(0.02, 20)) == 0.02           # the window reset in between
    r = receipt_of("a0", state, {"five_hour": 0.1}, 0.25, "sonnet", DOWNGRADE, asked="gpt-4o")
    assert r.headers() == {
        "x-relay-account": "a0", "x-relay-receipt": "after_turn",
        "x-relay-window-utilization": "five_hour=0.42, seven_day=0.13, seven_day_overage_included=0.5",
        "x-relay-window-reset": "five_hour=1796593208", "x-relay-overage-in-use": "true",
        "x-relay-key-window-share": "five_hour=0.1, seven_day=0, seven_day_overage_included=0",
        "x-relay-key-window-share-limit": "0.25", "x-relay-served-model": DOWNGRADE,
        "x-relay-requested-model": "gpt-4o"}


def test_a_key_over_its_share_on_one_account_is_served_by_another(relay_factory, mock_api, tmp_path):
    """alice (window_share 0.05) fills her share of a0's 5-hour window in one turn, so her next goes to a1; once
    she is over on both, the 429 names the account that frees her first and its reset; bob stays on a0."""
    ta, tb = tokens(2)
    now = int(time.time())
    wa = mock_api.set_account(ta, five_hour=0.1, seven_day=0.1, per_request=0.05, per_request_7d=0.0,
                              five_hour_reset=now + 1000)
    mock_api.set_account(tb, five_hour=0.5, seven_day=0.1, per_request=0.05, per_request_7d=0.0,
                         five_hour_reset=now + 2000)
    srv = start(relay_factory, [ta, tb], env=keys_env(tmp_path, share=0.05))

    def ask(key: str, text: str) -> requests.Response:
        return requests.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "sonnet", "messages": [{"role": "user", "content": text}]}, timeout=60)
    # bob's two first turns make both accounts known (a0 by name, then a1: unknown means full headroom)
    assert [ask(BOB, f"two accounts bob {i}").headers["x-relay-account"] for i in range(2)] == ["a0", "a1"]
    first = ask(ALICE, "two accounts alice 0")          # a0: 10 % → 15 %, her share 0.05: full
    assert first.headers["x-relay-account"] == "a0"
    assert first.headers["x-relay-key-window-share"] == "five_hour=0.05, seven_day=0"
    second = ask(ALICE, "two accounts alice 1")         # a0 is full for her: a1, 50 % → 55 %
    assert second.headers["x-relay-account"] == "a1"
    assert second.headers["x-relay-key-window-share"] == "five_hour=0.05, seven_day=0"
    refused = ask(ALICE, "two accounts alice 2")
    assert refused.status_code == 429
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wa.five_hour_reset))
    assert refused.json()["error"]["message"] == (
        f"This API key used its share (0.05) of the five-hour window of account a0; it is served again when that "
        f"window resets at {stamp}.")
    assert abs(int(refused.headers["Retry-After"]) - (wa.five_hour_reset - time.time())) <= 3
    assert ask(BOB, "two accounts bob 2").headers["x-relay-account"] == "a0"
    assert len(mock_api.by_token(ta)) == 3 and len(mock_api.by_token(tb)) == 2


def test_near_its_reset_a_windows_unused_shares_go_to_whoever_asks(relay_factory, mock_api, tmp_path):
    """window_share_release_s = 3600 and the 5-hour window resets in 30 minutes: alice's share (0.05) no longer
    caps it, so she is served past it; the weekly window, far from its reset, would still cap her."""
    (tok,) = tokens(1)
    mock_api.set_account(tok, five_hour=0.1, seven_day=0.1, per_request=0.05, per_request_7d=0.0,
                         five_hour_reset=int(time.time()) + 1800)
    srv = start(relay_factory, [tok], env={**keys_env(tmp_path, share=0.05), "RELAY_WINDOW_SHARE_RELEASE_S": "3600"})
    for i in range(4):
        r = requests.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"}, timeout=60,
                          json={"model": "sonnet", "messages": [{"role": "user", "content": f"release {i}"}]})
        assert r.status_code == 200, r.text
    assert r.headers["x-relay-key-window-share"] == "five_hour=0.15, seven_day=0"
    assert r.headers["x-relay-key-window-share-limit"] == "0.05"

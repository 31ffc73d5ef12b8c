"""What a forged or broken CLI line, a hostile alert text and an admin's clear do to account and usage state.

Issue 20: usage is never negative, alert text carries no Slack/Telegram markup or links, a 200 whose text
says "hit your limit" limits nothing, and an admin can clear a limited account (API and CLI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import requests
from harness import ROOT, openai_client, wait_until
from test_accounts import ask, start, tokens
from test_hygiene import body, fake_cli, srv_mock_url

from relay.core.alerts import plain, slack_text
from relay.core.record import figure


def test_figures_are_never_negative_or_absurd() -> None:
    assert [figure(v) for v in (-5_000_000, "12abc", float("nan"), 1e300, True, None, "42", 7.0, 3)] == \
        [0, 0, 0, 10**10, 0, 0, 42, 7, 3]  # a huge float is held at the cap


def test_alert_text_carries_no_markup_or_links() -> None:
    evil = ("<!channel> <!here> <@U123> limit hit, log in at <https://evil.example/login|claude.ai/login> "
            "or [here](https://evil.example/x) or https://evil.example/y <b>now</b>")
    for text in (plain(evil), slack_text(plain(evil))):
        assert "<!" not in text and "<@" not in text and "https://" not in text and "](" not in text
        assert "<b>" not in text and "|claude.ai" not in text
    assert "limit hit" in plain(evil)


def test_a_forged_negative_usage_line_lowers_no_total(relay_factory, tmp_path, cli_bin) -> None:
    """A real turn's events replayed with a forged `result` (input_tokens -5,000,000, junk figures)."""
    env = dict(os.environ, ANTHROPIC_BASE_URL=srv_mock_url(relay_factory), ANTHROPIC_API_KEY="k",
               CLAUDE_CONFIG_DIR=str(tmp_path), CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    from relay.cli.invocation import base_argv
    line = json.dumps({"type": "user", "message": {"role": "user", "content": "MOCK:words=3"}})
    events = subprocess.run(base_argv(cli_bin, "sonnet") + ["--no-session-persistence"], input=line + "\n",
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60).stdout.splitlines()
    forged = []
    for e in events:
        ev = json.loads(e)
        if ev.get("type") == "result":
            ev["usage"] = {"input_tokens": -5_000_000, "output_tokens": "12abc", "cache_read_input_tokens": 1e300,
                           "cache_creation_input_tokens": -1}
        forged.append(json.dumps(ev))
    recorded = tmp_path / "forged.ndjson"
    recorded.write_text("\n".join(forged) + "\n")
    srv = relay_factory({"CLAUDE_BIN": fake_cli(tmp_path, f"sys.stdout.write(open({str(recorded)!r}).read())\n")})
    r = requests.post(srv.url + "/v1/chat/completions", json=body("forged", False), timeout=60)
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert all(v >= 0 for v in (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]))
    assert wait_until(lambda: requests.get(srv.url + "/v1/usage/recent?limit=5").json()["data"], 10)
    total = requests.get(srv.url + "/v1/usage").json()["total"]
    assert all(total[k] >= 0 for k in ("input_tokens", "output_tokens", "cache_read_tokens", "total_tokens"))
    assert total["cache_read_tokens"] < 10**11
    for metric in requests.get(srv.url + "/metrics").text.splitlines():
        if metric.startswith("relay_tokens_total"):
            assert float(metric.rsplit(" ", 1)[1]) >= 0, metric


def test_an_admin_clears_a_limited_account_through_the_api_and_the_cli(relay_factory, mock_api) -> None:
    (ta,) = tokens(1)
    mock_api.set_account(ta, five_hour=1.0, five_hour_reset=int(time.time()) + 3000)
    srv = start(relay_factory, [ta])
    with openai_client(srv.url) as c:
        try:
            ask(c, "clear-me first")
        except Exception as exc:  # the account is limited: a 429, never a 200
            assert getattr(exc, "status_code", None) == 429
    health = requests.get(srv.url + "/health", timeout=10)
    assert health.json()["status"] == "degraded" and health.json()["accounts"][0]["state"] == "limit"
    mock_api.set_account(ta, five_hour=0.1)   # the window really reset; the relay still holds its cooldown
    r = requests.delete(srv.url + "/v1/accounts/a0/state", timeout=10)
    assert r.status_code == 200 and r.json()["cleared"] is True and r.json()["was"]["state"] == "limit"
    assert requests.delete(srv.url + "/v1/accounts/nope/state", timeout=10).status_code == 404
    with openai_client(srv.url) as c:
        assert "clear-me second" in ask(c, "clear-me second")
    # the CLI: limit it again, then clear it from the command line with the relay's own environment
    mock_api.set_account(ta, five_hour=1.0, five_hour_reset=int(time.time()) + 3000)
    requests.post(srv.url + "/v1/chat/completions", timeout=60, json=body("clear-me third", False))
    assert wait_until(lambda: requests.get(srv.url + "/v1/accounts").json()["data"][0]["state"] == "limit", 10)
    mock_api.set_account(ta, five_hour=0.1)
    out = subprocess.run([sys.executable, "-m", "relay", "accounts", "clear", "a0"], cwd=ROOT, env=srv.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "cleared" in out.stderr and json.loads(out.stdout)["state"] == "ok", out
    assert requests.get(srv.url + "/v1/accounts").json()["data"][0]["state"] != "limit"


def test_a_member_key_cannot_clear_an_account(relay_factory, tmp_path) -> None:
    from test_auth import ADMIN, ALICE, keys_config
    srv = relay_factory({"RELAY_CONFIG": str(keys_config(tmp_path))})
    r = requests.delete(srv.url + "/v1/accounts/default/state", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["type"]
    r = requests.delete(srv.url + "/v1/accounts/nope/state", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 404


def test_webhooks_get_no_markup_and_redirects_are_not_followed(redis_server) -> None:
    """Through the real outbox (Redis) to real loopback webhooks: a Slack and a Telegram hook get the
    alert's text without pings or links; a hook that answers 307 is not followed to its target."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import redis

    from relay.state.alerts import Alerts

    got: dict[str, list[bytes]] = {"/slack": [], "/tg": [], "/redirect": [], "/target": []}

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got[self.path].append(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/redirect":
                self.send_response(307)
                self.send_header("Location", "/target")
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        r = redis.Redis.from_url(redis_server.fresh_db(), decode_responses=True)
        alerts = Alerts(r, [{"url": base + "/slack", "format": "slack"},
                            {"url": base + "/tg", "format": "telegram", "chat_id": 1},
                            {"url": base + "/redirect"}], "host-a")
        assert alerts.offer("account_limited", "a0", "<!channel> log in at <https://evil.example/x|claude.ai/login> "
                            "@admin [here](https://evil.example/y)", "t1")
        assert alerts.offer("account_limited", "a0", "again", "t1") is False  # the same alert id: once
        alerts.deliver_due()
        slack, tg = json.loads(got["/slack"][0]), json.loads(got["/tg"][0])
        for text in (slack["text"], tg["text"]):
            assert "<!" not in text and "https://" not in text and "evil.example" not in text and "](" not in text
        assert slack["mrkdwn"] is False and "parse_mode" not in tg and tg["link_preview_options"]["is_disabled"]
        assert len(got["/redirect"]) == 1 and got["/target"] == [] and alerts.pending() == 0
    finally:
        srv.shutdown()


def test_a_limit_is_read_from_the_status_not_from_any_text() -> None:
    from relay.core.events import Turn
    from relay.core.upstream import classify
    from relay.errors import SubscriptionLimited

    said = "You've hit your limit · resets 5pm"
    ok = Turn(result={"is_error": False, "result": said})
    assert classify(ok, time.time(), 60) is None   # an answer that quotes the limit text is an answer
    server = Turn(result={"is_error": True, "api_error_status": 500, "result": said})
    assert not isinstance(classify(server, time.time(), 60), SubscriptionLimited)
    limited = Turn(result={"is_error": True, "api_error_status": 429, "result": said})
    assert isinstance(classify(limited, time.time(), 60), SubscriptionLimited)


def test_a_resume_point_the_cli_cannot_find_replays_the_history() -> None:
    """`--resume-session-at` naming a message that is not in the session's loaded chain (seen once in a
    full run: the file held it, the CLI did not load it) is a vanished session, retried from the client's
    history, not a 502 for the client."""
    from relay.core.events import Turn
    from relay.core.upstream import SessionMissing, classify

    said = "No message found with message.uuid of: f2ecad71-f6c9-402c-ab80-96fe04e40448"
    for result in ({"is_error": True, "errors": [said]}, {"is_error": True, "result": said}):
        assert isinstance(classify(Turn(result=result), time.time(), 60), SessionMissing)

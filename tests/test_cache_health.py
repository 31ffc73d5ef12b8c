"""Prompt-cache health: an alert when an account's or a key's hit rate over the last hour falls far below
its usual level, naming the likely cause (relay/core/cache_health.py, relay/state/cache_health.py)."""

from __future__ import annotations

import json
import time

import redis
from harness import free_port, openai_client, wait_until
from test_accounts import Receiver, start, tokens

from relay.core.cache_health import Counts, verdict
from relay.core.record import RequestRecord
from relay.state.cache_health import BUCKET_S, CacheHealth

NOW = 1_800_000_000.0


class Alerts:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None, str, str, dict]] = []

    def emit(self, event, account, text, alert_id, ttl=0, details=None):
        if any(a[3] == alert_id for a in self.sent):
            return False
        self.sent.append((event, account, text, alert_id, details or {}))
        return True


def rec(read, total, resumed=True, account="a0", key_id="k1", status=200, estimated=False):
    return RequestRecord(id="x", request_id="r", key_id=key_id, account=account, status=status, estimated=estimated,
                         input_tokens=total - read, cache_read_tokens=read, resumed=resumed)


def test_the_verdict_and_its_cause():
    usual = Counts(read=80_000, total=100_000, requests=20, resumed=18)
    assert verdict(Counts(read=70_000, total=100_000, requests=20, resumed=18), usual) is None  # a normal hour
    assert verdict(Counts(read=0, total=5_000, requests=2, resumed=0), usual) is None            # too little to tell
    assert verdict(Counts(read=0, total=50_000, requests=9, resumed=9), Counts(read=5, total=100_000)) is None
    v = verdict(Counts(read=1_000, total=50_000, requests=10, resumed=1), usual)
    assert v and round(v.rate, 2) == 0.02 and v.usual == 0.8 and "not resumed" in v.cause
    assert "switched accounts" in verdict(Counts(read=0, total=50_000, requests=8, resumed=8, moved=4), usual).cause
    assert "prompts changed" in verdict(Counts(read=0, total=50_000, requests=8, resumed=8), usual).cause


def test_counts_per_account_and_key_and_one_alert_per_hour(redis_server):
    r = redis.Redis.from_url(redis_server.fresh_db())
    alerts = Alerts()
    ch = CacheHealth(r, alerts)
    for hours_ago in range(2, 14):                        # a usual day: 80 % of the prompt from the cache
        ch.count(rec(24_000, 30_000), False, NOW - hours_ago * 3600)
    ch.count(rec(0, 999_999, status=429), False, NOW)      # refused or estimated requests do not count
    ch.count(rec(0, 999_999, estimated=True), False, NOW)
    last, usual = ch.counts("account", "a0", NOW)
    assert last == Counts() and usual == Counts(read=288_000, total=360_000, requests=12, resumed=12)
    for i in range(3):                                    # then an hour of cold replays
        ch.record(rec(0, 15_000, resumed=False), False, NOW + i * 60)
    assert [(a[0], a[1], a[4].get("account") or a[4].get("key")) for a in alerts.sent] == \
        [("cache_health", "a0", "a0"), ("cache_health", None, "k1")]
    assert "fell to 0% over the last hour, against 80% usually" in alerts.sent[0][2]
    assert "not resumed" in alerts.sent[0][4]["cause"]
    ch.record(rec(0, 15_000, resumed=False), False, NOW + 400)   # checked again later: the same hour's alert
    assert len(alerts.sent) == 2


def test_a_relay_alerts_its_webhook_when_an_accounts_cache_goes_cold(relay_factory, mock_api):
    port = free_port()
    receiver = Receiver(port)
    try:
        (tok,) = tokens(1)
        mock_api.set_account(tok, five_hour=0.1)
        srv = start(relay_factory, [tok], env={"RELAY_ALERTS__WEBHOOKS": json.dumps(
            [{"url": f"http://127.0.0.1:{port}/hook", "events": ["cache_health"]}])})
        history = CacheHealth(redis.Redis.from_url(srv.env["REDIS_URL"]), Alerts())
        now = time.time()
        for hours_ago in range(2, 8):                     # the account's usual: 90 % cache reads
            history.count(rec(27_000, 30_000, key_id=""), False, now - hours_ago * 3600 - BUCKET_S)
        c = openai_client(srv.url)
        for i in range(2):                                # answers with no cache reads at all
            c.chat.completions.create(model="sonnet", messages=[
                {"role": "user", "content": f"cold{i} MOCK:usage=25000,0,0,5"}])
        assert wait_until(lambda: receiver.got, 15)
        path, body = receiver.got[0]
        assert body["event"] == "cache_health" and body["account"] == "a0", body
        assert "fell to 0%" in body["text"] and "against 90%" in body["text"]
        time.sleep(1)
        assert len(receiver.got) == 1
    finally:
        receiver.stop()

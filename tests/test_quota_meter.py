"""The quota meter (issue 21): every window of every account, on every surface, across 2 workers; stale
windows; the reserve; a per-model bucket rejection scoped to its model family; burn-rate routing; threshold
alerts exactly once per window.

The real CLI runs in subscription mode (CLAUDE_CODE_OAUTH_TOKEN per account) against the mock, which keeps
separate windows per bearer token and sends the unified headers (5h, 7d, 7d_oi, status, surpassed threshold).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from harness import anthropic_client, free_port, openai_client, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_accounts import Receiver, ask, meter, start, tokens
from test_pages import browser, chromium, screenshot, settled, text  # noqa: F401  (the pages' fixtures)

pytestmark = pytest.mark.slow


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def scrape(srv: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    r = requests.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def gauge(m: dict[str, Any], name: str) -> dict[tuple[str, str], float]:
    return {(lab["account"], lab["window"]): v for lab, v in m.get(name, [])}


def chat(srv: Any, text: str, model: str = "sonnet", session: str | None = None) -> requests.Response:
    headers = {"X-Session-Id": session} if session else {}
    return requests.post(srv.url + "/v1/chat/completions", timeout=120, headers=headers,
                         json={"model": model, "messages": [{"role": "user", "content": text}]})


def workers(srv: Any) -> set[int]:
    return {r["worker"] for r in requests.get(srv.url + "/v1/usage/recent?limit=50", timeout=10).json()["data"]}


def test_the_meter_shows_every_window_exactly_on_every_surface_across_two_workers(relay_factory, mock_api):
    ta, tb = tokens(2)
    now = int(time.time())
    wa = mock_api.set_account(ta, five_hour=0.42, seven_day=0.13, seven_day_oi=0.3, warn_threshold=0.4,
                              five_hour_reset=now + 4000, seven_day_reset=now + 500000, seven_day_oi_reset=now + 400000)
    wb = mock_api.set_account(tb, five_hour=0.10, seven_day=0.05, five_hour_reset=now + 9000,
                              seven_day_reset=now + 600000)
    srv = start(relay_factory, [ta, tb])
    chat(srv, "meter-0").raise_for_status()          # a0 (name order; nothing known yet)
    chat(srv, "meter-1").raise_for_status()          # a1 (unknown: full headroom)
    n = 2
    with ThreadPoolExecutor(4) as pool:               # until both workers served turns
        while len(workers(srv)) < 2 and n < 30:
            list(pool.map(lambda i: chat(srv, f"meter-{i}").raise_for_status(), range(n, n + 4)))
            n += 4
    assert len(workers(srv)) == 2
    assert mock_api.by_token(ta) and mock_api.by_token(tb)
    want = {
        "a0": {"five_hour": (0.42, wa.five_hour_reset, "allowed_warning", 0.4),
               "seven_day": (0.13, wa.seven_day_reset, "allowed", None),
               "seven_day_overage_included": (0.3, wa.seven_day_oi_reset, "allowed", None)},
        "a1": {"five_hour": (0.10, wb.five_hour_reset, "allowed", None),
               "seven_day": (0.05, wb.seven_day_reset, "allowed", None)}}
    for _ in range(4):                                # any worker answers the same, from Redis
        for surface in (meter(srv), {a["name"]: a for a in requests.get(srv.url + "/health", timeout=10)
                                     .json()["accounts"]}):
            for name, wins in want.items():
                got = surface[name]["windows"]
                assert set(got) == set(wins), got
                for w, (util, reset, status, surpassed) in wins.items():
                    assert got[w]["utilization"] == pytest.approx(util)
                    assert got[w]["resets_at"] == iso(reset) and got[w]["status"] == status
                    assert got[w]["surpassed_threshold"] == surpassed and got[w]["stale"] is False
                    assert 0 < got[w]["resets_in_s"] <= reset - now
    health = requests.get(srv.url + "/health", timeout=10).text
    assert ta not in health and tb not in health and "CLAUDE_TOKEN_0" not in health
    m = scrape(srv)
    util = gauge(m, "relay_account_window_utilization")
    resets = gauge(m, "relay_account_window_reset_timestamp_seconds")
    assert util == {(a, w): pytest.approx(v[0]) for a, wins in want.items() for w, v in wins.items()}
    assert resets == {(a, w): float(v[1]) for a, wins in want.items() for w, v in wins.items()}
    assert set(gauge(m, "relay_account_window_stale").values()) == {0.0}
    data = requests.get(srv.url + "/dashboard/data", timeout=10).json()
    acc = {a["name"]: a for a in data["accounts"]}
    assert {w["name"]: w["utilization"] for w in acc["a0"]["windows"]} == \
        {"five_hour": 0.42, "seven_day": 0.13, "seven_day_overage_included": 0.3}
    labels = [bar.split('aria-label="')[1].split('"')[0] for bar in acc["a0"]["window_meters"]]
    assert labels == ["a0 5-hour: 42 % · allowed warning", "a0 weekly: 13 %", "a0 per-model wk: 30 %"]
    assert re.search(r"resets in 1 h [0-6] min", acc["a0"]["window_meters"][0])   # 1 h 6 min 40 s after `now`
    assert "resets in 5 d 1" in acc["a0"]["window_meters"][1]                        # 5 d 18 h 53 min


def test_a_stale_window_says_so_and_is_never_shown_as_zero(relay_factory, mock_api):
    (ta,) = tokens(1)
    srv = start(relay_factory, [ta])
    soon = int(time.time()) + 6          # set once the relay is up: its start must not outlast the window
    mock_api.set_account(ta, five_hour=0.55, seven_day=0.2, five_hour_reset=soon)
    chat(srv, "stale-0").raise_for_status()
    assert meter(srv)["a0"]["windows"]["five_hour"]["utilization"] == pytest.approx(0.55)
    time.sleep(max(0.0, soon - time.time()) + 1)       # the reset passes with no turn since
    for _ in range(3):
        w = meter(srv)["a0"]["windows"]["five_hour"]
        assert w["stale"] is True and w["utilization"] is None and w["status"] is None
        assert w["resets_at"] == iso(soon) and w["resets_in_s"] == 0
    assert meter(srv)["a0"]["windows"]["seven_day"]["utilization"] == pytest.approx(0.2)
    m = scrape(srv)
    assert ("a0", "five_hour") not in gauge(m, "relay_account_window_utilization")   # no sample, never 0
    assert gauge(m, "relay_account_window_stale")[("a0", "five_hour")] == 1.0
    assert gauge(m, "relay_account_window_utilization")[("a0", "seven_day")] == pytest.approx(0.2)
    acc = requests.get(srv.url + "/dashboard/data", timeout=10).json()["accounts"][0]
    bars = acc["window_meters"]
    assert acc["utilization"] == pytest.approx(0.2)       # the fuller window known: the weekly one
    assert 'aria-label="a0 5-hour: unknown (stale)"' in bars[0] and "no turn since its reset" in bars[0]
    assert "0 %" not in bars[0]
    chat(srv, "stale-1").raise_for_status()             # the next turn reports the new period (the mock rolled)
    w = meter(srv)["a0"]["windows"]["five_hour"]
    assert w["stale"] is False and w["utilization"] == 0.0 and w["resets_at"] > iso(soon)


def test_a_reserve_pauses_new_conversations_while_its_own_go_on_until_the_limit(relay_factory, mock_api):
    ta, tb = tokens(2)
    mock_api.set_account(ta, five_hour=0.88, seven_day=0.1, per_request=0.02)
    mock_api.set_account(tb, five_hour=0.5, seven_day=0.1)
    srv = start(relay_factory, [ta, tb], [{"reserve": 0.9}, {"priority": 2}])
    with openai_client(srv.url) as c:
        hist: list[dict[str, Any]] = []
        ask(c, "reserve conv turn 1", "reserve-conv", hist)    # a0 (priority 1) reports 88 %
        ask(c, "reserve new A")                                  # a0 reports 90 %: at its reserve
        assert meter(srv)["a0"]["at_reserve"] == "five_hour"
        for i in range(4):
            ask(c, f"reserve new B{i}")                          # new conversations: a1 only
        for n in (2, 3):
            ask(c, f"reserve conv turn {n}", "reserve-conv", hist)  # its own conversation goes on, sticky
    assert len(mock_api.by_token(ta, "reserve conv turn")) == 3 and not mock_api.by_token(tb, "reserve conv")
    assert len(mock_api.by_token(tb, "reserve new B")) == 4 and not mock_api.by_token(ta, "reserve new B")
    m = meter(srv)["a0"]
    assert m["reserve"] == 0.9 and m["usable"] and m["windows"]["five_hour"]["utilization"] == pytest.approx(0.94)
    # at the hard limit the conversation moves (the mock answers a0 with a 429)
    mock_api.set_account(ta, five_hour=1.0)
    with openai_client(srv.url) as c:
        ask(c, "reserve conv turn 4", "reserve-conv", hist)
    assert mock_api.by_token(tb, "reserve conv turn 4")
    # every account at its reserve: a new conversation gets a 429 naming the reserve, not a run
    srv2 = start(relay_factory, tokens(1), [{"reserve": 0.5}])
    mock_api.set_account(srv2.env["CLAUDE_TOKEN_0"], five_hour=0.6)
    chat(srv2, "reserve single 1").raise_for_status()
    r = chat(srv2, "reserve single 2")
    assert r.status_code == 429 and "at its reserve" in r.json()["error"]["message"], r.text
    assert len(mock_api.by_token(srv2.env["CLAUDE_TOKEN_0"])) == 1


def test_a_per_model_bucket_rejection_leaves_the_account_serving_other_models(relay_factory, mock_api):
    ta, tb = tokens(2)
    oi_reset = int(time.time()) + 3 * 86400
    mock_api.set_account(ta, five_hour=0.2, seven_day=0.1, seven_day_oi=1.0, seven_day_oi_reset=oi_reset)
    mock_api.set_account(tb, five_hour=0.3, seven_day=0.1, seven_day_oi=0.2)
    srv = start(relay_factory, [ta, tb], [{}, {"priority": 2}])
    with requests.post(srv.url + "/v1/chat/completions", timeout=120, stream=True,   # a0 refuses opus (429
                       json={"model": "opus", "stream": True,                          # 7d_oi): a1 answers,
                             "messages": [{"role": "user", "content": "oi opus 1"}]}) as r:  # before a byte
        assert r.status_code == 200 and r.headers["x-relay-account"] == "a1"
        streamed = r.text
    assert "You said: oi opus 1" in "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                                            for line in streamed.splitlines()
                                            if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert chat(srv, "oi sonnet 1", "sonnet").status_code == 200    # a0 still serves sonnet
    assert chat(srv, "oi opus 2", "opus").status_code == 200        # straight to a1: a0 is out for opus
    assert chat(srv, "oi haiku 1", "haiku").status_code == 200
    for i in range(4):                                               # both workers know it (Redis)
        assert chat(srv, f"oi opus more {i}", "opus").status_code == 200
        assert chat(srv, f"oi sonnet more {i}", "sonnet").status_code == 200
    with anthropic_client(srv.url) as ac:          # the Messages API routes the same way
        msg = ac.messages.with_raw_response.create(model="claude-opus-5-5", max_tokens=50,
                                                   messages=[{"role": "user", "content": "oi messages opus"}])
        assert msg.headers["x-relay-account"] == "a1" and "oi messages opus" in msg.parse().content[0].text
    to_a = [(r["body"]["model"], r["status"] if "status" in r else None) for r in mock_api.by_token(ta)]
    assert [m for m, _ in to_a if "opus" in m] == ["claude-opus-5-5"]       # refused once, never asked again
    assert len([m for m, _ in to_a if "sonnet" in m]) == 5 and len([m for m, _ in to_a if "haiku" in m]) == 1
    assert len([r for r in mock_api.by_token(tb) if "opus" in r["body"]["model"]]) == 7
    a0 = meter(srv)["a0"]
    assert a0["usable"] and a0["state"] == "ok" and a0["model_limits"] == {"opus": iso(oi_reset)}
    oi = a0["windows"]["seven_day_overage_included"]
    assert oi["utilization"] == 1.0 and oi["status"] == "rejected" and oi["resets_at"] == iso(oi_reset)
    assert a0["windows"]["five_hour"]["utilization"] == pytest.approx(0.2)
    # the last account refuses opus too: opus gets a 429 naming the model family; sonnet is answered
    mock_api.set_account(tb, seven_day_oi=1.0, seven_day_oi_reset=oi_reset)
    r = chat(srv, "oi opus last", "opus")
    assert r.status_code == 429, r.text
    msg = r.json()["error"]["message"]
    assert "opus" in msg and "a0: usage limit reached for opus models" in msg, msg
    assert 0 < int(r.headers["Retry-After"]) <= oi_reset - time.time() + 5
    assert chat(srv, "oi sonnet last", "sonnet").status_code == 200
    assert meter(srv)["a1"]["model_limits"] == {"opus": iso(oi_reset)} and meter(srv)["a1"]["usable"]


def test_new_conversations_follow_the_burn_rate_not_round_robin(relay_factory, mock_api):
    ta, tb = tokens(2)
    now = int(time.time())
    # a0: 60 % used, its 5-hour window resets in 30 min (what is left would be lost); a1: 30 % used of a
    # window that has just begun. By plain headroom a1 wins; by burn rate a0 does.
    mock_api.set_account(ta, five_hour=0.6, seven_day=0.1, five_hour_reset=now + 1800)
    mock_api.set_account(tb, five_hour=0.3, seven_day=0.1, five_hour_reset=now + 5 * 3600 - 60)
    srv = start(relay_factory, [ta, tb])
    with openai_client(srv.url) as c:
        ask(c, "burn-0")           # a0 (name order)
        ask(c, "burn-1")           # a1 (unknown)
        for i in range(2, 8):
            ask(c, f"burn-{i}")
    assert len(mock_api.by_token(ta)) == 7 and len(mock_api.by_token(tb)) == 1


def test_threshold_alerts_fire_exactly_once_per_window_across_workers(relay_factory, mock_api):
    (ta,) = tokens(1)
    mock_api.set_account(ta, five_hour=0.45, seven_day=0.5, seven_day_oi=0.6, warn_threshold=0.42)
    port = free_port()
    receiver = Receiver(port)
    try:
        srv = start(relay_factory, [ta], None,
                    {"RELAY_ALERTS__WEBHOOKS": json.dumps([{"url": f"http://127.0.0.1:{port}/hook"}]),
                     "RELAY_ALERTS__THRESHOLDS": "[0.4, 0.9]", "RELAY_ALERTS__RETRY_BASE_S": "0.3"})
        n = 0
        with ThreadPoolExecutor(4) as pool:
            while (len(workers(srv)) < 2 or n < 8) and n < 40:
                list(pool.map(lambda i: chat(srv, f"thr-{i}").raise_for_status(), range(n, n + 4)))
                n += 4
        assert len(workers(srv)) == 2
        want = {("five_hour", 0.4), ("five_hour", 0.42), ("seven_day", 0.4), ("seven_day", 0.42),
                ("seven_day_overage_included", 0.4), ("seven_day_overage_included", 0.42)}

        def got() -> list[tuple[str, float]]:
            return [(b["details"]["window"], b["details"]["threshold"]) for _, b in receiver.got
                    if b["event"] == "utilization_threshold"]
        assert wait_until(lambda: set(got()) == want, 30, 0.2), got()
        time.sleep(2)
        assert sorted(got()) == sorted(want)      # exactly once each
        five = next(b for _, b in receiver.got if b["details"]["window"] == "five_hour"
                    and b["details"]["threshold"] == 0.42)
        assert five["details"]["status"] == "allowed_warning" and five["details"]["surpassed_threshold"] == 0.42
        assert five["details"]["utilization"] == pytest.approx(0.45)
    finally:
        receiver.stop()


def test_the_dashboard_draws_every_window_as_a_bar_in_headless_chromium(relay_factory, mock_api,
                                                                           browser, tmp_path):  # noqa: F811
    ta, tb = tokens(2)
    now = int(time.time())
    mock_api.set_account(ta, five_hour=0.42, seven_day=0.13, seven_day_oi=0.3, warn_threshold=0.4,
                         five_hour_reset=now + 2 * 3600 + 600, seven_day_reset=now + 3 * 86400 + 7200)
    mock_api.set_account(tb, five_hour=0.97, seven_day=0.61, five_hour_reset=now + 1500, warn_threshold=0.9)
    srv = start(relay_factory, [ta, tb], [{}, {"priority": 2}])
    chat(srv, "dash-0").raise_for_status()
    mock_api.set_account(ta, five_hour=1.0, five_hour_reset=now + 2 * 3600 + 600)
    chat(srv, "dash-1").raise_for_status()      # a0 refuses (limited): a1 answers at 97 %
    browser.get(srv.url + "/dashboard")
    assert settled(browser) == "loaded"
    bars = [e.get_attribute("aria-label") for e in browser.find_elements("css selector", "#accounts svg")]
    assert bars == ["a0: limited", "a0 5-hour: 100 % · rejected", "a0 weekly: 13 %", "a0 per-model wk: 30 %",
                    "a1: 97 % of the fuller window", "a1 5-hour: 97 % · allowed warning", "a1 weekly: 61 %"], bars
    shown = [e.get_attribute("textContent") for e in browser.find_elements("css selector", "#accounts svg")]
    assert re.search(r"resets in 2 h ([0-9]|10) min", shown[1]), shown[1]     # 2 h 10 min after `now`
    assert re.search(r"resets in 3 d [12] h", shown[2]), shown[2]
    assert re.search(r"resets in (1[5-9]|2[0-5]) min", shown[5]), shown[5]    # 25 min after `now`
    assert "a0: limited until" in text(browser, "accounts")
    screenshot(browser, tmp_path, "dashboard-windows.png")

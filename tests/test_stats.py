"""Usage statistics shared by all workers through Redis, and the log/stats.json snapshot."""

import json
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from harness import openai_client, wait_until


def post(srv, text, **kw):
    return requests.post(srv.url + "/v1/chat/completions", timeout=120,
                         json={"model": "sonnet", "messages": [{"role": "user", "content": text}], **kw})


def test_a_storm_across_four_workers_gives_exact_totals(relay_factory):
    srv = relay_factory({"RELAY_WORKERS": "4", "RELAY_MAX_CONCURRENT_RUNS": "2", "RELAY_QUEUE_TIMEOUT_S": "0"})
    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(lambda i: post(srv, f"storm-{i}").status_code, range(1000)))
    ok, limited = statuses.count(200), statuses.count(429)
    assert ok + limited == 1000 and ok >= 2
    assert wait_until(lambda: requests.get(srv.url + "/stats").json()["requests"]["total"] == 1000, 10)
    total = requests.get(srv.url + "/v1/usage").json()["total"]
    assert total["requests"] == 1000 and total["successful"] == ok and total["errors"] == limited
    # every success: 100 input, 200 cache creation, 300 cache read, 6 output tokens (from the CLI's result)
    assert total["input_tokens"] == 100 * ok and total["output_tokens"] == 6 * ok
    assert total["cache_read_tokens"] == 300 * ok and total["cache_creation_tokens"] == 200 * ok
    assert total["total_tokens"] == 606 * ok and total["cache_hit_requests"] == ok
    pids = {r.get("worker") for r in requests.get(srv.url + "/v1/usage/recent?limit=1000").json()["data"]}
    assert len(pids) >= 2  # really served by several workers


def test_snapshot_schema_cap_and_restart(relay_factory, redis_server, tmp_root):
    tmp = tmp_root / "stats-restart"
    srv = relay_factory({"RELAY_MAX_REQUESTS_PER_DAY": "5"}, tmp=tmp)
    for i in range(3):
        assert post(srv, f"snap {i}").status_code == 200
    for _ in range(4):
        assert post(srv, "x", n=2).status_code == 400  # errors are recorded too
    path = tmp / "log" / "stats.json"
    assert wait_until(lambda: path.exists() and json.loads(path.read_text())["total"]["requests"] == 7, 10)
    snap = json.loads(path.read_text())
    assert set(snap) >= {"total", "cache_stats", "months"}
    month = time.strftime("%Y-%m", time.gmtime())
    day = time.strftime("%d", time.gmtime())
    assert snap["months"][month]["summary"]["requests"] == 7
    d = snap["months"][month]["days"][day]
    assert d["summary"]["requests"] == 7 and d["summary"]["successful"] == 3 and d["summary"]["errors"] == 4
    assert len(d["requests"]) == 5  # capped at max_requests_per_day
    assert snap["cache_stats"]["requests_with_cache_hits"] == 3 and snap["cache_stats"]["tokens_saved"] == 900
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # temp file + rename
    req = d["requests"][-1]
    assert set(req) >= {"id", "timestamp", "model", "stream", "input_tokens", "output_tokens", "cache_read_tokens",
                        "cache_creation_tokens", "response_time_ms", "ttft_ms", "status", "first_message"}
    srv.stop()
    # a new machine: the same log dir, an empty Redis -> history is loaded back
    again = relay_factory({"RELAY_MAX_REQUESTS_PER_DAY": "5"}, tmp=tmp, redis_url=redis_server.fresh_db())
    usage = requests.get(again.url + "/v1/usage").json()
    assert usage["total"]["requests"] == 7 and usage["total"]["successful"] == 3
    assert post(again, "after restart").status_code == 200
    assert wait_until(lambda: requests.get(again.url + "/v1/usage").json()["total"]["requests"] == 8, 5)


def test_usage_and_stats_endpoints(relay, client):
    client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "usage-probe one"}],
                                   stream=True, stream_options={"include_usage": True}).close()
    client.chat.completions.create(model="haiku", messages=[{"role": "user", "content": "usage-probe two"}])
    assert wait_until(lambda: any(r["first_message"] == "usage-probe two"
                                  for r in requests.get(relay.url + "/v1/usage/recent").json()["data"]), 5)
    u = requests.get(relay.url + "/v1/usage").json()
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert u["days"][day]["requests"] >= 2 and u["total"]["estimated_cost_usd"] > 0
    assert {"claude-sonnet-5-5"} <= set(u["models"]) and u["models"]["claude-sonnet-5-5"]["estimated_cost_usd"] > 0
    recent = requests.get(relay.url + "/v1/usage/recent?limit=5").json()["data"]
    two = next(r for r in recent if r["first_message"] == "usage-probe two")
    assert two["status"] == 200 and two["output_tokens"] > 0 and two["ttft_ms"] is not None
    assert two["estimated"] is False and two["stream"] is False
    s = requests.get(relay.url + "/stats").json()
    assert s["uptime_s"] > 0 and s["requests"]["total"] >= 2 and s["requests"]["active"] == 0
    assert set(s["requests"]) >= {"total", "completed", "errors", "active", "queued"}
    assert s["concurrency"]["max_concurrent_runs"] == 4 and s["sessions"] >= 0
    assert s["tokens"]["output_tokens"] > 0
    assert s["latency"]["p95_ms"] >= s["latency"]["avg_ms"] * 0 and s["latency"]["samples"] >= 2
    assert s["time_to_first_token"]["avg_ms"] > 0


def test_first_message_logging_can_be_turned_off(relay_factory):
    srv = relay_factory({"RELAY_STATS__LOG_FIRST_MESSAGE": "false"})
    assert post(srv, "private words").status_code == 200
    rec = requests.get(srv.url + "/v1/usage/recent").json()["data"][0]
    assert rec["first_message"] is None and rec["status"] == 200


def test_estimates_are_marked_when_the_cli_reported_nothing(relay_factory, tmp_path):
    fake = tmp_path / "claude"
    fake.write_text("#!/usr/bin/env python3\nimport sys\nif '--version' in sys.argv: print('2.1.330 (Claude Code)');"
                    " sys.exit(0)\nsys.stdin.readline(); sys.exit(1)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    srv = relay_factory({"CLAUDE_BIN": str(fake)})
    assert post(srv, "count these words please").status_code == 502
    rec = requests.get(srv.url + "/v1/usage/recent").json()["data"][0]
    assert rec["estimated"] is True and rec["input_tokens"] > 0 and rec["status"] == 502


def test_cancelled_requests_are_recorded_once(relay_factory):
    srv = relay_factory()
    import socket
    s = socket.create_connection(("127.0.0.1", srv.port))
    data = json.dumps({"model": "s", "stream": True,
                       "messages": [{"role": "user", "content": "cancel-me MOCK:slow=200 MOCK:words=50"}]}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(data)).encode() + b"\r\n\r\n" + data)
    from test_hygiene import read_until
    assert read_until(s, b"data:")
    s.close()
    assert wait_until(lambda: requests.get(srv.url + "/v1/usage").json()["total"]["cancelled"] == 1, 20)
    time.sleep(1)
    assert requests.get(srv.url + "/v1/usage").json()["total"]["requests"] == 1
    with openai_client(srv.url) as c:
        assert c.models.list()
    assert re.match(r"^\d+$", str(requests.get(srv.url + "/stats").json()["requests"]["cancelled"]))


def test_response_cache_serves_identical_requests(relay_factory, mock_api):
    srv = relay_factory({"RELAY_RESPONSE_CACHE__TTL": "60", "RELAY_RESPONSE_CACHE__MIN_TOKENS": "10"})
    body = {"model": "sonnet", "messages": [{"role": "user", "content": "rc1 a question long enough to be cached"}]}
    first = requests.post(srv.url + "/v1/chat/completions", json=body).json()
    r = requests.post(srv.url + "/v1/chat/completions", json=body)
    assert r.headers["x-relay-cache"] == "hit" and r.json()["id"] != first["id"]
    assert r.json()["choices"] == first["choices"]
    assert len(mock_api.bodies("rc1 a question")) == 1  # the second one never reached the model
    short = {"model": "sonnet", "messages": [{"role": "user", "content": "rc2"}]}  # under min_tokens
    requests.post(srv.url + "/v1/chat/completions", json=short)
    assert "x-relay-cache" not in requests.post(srv.url + "/v1/chat/completions", json=short).headers
    stream = requests.post(srv.url + "/v1/chat/completions", json=dict(body, stream=True))
    assert "x-relay-cache" not in stream.headers
    u = requests.get(srv.url + "/v1/usage").json()
    assert u["cache_stats"]["response_cache_hits"] == 1 and u["cache_stats"]["response_cache_tokens_saved"] == first["usage"]["total_tokens"]

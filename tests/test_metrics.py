"""GET /metrics: Prometheus counters and histograms kept in Redis, exact across gunicorn workers and restarts."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from harness import ROOT, wait_until
from prometheus_client.parser import text_string_to_metric_families

from relay.state.apikeys import digest

ALICE, BOB, ADMIN, SCRAPE = "sk-alice-metrics-1", "sk-bob-metrics-1", "sk-root-metrics-1", "scrape-secret-42"


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def team(relay_factory, tmp_path_factory):
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": [
        {"name": "alice", "key_sha256": digest(ALICE), "rpm": 2},
        {"name": "bob", "key": BOB, "tokens_per_day": 600},
        {"name": "root", "key_sha256": digest(ADMIN), "admin": True},
    ]}
    cfg["metrics"] = {"scrape_token": SCRAPE}
    path = tmp_path_factory.mktemp("metrics") / "config.json"
    path.write_text(json.dumps(cfg))
    return relay_factory({"RELAY_CONFIG": str(path), "RELAY_FIRST_TOKEN_TIMEOUT_S": "30"})


def chat(srv, key, text, **kw):
    return requests.post(srv.url + "/v1/chat/completions", headers=auth(key), timeout=60,
                         json={"model": "sonnet", "messages": [{"role": "user", "content": text}], **kw})


def scrape(srv, key=SCRAPE):
    r = requests.get(srv.url + "/metrics", headers=auth(key), timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for fam in text_string_to_metric_families(r.text):  # prometheus_client's own parser
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples, name, **labels):
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items()))


def recent(srv):
    return requests.get(srv.url + "/v1/usage/recent?limit=1000", headers=auth(ADMIN)).json()["data"]


def known_mix(srv):
    """Successes spread over both workers, a 400, a rate-limit 429, a quota 429, an upstream error, a timeout."""
    ok = 0
    while len({r["worker"] for r in recent(srv)}) < 2 and ok < 40:  # until both workers served some
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i, base=ok: chat(srv, ADMIN, f"mix {base} {i}"), range(4)))
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        ok += 4
    assert len({r["worker"] for r in recent(srv)}) == 2
    assert chat(srv, ADMIN, "bad", n=2).status_code == 400
    while time.gmtime().tm_sec > 45:  # alice's 2 per minute must fall into one fixed window
        time.sleep(1)
    assert chat(srv, ALICE, "alice one").status_code == 200
    assert chat(srv, ALICE, "alice two", stream=True).status_code == 200
    r = chat(srv, ALICE, "alice three")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert chat(srv, BOB, "bob one").status_code == 200   # 606 tokens: over bob's 600 a day
    r = chat(srv, BOB, "bob two")
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    r = chat(srv, ADMIN, "boom MOCK:error=500")
    assert r.status_code == 502
    r = chat(srv, ADMIN, "silence MOCK:stall=60")
    assert r.status_code == 504 and r.json()["error"]["code"] == "first_token_timeout"
    return ok


@pytest.mark.slow
def test_metrics_count_a_known_mix_exactly_across_workers_and_a_worker_restart(team):
    host = requests.get(team.url + "/health", headers=auth(ADMIN)).json()["host"]  # details need an admin key
    account = "default"  # no accounts configured: the host's own login
    ok_root = known_mix(team)
    n = ok_root + 8
    assert wait_until(lambda: len(recent(team)) == n, 10), [(r["key"], r["status"], r["error"]) for r in recent(team)]
    m = scrape(team)
    ep = "/v1/chat/completions"
    req = "relay_requests_total"
    assert total(m, req) == n
    assert total(m, req, endpoint=ep, status=200, key="root", account=account) == ok_root
    assert total(m, req, status=200, key="alice", account=account) == 2
    assert total(m, req, status=200, key="bob", account=account) == 1
    assert total(m, req, status=400, key="root", account="none", model="none") == 1
    assert total(m, req, status=429, key="alice", account="none") == 1
    assert total(m, req, status=429, key="bob", account="none") == 1
    assert total(m, req, status=502, key="root", account=account) == 1
    assert total(m, req, status=504, key="root", account=account) == 1
    assert total(m, "relay_rejections_total", reason="rate_limit", key="alice") == 1
    assert total(m, "relay_rejections_total", reason="quota", key="bob") == 1
    assert total(m, "relay_rejections_total") == 2
    assert total(m, "relay_cli_failures_total", kind="first_token_timeout") == 1
    assert total(m, "relay_cli_failures_total") == 1
    # tokens: each success is 100 input, 300 cache read, 200 cache creation (the CLI's own report)
    for kind, per in (("input", 100), ("cache_read", 300), ("cache_creation", 200)):
        assert total(m, "relay_tokens_total", type=kind, key="alice") == 2 * per
        assert total(m, "relay_tokens_total", type=kind, key="bob") == per
    usage = requests.get(team.url + "/v1/usage", headers=auth(ADMIN)).json()
    for kind in ("input", "output", "cache_read", "cache_creation"):  # failed runs add tiktoken estimates
        assert total(m, "relay_tokens_total", type=kind) == usage["total"][f"{kind}_tokens"]
        for key in ("alice", "bob", "root"):
            assert total(m, "relay_tokens_total", type=kind, key=key) == usage["keys"][key][f"{kind}_tokens"]
    assert total(m, "relay_tokens_total", type="output", key="alice") > 0
    # histograms: every request has a duration; time to first token for every run that produced output
    recs = recent(team)
    with_ttft = sum(1 for r in recs if r["ttft_ms"] is not None)
    assert with_ttft >= ok_root + 3
    assert total(m, "relay_request_duration_seconds_count") == n
    assert total(m, "relay_time_to_first_token_seconds_count") == with_ttft
    assert total(m, "relay_request_duration_seconds_bucket", le="+Inf") == n
    assert total(m, "relay_time_to_first_token_seconds_bucket", le="+Inf") == with_ttft
    assert total(m, "relay_request_duration_seconds_sum") == pytest.approx(
        sum(r["response_time_ms"] for r in recs) / 1000, abs=0.01)
    for labels, _ in m["relay_request_duration_seconds_count"]:  # buckets are cumulative
        les = [(float(lab["le"]), v) for lab, v in m["relay_request_duration_seconds_bucket"]
               if {k: lab[k] for k in ("endpoint", "model")} == labels]
        values = [v for _, v in sorted(les)]
        assert values == sorted(values)
    # gauges: nothing running, the warm pool not built yet (zeros), the host's account usable
    for name in ("relay_active_runs", "relay_queue_length", "relay_queue_oldest_wait_seconds", "relay_warm_processes",
                 "relay_warm_spares", "relay_warm_hits_total", "relay_warm_misses_total"):
        assert m[name] == [({"host": host}, 0.0)], name
    assert m["relay_max_concurrent_runs"] == [({"host": host}, 4.0)]
    assert m["relay_account_limited"] == [({"account": account}, 0.0)]
    assert m["relay_account_limited_until_timestamp_seconds"] == [({"account": account}, 0.0)]
    assert not m.get("relay_account_window_reset_timestamp_seconds")  # no window reported: no sample, never 0 %
    assert not m.get("relay_account_window_utilization")

    # a worker restart (gunicorn replaces it) loses nothing: the counts live in Redis
    before = team.worker_pids()
    os.kill(before[0], signal.SIGTERM)
    assert wait_until(lambda: before[0] not in team.worker_pids() and len(team.worker_pids()) == 2, 30)
    assert wait_until(lambda: requests.get(team.url + "/health").status_code == 200, 30)
    again = scrape(team)
    for name in ("relay_requests_total", "relay_tokens_total", "relay_rejections_total", "relay_cli_failures_total",
                 "relay_request_duration_seconds_bucket", "relay_time_to_first_token_seconds_count"):
        assert sorted(map(repr, again[name])) == sorted(map(repr, m[name])), name
    assert chat(team, ADMIN, "after restart").status_code == 200
    assert wait_until(lambda: total(scrape(team), req) == n + 1, 10)
    assert total(scrape(team, ADMIN), req, status=200, key="root") == ok_root + 1


def test_metrics_need_an_admin_key_or_the_scrape_token(team):
    url = team.url + "/metrics"
    assert requests.get(url).status_code == 401
    assert requests.get(url, headers=auth("sk-wrong")).status_code == 401
    r = requests.get(url, headers=auth(BOB))
    assert r.status_code == 403 and "relay_" not in r.text
    assert requests.get(url, headers=auth(ADMIN)).status_code == 200
    assert requests.get(url, headers=auth(SCRAPE)).status_code == 200
    # the scrape token opens /metrics only, not the dashboard's data
    assert requests.get(team.url + "/dashboard/data", headers=auth(SCRAPE)).status_code == 401
    assert SCRAPE not in team.log() and ADMIN not in team.log()


def test_without_auth_metrics_answer_only_this_machine(relay_factory):
    srv = relay_factory()
    assert requests.get(srv.url + "/metrics").status_code == 200
    # through a (trusted, local) proxy for a remote client: refused
    r = requests.get(srv.url + "/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
    assert r.status_code == 403 and "relay_" not in r.text
    assert requests.get(srv.url + "/dashboard/data", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 403
    tok = relay_factory({"RELAY_METRICS__SCRAPE_TOKEN": SCRAPE})
    assert requests.get(tok.url + "/metrics").status_code == 401
    assert requests.get(tok.url + "/metrics", headers=auth(SCRAPE)).status_code == 200


@pytest.mark.slow
def test_live_gauges_show_running_and_waiting_requests(relay_factory):
    srv = relay_factory({"RELAY_MAX_CONCURRENT_RUNS": "1", "RELAY_QUEUE_TIMEOUT_S": "60"})
    slow = "live MOCK:slow=400 MOCK:words=40"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(requests.post, srv.url + "/v1/chat/completions", timeout=120,
                            json={"model": "sonnet", "stream": True, "messages": [{"role": "user", "content": slow}]})
        assert wait_until(lambda: total(scrape(srv), "relay_active_runs") == 1, 60)
        second = pool.submit(requests.post, srv.url + "/v1/chat/completions", timeout=120,
                             json={"model": "haiku", "messages": [{"role": "user", "content": "waits"}]})
        assert wait_until(lambda: total(scrape(srv), "relay_queue_length") == 1, 30)
        assert wait_until(lambda: total(scrape(srv), "relay_queue_oldest_wait_seconds") > 0, 10)
        live = requests.get(srv.url + "/dashboard/data").json()["live"]
        assert live["active_runs"] == 1 and live["queued"] == 1 and live["oldest_wait_s"] > 0
        assert [(r["model"], r["endpoint"], r["stream"]) for r in live["runs"]] == [("sonnet", "/v1/chat/completions", True)]
        assert first.result().status_code == 200 and second.result().status_code == 200
    m = scrape(srv)
    assert total(m, "relay_active_runs") == 0 and total(m, "relay_queue_length") == 0
    assert total(m, "relay_queue_oldest_wait_seconds") == 0 and total(m, "relay_requests_total", status=200) == 2
    assert requests.get(srv.url + "/dashboard/data").json()["live"]["runs"] == []


def test_a_record_adds_to_the_right_bucket_and_labels():
    from relay.core.metrics import record_updates
    from relay.core.record import RequestRecord

    up = record_updates(RequestRecord(id="a", request_id="r", key="k", model="m", status=200, endpoint="/e",
                                      account="acc", input_tokens=5, ttft_ms=300, response_time_ms=7000))
    assert up[("requests", '["/e","200","m","k","acc"]')] == 1
    assert up[("tokens", '["input","m","k","acc"]')] == 5 and ("tokens", '["output","m","k","acc"]') not in up
    assert up[("time_to_first_token_seconds", '["/e","m","le","0.5"]')] == 1
    assert up[("request_duration_seconds", '["/e","m","le","10.0"]')] == 1
    assert up[("request_duration_seconds", '["/e","m","sum"]')] == 7.0
    assert isinstance(up[("request_duration_seconds", '["/e","m","sum"]')], float)  # whole seconds too
    assert all(isinstance(v, int) for (fam, f), v in up.items() if not f.endswith('"sum"]'))
    refused = record_updates(RequestRecord(id="b", request_id="r", status=429, error="insufficient_quota"))
    assert refused[("rejections", '["quota","none"]')] == 1
    upstream_429 = record_updates(RequestRecord(id="c", request_id="r", status=429, account="acc",
                                                error="rate_limit_exceeded"))
    assert not [k for k in upstream_429 if k[0] == "rejections"]  # the subscription's 429 is not the relay's refusal
    crash = record_updates(RequestRecord(id="d", request_id="r", status=502, account="acc", error="cli_crashed"))
    assert crash[("cli_failures", '["crash"]')] == 1


def test_charts_escape_names_and_use_no_style_attributes():
    from relay.core.charts import meter, stacked_bars

    svg = stacked_bars("t", ["a", "b"], {"<script>x</script>": [1, 2], "ok": [0, 3]})
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "style=" not in svg and svg.count("<rect") >= 3
    m = meter('"><img src=x>', 50, 100)
    assert "<img" not in m and "style=" not in m


def test_the_store_adds_whole_and_fractional_seconds_to_one_sum(redis_server):
    import redis

    from relay.core.metrics import Live, WarmStats, families
    from relay.core.record import RequestRecord
    from relay.state.metrics import MetricsStore

    store = MetricsStore(redis.Redis.from_url(redis_server.fresh_db(), decode_responses=True))
    for ms in (5000, 2345, 7000):  # a whole first sum must not make the field an integer for HINCRBY
        store.record(RequestRecord(id="x", request_id="x", status=200, endpoint="/e", model="m", ttft_ms=ms,
                                   response_time_ms=ms))
    stored = store.counters()
    assert stored["request_duration_seconds"]['["/e","m","sum"]'] == pytest.approx(14.345)
    assert stored["requests"] == {'["/e","200","m","none","none"]': 3.0}
    fam = {f.name: f for f in families(stored, Live("h", 0, 1, 0, 0.0, WarmStats(), []))}
    buckets = {s.labels["le"]: s.value for s in fam["relay_request_duration_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["2.5"] == 1 and buckets["5.0"] == 2 and buckets["10.0"] == 3 and buckets["+Inf"] == 3

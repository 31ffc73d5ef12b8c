"""Redis memory (issue 20, item 2): refusals with made-up paths and model ids leave Redis and /metrics
bounded; the private Redis never evicts, so a full Redis answers 503 `redis_full` and keeps every limit."""

import json
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from harness import ROOT, anthropic_client, free_port, openai_client, redis_server_binary, wait_until

from relay.core.record import RequestRecord
from relay.state.labels import MODELS, OTHER, ModelLabels
from relay.state.metrics import MetricsStore
from relay.state.stats import S, Stats

TIGHT, ROOMY, BOSS = "sk-mem-tight-1", "sk-mem-roomy-1", "sk-mem-boss-1"
MAXMEMORY_MB = 8


def write_config(path, keys, **extra):
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": keys}
    cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2))
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def small(relay_factory):
    """A relay on its own private Redis (as `make run` starts it) with maxmemory 8 MB; `tight` may make
    2 requests a minute."""
    srv = relay_factory({"REDIS_URL": "", "RELAY_REDIS_MAXMEMORY_MB": str(MAXMEMORY_MB)}, start=False)
    path = write_config(srv.tmp / "config.json", [{"name": "tight", "key": TIGHT, "rpm": 2},
                                                  {"name": "roomy", "key": ROOMY},
                                                  {"name": "boss", "key": BOSS, "admin": True}])
    srv.env["RELAY_CONFIG"] = str(path)
    srv.start()
    srv.redis = redis.Redis(unix_socket_path=str(srv.tmp / "var" / "redis.sock"), decode_responses=True)
    return srv


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def refusals(srv, n):
    """`n` requests of `tight` with random 8 KB paths (8,000 characters: gevent refuses a longer request line with 414) and random pinned model ids; their statuses."""
    def one(i):
        if i % 2:
            r = requests.get(f"{srv.url}/v1/responses/{secrets.token_hex(4000)}", headers=auth(TIGHT), timeout=60)
        else:
            model = f"claude-{secrets.token_hex(30)}-20250101"
            r = requests.post(srv.url + "/v1/chat/completions", headers=auth(TIGHT), timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "mem1 MOCK:error=404"}]})
        return r.status_code
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def metrics_size(srv):
    r = requests.get(srv.url + "/metrics", headers=auth(BOSS), timeout=30)
    assert r.status_code == 200
    return len(r.content)


def used_memory(srv):
    return int(srv.redis.info("memory")["used_memory"])


def test_the_private_redis_never_evicts(small):
    assert small.redis.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert small.redis.config_get("maxmemory")["maxmemory"] == str(MAXMEMORY_MB * 1024 * 1024)


def test_a_thousand_refusals_with_made_up_paths_and_models_leave_redis_and_metrics_bounded(small):
    for _ in range(2):  # the minute's two allowed requests (a 404: no such stored response)
        requests.get(f"{small.url}/v1/responses/resp_none", headers=auth(TIGHT), timeout=30)
    m0, k0, size0 = used_memory(small), small.redis.dbsize(), metrics_size(small)
    first = refusals(small, 1000) + refusals(small, 1000)  # fills every capped list (latencies keep 2,000)
    m1, k1, size1 = used_memory(small), small.redis.dbsize(), metrics_size(small)
    second = refusals(small, 1000)
    m2, k2, size2 = used_memory(small), small.redis.dbsize(), metrics_size(small)
    print(f"used_memory {m0} -> {m1} -> {m2}; keys {k0} -> {k1} -> {k2}; /metrics {size0} -> {size1} -> {size2}")
    statuses = first + second
    assert 500 not in statuses and statuses.count(429) >= len(statuses) - 12  # a new minute lets 2 more in
    # the first thousand fill the capped request lists (the recent list, the day's list); the second
    # thousand add nothing that stays
    assert m1 - m0 < 3 * 1024 * 1024 and m2 - m1 < 256 * 1024, (m0, m1, m2)
    assert k1 - k0 <= 40 and k2 <= k1 + 3  # a fixed set of totals, lists and hashes (a lock or lease may come and go)
    assert size1 - size0 < 4096 and size2 - size1 < 1024
    body = requests.get(small.url + "/metrics", headers=auth(BOSS), timeout=30).text
    assert 'endpoint="/v1/responses/<rid>"' in body
    assert not [line for line in body.splitlines() if "20250101" in line]
    assert not small.redis.keys(S + "model:claude-*")
    recent = requests.get(small.url + "/v1/usage/recent?limit=1000", headers=auth(BOSS), timeout=30).json()
    rows = recent["data"]
    assert len(rows) == 1000 and all(len(json.dumps(row)) < 2048 for row in rows)  # no 8 KB path in any request's record


def test_pinned_model_ids_that_fail_upstream_count_as_other(small):
    models = [f"claude-{secrets.token_hex(8)}-2025010{i}" for i in range(4)]
    for model in models:
        r = requests.post(small.url + "/v1/chat/completions", headers=auth(ROOMY), timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "mem2 MOCK:error=404"}]})
        assert r.status_code not in (200, 500) and r.json()["error"]["message"]
    body = requests.get(small.url + "/metrics", headers=auth(BOSS), timeout=30).text
    assert not [m for m in models if m in body]
    assert 'model="other"' in body
    assert not [m for m in models if small.redis.exists(S + "model:" + m)]
    assert not set(models) & small.redis.smembers(S + "models") and not set(models) & small.redis.smembers(MODELS)
    usage = requests.get(small.url + "/v1/usage", headers=auth(BOSS), timeout=30).json()
    assert OTHER in usage["models"] and not set(models) & set(usage["models"])


def test_a_pinned_model_that_answers_is_counted_under_its_own_name(small):
    model = f"claude-sonnet-{secrets.token_hex(4)}-20250101"
    r = requests.post(small.url + "/v1/chat/completions", headers=auth(ROOMY), timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "mem3"}]})
    assert r.status_code == 200
    body = requests.get(small.url + "/metrics", headers=auth(BOSS), timeout=30).text
    assert f'model="{model}"' in body and model in small.redis.smembers(MODELS)


def test_model_labels_admit_only_models_that_answered_and_only_up_to_the_cap(redis_server):
    r = redis.Redis.from_url(redis_server.fresh_db(), decode_responses=True)
    labels = ModelLabels(r, {"sonnet", "claude-sonnet-4"}, cap=5)
    assert labels.label("sonnet", False) == "sonnet" and labels.label("none", False) == "none"
    assert labels.label("claude-made-up-20250101", False) == OTHER  # refused: never a label
    answered = [labels.label(f"claude-m{i}-20250101", True) for i in range(20)]
    assert answered[:5] == [f"claude-m{i}-20250101" for i in range(5)] and set(answered[5:]) == {OTHER}
    assert r.scard(MODELS) == 5
    again = ModelLabels(r, set(), cap=5)  # another worker: the same labels
    assert again.label("claude-m3-20250101", False) == "claude-m3-20250101"


def test_stats_and_metrics_stay_bounded_for_a_thousand_model_ids(redis_server, tmp_path):
    r = redis.Redis.from_url(redis_server.fresh_db(), decode_responses=True)
    labels = ModelLabels(r, {"sonnet"}, cap=3)
    stats, metrics = Stats(r, tmp_path / "stats.json", 10, False, {}, request_days=2), MetricsStore(r)
    sizes = []
    for i in range(1000):
        rec = RequestRecord(id=f"r{i}", request_id=f"r{i}", model=f"claude-x{i}-20250101", status=200 if i % 2 else 404,
                            endpoint="/v1/chat/completions", response_time_ms=5)
        label = labels.label(rec.model, rec.status == 200)
        stats.record(rec.as_dict(), label)
        metrics.record(RequestRecord(**dict(rec.as_dict(), model=label)))
        if i in (99, 999):
            sizes.append((r.dbsize(), sum(r.hlen(k) for k in r.keys(PREFIX_ALL) if r.type(k) == "hash")))
    assert sizes[0] == sizes[1], sizes  # past the first few, no new key and no new field
    assert len(r.smembers(S + "models")) == 4  # three admitted, and "other"
    day_lists = r.keys(S + "req:*")
    assert day_lists and all(0 < r.ttl(k) <= 2 * 86400 for k in day_lists)
    assert all(0 < r.ttl(k) for k in r.keys(S + "day:*:model:*"))


PREFIX_ALL = "relay:*"


def test_a_full_redis_answers_503_in_the_clients_shape_and_keeps_the_limits(small):
    r = small.redis
    for _ in range(3):
        requests.get(f"{small.url}/v1/responses/resp_none", headers=auth(TIGHT), timeout=30)
    windows = {k: r.get(k) for k in r.keys("*relay-limits*")}
    assert any("tight" in k for k in windows), windows
    filled = 0
    try:  # fill what is left with data that has no TTL, until Redis refuses
        while True:
            r.set(f"junk:{filled}", "x" * 10000)
            filled += 1
    except redis.exceptions.OutOfMemoryError:
        pass
    try:
        statuses = refusals(small, 50)
        assert set(statuses) <= {429, 503}, statuses
        r.config_set("maxmemory", "1")  # certainly full now
        with pytest.raises(Exception) as oa:
            openai_client(small.url, TIGHT).chat.completions.create(
                model="sonnet", messages=[{"role": "user", "content": "mem4"}])
        assert getattr(oa.value, "status_code", None) == 503 and oa.value.body["code"] == "redis_full"
        with pytest.raises(Exception) as an:
            anthropic_client(small.url, ROOMY, max_retries=0).messages.create(
                model="sonnet", max_tokens=50, messages=[{"role": "user", "content": "mem5"}])
        assert getattr(an.value, "status_code", None) == 503
        assert an.value.body["error"]["type"] == "api_error"
        raw = requests.get(f"{small.url}/v1/responses/resp_none", headers=auth(TIGHT), timeout=30)
        assert raw.status_code == 503 and raw.headers["Retry-After"] and raw.json()["error"]["code"] == "redis_full"
    finally:
        r.config_set("maxmemory", f"{MAXMEMORY_MB}mb")
        for start in range(0, filled, 500):
            r.delete(*[f"junk:{i}" for i in range(start, min(filled, start + 500))])
    assert int(r.info("stats")["evicted_keys"]) == 0
    for k, v in windows.items():  # every window survived the full Redis, with at least its count
        assert r.get(k) is not None and int(r.get(k)) >= int(v), k
    again = requests.get(f"{small.url}/v1/responses/resp_none", headers=auth(TIGHT), timeout=30)
    assert again.status_code == 429
    assert requests.get(f"{small.url}/v1/responses/resp_none", headers=auth(ROOMY), timeout=30).status_code == 404


def test_check_warns_about_an_external_redis_that_may_evict(tmp_path):
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path), "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    env = dict(os.environ, REDIS_URL=url, RELAY_CONFIG=str(ROOT / "config.json"), PYTHONPATH=str(ROOT))
    try:
        assert wait_until(lambda: _answers(r))
        out = subprocess.run([sys.executable, "-m", "relay", "check"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert "maxmemory-policy is volatile-lru" in out.stderr and "noeviction" in out.stderr
        r.config_set("maxmemory-policy", "noeviction")
        out = subprocess.run([sys.executable, "-m", "relay", "check"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert "maxmemory-policy" not in out.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(r):
    try:
        return r.ping()
    except redis.ConnectionError:
        return False

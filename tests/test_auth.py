"""API keys, per-key limits and quotas, admin routes, revocation — across real gunicorn workers."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from harness import ROOT, openai_client, wait_until

from relay.state.apikeys import digest

ALICE, BOB, ADMIN, PLAIN = "sk-alice-0123456789", "sk-bob-0123456789", "sk-admin-0123456789", "sk-plain-key-1"


def keys_config(tmp, extra=None, alice_rpm=3):
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": [
        PLAIN,
        {"name": "alice", "key_sha256": digest(ALICE), "rpm": alice_rpm, "tokens_per_day": 2000, "max_concurrent": 1,
         "models": ["sonnet", "haiku"]},
        {"name": "bob", "key": BOB},
        {"name": "root", "key_sha256": digest(ADMIN), "admin": True},
    ]}
    cfg.update(extra or {})
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="module")
def team(relay_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    path = keys_config(tmp)
    return relay_factory({"RELAY_CONFIG": str(path)})


def call(srv, key, text="hi", model="sonnet", header="bearer", **kw):
    headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"x-api-key": key}
    return requests.post(srv.url + "/v1/chat/completions", headers=headers, timeout=60,
                         json={"model": model, "messages": [{"role": "user", "content": text}], **kw})


def test_every_v1_route_needs_a_valid_key_but_health_does_not(team):
    assert requests.get(team.url + "/health").status_code == 200
    for path in ("/v1/models", "/v1/usage"):
        r = requests.get(team.url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        r = requests.get(team.url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai_client(team.url, api_key="nope").models.list()
    assert openai_client(team.url, api_key=BOB).models.list()
    assert requests.get(team.url + "/v1/models", headers={"x-api-key": PLAIN}).status_code == 200


def test_keys_are_never_logged(team):
    call(team, BOB, "log-probe")
    call(team, "sk-wrong-secret-999", "log-probe")
    log = team.log()
    assert BOB not in log and "sk-wrong-secret-999" not in log and "key=bob" in log


def test_model_restrictions(team):
    assert call(team, ALICE, "allowed", model="claude-haiku-4").status_code == 200
    r = call(team, ALICE, "forbidden", model="opus")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_admin_routes_and_own_usage(team):
    call(team, BOB, "bob-usage-1")
    assert requests.get(team.url + "/stats", headers={"Authorization": f"Bearer {BOB}"}).status_code == 403
    assert requests.get(team.url + "/v1/sessions", headers={"Authorization": f"Bearer {BOB}"}).status_code == 403
    assert requests.get(team.url + "/stats", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert requests.get(team.url + "/v1/sessions", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    mine = requests.get(team.url + "/v1/usage", headers={"Authorization": f"Bearer {BOB}"}).json()
    assert set(mine["keys"]) == {"bob"} and mine["models"] == {}
    everyone = requests.get(team.url + "/v1/usage", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert {"bob"} <= set(everyone["keys"])
    recent = requests.get(team.url + "/v1/usage/recent", headers={"Authorization": f"Bearer {BOB}"}).json()["data"]
    assert recent and {r["key"] for r in recent} == {"bob"}


def test_conversations_are_private_to_each_key(team):
    h = {"X-Session-Id": "shared-name"}
    a = requests.post(team.url + "/v1/chat/completions", headers=dict(h, Authorization=f"Bearer {BOB}"),
                      json={"model": "s", "messages": [{"role": "user", "content": "bob secret PASSWORD-1"}]}).json()
    r = requests.post(team.url + "/v1/chat/completions", headers=dict(h, Authorization=f"Bearer {PLAIN}"), json={
        "model": "s", "messages": [{"role": "user", "content": "bob secret PASSWORD-1"},
                                   {"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                                   {"role": "user", "content": "what was it?"}]})
    assert r.status_code == 200
    rec = requests.get(team.url + "/v1/usage/recent", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"][0]
    assert rec["resumed"] is False  # another key never continues bob's session
    convs = requests.get(team.url + "/v1/sessions", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert {c["scope"] for c in convs if c["id"] == "s:shared-name"} == {"bob", "key-" + digest(PLAIN)[:8]}


def test_per_key_rpm_is_independent_and_has_headers(relay_factory, tmp_path):
    srv = relay_factory({"RELAY_CONFIG": str(keys_config(tmp_path))})
    first = call(srv, ALICE, "rpm-1")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert first.headers["x-ratelimit-limit-tokens"] == "2000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 2000 - 606  # after charging this request
    assert call(srv, ALICE, "rpm-2").status_code == 200 and call(srv, ALICE, "rpm-3").status_code == 200
    r = call(srv, ALICE, "rpm-4")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 60 and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert "this API key" in r.json()["error"]["message"]
    assert call(srv, BOB, "bob unaffected").status_code == 200  # others are independent


def test_token_quota_is_checked_before_and_charged_with_actual_usage(relay_factory, tmp_path):
    srv = relay_factory({"RELAY_CONFIG": str(keys_config(tmp_path, alice_rpm=100))})
    r = call(srv, ALICE, "q1")
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 606
    # charged with what the CLI reported (606), not with the estimate
    assert int(call(srv, ALICE, "q2").headers["x-ratelimit-remaining-tokens"]) == 2000 - 606 * 2
    assert call(srv, ALICE, "q3").status_code == 200  # 1818 used
    r = call(srv, ALICE, "q4 " + "word " * 400)  # estimate exceeds what is left
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    assert r.json()["error"]["type"] == "insufficient_quota" and r.headers["x-should-retry"] == "false"
    assert int(r.headers["Retry-After"]) > 0
    assert call(srv, BOB, "bob has no quota").status_code == 200


def test_global_token_quota(relay_factory):
    srv = relay_factory({"RELAY_RATE_LIMIT__MAX_TOKENS_PER_DAY": "1000"})
    assert requests.post(srv.url + "/v1/chat/completions", json={"model": "s", "messages": [
        {"role": "user", "content": "g1"}]}).status_code == 200
    r = requests.post(srv.url + "/v1/chat/completions", json={"model": "s", "messages": [
        {"role": "user", "content": "g2 " + "word " * 500}]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


def test_per_key_concurrency(relay_factory, tmp_path):
    srv = relay_factory({"RELAY_CONFIG": str(keys_config(tmp_path, alice_rpm=100)), "RELAY_QUEUE_TIMEOUT_S": "0.3"})
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(call, srv, ALICE, "conc MOCK:slow=100 MOCK:words=30")
        assert wait_until(lambda: running_cli(srv), 20)  # alice's first run holds her only slot
        second = call(srv, ALICE, "conc second")
        bob = call(srv, BOB, "bob at the same time")
        assert slow.result().status_code == 200
    assert second.status_code == 429 and "at once" in second.json()["error"]["message"]
    assert bob.status_code == 200


def running_cli(srv):
    import psutil
    return [c for w in srv.worker_pids() for c in psutil.Process(w).children()
            if c.status() != psutil.STATUS_ZOMBIE and "--input-format" in c.cmdline()]


def test_burst_across_four_workers_admits_no_more_than_the_limit(relay_factory):
    srv = relay_factory({"RELAY_WORKERS": "4", "RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE": "20",
                         "RELAY_MAX_CONCURRENT_RUNS": "20"})
    # invalid bodies are cheap but still pass the limiter first
    with ThreadPoolExecutor(60) as pool:
        codes = list(pool.map(lambda i: requests.post(srv.url + "/v1/chat/completions", json={"n": 2}).status_code,
                              range(200)))
    assert codes.count(429) == 180 and codes.count(400) == 20


def test_per_ip_limit_when_auth_is_off_honours_trusted_proxies(relay_factory):
    srv = relay_factory({"RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE_PER_IP": "2", "RELAY_TRUSTED_PROXIES": '["127.0.0.1"]'})
    bad = {"model": "s", "messages": []}

    def post(xff):
        return requests.post(srv.url + "/v1/chat/completions", json=bad, headers={"X-Forwarded-For": xff}).status_code
    assert [post("203.0.113.5") for _ in range(3)] == [400, 400, 429]
    assert post("203.0.113.6") == 400  # another client behind the same proxy
    assert post("198.51.100.1, 203.0.113.5") == 429  # the proxy appended the real client last
    srv2 = relay_factory({"RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE_PER_IP": "2", "RELAY_TRUSTED_PROXIES": "[]"})
    codes = [requests.post(srv2.url + "/v1/chat/completions", json=bad,
                           headers={"X-Forwarded-For": f"10.9.9.{i}"}).status_code for i in range(3)]
    assert codes == [400, 400, 429]  # an untrusted peer cannot pick its own address


def test_keys_cli_add_list_revoke(relay_factory, tmp_path, redis_server):
    path = keys_config(tmp_path)
    srv = relay_factory({"RELAY_CONFIG": str(path)})
    env = dict(srv.env, RELAY_CONFIG=str(path))
    out = subprocess.run([sys.executable, "-m", "relay", "keys", "add", "carol", "--rpm", "5"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    key = out.stdout.strip()
    assert key.startswith("sk-relay-") and key not in path.read_text()
    entry = next(k for k in json.loads(path.read_text())["auth"]["api_keys"] if isinstance(k, dict) and k["name"] == "carol")
    assert entry["key_sha256"] == digest(key) and entry["rpm"] == 5
    assert wait_until(lambda: call(srv, key, "carol here").status_code == 200, 5)
    listed = subprocess.run([sys.executable, "-m", "relay", "keys", "list"], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True).stdout
    assert "carol" in listed and key not in listed
    subprocess.run([sys.executable, "-m", "relay", "keys", "revoke", "carol"], cwd=ROOT, env=env, check=True)
    # every worker refuses it within seconds
    assert wait_until(lambda: all(call(srv, key, "x").status_code == 401 for _ in range(6)), 5)


def test_api_keys_env(relay_factory):
    srv = relay_factory({"RELAY_AUTH__ENABLED": "true", "API_KEYS": "envkey-1,envkey-2"})
    assert call(srv, "envkey-2", "env key").status_code == 200
    assert call(srv, "envkey-3", "env key").status_code == 401
    assert os.environ.get("API_KEYS") is None

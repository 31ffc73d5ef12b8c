"""Users coming from the original relay (issue 10, items 1, 9, 10): its config.json starts the relay with
its prompt-caching meaning, its environment variables work, and log/stats.json keeps its schema."""

import json
import re
import subprocess
import sys
import time

import requests
from harness import ROOT, RelayServer, default_cli_bin, relay_env, wait_until

from relay.config import load_settings

# The original relay's config.json (the seed's own file): `cache` is Anthropic prompt caching.
ORIGINAL_CONFIG = {
    "port": 3456, "claude_bin": "claude", "default_model": "sonnet", "system_prompt_mode": "replace",
    "max_concurrent_runs": 4, "max_requests_per_day": 1000, "cache": {"ttl": "5m", "min_tokens": 1024},
    "rate_limit": {"max_requests_per_minute": 60, "max_tokens_per_day": 0},
    "auth": {"enabled": False, "api_keys": []}, "sessions": {"enabled": True, "ttl_hours": 24},
    "stats": {"log_first_message": True},
}

# The shape of the original relay's log/stats.json (every key it had, with its type).
ORIGINAL_STATS_EXAMPLE = {
    "total": {"requests": 20, "input_tokens": 1200, "output_tokens": 340, "cache_read_tokens": 900,
              "cache_write_tokens": 400},
    "cache_stats": {"cache_hits": 9, "total_requests": 20, "hit_rate": "45.00"},
    "months": {"2026-02": {
        "summary": {"requests": 20, "input_tokens": 1200, "output_tokens": 340, "cache_read_tokens": 900,
                    "cache_write_tokens": 400},
        "days": {"24": {
            "summary": {"requests": 20, "input_tokens": 1200, "output_tokens": 340, "cache_read_tokens": 900,
                        "cache_write_tokens": 400},
            "requests": [{"timestamp": "2026-02-24T12:00:00.000Z", "model": "claude-sonnet-4", "stream": True,
                          "input_tokens": 60, "output_tokens": 17, "cache_read_input_tokens": 45,
                          "cache_creation_input_tokens": 20, "response_time_ms": 2300,
                          "first_message": "Hello"}]}}}},
}


def same_shape(example, actual, path="$"):
    """Every key of `example` is in `actual` with the same JSON type (extra keys are fine)."""
    problems = []
    if isinstance(example, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {type(actual).__name__}"]
        for k, v in example.items():
            if k not in actual:
                problems.append(f"{path}.{k}: missing")
            elif path.endswith(("months", "days")):  # the month and day names vary
                pass
            else:
                problems += same_shape(v, actual[k], f"{path}.{k}")
        if path.endswith(("months", "days")) and actual:
            sample = next(iter(example.values()))
            for k, v in actual.items():
                problems += same_shape(sample, v, f"{path}.{k}")
            problems = [p for p in problems if not p.endswith(": missing")]
        return problems
    if isinstance(example, list):
        if not isinstance(actual, list) or not actual:
            return [f"{path}: expected a non-empty list"]
        return [p for item in actual for p in same_shape(example[0], item, f"{path}[]")]
    kind = {bool: (bool,), int: (int,), str: (str,), float: (int, float)}[type(example)]
    if not isinstance(actual, kind) or (isinstance(actual, bool) and bool not in kind):
        return [f"{path}: expected {type(example).__name__}, got {actual!r}"]
    return []


def test_stats_json_keeps_the_original_relays_schema(relay_factory, tmp_root):
    tmp = tmp_root / "original-stats"
    srv = relay_factory({"RELAY_MAX_REQUESTS_PER_DAY": "3"}, tmp=tmp)
    base = {"model": "sonnet", "messages": [{"role": "user", "content": "mig1 hello"}]}
    assert requests.post(srv.url + "/v1/chat/completions", json=base).status_code == 200
    assert requests.post(srv.url + "/v1/chat/completions", json=dict(base, stream=True)).status_code == 200
    for _ in range(2):
        assert requests.post(srv.url + "/v1/chat/completions", json=dict(base, n=3)).status_code == 400
    path = tmp / "log" / "stats.json"
    assert wait_until(lambda: path.exists() and json.loads(path.read_text())["total"]["requests"] == 4, 15)
    snap = json.loads(path.read_text())
    assert same_shape(ORIGINAL_STATS_EXAMPLE, snap) == []
    assert snap["total"]["cache_write_tokens"] == 400  # two runs, 200 cache-creation tokens each
    assert snap["cache_stats"] == dict(snap["cache_stats"], cache_hits=2, total_requests=4, hit_rate="50.00")
    day = snap["months"][time.strftime("%Y-%m", time.gmtime())]["days"][time.strftime("%d", time.gmtime())]
    assert len(day["requests"]) == 3  # max_requests_per_day records per day
    done = [r for r in day["requests"] if r["status"] == 200]
    assert done and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["timestamp"]) for r in day["requests"])
    assert {r["stream"] for r in done} == {True} and done[0]["cache_read_input_tokens"] == 300
    assert done[0]["cache_creation_input_tokens"] == 200 and done[0]["first_message"] == "mig1 hello"


def test_the_original_config_file_starts_the_relay(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ORIGINAL_CONFIG))
    s = load_settings(path, env={})
    assert s["cache.ttl"] == "5m" and s["cache.min_tokens"] == 1024 and s["response_cache.ttl"] == 0
    env = {"RELAY_CONFIG": str(path), "PATH": "/usr/bin:/bin", "CLAUDE_BIN": default_cli_bin(), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "relay", "check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    # a number where the prompt-cache lifetime belongs says where the response cache went
    path.write_text(json.dumps(dict(ORIGINAL_CONFIG, cache={"ttl": 60})))
    out = subprocess.run([sys.executable, "-m", "relay", "check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "response_cache.ttl" in out.stderr


def _cache_controls(body):
    blocks = list(body.get("system") or [])
    for msg in body["messages"]:
        blocks += msg["content"] if isinstance(msg["content"], list) else []
    return [b["cache_control"] for b in blocks if isinstance(b, dict) and b.get("cache_control")]


def test_cache_settings_are_prompt_caching_at_the_model(relay_factory, redis_server, mock_api, cli_bin, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ORIGINAL_CONFIG))
    # a subscription login (OAuth token): the CLI's own default there is the 1-hour cache
    env = relay_env(redis_server.fresh_db(), cli_bin, mock_api.url, tmp_path, {"RELAY_CONFIG": str(path)})
    env.pop("ANTHROPIC_API_KEY")
    env["CLAUDE_CODE_OAUTH_TOKEN"] = "sk-ant-oat01-test"
    srv = RelayServer(tmp_path, env).start()
    long_system = "mig2 policy. " + "Follow every rule carefully and be precise. " * 300  # > 1024 tokens

    def ask(server, system, text):
        r = requests.post(server.url + "/v1/chat/completions", timeout=120, json={"model": "sonnet", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": text}]})
        assert r.status_code == 200
        return mock_api.bodies(text)[-1]
    try:
        assert _cache_controls(ask(srv, "Be brief.", "mig2 short prompt")) == []  # under min_tokens: no cache writes
        controls = _cache_controls(ask(srv, long_system, "mig2 long prompt"))
        assert controls and all(c == {"type": "ephemeral"} for c in controls)  # "5m" means 5 minutes
    finally:
        srv.stop()
    hour = relay_factory({"RELAY_CONFIG": str(path), "RELAY_CACHE__TTL": "1h"})  # an API key: 5m by default
    controls = _cache_controls(ask(hour, long_system, "mig2 hour prompt"))
    assert controls and all(c == {"type": "ephemeral", "ttl": "1h"} for c in controls)


def test_the_seed_relays_environment_variables_are_aliases(tmp_path):
    cfg = ROOT / "config.json"
    s = load_settings(cfg, env={"CLAUDE_PROXY_MODELS": "claude-opus-4-1, my-model", "SYSTEM_PROMPT_MODE": "append",
                                "LOG_LEVEL": "warn", "API_KEYS": "k1"})
    assert [m if isinstance(m, str) else m["id"] for m in s["extra_models"]] == ["claude-opus-4-1", "my-model"]
    assert s["system_prompt_mode"] == "append" and s["log_level"] == "warning" and s["auth.api_keys"] == ["k1"]
    assert load_settings(cfg, env={"LOG_LEVEL": "DEBUG"})["log_level"] == "debug"
    assert load_settings(cfg, env={"LOG_LEVEL": "error"})["log_level"] == "error"
    assert load_settings(cfg, env={"DEBUG": "true"})["log_level"] == "debug"
    assert load_settings(cfg, env={"DEBUG": "express:*"})["log_level"] == "info"
    # the relay's own names win over the legacy ones
    assert load_settings(cfg, env={"SYSTEM_PROMPT_MODE": "append", "RELAY_SYSTEM_PROMPT_MODE": "embed"})[
        "system_prompt_mode"] == "embed"
    ops = (ROOT / "docs" / "operations.md").read_text()
    migration = ops[ops.index("## Migrating"):]
    for name in ("CLAUDE_PROXY_MODELS", "SYSTEM_PROMPT_MODE", "LOG_LEVEL", "DEBUG", "API_KEYS", "cache.ttl",
                 "response_cache.ttl"):
        assert name in migration, name


def test_legacy_model_list_reaches_the_model_list(relay_factory):
    srv = relay_factory({"CLAUDE_PROXY_MODELS": "mig3-model"})
    ids = [m["id"] for m in requests.get(srv.url + "/v1/models").json()["data"]]
    assert "mig3-model" in ids

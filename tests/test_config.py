"""Settings: defaults, the JSON file, environment overrides and clear start-up errors."""

import json
import subprocess
import sys

import pytest

from relay.config import SCHEMA, ConfigError, load_settings

ROOT_CONFIG = __import__("pathlib").Path(__file__).resolve().parent.parent / "config.json"


def test_config_json_holds_the_documented_defaults():
    s = load_settings(ROOT_CONFIG, env={})
    assert s["port"] == 3456 and s["host"] == "127.0.0.1"
    assert s["system_prompt_mode"] == "replace"
    for key in ("max_requests_per_day", "cache.ttl", "cache.min_tokens", "rate_limit.max_requests_per_minute",
                "rate_limit.max_tokens_per_day", "auth.enabled", "auth.api_keys", "workers", "claude_bin",
                "default_model", "extra_models", "max_concurrent_runs", "first_token_timeout_s",
                "idle_timeout_s", "total_timeout_s", "cli_max_retries"):
        assert key in s


def test_env_overrides_nested_keys_and_conventional_names(tmp_path):
    env = {"RELAY_PORT": "4000", "RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE": "5", "REDIS_URL": "redis://x:1/2",
           "CLAUDE_BIN": "/opt/claude", "RELAY_AUTH__ENABLED": "true", "API_KEYS": "k1, k2"}
    s = load_settings(ROOT_CONFIG, env=env)
    assert s["port"] == 4000 and s["rate_limit.max_requests_per_minute"] == 5
    assert s["redis_url"] == "redis://x:1/2" and s["claude_bin"] == "/opt/claude"
    assert s["auth.enabled"] is True and s["auth.api_keys"][-2:] == ["k1", "k2"]
    assert load_settings(ROOT_CONFIG, env={"PORT": "5000"})["port"] == 5000


def test_relay_config_picks_another_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"port": 9999, "rate_limit": {"max_requests_per_minute": 7}}))
    s = load_settings(env={"RELAY_CONFIG": str(f)})
    assert s["port"] == 9999 and s["rate_limit.max_requests_per_minute"] == 7
    assert s["host"] == "127.0.0.1"  # defaults fill the rest


@pytest.mark.parametrize("env, key", [
    ({"RELAY_PORT": "eighty"}, "port"),
    ({"RELAY_PORT": "70000"}, "port"),
    ({"RELAY_SYSTEM_PROMPT_MODE": "shout"}, "system_prompt_mode"),
    ({"RELAY_CLI_MAX_RETRIES": "99"}, "cli_max_retries"),
    ({"RELAY_AUTH__ENABLED": "maybe"}, "auth.enabled"),
    ({"RELAY_FIRST_TOKEN_TIMEOUT_S": "-1"}, "first_token_timeout_s"),
    ({"RELAY_NO_SUCH_KEY": "1"}, "RELAY_NO_SUCH_KEY"),
])
def test_a_wrong_value_names_its_key(env, key):
    with pytest.raises(ConfigError) as e:
        load_settings(ROOT_CONFIG, env=env)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_unknown_and_mistyped_keys_in_the_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"prot": 1}))
    with pytest.raises(ConfigError, match="prot"):
        load_settings(f, env={})
    f.write_text(json.dumps({"workers": "two"}))
    with pytest.raises(ConfigError, match="workers"):
        load_settings(f, env={})
    f.write_text(json.dumps({"auth": {"api_keys": [{"name": "alice"}]}}))
    with pytest.raises(ConfigError, match="auth.api_keys"):
        load_settings(f, env={})


def test_every_setting_has_a_doc_and_a_valid_default():
    for key, field in SCHEMA.items():
        assert field.doc, key
        assert field.check is None or field.check(field.default) is None, key


def test_gunicorn_refuses_a_bad_config_with_one_line():
    env = {"RELAY_PORT": "abc", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--check-config", "wsgi:app"],
                         cwd=ROOT_CONFIG.parent, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "relay: config: port must be an integer" in out.stderr

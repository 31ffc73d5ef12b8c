"""Every setting of the relay, declared once: defaults, types, checks and environment overrides.

Sources, later ones winning: the built-in defaults below, `config.json` (or the file named by
`RELAY_CONFIG`), then the environment (`RELAY_<KEY>` with `__` for nesting, plus `PORT`, `REDIS_URL`,
`CLAUDE_BIN` and `API_KEYS`, and the seed relays' `CLAUDE_PROXY_MODELS`, `SYSTEM_PROMPT_MODE`, `LOG_LEVEL` and
`DEBUG`). A wrong value raises `ConfigError` naming the key, at start-up.
Imports only the standard library, so `gunicorn.conf.py` may use it in the master process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting is missing, of the wrong type or out of range; the message names the key."""


# what an alert webhook may subscribe to (core/alerts.py sends them)
ALERT_EVENTS = ("account_limited", "account_recovered", "utilization_threshold", "overage_detected", "login_failing",
                "run_timeout", "runaway_conversation", "helper_down", "helper_restarted", "cli_too_old",
                "cli_selftest_failed", "cache_health", "model_limited", "model_mismatch")


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def _num(x: float) -> str:
    return f"{x:g}" if x < 10**6 else f"{int(x):,}"


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    check: Callable[[Any], str | None] = lambda v: None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}"  # noqa: E731
    check.__doc__ = f"{_num(lo)} to {_num(hi)}"  # shown by `python -m relay config --markdown`
    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    check: Callable[[Any], str | None] = lambda v: None if v in choices else "must be one of " + ", ".join(choices)  # noqa: E731
    check.__doc__ = "one of " + ", ".join(f"`{c}`" for c in choices)
    return check


def _check_keys(value: Any) -> str | None:
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                return f"item {i} is an empty key"
            continue
        if not isinstance(item, dict) or not item.get("name"):
            return f"item {i} must be a key string or an object with a name"
        if not (item.get("key") or item.get("key_sha256")):
            return f"item {i} ({item['name']}) needs key or key_sha256"
        share = item.get("window_share")
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or
                                  not 0 < share <= 1):
            return f"item {i} ({item['name']}): window_share must be a number above 0 and at most 1"
    return None


def _check_models(value: Any) -> str | None:
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            continue
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]:
            continue
        return f"item {i} must be a model id or an object with an id"
    return None


_ACCOUNT_FIELDS = {"name", "config_dir", "oauth_token_env", "max_concurrent", "priority", "reserve"}


def _check_accounts(value: Any) -> str | None:
    names: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return (f"item {i} must be an object {{name, config_dir | oauth_token_env, max_concurrent, priority, "
                    "reserve}")
        name = item.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or \
                not all(c.isalnum() or c in "._-" for c in name):
            return f"item {i} needs a name of 1-64 letters, digits, '.', '_' or '-'"
        if name in names:
            return f"item {i}: the name {name!r} is used twice"
        names.add(name)
        unknown = set(item) - _ACCOUNT_FIELDS
        if unknown:
            return f"item {i} ({name}): unknown field(s) {', '.join(sorted(unknown))}"
        for f in ("config_dir", "oauth_token_env"):
            if f in item and not isinstance(item[f], str):
                return f"item {i} ({name}): {f} must be a string"
        if not (item.get("config_dir") or item.get("oauth_token_env")):
            return f"item {i} ({name}) needs config_dir or oauth_token_env (or both)"
        env_name = item.get("oauth_token_env") or ""
        if env_name and not (env_name.replace("_", "").isalnum() and not env_name[0].isdigit()):
            return f"item {i} ({name}): oauth_token_env must name an environment variable"
        for f, lo in (("max_concurrent", 0), ("priority", 1)):
            v = item.get(f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= 1000):
                return f"item {i} ({name}): {f} must be an integer from {lo} to 1000"
        reserve = item.get("reserve")
        if reserve is not None and (not isinstance(reserve, (int, float)) or isinstance(reserve, bool)
                                    or not 0 < reserve <= 1):
            return f"item {i} ({name}): reserve must be a fraction of a window above 0 and at most 1 (e.g. 0.9)"
    return None


def _check_webhooks(value: Any) -> str | None:
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("url"), str) or \
                not item["url"].startswith(("http://", "https://")):
            return f"item {i} must be an object with an http(s) url"
        fmt = item.get("format", "json")
        if fmt not in ("json", "slack", "telegram"):
            return f"item {i}: format must be json, slack or telegram"
        if fmt == "telegram" and item.get("chat_id") in (None, ""):
            return f"item {i}: the telegram format needs a chat_id"
        events = item.get("events")
        known = ALERT_EVENTS
        if events is not None and (not isinstance(events, list) or any(e not in known for e in events)):
            return f"item {i}: events must be a list of: {', '.join(known)}"
        unknown = set(item) - {"url", "format", "chat_id", "events", "timeout_s"}
        if unknown:
            return f"item {i}: unknown field(s) {', '.join(sorted(unknown))}"
    return None


def _check_thresholds(value: Any) -> str | None:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in value)
    return None if ok else "must be fractions between 0 and 1, e.g. [0.8, 0.95]"


def _auto_or_count(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and 0 <= value <= 1000):
        return None
    return "must be \"auto\" or an integer between 0 and 1000"


_auto_or_count.__doc__ = "`\"auto\"` or 0 to 1000"

_POS = _between(0.001, 1e9)
_POS.__doc__ = "more than 0"
_NONNEG = _between(0, 1e12)
_NONNEG.__doc__ = "0 or more"

# One entry per setting: dotted key -> Field. docs/configuration.md is generated from it
# (`python -m relay config --markdown`, see markdown() below).
SCHEMA: dict[str, Field] = {
    "host": Field(str, "127.0.0.1", "Address to bind. Keep 127.0.0.1 behind nginx."),
    "allowed_hosts": Field(list, [], "Host header names answered besides localhost, 127.0.0.1 and [::1] (any port); "
                           "[\"*\"] for any. Anything else gets 403 (DNS rebinding)."),
    "client_header_timeout_s": Field(float, 10.0, "A request's headers must arrive within this long of its "
                                     "first byte (and of the connection's start).", _between(0.5, 3600)),
    "client_body_timeout_s": Field(float, 60.0, "A request body must arrive within this long after its headers "
                                   "(408 beyond).", _between(0.5, 86400)),
    "client_send_timeout_s": Field(float, 30.0, "Each write of an answer must be taken by the client within this long "
                                   "(and none after the run's total_timeout_s); a client that stops reading is "
                                   "disconnected, its run stopped and its slots released.", _between(0.5, 3600)),
    "port": Field(int, 3456, "TCP port.", _between(1, 65535)),
    "workers": Field(int, 2, "gunicorn gevent worker processes.", _between(1, 64)),
    "worker_connections": Field(int, 200, "Concurrent connections per gevent worker.", _between(1, 10000)),
    "graceful_timeout_s": Field(int, 30, "On SIGTERM, how long running streams may finish before the kill.",
                                _between(1, 3600)),
    "redis_url": Field(str, "", "Redis URL; empty means the private Redis that `make run` starts."),
    "claude_bin": Field(str, "claude", "Claude Code CLI executable (name on PATH or a path)."),
    "cli_watch_s": Field(float, 30.0, "How often the relay looks at its claude binary (resolved path, mtime and size, "
                         "version). When it changed, the new one is self-tested (`python -m relay check --conformance`) "
                         "once per host before new spares use it; a failure is alerted and shown by /health. 0 = off.",
                         _between(0, 86400)),
    "claude_config_dir": Field(str, "", "CLAUDE_CONFIG_DIR for the CLI; empty passes the relay's through."),
    "default_model": Field(str, "sonnet", "CLI model for names the relay does not recognise."),
    "extra_models": Field(list, [], "More model ids to list and accept: strings or {id, cli_model}.",
                          _check_models),
    "system_prompt_mode": Field(str, "replace", "How the client's system prompt reaches the CLI: replace (it replaces the CLI's "
                                "coding-agent prompt), append (added after it) or embed (the CLI's prompt is kept and the "
                                "client's instructions lead the first user turn); see docs/api.md, Messages.",
                                _one_of("replace", "append", "embed")),
    "max_concurrent_runs": Field(int, 4, "CLI processes allowed at once on this host.", _between(1, 1000)),
    "queue_timeout_s": Field(float, 60.0, "How long a request waits in the queue for a run slot before 429.",
                             _NONNEG),
    "first_token_timeout_s": Field(float, 120.0, "Kill a run with no model output after this long.", _POS),
    "idle_timeout_s": Field(float, 120.0, "Kill a run whose output stops for this long.", _POS),
    "total_timeout_s": Field(float, 900.0, "Kill a run that lasts longer than this.", _POS),
    "tool_wait_s": Field(float, 900.0, "How long a CLI process that called the client's functions waits, held in the "
                         "host's pool, for the request bringing their results (a warm tool step: no spawn, no "
                         "resume). It counts against pool.max_warm; past this it is ended and the step resumes "
                         "from the transcript. 0: every tool step ends the process (a cold start each).",
                         _between(0, 86400)),
    "keepalive_s": Field(float, 5.0, "SSE keep-alive comment interval while the model is silent.", _POS),
    "cli_max_retries": Field(int, 1, "CLAUDE_CODE_MAX_RETRIES for the CLI (0-15).", _between(0, 15)),
    "upstream_retry_after_s": Field(int, 30, "Retry-After for an upstream 429 that gives no reset time.",
                                    _between(1, 86400)),
    "max_requests_per_day": Field(int, 1000, "Requests kept per day in log/stats.json.", _between(0, 10**7)),
    "var_dir": Field(str, "var", "Runtime state: private Redis, temp files, agent folders."),
    "state_dir": Field(str, "", "The CLI's own working folder lives here, outside any git repository "
                       "(empty: $XDG_STATE_HOME/claude-max-relay, else ~/.local/state/claude-max-relay)."),
    "redis_maxmemory_mb": Field(int, 256, "maxmemory of the private Redis (policy noeviction: when full it refuses "
                                "writes, 503 redis_full, and never drops the limits' counters); 0 = no limit.",
                                _between(0, 10**6)),
    "log_dir": Field(str, "log", "Where stats.json is written."),
    "log_level": Field(str, "info", "debug | info | warning (or warn) | error.",
                       _one_of("debug", "info", "warning", "error")),
    "cache.ttl": Field(str, "auto", "Anthropic prompt-cache lifetime: \"5m\", \"1h\", \"auto\" (the CLI's choice: 1h on a "
                       "subscription, 5m on an API key) or \"off\".", _one_of("auto", "5m", "1h", "off")),
    "cache.min_tokens": Field(int, 1024, "Prompts (system prompt plus history) shorter than this many tokens are "
                              "sent without prompt caching (0 = always cache).", _between(0, 10**9)),
    "response_cache.ttl": Field(int, 0, "Seconds an identical non-streaming answer is served from the response "
                                "cache (0 = off).", _between(0, 10**7)),
    "response_cache.min_tokens": Field(int, 1000, "Only prompts of at least this many tokens use the response cache.",
                                       _between(0, 10**9)),
    "rate_limit.max_requests_per_minute": Field(int, 60, "Global requests per minute (0 = no limit).",
                                                _between(0, 10**9)),
    "rate_limit.max_requests_per_minute_per_ip": Field(int, 0, "Per client address when auth is off (0 = no limit).",
                                                       _between(0, 10**9)),
    "rate_limit.count_tokens_per_minute": Field(int, 120, "POST /v1/messages/count_tokens per minute, per API key "
                                                "(per client address when auth is off); 0 = no limit.",
                                                _between(0, 10**9)),
    "rate_limit.max_tokens_per_day": Field(int, 0, "Global tokens per day (0 = no limit).", _between(0, 10**12)),
    "auth.enabled": Field(bool, False, "Require an API key on /v1/*."),
    "auth.api_keys": Field(list, [], "Keys: strings (named key-XXXXXXXX: the first 8 hex digits of the digest), or objects {name, key | "
                          "key_sha256, rpm, tokens_per_day, max_concurrent, models, admin, agent, window_share}. "
                          "window_share (0 < x <= 1): the most of each subscription window (per account) the "
                          "key may use; past it, 429 window_share_exceeded until the window resets.", _check_keys),
    "sessions.enabled": Field(bool, True, "Map conversations onto CLI sessions (resume)."),
    "sessions.ttl_hours": Field(float, 24.0, "How long an idle conversation is kept.", _POS),
    "sessions.lock_wait_s": Field(float, 30.0, "How long a second request for a busy conversation waits.",
                                  _NONNEG),
    "responses.max_stored_kb": Field(int, 8192, "Largest stored Response (store: true); bigger ones are "
                                     "answered but not stored.", _between(1, 10**7)),
    "sessions.cleanup_interval_s": Field(float, 600.0, "How often expired CLI session files are removed.", _POS),
    "lease_ttl_s": Field(float, 15.0, "Run slots and conversation locks of a dead worker expire after this.",
                         _between(1, 600)),
    "stats.log_first_message": Field(bool, True, "Keep the first user message (truncated) in stats."),
    "stats.snapshot_interval_s": Field(float, 5.0, "How often log/stats.json is rewritten.", _POS),
    "stats.request_days": Field(int, 30, "Days each day's request list (up to max_requests_per_day entries) is kept "
                                "in Redis and log/stats.json; the day's summary is kept for good.", _between(1, 3650)),
    "max_body_mb": Field(float, 50.0, "Largest request body accepted (413 beyond).", _between(0.001, 4096)),
    "count_tokens_max_body_mb": Field(float, 8.0, "Largest body of POST /v1/messages/count_tokens (413 beyond; "
                                      "it is counted on the worker's CPU).", _between(0.001, 4096)),
    "trusted_proxies": Field(list, ["127.0.0.1", "::1"], "Addresses whose X-Forwarded-For/-Proto are believed."),
    "cors.allowed_origins": Field(list, [], "Browser origins allowed by CORS ([\"*\"] for any)."),
    "host_id": Field(str, "", "This host's name in shared Redis state (default: the hostname)."),
    "login_recheck_s": Field(float, 60.0, "After the CLI reported a login failure, refuse runs for this long.",
                             _POS),
    "relay.expose_reasoning": Field(bool, False, "Stream thinking as reasoning_content (per request: expose_reasoning)."),
    "images.max_count": Field(int, 20, "Images and files allowed in one request.", _between(0, 1000)),
    "images.max_bytes": Field(int, 5 * 1024 * 1024, "Largest decoded image or file, in bytes.", _between(1, 10**9)),
    "agent.enabled": Field(bool, False, "Let clients use the CLI's own tools (Bash, Read, Write...): they run "
                           "commands on this host. Per key: api_keys[].agent."),
    "agent.allowed_tools": Field(list, ["Bash", "Read", "Write", "Edit", "Glob", "Grep", "WebFetch"],
                                 "The CLI tools agent runs may use (pre-approved)."),
    "agent.permission_mode": Field(str, "acceptEdits", "The CLI's --permission-mode for agent runs.",
                                   _one_of("default", "acceptEdits", "bypassPermissions", "dontAsk", "plan")),
    "agent.workdir_root": Field(str, "var/agent", "Each conversation gets its own working directory under here."),
    "agent.max_turns": Field(int, 20, "--max-turns for agent runs (0 = the CLI's default).", _between(0, 1000)),
    "agent.max_budget_usd": Field(float, 0.0, "--max-budget-usd for agent runs (0 = none).", _between(0, 10**6)),
    "agent.intermediate": Field(str, "hidden", "Steps before the final answer: hidden, or sent as reasoning.",
                                _one_of("hidden", "reasoning")),
    "agent.user": Field(str, "", "Run agent CLIs as this user (required for bypassPermissions when the relay is root)."),
    "agent.proxy_max_body_mb": Field(float, 32.0, "Largest API request body an agent run's credential proxy reads "
                                     "(413 beyond; 32 MB is Anthropic's own limit).", _between(0.01, 1024)),
    "agent.proxy_max_connections": Field(int, 16, "Connections open at once to one agent run's credential proxy; "
                                         "as many more are answered 429, the rest closed unread.", _between(1, 1000)),
    "agent.proxy_read_timeout_s": Field(float, 30.0, "A request to an agent run's credential proxy (its head and body) "
                                        "must arrive within this long of its connection (408 beyond).",
                                        _between(0.1, 3600)),
    "prices": Field(dict, {}, "Override API list prices (USD per million tokens) per model family, e.g. "
                    "{\"opus\": {\"input\": 5, \"output\": 25, \"cache_write\": 6.25, \"cache_read\": 0.5}}; used only "
                    "for the estimated_cost_usd figures."),
    "accounts": Field(list, [], "Claude accounts (subscriptions) to route over: {name, config_dir | "
                      "oauth_token_env, max_concurrent, priority, reserve} (see docs/operations.md, Several "
                      "accounts); `reserve` (e.g. 0.9) stops new conversations on an account once any of its "
                      "windows is that full (its own conversations go on until the limit); "
                      "empty = the host's own login.", _check_accounts),
    "accounts_overage": Field(str, "block", "block: an account drawing on overage (extra usage) is not used until "
                              "its reset; allow: it is used (and alerted).", _one_of("block", "allow")),
    "accounts_failover_ramp_s": Field(float, 20.0, "Storm control: after a failover, the runs of conversations "
                                      "moving to an account ramp up over this many seconds, from "
                                      "accounts_failover_start at once to its limit; 0 = no ramp.", _between(0, 3600)),
    "accounts_failover_start": Field(int, 2, "Storm control: runs of moving conversations an account takes at once "
                                     "when its ramp starts.", _between(1, 1000)),
    "accounts_hold_s": Field(float, 0.0, "When every account is at its limit and the earliest reset is at most "
                             "this many seconds away, a request waits for it (a stream sends keep-alives) instead "
                             "of a 429; 0 = never (a 429 at once).", _between(0, 6 * 3600)),
    "window_share_release_s": Field(float, 0.0, "In the last this many seconds before a window resets, "
                                    "api_keys[].window_share no longer caps that window: a share not used by then "
                                    "goes to whoever asks (0 = shares hold to the reset).", _NONNEG),
    "alerts.webhooks": Field(list, [], "Webhooks for operator alerts: {url, format: json | slack | telegram, "
                             "chat_id, events}.", _check_webhooks),
    "alerts.thresholds": Field(list, [0.8, 0.95], "Window utilizations that raise an alert (once per window).",
                               _check_thresholds),
    "alerts.repeat_window_s": Field(float, 3600.0, "An account's alert (limited, recovered, overage, a threshold) "
                                    "goes out at most once in this many seconds, however often its state flips or "
                                    "the reset time the CLI reports changes.", _between(60, 8 * 86400)),
    "alerts.max_attempts": Field(int, 10, "Deliveries of one alert tried before it is dropped.", _between(1, 100)),
    "alerts.retry_base_s": Field(float, 2.0, "First retry delay of a failed alert delivery (doubles each time, at most 10 min).",
                                 _between(0.01, 3600)),
    "runaway.max_replays_in_a_row": Field(int, 5, "Turns in a row that may each replay a conversation's whole history "
                                          "in a new CLI session instead of resuming it (a client whose history "
                                          "changes every turn); the next is refused with 429 runaway_conversation "
                                          "for runaway.cooldown_s and an alert goes out. 0 = no limit.",
                                          _between(0, 1000)),
    "runaway.burn_ratio": Field(float, 20.0, "A conversation whose turns in the last runaway.window_s burnt (the prompt "
                                "tokens the CLI reported: input, cache writes and reads) at least "
                                "runaway.burn_min_tokens and more than this many times what their histories explain "
                                "(the sum of their prompt estimates) is refused like a replay loop. 0 = no limit.",
                                _between(0, 10**6)),
    "runaway.burn_min_tokens": Field(int, 200000, "A conversation that burnt fewer tokens than this in the window is "
                                     "never stopped for its burn.", _between(0, 10**12)),
    "runaway.cooldown_s": Field(float, 900.0, "How long a stopped conversation is refused (its Retry-After); then "
                                "its counters start afresh.", _between(1, 7 * 86400)),
    "runaway.window_s": Field(float, 3600.0, "The recent window a conversation's burn is summed over.",
                              _between(1, 7 * 86400)),
    "metrics.scrape_token": Field(str, "", "A token Prometheus may send (Authorization: Bearer) to read /metrics "
                                  "instead of an admin key; empty = admin keys only."),
    "pool.enabled": Field(bool, True, "Warm CLI processes: one pool server per host keeps spares and "
                          "conversations' processes alive (see docs/warm-pool.md)."),
    "pool.spares": Field(int, 1, "Spare CLI processes kept ready for new conversations (each about 90-135 MB private).",
                         _between(0, 64)),
    "pool.max_warm": Field((int, str), "auto", "Conversations' processes kept alive between turns (each about 90-135 MB "
                           "private, growing with turns); least recently used goes first. \"auto\": the pool server "
                           "sizes it at start to a third of MemAvailable over one process's measured private memory "
                           "(1 to 64; see docs/warm-pool.md); an integer sets it.", _auto_or_count),
    "pool.idle_ttl_s": Field(float, 600.0, "A warm process unused for this long is ended.", _POS),
    "pool.max_turns": Field(int, 100, "Recycle a warm process after this many turns.", _between(1, 10**6)),
    "pool.max_age_s": Field(float, 3600.0, "Recycle a spare or warm process after this age (seconds).", _POS),
    "pool.max_rss_mb": Field(float, 600.0, "Recycle a warm process above this resident memory (0 = no limit).",
                             _between(0, 10**6)),
}


class Settings(Mapping[str, Any]):
    """Validated settings, read with dotted keys: `settings["rate_limit.max_requests_per_minute"]`."""

    def __init__(self, values: dict[str, Any], source: str) -> None:
        self._values = values
        self.source = source

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def path(self, key: str) -> Path:
        """A directory setting as an absolute path (relative ones are under the checkout)."""
        p = Path(self._values[key]).expanduser()
        return p if p.is_absolute() else ROOT / p

    def replace(self, **changes: Any) -> Settings:
        values = dict(self._values)
        for k, v in changes.items():
            values[k.replace("__", ".")] = v
        return Settings(_validate(values), self.source)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key.startswith("_"):
            continue  # comments
        dotted = prefix + key
        if isinstance(value, dict) and dotted not in SCHEMA:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _coerce(key: str, raw: Any, from_env: bool) -> Any:
    field = SCHEMA[key]
    value = raw
    if from_env and isinstance(raw, str) and field.kind is not str:
        if field.kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ConfigError(f"config: {key} must be true or false, got {raw!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            if not (isinstance(field.kind, tuple) and str in field.kind):
                raise ConfigError(f"config: {key} must be {_name(field.kind)}, got {raw!r}") from None
            value = raw.strip()  # a word for a setting that also takes one (pool.max_warm: auto)
    if field.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and field.kind is not bool:
        raise ConfigError(f"config: {key} must be {_name(field.kind)}, got {value!r}")
    if not isinstance(value, field.kind):
        raise ConfigError(f"config: {key} must be {_name(field.kind)}, got {value!r}")
    return value


def _name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_name(k) for k in kind)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "an object"}.get(kind, str(kind))


def _normalise(values: dict[str, Any]) -> dict[str, Any]:
    """Spellings the seed relays accepted: `warn` for `warning`, any case for levels and modes."""
    level = str(values["log_level"]).strip().lower()
    values["log_level"] = "warning" if level == "warn" else level
    values["system_prompt_mode"] = str(values["system_prompt_mode"]).strip().lower()
    return values


def _validate(values: dict[str, Any]) -> dict[str, Any]:
    _normalise(values)
    for key, value in values.items():
        field = SCHEMA[key]
        problem = field.check(value) if field.check else None
        if problem:
            raise ConfigError(f"config: {key} {problem} (got {value!r})")
    if values.get("agent.enabled") and not values.get("auth.enabled"):
        # anyone who can reach the port would run commands on this host
        raise ConfigError("config: agent.enabled needs auth.enabled: without API keys anyone who reaches the "
                          "relay could run commands on this host (enable auth, or give agent mode to chosen keys)")
    return values


def legacy_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings from the seed relays' environment variables (docs/operations.md, "Migrating")."""
    out: dict[str, Any] = {}
    models = env.get("CLAUDE_PROXY_MODELS", "").strip()
    if models:
        if models.startswith("["):
            out["extra_models"] = _coerce("extra_models", models, from_env=True)
        else:
            out["extra_models"] = [m.strip() for m in models.split(",") if m.strip()]
    if env.get("SYSTEM_PROMPT_MODE", "").strip():
        out["system_prompt_mode"] = env["SYSTEM_PROMPT_MODE"].strip().lower()
    debug = env.get("DEBUG", "").strip().lower()
    if env.get("LOG_LEVEL", "").strip():
        out["log_level"] = env["LOG_LEVEL"].strip().lower()
    elif debug in ("1", "true", "yes", "on", "debug"):  # not DEBUG=express:* and the like
        out["log_level"] = "debug"
    return out


def load_settings(path: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Read defaults, the JSON file and the environment; raise ConfigError on the first bad value."""
    env = os.environ if env is None else env
    file = Path(path or env.get("RELAY_CONFIG") or ROOT / "config.json")
    values = {k: f.default for k, f in SCHEMA.items()}
    if file.exists():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config: cannot read {file}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {file} must hold a JSON object")
        for key, raw in _flatten(data).items():
            if key not in SCHEMA:
                raise ConfigError(f"config: unknown key {key} in {file}")
            if key == "cache.ttl" and isinstance(raw, int) and not isinstance(raw, bool):
                raise ConfigError(f"config: cache.ttl is the prompt-cache lifetime, \"5m\", \"1h\" or \"auto\" (got {raw!r}); "
                                  "the response cache's seconds are response_cache.ttl")
            values[key] = _coerce(key, raw, from_env=False)
    elif path or env.get("RELAY_CONFIG"):
        raise ConfigError(f"config: file {file} does not exist")
    values.update(legacy_env(env))  # the seed relays' names; RELAY_<KEY> below still wins
    for name, raw in env.items():
        if not name.startswith("RELAY_") or name == "RELAY_CONFIG":
            continue
        key = name[len("RELAY_"):].lower().replace("__", ".")
        if key not in SCHEMA:
            raise ConfigError(f"config: unknown setting {name} in the environment")
        values[key] = _coerce(key, raw, from_env=True)
    for name, key in (("PORT", "port"), ("REDIS_URL", "redis_url"), ("CLAUDE_BIN", "claude_bin")):
        if env.get(name):
            values[key] = _coerce(key, env[name], from_env=True)
    if env.get("API_KEYS"):
        extra = [k.strip() for k in env["API_KEYS"].split(",") if k.strip()]
        values["auth.api_keys"] = list(values["auth.api_keys"]) + extra
    return Settings(_validate(values), str(file))


# The conventional and seed-relay environment variables besides RELAY_<KEY> (see load_settings and legacy_env).
ENV_ALIASES: dict[str, str] = {
    "port": "`PORT`",
    "redis_url": "`REDIS_URL`",
    "claude_bin": "`CLAUDE_BIN`",
    "auth.api_keys": "`API_KEYS=k1,k2` (adds to the list)",
    "extra_models": "`CLAUDE_PROXY_MODELS=id1,id2` (or a JSON list)",
    "system_prompt_mode": "`SYSTEM_PROMPT_MODE`",
    "log_level": "`LOG_LEVEL`; `DEBUG=1` means debug",
}


def env_name(key: str) -> str:
    """The environment variable that overrides a setting: `RELAY_<KEY>` with `__` for nesting."""
    return "RELAY_" + key.upper().replace(".", "__")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from SCHEMA."""
    kinds = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", dict: "object"}
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from relay/config.py (SCHEMA) by `python -m relay config --markdown`; do not edit by hand."
        " Regenerate: `.venv/bin/python -m relay config --markdown > docs/configuration.md` -->",
        "",
        "Sources, later ones winning: the built-in defaults below, `config.json` (or the file named by "
        "`RELAY_CONFIG=/path/to/file.json`), then the environment. Any key can be overridden as `RELAY_<KEY>` "
        "with `__` for nesting (`RELAY_PORT=4000`, `RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE=5`, "
        "`RELAY_AUTH__ENABLED=true`; lists and objects as JSON; booleans as `1`/`true`/`yes`/`on` or "
        "`0`/`false`/`no`/`off`). The conventional `PORT`, `REDIS_URL`, `CLAUDE_BIN` and `API_KEYS=k1,k2` and "
        "the original relay's `CLAUDE_PROXY_MODELS`, `SYSTEM_PROMPT_MODE`, `LOG_LEVEL` and `DEBUG` work too "
        "(a `RELAY_<KEY>` variable wins over the original relay's names).",
        "",
        "In `config.json`, nested keys are nested objects (`{\"rate_limit\": {\"max_requests_per_minute\": 5}}`) "
        "or dotted names; keys starting with `_` are comments. A wrong value or an unknown key stops the "
        "start-up with one line naming it, e.g. `relay: config: port must be an integer, got 'abc'`; "
        "`python -m relay check` runs the same validation (and probes the CLI) without starting the server. "
        "`agent.enabled` needs `auth.enabled`.",
        "",
        f"{len(SCHEMA)} settings:",
        "",
        "| key | type | default | environment | what it does |",
        "|---|---|---|---|---|",
    ]
    for key, field in SCHEMA.items():
        kind = " or ".join(kinds.get(k, str(k)) for k in field.kind) if isinstance(field.kind, tuple) \
            else kinds.get(field.kind, str(field.kind))
        env = f"`{env_name(key)}`" + (f", {ENV_ALIASES[key]}" if key in ENV_ALIASES else "")
        doc = field.doc
        allowed = field.check.__doc__ if field.check and field.check.__doc__ else ""
        if allowed:
            doc += f" Allowed: {allowed}."
        default = json.dumps(field.default, ensure_ascii=False)
        lines.append(f"| `{key}` | {kind} | `{_cell(default)}` | {_cell(env)} | {_cell(doc)} |")
    lines.append("")
    return "\n".join(lines)

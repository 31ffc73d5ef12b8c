"""The app factory and the per-worker `Relay` object that holds settings, stores and live runs."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from flask import Flask

from .auth import KeyRing
from .cache import ResponseCache
from .cli import child_env, probe_cli
from .config import ConfigError, Settings, load_settings
from .errors import RateLimited, SubscriptionLimited, Unavailable
from .limits import Quotas
from .models import ModelCatalog
from .run import Run
from .sessions import Sessions, expire_session_files, session_dir
from .stats import Stats
from .store import PREFIX, Leases, connect, host_id

log = logging.getLogger("relay")


class Relay:
    """Everything one worker needs; created once per worker by `create_app`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        self.catalog = ModelCatalog(settings["default_model"], settings["extra_models"])
        self.r = connect(settings["redis_url"])
        self.leases = Leases(self.r, settings["lease_ttl_s"])
        self.sessions = Sessions(self.r, settings["sessions.ttl_hours"], settings["sessions.enabled"])
        var = settings.path("var_dir")
        self.cli_cwd = var / "cli-cwd"      # stable (sessions are scoped to it) and empty
        self.tmp_dir = var / "tmp"
        for d in (self.cli_cwd, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.cli_env = child_env(dict(os.environ), settings["cli_max_retries"], settings["claude_config_dir"])
        self.stats = Stats(self.r, settings.path("log_dir") / "stats.json", settings["max_requests_per_day"],
                           settings["stats.log_first_message"], settings["prices"])
        self.active: dict[str, Run] = {}
        self.host = settings["host_id"] or host_id()
        self.keys = KeyRing(settings.source, settings["auth.api_keys"], self.r)
        self.quotas = Quotas(self.r, settings["rate_limit.max_tokens_per_day"])
        self.response_cache = ResponseCache(self.r, settings["cache.ttl"], settings["cache.min_tokens"])
        self.limiter: Any = None
        self.expose_reasoning = settings["relay.expose_reasoning"]
        self._cli: dict[str, Any] = {}
        self._cli_checked = 0.0
        self.check_cli(force=True)
        from .agent import check as check_agent

        check_agent(settings)

    # -- the CLI ---------------------------------------------------------------------------------
    def check_cli(self, force: bool = False) -> dict[str, Any]:
        """Probe the CLI (cached; an unusable one is probed again every 30 s)."""
        if force or (not self._cli.get("ok") and time.monotonic() - self._cli_checked > 30):
            self._cli = probe_cli(self.settings["claude_bin"], self.cli_env)
            self._cli_checked = time.monotonic()
            if self._cli.get("too_old"):
                raise ConfigError("claude_bin: " + str(self._cli["problem"]))
        return self._cli

    def cli_path(self) -> str:
        return str(self._cli.get("path") or self.settings["claude_bin"])

    def guard_spawning(self) -> None:
        """Refuse before spawning: unusable CLI, subscription cooldown, or a login known to be broken."""
        info = self.check_cli()
        if not info.get("ok"):
            raise Unavailable(str(info.get("problem")), code="cli_unavailable")
        state = self.account_state()
        if state.get("cooldown_until"):
            wait = state["cooldown_until"] - time.time()
            raise RateLimited(f"The Claude subscription behind this relay is at its usage limit until "
                              f"{time.strftime('%H:%M UTC', time.gmtime(state['cooldown_until']))}; no request is "
                              f"sent upstream until then. ({state.get('cooldown_reason', '')})", retry_after=wait)
        if state.get("login_problem"):
            raise Unavailable(state["login_problem"], code="cli_login_required", retry_after=30)

    def account_state(self) -> dict[str, Any]:
        """Cooldown and login state of this host's CLI login, shared by all its workers."""
        raw = self.r.hgetall(f"{PREFIX}account:{self.host}")
        now = time.time()
        out: dict[str, Any] = {}
        until = float(raw.get("cooldown_until") or 0)
        if until > now:
            out.update(cooldown_until=until, cooldown_reason=raw.get("cooldown_reason", ""))
        if float(raw.get("login_until") or 0) > now:
            out["login_problem"] = raw.get("login_problem", "")
        return out

    def note_upstream_error(self, err: Exception) -> None:
        """Remember a subscription limit (cooldown until the reset) or a broken login, for every worker."""
        key = f"{PREFIX}account:{self.host}"
        code = getattr(err, "code", None)
        now = time.time()
        if isinstance(err, SubscriptionLimited) and err.retry_after:
            self.r.hset(key, mapping={"cooldown_until": now + err.retry_after, "cooldown_reason": err.message})
            self.r.expire(key, int(err.retry_after) + 60)
            log.warning("subscription limit reached: no CLI runs for %.0f s", err.retry_after)
        elif code == "cli_login_required":
            self.r.hset(key, mapping={"login_until": now + self.settings["login_recheck_s"],
                                      "login_problem": getattr(err, "message", str(err))})
            self.r.expire(key, int(self.settings["login_recheck_s"]) + 60)
            log.error("CLI login failed: refusing runs for %.0f s", self.settings["login_recheck_s"])

    def slot_key(self) -> str:
        return f"{PREFIX}slots:{self.host}"

    def config_dir(self) -> Path:
        d = self.settings["claude_config_dir"] or os.environ.get("CLAUDE_CONFIG_DIR") or "~/.claude"
        return Path(d).expanduser()

    def expire_cli_sessions(self) -> int:
        """Remove CLI session files idle for longer than the conversation TTL (one worker at a time)."""
        interval = max(1, int(self.settings["sessions.cleanup_interval_s"]))
        if not self.r.set(PREFIX + "janitor", "1", nx=True, ex=interval):
            return 0
        keep = {c["cli_session_id"] for c in self.sessions.list_all() if c.get("cli_session_id")}
        return expire_session_files(session_dir(self.config_dir(), self.cli_cwd.resolve()),
                                    self.settings["sessions.ttl_hours"] * 3600, keep)

    def record(self, rec: dict[str, Any]) -> None:
        try:
            self.stats.record(rec)
        except Exception as exc:  # stats must never break a response
            log.error("stats: could not record %s: %s", rec.get("id"), exc)
        log.info("request %s key=%s model=%s stream=%s status=%s in=%s out=%s ms=%s", rec.get("request_id"),
                 rec.get("key") or "-", rec.get("model"), rec.get("stream"), rec.get("status"),
                 rec.get("input_tokens"), rec.get("output_tokens"), rec.get("response_time_ms"))

    def shutdown(self) -> None:
        for run in list(self.active.values()):
            run.cancel()
        self.stats.stop()


def _start_janitor(relay: Relay) -> None:
    def loop() -> None:
        interval = relay.settings["sessions.cleanup_interval_s"]
        while True:
            time.sleep(interval)
            try:
                removed = relay.expire_cli_sessions()
                if removed:
                    log.info("removed %d expired CLI session files", removed)
            except Exception as exc:  # keep going: Redis or the disk may recover
                log.warning("session file cleanup failed: %s", exc)
    threading.Thread(target=loop, daemon=True).start()


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    logging.basicConfig(level=settings["log_level"].upper(),
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    app = Flask("relay")
    app.config["MAX_CONTENT_LENGTH"] = int(settings["max_body_mb"] * 1024 * 1024)
    relay = Relay(settings)
    app.extensions["relay"] = relay
    try:
        relay.stats.restore_if_empty()
    except Exception as exc:  # Redis may be down at boot: /health shows it
        log.error("stats: restore skipped: %s", exc)
    relay.stats.run_snapshots(settings["stats.snapshot_interval_s"])
    _start_janitor(relay)
    atexit.register(relay.shutdown)

    from . import http
    from .limits import setup_limiter
    from .routes_chat import bp as chat_bp
    from .routes_meta import bp as meta_bp
    from .routes_responses import bp as responses_bp

    http.install(app, relay)  # before the limiter: it identifies the caller first
    app.register_blueprint(meta_bp)
    app.register_blueprint(chat_bp)
    app.register_blueprint(responses_bp)
    relay.limiter = setup_limiter(app, relay, [chat_bp, responses_bp])
    return app

"""`Relay`: everything one worker holds (settings, stores, the CLI's health, live runs). No Flask.

Created once per worker by `create_app`; the exchange and the routes reach every store through it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .cli.agent import check as check_agent
from .cli.invocation import MODEL_ALIASES, settings_fingerprint, spare_controls
from .cli.pool_client import PoolClient, PooledProcess
from .cli.process import RunSpec, child_env, probe_cli
from .cli.run import Run
from .cli.session_files import expire_session_files, remove_session_files, session_dir
from .config import ConfigError, Settings
from .core.conversation import Plan
from .core.models import ModelCatalog
from .core.record import RequestRecord
from .core.run_description import RunDescription
from .errors import RateLimited, Unavailable
from .state.accounts import AccountState
from .state.apikeys import KeyRing
from .state.cache import ResponseCache
from .state.connection import connect, host_id
from .state.leases import Leases
from .state.quotas import Quotas
from .state.responses import ResponseStore
from .state.sessions import Sessions
from .state.slots import RunSlots
from .state.stats import Stats

if TYPE_CHECKING:
    from flask_limiter import Limiter

log = logging.getLogger("relay")


class Relay:
    """Everything one worker needs; created once per worker by `create_app`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        self.catalog = ModelCatalog(settings["default_model"], settings["extra_models"])
        self._redis = connect(settings["redis_url"])
        self.host = settings["host_id"] or host_id()
        self.leases = Leases(self._redis, settings["lease_ttl_s"])
        self.slots = RunSlots(self._redis, self.leases, self.host)
        self.sessions = Sessions(self._redis, settings["sessions.ttl_hours"], settings["sessions.enabled"])
        self.responses = ResponseStore(self._redis, settings["sessions.ttl_hours"])
        self.account = AccountState(self._redis, self.host, settings["login_recheck_s"])
        var = settings.path("var_dir")
        self.cli_cwd = var / "cli-cwd"      # stable (sessions are scoped to it) and empty
        self.tmp_dir = var / "tmp"
        for d in (self.cli_cwd, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.cli_env = child_env(dict(os.environ), settings["cli_max_retries"], settings["claude_config_dir"])
        self.stats = Stats(self._redis, settings.path("log_dir") / "stats.json", settings["max_requests_per_day"],
                           settings["stats.log_first_message"], settings["prices"])
        self.active: dict[str, Run] = {}
        self.keys = KeyRing(settings.source, settings["auth.api_keys"], self._redis)
        self.quotas = Quotas(self._redis, settings["rate_limit.max_tokens_per_day"])
        self.response_cache = ResponseCache(self._redis, settings["cache.ttl"], settings["cache.min_tokens"])
        self.limiter: Limiter | None = None   # set by api.init_app
        self.expose_reasoning: bool = settings["relay.expose_reasoning"]
        self.pool = PoolClient(var / "pool.sock", settings["pool.enabled"])
        self._cli: dict[str, Any] = {}
        self._cli_checked = 0.0
        self.check_cli(force=True)
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
        state = self.account.get()
        if state.get("cooldown_until"):
            wait = state["cooldown_until"] - time.time()
            raise RateLimited(f"The Claude subscription behind this relay is at its usage limit until "
                              f"{time.strftime('%H:%M UTC', time.gmtime(state['cooldown_until']))}; no request is "
                              f"sent upstream until then. ({state.get('cooldown_reason', '')})", retry_after=wait)
        if state.get("login_problem"):
            raise Unavailable(state["login_problem"], code="cli_login_required", retry_after=30)

    def pooled(self, desc: RunDescription, plan: Plan, spec: RunSpec) -> tuple[PooledProcess | None, str]:
        """The run on a process of the host's pool (a spare, this conversation's warm process, or a cold
        one the pool may keep afterwards), or (None, why) when this worker must spawn the CLI itself."""
        if not self.pool.enabled:
            return None, ""
        why = ("agent mode" if desc.agent else "function calling" if desc.client_tools
               else "sessions off" if not plan.conv_key or not plan.cli_session else "")
        if why:  # agent runs stay cold (own working directory, sandboxing); tools answer permissions
            self.pool.note(why)
            return None, why
        want: str | None = None
        extra: dict[str, Any] = {}
        spare_model_ok = desc.model in MODEL_ALIASES or desc.model == self.settings["default_model"]
        if plan.first_turn and not plan.resume and not spare_model_ok:
            # measured: `set_model` with a full model id costs a 1-token API request to validate it
            # (spares are spawned with default_model, which needs no `set_model`)
            why = "pinned model (a spare would validate it upstream)"
        elif plan.first_turn and not plan.resume:
            want, extra = "spare", {"controls": spare_controls(desc)}
        elif plan.warm:
            host, _, rest = plan.warm.partition("|")
            proc_id, _, turns = rest.partition("|")
            if host == self.host and turns.isdigit():
                want, extra = "warm", {"proc": proc_id, "turns": int(turns)}
            else:
                why = "held by another host"
        else:
            why = "pending tool calls" if plan.resume_at else "no warm process"
        request = {"want": want, "why": why, "conv": plan.conv_key, "fingerprint": settings_fingerprint(desc),
                   "model": desc.model, "line": spec.stdin.decode(),
                   "cold": {"argv": spec.argv, "cwd": spec.cwd, "temp_dir": spec.temp_dir,
                            "session_id": plan.cli_session}, **extra}
        proc = self.pool.run(request)
        return proc, "" if proc else "pool server unavailable"

    def config_dir(self) -> Path:
        d = self.settings["claude_config_dir"] or os.environ.get("CLAUDE_CONFIG_DIR") or "~/.claude"
        return Path(d).expanduser()

    def session_folder(self) -> Path:
        return session_dir(self.config_dir(), self.cli_cwd.resolve())

    # -- housekeeping ----------------------------------------------------------------------------
    def expire_cli_sessions(self) -> int:
        """Remove CLI session files idle for longer than the conversation TTL (one worker at a time)."""
        if not self.leases.once_per(int(max(1, self.settings["sessions.cleanup_interval_s"])), "janitor"):
            return 0
        keep = {c["cli_session_id"] for c in self.sessions.list_all() if c.get("cli_session_id")}
        return expire_session_files(self.session_folder(), self.settings["sessions.ttl_hours"] * 3600, keep)

    def forget_conversations(self, conv_id: str | None, scope: str | None, purge_files: bool) -> tuple[int, int]:
        """Delete one conversation (or all, in `scope` or everywhere); returns (deleted, files removed)."""
        victims = self.sessions.delete(conv_id, scope)
        removed = 0
        if purge_files:
            removed = remove_session_files(self.session_folder(),
                                           [c["cli_session_id"] for c in victims if c.get("cli_session_id")])
        return len(victims), removed

    def uptime(self) -> float:
        """Seconds since the gunicorn master started (a bare worker counts from its own start)."""
        try:
            parent = psutil.Process().parent()
            if parent and "gunicorn" in " ".join(parent.cmdline()):
                return time.time() - parent.create_time()
        except psutil.Error:
            pass
        return time.time() - self.started

    def redis_ok(self) -> dict[str, Any]:
        try:
            self._redis.ping()
            return {"ok": True}
        except Exception as exc:  # any Redis trouble is reported, never raised, by /health
            return {"ok": False, "error": str(exc)}

    def record(self, rec: RequestRecord) -> None:
        try:
            self.stats.record(rec.as_dict())
        except Exception as exc:  # stats must never break a response
            log.error("stats: could not record %s: %s", rec.id, exc)
        log.info("request %s key=%s model=%s stream=%s status=%s in=%s out=%s ms=%s", rec.request_id,
                 rec.key or "-", rec.model, rec.stream, rec.status, rec.input_tokens, rec.output_tokens,
                 rec.response_time_ms)
        try:
            self.quotas.charge(rec.key or None, rec.tokens_spent)
        except Exception as e:
            log.error("%s: could not charge %d tokens to the quota: %s", rec.request_id, rec.tokens_spent, e)

    def shutdown(self) -> None:
        for run in list(self.active.values()):
            run.cancel()
        self.stats.stop()

    def start_background(self) -> None:
        try:
            self.stats.restore_if_empty()
        except Exception as exc:  # Redis may be down at boot: /health shows it
            log.error("stats: restore skipped: %s", exc)
        self.stats.run_snapshots(self.settings["stats.snapshot_interval_s"])
        threading.Thread(target=self._janitor, daemon=True).start()

    def _janitor(self) -> None:
        interval = self.settings["sessions.cleanup_interval_s"]
        while True:
            time.sleep(interval)
            try:
                removed = self.expire_cli_sessions()
                if removed:
                    log.info("removed %d expired CLI session files", removed)
            except Exception as exc:  # keep going: Redis or the disk may recover
                log.warning("session file cleanup failed: %s", exc)

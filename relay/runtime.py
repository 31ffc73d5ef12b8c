"""`Relay`: everything one worker holds (settings, stores, the CLI's health, live runs). No Flask.

Created once per worker by `create_app`; the exchange and the routes reach every store through it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .cli.agent import check as check_agent
from .cli.agent import remove_all_dirs, remove_conversation_dirs
from .cli.agent import resolve as resolve_agent
from .cli.pool.client import PooledProcess
from .cli.pool.protocol import socket_path
from .cli.pool.source import ProcessSource
from .cli.process import RunSpec
from .cli.run import Run
from .cli.session_files import expire_session_files, remove_session_files, session_dir
from .cli.setup import CliSetup, account_envs
from .config import ConfigError, Settings
from .core import tokens
from .core.conversation import Plan, client_ids
from .core.metrics import AccountStatus, Live, WarmStats
from .core.models import ModelCatalog
from .core.record import RequestRecord
from .core.routing import AccountSpec
from .core.run_description import RunDescription
from .errors import Unavailable
from .state.accounts import Accounts
from .state.alerts import Alerts
from .state.apikeys import KeyRing
from .state.cache import ResponseCache
from .state.connection import connect, host_id
from .state.leases import Leases
from .state.metrics import MetricsStore, PoolTally
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
        self.responses = ResponseStore(self._redis, settings["sessions.ttl_hours"],
                                       settings["responses.max_stored_kb"] * 1024)
        self.cli = CliSetup.from_settings(settings).make_folders()
        self.cli_cwd, self.tmp_dir, self.cli_env = self.cli.cwd, self.cli.tmp_dir, self.cli.env
        self._init_accounts(settings)
        self.stats = Stats(self._redis, settings.path("log_dir") / "stats.json", settings["max_requests_per_day"],
                           settings["stats.log_first_message"], settings["prices"])
        self.active: dict[str, Run] = {}
        self.keys = KeyRing(settings.source, settings["auth.api_keys"], self._redis)
        self.quotas = Quotas(self._redis, settings["rate_limit.max_tokens_per_day"])
        self.metrics = MetricsStore(self._redis)
        self.response_cache = ResponseCache(self._redis, settings["response_cache.ttl"],
                                            settings["response_cache.min_tokens"])
        self.limiter: Limiter | None = None   # set by api.init_app
        self.expose_reasoning: bool = settings["relay.expose_reasoning"]
        self.pool = ProcessSource(socket_path(settings.path("var_dir")), settings["pool.enabled"], self.host,
                                  self.cli_env, settings["default_model"], PoolTally(self._redis, self.host))
        self._cli: dict[str, Any] = {}
        self._cli_checked = 0.0
        self.check_cli(force=True)
        check_agent(settings)

    # -- accounts (issue 12): each configured subscription with its own CLI environment --------------
    def _init_accounts(self, settings: Settings) -> None:
        self.alerts = Alerts(self._redis, settings["alerts.webhooks"], self.host, settings["alerts.max_attempts"],
                             settings["alerts.retry_base_s"])
        specs = [AccountSpec.from_config(a) for a in settings["accounts"]] or \
            [AccountSpec("default", implicit=True)]
        self.accounts = Accounts(self._redis, self.leases, specs, self.host, settings["login_recheck_s"],
                                 settings["accounts_overage"], settings["alerts.thresholds"], self.alerts.emit)
        # each account's login: its config dir and/or OAuth token; the others' tokens are scrubbed
        self.account_envs, self.account_problems = account_envs(specs, self.cli_env)

    def account_meter(self) -> list[dict[str, Any]]:
        return self.accounts.snapshot(self.settings["sessions.ttl_hours"] * 3600, self.account_problems)

    def account_summary(self) -> dict[str, Any]:
        """Why no account can answer (cooldown until the earliest reset, or the broken login)."""
        views = self.accounts.views(problems=self.account_problems)
        err = self.accounts.unusable_error(views)
        if err.code == "cli_login_required":
            return {"login_problem": err.message}
        until = time.time() + (err.retry_after or 0)
        return {"cooldown_until": until, "cooldown_reason": err.message}

    def account_config_dir(self, name: str) -> Path:
        env = self.account_envs.get(name) or self.cli_env
        return Path(env.get("CLAUDE_CONFIG_DIR") or "~/.claude").expanduser()

    def session_folders(self) -> list[Path]:
        """Where each account's CLI keeps this relay's sessions (one folder per distinct config dir)."""
        dirs = {self.account_config_dir(s.name) for s in self.accounts.specs}
        return [session_dir(d, self.cli_cwd.resolve()) for d in sorted(dirs)]

    # -- the CLI ---------------------------------------------------------------------------------
    def check_cli(self, force: bool = False) -> dict[str, Any]:
        """Probe the CLI (cached; an unusable one is probed again every 30 s)."""
        if force or (not self._cli.get("ok") and time.monotonic() - self._cli_checked > 30):
            self._cli = self.cli.probe()
            self._cli_checked = time.monotonic()
            if self._cli.get("too_old"):
                raise ConfigError("claude_bin: " + str(self._cli["problem"]))
        return self._cli

    def cli_path(self) -> str:
        return str(self._cli.get("path") or self.settings["claude_bin"])

    def guard_spawning(self) -> None:
        """Refuse before spawning when the CLI is unusable (accounts are checked when one is chosen)."""
        info = self.check_cli()
        if not info.get("ok"):
            raise Unavailable(str(info.get("problem")), code="cli_unavailable")

    def pooled(self, desc: RunDescription, plan: Plan, spec: RunSpec,
               account: str | None = None) -> tuple[PooledProcess | None, str]:
        """The run on a process of the host's pool, or (None, why): see `cli/pool/source.py`."""
        return self.pool.acquire(desc, plan, spec, account)

    # -- housekeeping ----------------------------------------------------------------------------
    def expire_cli_sessions(self) -> int:
        """Remove CLI session files idle for longer than the conversation TTL (one worker at a time)."""
        if not self.leases.once_per(int(max(1, self.settings["sessions.cleanup_interval_s"])), "janitor"):
            return 0
        keep = {c["cli_session_id"] for c in self.sessions.list_all() if c.get("cli_session_id")}
        ttl = self.settings["sessions.ttl_hours"] * 3600
        return sum(expire_session_files(folder, ttl, keep) for folder in self.session_folders())

    def forget_conversations(self, conv_id: str | None, scope: str | None, purge_files: bool,
                             own_scope: str | None = None) -> tuple[int, int]:
        """Forget one conversation of `scope` (or all, in `scope` or everywhere) with its stored Responses;
        with `purge_files` also its CLI transcripts and agent folders. Returns (deleted, files removed).

        `conv_id` is a listed id (`s:ticket-4711`) or, within the caller's `own_scope`, the id the client
        chose: its X-Session-Id value or its `user`."""
        victims = self.sessions.delete(conv_id, scope)
        if not victims and conv_id and own_scope:
            for alias in client_ids(conv_id):
                victims += self.sessions.delete(alias, own_scope)
        for c in victims:
            self.responses.delete_conversation(c["scope"], c["id"])
        if conv_id is None:
            self.responses.delete_scope(scope)
        removed = 0
        if purge_files:
            ids = [c["cli_session_id"] for c in victims if c.get("cli_session_id")]
            removed = sum(remove_session_files(folder, ids) for folder in self.session_folders())
            agents = self._agent_setups()
            if conv_id is None and scope is None:  # everything: folders of expired conversations too
                removed += sum(remove_all_dirs(a) for a in agents)
            else:
                removed += sum(remove_conversation_dirs(agents, f"{c['scope']}\x00{c['id']}") for c in victims)
        return len(victims), removed

    def _agent_setups(self) -> list[Any]:
        """Every agent folder layout in use: the global one and any key's own workdir_root."""
        setups = [resolve_agent(self.settings, dict(k.agent or {}, enabled=True)) for k in self.keys.keys]
        setups.append(resolve_agent(self.settings, {"enabled": True}))
        return list({(a.workdir_root, a.config_root): a for a in setups if a is not None}.values())

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

    # -- what operators see ---------------------------------------------------------------------
    def account_statuses(self) -> list[AccountStatus]:
        """Every account this relay routes to, with its limit state and window utilization."""
        return self.accounts.statuses(problems=self.account_problems)

    def warm_stats(self) -> WarmStats:
        return self.pool.warm_stats()

    def live(self) -> Live:
        """The gauges of this host, read now."""
        queued, oldest = self.slots.waiting(self.settings["queue_timeout_s"])
        return Live(host=self.host, active_runs=self.slots.in_use(), max_runs=self.settings["max_concurrent_runs"],
                    queued=queued, oldest_wait_s=round(oldest, 3), warm=self.warm_stats(),
                    accounts=self.account_statuses())

    def record(self, rec: RequestRecord) -> None:
        try:
            self.stats.record(rec.as_dict())
        except Exception as exc:  # stats must never break a response
            log.error("stats: could not record %s: %s", rec.id, exc)
        try:
            self.metrics.record(rec)
        except Exception as exc:  # nor must the metrics
            log.error("metrics: could not record %s: %s", rec.id, exc)
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
        self.alerts.stop()

    def start_background(self) -> None:
        try:
            self.stats.restore_if_empty()
        except Exception as exc:  # Redis may be down at boot: /health shows it
            log.error("stats: restore skipped: %s", exc)
        self.stats.run_snapshots(self.settings["stats.snapshot_interval_s"])
        self.alerts.run(tick=self.accounts.recoveries)
        threading.Thread(target=self._janitor, daemon=True).start()
        tokens.warm()  # a burst of count_tokens right after start-up must not wait for it

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

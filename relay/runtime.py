"""`Relay`: everything one worker holds (settings, stores, the CLI's health, live runs). No Flask.

Created once per worker by `create_app`; the exchange and the routes reach every store through it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from .cli.agent import check as check_agent
from .cli.invocation import CACHE_ENV, MODEL_ALIASES, settings_fingerprint, spare_controls
from .cli.pool_client import PoolClient, PooledProcess, PoolMetrics
from .cli.process import RunSpec, account_envs, child_env, probe_cli
from .cli.run import Run
from .cli.session_files import cli_workdir
from .config import ConfigError, Settings
from .core import tokens
from .core.conversation import Plan
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
from .state.metrics import MetricsStore
from .state.quotas import Quotas
from .state.responses import ResponseStore
from .state.sessions import Sessions
from .state.slots import RunSlots
from .state.stats import Stats

if TYPE_CHECKING:
    from flask_limiter import Limiter

log = logging.getLogger("relay")


class WarmPoolStats(Protocol):
    """What the metrics need from a warm CLI pool; `Relay.warm_pool` is None until one exists."""

    def stats(self) -> WarmStats: ...


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
        var = settings.path("var_dir")
        self.cli_cwd = cli_workdir(settings)  # stable (sessions are scoped to it), empty, outside any repo
        self.tmp_dir = var / "tmp"
        self.cli_cwd.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.cli_env = child_env(dict(os.environ), settings["cli_max_retries"], settings["claude_config_dir"])
        self._init_accounts(settings)
        self.stats = Stats(self._redis, settings.path("log_dir") / "stats.json", settings["max_requests_per_day"],
                           settings["stats.log_first_message"], settings["prices"])
        self.active: dict[str, Run] = {}
        self.keys = KeyRing(settings.source, settings["auth.api_keys"], self._redis)
        self.quotas = Quotas(self._redis, settings["rate_limit.max_tokens_per_day"])
        self.metrics = MetricsStore(self._redis)
        self.warm_pool: WarmPoolStats | None = None
        self.response_cache = ResponseCache(self._redis, settings["response_cache.ttl"],
                                            settings["response_cache.min_tokens"])
        self.limiter: Limiter | None = None   # set by api.init_app
        self.expose_reasoning: bool = settings["relay.expose_reasoning"]
        self.pool = PoolClient(var / "pool.sock", settings["pool.enabled"])
        if settings["pool.enabled"]:
            self.warm_pool = PoolMetrics(self.pool)
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
        """Refuse before spawning when the CLI is unusable (accounts are checked when one is chosen)."""
        info = self.check_cli()
        if not info.get("ok"):
            raise Unavailable(str(info.get("problem")), code="cli_unavailable")

    def pooled(self, desc: RunDescription, plan: Plan, spec: RunSpec,
               account: str | None = None) -> tuple[PooledProcess | None, str]:
        """The run on a process of the host's pool (a spare, this conversation's warm process, or a cold
        one the pool may keep afterwards), or (None, why) when this worker must spawn the CLI itself.
        Spares hold the host's own login; a run on another account gets a process with its own
        environment, and a warm process serves only the account it was started for."""
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
        # spares hold the host's own login and the CLI's default prompt caching; the run's own temp folder
        # (CLAUDE_CODE_TMPDIR) is the only per-run difference a spare may ignore (it has its own)
        flavour = {k: v for k, v in spec.env.items() if k in CACHE_ENV}  # prompt caching: spares follow demand
        spare_env_ok = {k: v for k, v in spec.env.items()
                        if k != "CLAUDE_CODE_TMPDIR" and k not in CACHE_ENV} == self.cli_env
        if plan.first_turn and not plan.resume and not spare_env_ok:
            why = f"account {account} (spares hold the host's own login)"
        elif plan.first_turn and not plan.resume and not spare_model_ok:
            # measured: `set_model` with a full model id costs a 1-token API request to validate it
            # (spares are spawned with default_model, which needs no `set_model`)
            why = "pinned model (a spare would validate it upstream)"
        elif plan.first_turn and not plan.resume:
            want, extra = "spare", {"controls": spare_controls(desc), "flavour": flavour}
        elif plan.warm:
            host, _, rest = plan.warm.partition("|")
            proc_id, _, turns = rest.partition("|")
            if host == self.host and turns.isdigit():
                want, extra = "warm", {"proc": proc_id, "turns": int(turns)}
            else:
                why = "held by another host"
        else:
            why = "pending tool calls" if plan.resume_at else "no warm process"
        cold: dict[str, Any] = {"argv": spec.argv, "cwd": spec.cwd, "temp_dir": spec.temp_dir,
                                "session_id": plan.cli_session}
        cold["env"] = spec.env  # over the pool's private socket: the account's login, the run's temp folder
        request = {"want": want, "why": why, "conv": plan.conv_key, "model": desc.model,
                   "fingerprint": f"{settings_fingerprint(desc)}:{account or ''}", "line": spec.stdin.decode(),
                   "cold": cold, **extra}
        proc = self.pool.run(request)
        return proc, "" if proc else "pool server unavailable"


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
        return self.warm_pool.stats() if self.warm_pool is not None else WarmStats()

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
        tokens.warm()  # a burst of count_tokens right after start-up must not wait for it

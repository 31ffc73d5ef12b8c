"""`Relay`: everything one worker holds (settings, stores, the CLI's health, live runs). No Flask.

Created once per worker by `create_app`; the exchange and the routes reach every store through it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .cli.agent import check as check_agent
from .cli.pool.protocol import socket_path
from .cli.pool.source import ProcessSource
from .cli.run import Run
from .cli.setup import CliSetup, account_envs
from .cli.watch import CliWatch, Verdict, failure_alert
from .config import ConfigError, Settings
from .core import tokens
from .core.models import ModelCatalog
from .core.record import RequestRecord
from .core.routing import AccountSpec
from .core.runaway import Limits
from .errors import Unavailable
from .state.accounts import Accounts
from .state.alerts import Alerts
from .state.apikeys import KeyRing
from .state.backlog import Backlog
from .state.cache import ResponseCache
from .state.cache_health import CacheHealth
from .state.connection import connect, eviction_risk, host_id
from .state.labels import ModelLabels
from .state.leases import Leases
from .state.metrics import MetricsStore, PoolTally
from .state.quotas import Quotas
from .state.responses import ResponseStore
from .state.runaway import Runaways
from .state.sessions import Sessions
from .state.shares import WindowShares
from .state.slots import RunSlots
from .state.stats import Stats
from .state.storm import FailoverRamp

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
                           settings["stats.log_first_message"], settings["prices"], settings["stats.request_days"])
        self.backlog = Backlog()   # what a Redis outage delayed
        self.active: dict[str, Run] = {}
        self.keys = KeyRing(settings.source, settings["auth.api_keys"], self._redis)
        self.quotas = Quotas(self._redis, settings["rate_limit.max_tokens_per_day"])
        self.runaways = Runaways(self._redis, Limits(settings["runaway.max_replays_in_a_row"],
                                                     settings["runaway.burn_ratio"], settings["runaway.burn_min_tokens"],
                                                     settings["runaway.cooldown_s"], settings["runaway.window_s"]))
        self.metrics = MetricsStore(self._redis)
        self.model_labels = ModelLabels(self._redis, self.catalog.label_names())
        self.response_cache = ResponseCache(self._redis, settings["response_cache.ttl"],
                                            settings["response_cache.min_tokens"])
        self.limiter: Limiter | None = None   # set by api.init_app
        self.expose_reasoning: bool = settings["relay.expose_reasoning"]
        self.pool = ProcessSource(socket_path(settings.path("var_dir")), settings["pool.enabled"], self.host,
                                  self.cli_env, settings["default_model"], PoolTally(self._redis, self.host),
                                  settings["tool_wait_s"])
        self._cli: dict[str, Any] = {}
        self._cli_checked = 0.0
        self.check_cli(force=True)
        check_agent(settings)
        self._stopping = threading.Event()
        self.cli_watch = CliWatch(settings["claude_bin"], self.cli_env, settings.path("var_dir"),
                                  settings["cli_watch_s"], on_verdict=self._cli_verdict)

    # -- accounts (issue 12): each configured subscription with its own CLI environment --------------
    def _init_accounts(self, settings: Settings) -> None:
        self.alerts = Alerts(self._redis, settings["alerts.webhooks"], self.host, settings["alerts.max_attempts"],
                             settings["alerts.retry_base_s"])
        self.cache_health = CacheHealth(self._redis, self.alerts)
        specs = [AccountSpec.from_config(a) for a in settings["accounts"]] or \
            [AccountSpec("default", implicit=True)]
        self.accounts = Accounts(self._redis, self.leases, specs, self.host, settings["login_recheck_s"],
                                 settings["accounts_overage"], settings["alerts.thresholds"], self.alerts.emit,
                                 settings["alerts.repeat_window_s"], self.alerts.forget)
        self.accounts.ramp = FailoverRamp(self._redis, settings["accounts_failover_ramp_s"],
                                          settings["accounts_failover_start"], settings["max_concurrent_runs"])
        # each account's login: its config dir and/or OAuth token; the others' tokens are scrubbed
        self.account_envs, self.account_problems = account_envs(specs, self.cli_env)
        self.shares = WindowShares(self._redis)   # each key's share of each window (api_keys[].window_share)

    # -- the CLI ---------------------------------------------------------------------------------
    def check_cli(self, force: bool = False) -> dict[str, Any]:
        """Probe the CLI (cached; an unusable one is probed again every 30 s)."""
        if force or (not self._cli.get("ok") and time.monotonic() - self._cli_checked > 30):
            self._cli = self.cli.probe()
            self._cli_checked = time.monotonic()
            if self._cli.get("too_old"):
                raise ConfigError("claude_bin: " + str(self._cli["problem"]))
        return self._cli

    def _cli_verdict(self, verdict: Verdict, old: Verdict | None) -> None:
        """The watch self-tested a changed CLI: a failure is an operator alert (once per binary)."""
        self._cli, self._cli_checked = self.cli.probe(), time.monotonic()  # /health names the new version
        if verdict["status"] == "failed":
            self.alerts.emit("cli_selftest_failed", None, *failure_alert(verdict, self.host))

    def cli_path(self) -> str:
        return str(self._cli.get("path") or self.settings["claude_bin"])

    def guard_spawning(self) -> None:
        """Refuse before spawning when the CLI is unusable (accounts are checked when one is chosen)."""
        info = self.check_cli()
        if not info.get("ok"):
            raise Unavailable(str(info.get("problem")), code="cli_unavailable")

    def redis_ok(self) -> dict[str, Any]:
        try:
            self._redis.ping()
            return {"ok": True}
        except Exception as exc:  # any Redis trouble is reported, never raised, by /health
            cause = exc.__cause__ or exc
            return {"ok": False, "error": str(cause), "down_since": self.redis_down_since()}

    def redis_down_since(self) -> float | None:
        """When this worker's Redis commands began to fail (None while they succeed)."""
        return getattr(self._redis, "down_since", None)

    def record(self, rec: RequestRecord) -> None:
        """Count a finished request: stats, metrics, the key's quota. A Redis outage delays each write
        (the backlog replays it once Redis is back); no other failure may break a response."""
        labelled: list[str] = []

        def label() -> str:  # the model it counts under (bounded: state/labels.py), worked out once
            if not labelled:
                vouched = self.catalog.get(rec.requested_model or "") is not None
                labelled.append(self.model_labels.label(rec.model, rec.status == 200, vouched))
            return labelled[0]
        writes = (("stats", lambda: self.stats.record(rec.as_dict(), label())),
                  ("metrics", lambda: self.metrics.record(replace(rec, model=label()))),
                  ("quota", lambda: self.quotas.charge(rec.key_id or None, rec.tokens_spent)),
                  ("cache health", lambda: self.cache_health.record(rec, rec.moved)))
        for what, write in writes:
            try:
                self.backlog.write(what, write)
            except Exception as exc:  # never break a response over it
                log.error("%s: could not record %s: %s", what, rec.id, exc)
        log.info("request %s key=%s model=%s stream=%s status=%s in=%s out=%s ms=%s", rec.request_id,
                 rec.key or "-", rec.model, rec.stream, rec.status, rec.input_tokens, rec.output_tokens,
                 rec.response_time_ms)

    def shutdown(self) -> None:
        self._stopping.set()
        for run in list(self.active.values()):
            run.cancel()
        self.backlog.stop()
        self.stats.stop()
        self.alerts.stop()

    def start_background(self) -> None:
        try:
            self.stats.restore_if_empty()
            risk = eviction_risk(self._redis)
        except Exception as exc:  # Redis may be down at boot: /health shows it
            log.error("stats: restore skipped: %s", exc)
            risk = None
        if risk:
            log.warning("Redis: %s", risk)
        self.backlog.run()
        self.stats.run_snapshots(self.settings["stats.snapshot_interval_s"])
        self.alerts.run(tick=self.accounts.recoveries)
        if self.cli_watch.enabled:
            threading.Thread(target=self.cli_watch.run, args=(self._stopping.wait,), daemon=True).start()
        tokens.warm()  # a burst of count_tokens right after start-up must not wait for it

"""The app factory and the per-worker `Relay` object that holds settings, stores and live runs."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request

from .cli import child_env, probe_cli
from .config import ConfigError, Settings, load_settings
from .errors import RelayError, Unavailable, not_found_route
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
        self.expose_reasoning = False
        self._cli: dict[str, Any] = {}
        self._cli_checked = 0.0
        self.check_cli(force=True)

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
        info = self.check_cli()
        if not info.get("ok"):
            raise Unavailable(str(info.get("problem")), code="cli_unavailable")

    def slot_key(self) -> str:
        return f"{PREFIX}slots:{host_id()}"

    def config_dir(self) -> Path:
        d = self.settings["claude_config_dir"] or os.environ.get("CLAUDE_CONFIG_DIR") or "~/.claude"
        return Path(d).expanduser()

    def expire_cli_sessions(self) -> int:
        """Remove CLI session files idle for longer than the conversation TTL (one worker at a time)."""
        interval = max(1, int(self.settings["sessions.cleanup_interval_s"]))
        if not self.r.set(PREFIX + "janitor", "1", nx=True, ex=interval):
            return 0
        keep = {c["cli_session_id"] for c in self.sessions.list() if c.get("cli_session_id")}
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
    app.config["MAX_CONTENT_LENGTH"] = None
    relay = Relay(settings)
    app.extensions["relay"] = relay
    try:
        relay.stats.restore_if_empty()
    except Exception as exc:  # Redis may be down at boot: /health shows it
        log.error("stats: restore skipped: %s", exc)
    relay.stats.run_snapshots(settings["stats.snapshot_interval_s"])
    _start_janitor(relay)
    atexit.register(relay.shutdown)

    from .routes_chat import bp as chat_bp
    from .routes_meta import bp as meta_bp

    app.register_blueprint(meta_bp)
    app.register_blueprint(chat_bp)

    @app.before_request
    def _request_id() -> None:
        rid = request.headers.get("x-request-id", "")
        g.request_id = rid if 0 < len(rid) <= 128 and rid.isprintable() else "req_" + secrets.token_hex(16)

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["x-request-id"] = getattr(g, "request_id", "")
        resp.headers.setdefault("openai-version", "2020-10-01")
        return resp

    @app.errorhandler(RelayError)
    def _relay_error(exc: RelayError) -> tuple[Response, int, dict[str, str]]:
        return jsonify(exc.body()), exc.status, exc.response_headers()

    @app.errorhandler(404)
    def _not_found(_: Any) -> tuple[Response, int]:
        return jsonify(not_found_route(request.path).body()), 404

    @app.errorhandler(405)
    def _method(_: Any) -> tuple[Response, int]:
        err = RelayError(f"Method {request.method} is not allowed on {request.path}.")
        body = err.body()
        body["error"].update(type="invalid_request_error", code="method_not_allowed")
        return jsonify(body), 405

    @app.errorhandler(Exception)
    def _crash(exc: Exception) -> tuple[Response, int]:
        from werkzeug.exceptions import HTTPException

        if isinstance(exc, HTTPException):
            body = RelayError(exc.description or exc.name).body()
            body["error"].update(type="invalid_request_error", code=exc.name.lower().replace(" ", "_"))
            return jsonify(body), exc.code or 400
        log.exception("unexpected error on %s", request.path)
        return jsonify(RelayError("Internal error in the relay; see its log (request id "
                                  f"{getattr(g, 'request_id', '')}).").body()), 500

    return app

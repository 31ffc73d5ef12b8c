"""Everything but the completions: health, models, usage, stats and conversation admin."""

from __future__ import annotations

import time
from typing import Any

import psutil
import redis
from flask import Blueprint, current_app, g, jsonify, request

from .errors import NotFound
from .store import PREFIX

bp = Blueprint("meta", __name__)


def _relay() -> Any:
    return current_app.extensions["relay"]


@bp.get("/health")
def health() -> Any:
    relay = _relay()
    cli = relay.check_cli()
    try:
        relay.r.ping()
        red: dict[str, Any] = {"ok": True}
        active = relay.leases.slot_count(relay.slot_key())
    except redis.RedisError as exc:
        red, active = {"ok": False, "error": str(exc)}, None
    ok = bool(cli.get("ok")) and red["ok"]
    try:
        account = relay.account_state()
    except redis.RedisError:
        account = {}
    if account.get("cooldown_until"):
        account["cooldown_until_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(account["cooldown_until"]))
        account["cooldown_remaining_s"] = round(account["cooldown_until"] - time.time())
    body = {"status": "ok" if ok else "degraded", "host": relay.host, "account": account,
            "cli": {k: cli.get(k) for k in ("ok", "path", "version", "problem")},
            "redis": red, "active_runs": active, "worker_active_runs": len(relay.active),
            "max_concurrent_runs": relay.settings["max_concurrent_runs"]}
    return jsonify(body), 200 if ok else 503


@bp.get("/v1/models")
def list_models() -> Any:
    return jsonify({"object": "list", "data": _relay().catalog.list()})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id: str) -> Any:
    entry = _relay().catalog.get(model_id)
    if entry is None:
        raise NotFound(f"The model `{model_id}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return jsonify(entry.as_openai())


def _uptime() -> float:
    try:  # the gunicorn master started the relay; a bare worker counts from its own start
        parent = psutil.Process().parent()
        if parent and "gunicorn" in " ".join(parent.cmdline()):
            return time.time() - parent.create_time()
    except psutil.Error:
        pass
    return time.time() - _relay().started


@bp.get("/stats")
def stats() -> Any:
    relay = _relay()
    total = relay.stats.totals()
    sessions = sum(1 for _ in relay.r.scan_iter(match=PREFIX + "conv:*", count=500))
    active = relay.leases.slot_count(relay.slot_key())
    return jsonify({
        "uptime_s": round(_uptime(), 1),
        "requests": {"total": total["requests"], "completed": total["successful"], "errors": total["errors"],
                     "cancelled": total["cancelled"], "active": active,
                     "queued": max(0, int(relay.r.get(PREFIX + "queued") or 0))},
        "concurrency": {"max_concurrent_runs": relay.settings["max_concurrent_runs"], "in_use": active},
        "sessions": sessions,
        "tokens": {k: total[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens",
                                         "cache_creation_tokens", "total_tokens")},
        **relay.stats.latency(),
    })


def _own_key() -> str | None:
    """A normal key sees only its own usage; admins (and a relay without auth) see everyone's."""
    key = getattr(g, "api_key", None)
    return key.name if key is not None and not key.admin else None


@bp.get("/v1/usage")
def usage() -> Any:
    days = request.args.get("days", "31")
    n = int(days) if days.isascii() and days.isdigit() else 31
    return jsonify(_relay().stats.usage(key=_own_key(), days=max(1, min(366, n))))


@bp.get("/v1/usage/recent")
def usage_recent() -> Any:
    limit = request.args.get("limit", "50")
    n = max(1, min(1000, int(limit) if limit.isascii() and limit.isdigit() else 50))
    return jsonify({"object": "list", "data": _relay().stats.recent(n, key=_own_key())})


@bp.get("/v1/sessions")
def sessions_list() -> Any:
    return jsonify({"object": "list", "data": _relay().sessions.list_all()})


def _purge(victims: list[dict[str, Any]]) -> int:
    relay = _relay()
    if request.args.get("purge_files", "").lower() not in ("1", "true", "yes"):
        return 0
    from .sessions import session_dir

    folder = session_dir(relay.config_dir(), relay.cli_cwd.resolve())
    removed = 0
    for c in victims:
        f = folder / f"{c.get('cli_session_id')}.jsonl"
        if c.get("cli_session_id") and f.exists():
            f.unlink()
            removed += 1
    return removed


@bp.delete("/v1/sessions")
def sessions_delete_all() -> Any:
    victims = _relay().sessions.delete(None)
    return jsonify({"object": "list", "deleted": len(victims), "files_removed": _purge(victims)})


@bp.delete("/v1/sessions/<path:conv_id>")
def sessions_delete(conv_id: str) -> Any:
    victims = _relay().sessions.delete(conv_id)
    if not victims:
        raise NotFound(f"No conversation {conv_id!r}.", param="id", code="session_not_found")
    return jsonify({"id": conv_id, "object": "conversation.deleted", "deleted": True,
                    "files_removed": _purge(victims)})

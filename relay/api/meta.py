"""Everything but the completions: health, models, usage, stats and conversation admin."""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from flask import Blueprint, g, jsonify, request

from .. import health as host_health
from ..core.routing import usability
from ..errors import Forbidden, NotFound, RelayError
from ..housekeeping import forget_conversations
from ..runtime import Relay
from ..state.apikeys import presented_key
from .common import caller_scope, current_relay

bp = Blueprint("meta", __name__)
log = logging.getLogger("relay.http")


def _relay() -> Relay:
    return current_relay()


def _sees_details() -> bool:
    """Paths, the hostname and the account state are for operators: an admin key, or (auth off) a
    client on this machine itself."""
    relay = _relay()
    if relay.settings["auth.enabled"]:
        presented = presented_key(request.headers)
        try:
            key = relay.keys.identify(presented) if presented else None
        except RelayError:  # Redis away: /health still answers, without the details
            return False
        return key is not None and key.admin
    return _local()


@bp.get("/health")
def health() -> Any:
    relay = _relay()
    cli = relay.check_cli()
    red = relay.redis_ok()
    active: int | None = None
    account: dict[str, Any] = {}
    accounts: list[dict[str, Any]] = []
    if red["ok"]:
        active = relay.slots.in_use()
        accounts = host_health.account_meter(relay)
        if not any(a["usable"] for a in accounts):  # the relay as a whole cannot answer: say why
            account = host_health.account_summary(relay)
    selftest = _selftest(relay)
    no_account = bool(red["ok"] and accounts and not any(a["usable"] for a in accounts))
    # no account can answer: degraded while they wait for a reset (every host shares them: a load balancer
    # taking this host out would gain nothing, and the relay's 429 says when to come back); 503 when only
    # logins are broken (the operator must act; another host's own login may work)
    ok = bool(cli.get("ok")) and red["ok"] and (selftest or {}).get("status") != "failed" \
        and not (no_account and "login_problem" in account)
    helper_view = host_health.helpers(relay)
    down = host_health.outages(relay, helper_view, red["ok"])
    if red.get("down_since"):
        red["down_since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(red["down_since"]))
    if account.get("cooldown_until"):
        account["cooldown_until_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(account["cooldown_until"]))
        account["cooldown_remaining_s"] = round(account["cooldown_until"] - time.time())
    # degraded: something is down (a pool server away still answers, from CLIs spawned by the workers);
    # 503 only when requests cannot be answered (no CLI, no Redis) or the CLI failed its self-test
    body = {"status": "ok" if ok and not down and not no_account else "degraded", "host": relay.host,
            "account": account, "accounts_usable": sum(1 for a in accounts if a["usable"]) if red["ok"] else None,
            "accounts": accounts,
            "cli": dict({k: cli.get(k) for k in ("ok", "path", "version", "problem")}, selftest=selftest),
            "redis": red, "down": down, "helpers": helper_view, "delayed_records": len(relay.backlog),
            "active_runs": active, "worker_active_runs": len(relay.active),
            "max_concurrent_runs": relay.settings["max_concurrent_runs"], "pool": _pool_summary(relay)}
    if not _sees_details():  # anyone may ask whether the relay is up and what is down, not where it lives
        body = {"status": body["status"], "cli": {"ok": bool(cli.get("ok")), "version": cli.get("version"),
                                                  "selftest": (selftest or {}).get("status")},
                "redis": {"ok": red["ok"]}, "down": down, "accounts_usable": body["accounts_usable"]}
    return jsonify(body), 200 if ok else 503


def _selftest(relay: Relay) -> dict[str, Any] | None:
    """The CLI watch's last verdict on this host's binary (see `python -m relay check --conformance`)."""
    v = relay.cli_watch.verdict() if relay.cli_watch.enabled else None
    if not v:
        return None
    ident = v.get("identity") or {}
    return {"status": v.get("status"), "version": ident.get("version"), "path": ident.get("path"),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(v.get("at") or 0))),
            "summary": v.get("summary"), "failed": v.get("failed") or []}


def _pool_summary(relay: Relay) -> dict[str, Any]:
    """The warm-process pool at a glance (the full figures are in /stats)."""
    st = relay.pool.stats()
    if not st.get("enabled") or not st.get("ok"):
        return st
    return {"enabled": True, "ok": True, "spares_ready": st["spares"]["ready"], "spares_target": st["spares"]["target"],
            "warm": len(st["warm"]), "max_warm": st["max_warm"], "max_warm_basis": st.get("max_warm_basis"),
            "busy": st["busy"], "misses": st.get("misses") or {}, "problem": st.get("problem")}


@bp.get("/v1/accounts")
def accounts() -> Any:
    """The quota meter (admin): every account's windows, overage, runs, conversations, errors, usage."""
    relay = _relay()
    usage = relay.stats.accounts()
    data = [dict(a, object="account", usage=usage.get(a["name"], {})) for a in host_health.account_meter(relay)]
    return jsonify({"object": "list", "overage_policy": relay.settings["accounts_overage"], "data": data})


@bp.delete("/v1/accounts/<name>/state")
def account_clear(name: str) -> Any:
    """An admin clears one account's limit, overage and login state: it takes runs again at once."""
    relay = _relay()
    if not relay.settings["auth.enabled"] and not _local():
        raise Forbidden("With auth.enabled off, an account's state can be cleared only from this machine "
                        "(or with `python -m relay accounts clear NAME`).", code="admin_required")
    try:
        before = relay.accounts.clear(name)
    except KeyError:
        raise NotFound(f"No Claude account named {name!r}.", param="name", code="account_not_found") from None
    log.warning("account %s cleared through the API by %s", name, getattr(g, "key_name", "") or g.client_ip)
    after = next(a for a in host_health.account_meter(relay) if a["name"] == name)
    return jsonify(dict(after, object="account", cleared=True,
                        was={"state": usability(before).kind or "ok", "reason": usability(before).reason or None}))


def _local() -> bool:
    try:
        return ipaddress.ip_address(g.client_ip).is_loopback
    except ValueError:
        return False


def _anthropic() -> bool:
    """Anthropic clients send `anthropic-version`: they get Anthropic's model objects."""
    return "anthropic-version" in request.headers


@bp.get("/v1/models")
def list_models() -> Any:
    if _anthropic():
        return jsonify(_relay().catalog.list_anthropic())
    return jsonify({"object": "list", "data": _relay().catalog.list()})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id: str) -> Any:
    entry = _relay().catalog.get(model_id)
    if entry is None:
        raise NotFound(f"The model `{model_id}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return jsonify(entry.as_anthropic() if _anthropic() else entry.as_openai())


@bp.get("/stats")
def stats() -> Any:
    relay = _relay()
    total = relay.stats.totals()
    active = relay.slots.in_use()
    queue = relay.slots.queue()
    per_account = relay.stats.accounts()
    return jsonify({
        "uptime_s": round(host_health.uptime(relay), 1),
        "requests": {"total": total["requests"], "completed": total["successful"], "errors": total["errors"],
                     "cancelled": total["cancelled"], "active": active,
                     "queued": queue["length"]},
        "queue": dict(queue, timeout_s=relay.settings["queue_timeout_s"]),
        "concurrency": {"max_concurrent_runs": relay.settings["max_concurrent_runs"], "in_use": active},
        "sessions": relay.sessions.count(),
        "tokens": {k: total[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens",
                                         "cache_creation_tokens", "total_tokens")},
        **relay.stats.latency(),
        "pool": relay.pool.stats(),
        "runaway": relay.runaways.summary(),
        "accounts": {a["name"]: {"usable": a["usable"], "state": a["state"], "in_flight": a["in_flight"],
                                 "conversations": a["conversations"], "windows": a["windows"],
                                 "usage": per_account.get(a["name"], {})} for a in host_health.account_meter(relay)},
    })


def _own_key() -> tuple[str | None, str | None]:
    """A normal key sees only its own usage (by its id: a re-issued name starts afresh); admins (and
    a relay without auth) see everyone's."""
    key = getattr(g, "api_key", None)
    return (key.name, key.id) if key is not None and not key.admin else (None, None)


@bp.get("/v1/usage")
def usage() -> Any:
    days = request.args.get("days", "31")
    n = int(days) if days.isascii() and days.isdigit() else 31
    name, kid = _own_key()
    return jsonify(_relay().stats.usage(key=name, days=max(1, min(366, n)), key_id=kid))


@bp.get("/v1/usage/recent")
def usage_recent() -> Any:
    limit = request.args.get("limit", "50")
    n = max(1, min(1000, int(limit) if limit.isascii() and limit.isdigit() else 50))
    name, kid = _own_key()
    return jsonify({"object": "list", "data": _relay().stats.recent(n, key=name, key_id=kid)})


@bp.get("/v1/sessions")
def sessions_list() -> Any:
    return jsonify({"object": "list", "data": _relay().sessions.list_all()})


def _purge_files() -> bool:
    return request.args.get("purge_files", "").lower() in ("1", "true", "yes")


@bp.delete("/v1/sessions")
def sessions_delete_all() -> Any:
    """Every conversation (or those of `?scope=`), with their stored Responses; files too with purge_files."""
    deleted, removed = forget_conversations(_relay(), None, request.args.get("scope") or None, _purge_files())
    return jsonify({"object": "list", "deleted": deleted, "files_removed": removed})


@bp.delete("/v1/sessions/<path:conv_id>")
def sessions_delete(conv_id: str) -> Any:
    """One conversation of one scope: the caller's own unless `?scope=` names another (ids repeat across keys)."""
    own = caller_scope()
    deleted, removed = forget_conversations(_relay(), conv_id, request.args.get("scope") or own, _purge_files(),
                                                     own_scope=own)
    if not deleted:
        raise NotFound(f"No conversation {conv_id!r}.", param="id", code="session_not_found")
    return jsonify({"id": conv_id, "object": "conversation.deleted", "deleted": True, "files_removed": removed})

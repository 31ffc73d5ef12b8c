"""Request hooks at the HTTP boundary: request ids, client address, CORS, API keys, headers, errors.

Every error leaves here as an OpenAI error object, or in Anthropic's shape on the Messages API routes
(and on /v1/models when the client sends `anthropic-version`); nothing else ever reaches a client. A Redis
outage is a 503 `redis_unavailable` with Retry-After, wherever it is met.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_limiter import RateLimitExceeded
from werkzeug.exceptions import HTTPException

from ..errors import Forbidden, PayloadTooLarge, RelayError, Unauthorized, UnsupportedMediaType, not_found_route
from ..runtime import Relay
from ..state.apikeys import ApiKey, presented_key, require
from ..state.connection import as_relay_error
from .common import record_rejection
from .ratelimit import add_headers, rate_limited_error

log = logging.getLogger("relay.http")
CORS_ALLOW_HEADERS = ("Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, OpenAI-Beta, X-Api-Key, "
                      "X-Session-Id, X-Request-Id, X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, "
                      "X-Stainless-Arch, X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Retry-Count, "
                      "X-Stainless-Timeout, X-Stainless-Async, X-Stainless-Helper-Method, anthropic-version, "
                      "anthropic-beta, anthropic-dangerous-direct-browser-access")
CORS_EXPOSE = ("x-request-id, request-id, retry-after, retry-after-ms, x-should-retry, openai-version, "
               "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
               "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, "
               "x-relay-account, x-relay-receipt, x-relay-window-utilization, x-relay-window-reset, "
               "x-relay-overage-in-use, x-relay-key-window-share, x-relay-key-window-share-limit, "
               "x-relay-served-model, x-relay-requested-model")
ADMIN_PREFIXES = ("/v1/sessions", "/stats", "/v1/accounts")
# with auth off, everyone's data: answered only on this machine (like /dashboard/data)
ADMIN_DATA = ADMIN_PREFIXES + ("/v1/usage",)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
MAX_FORWARDED_HOPS = 32  # counted from the right: the hops our own proxies appended come last
COMPLETION_PATHS = ("/v1/chat/", "/v1/responses", "/v1/messages")
OPS_DATA = ("/metrics", "/dashboard/data", "/me/data")  # the pages' shells and scripts hold no data


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def guard_ops(relay: Relay, path: str, headers: Any, client_ip: str) -> ApiKey | None:
    """Who may read the operators' data. /metrics: an admin key, or the scrape token when one is set.
    /dashboard/data: an admin key. /me/data: any valid key (it shows only that key's own data).
    With auth off there are no keys: the data answers only this machine (the relay's default bind;
    behind a trusted proxy the real client counts), and /metrics needs the scrape token if one is set."""
    token = relay.settings["metrics.scrape_token"]
    presented = presented_key(headers)
    if path == "/metrics" and token and presented and hmac.compare_digest(presented.encode(), token.encode()):
        return None
    if relay.settings["auth.enabled"]:
        return require(relay.keys, headers, admin=path != "/me/data")
    if path == "/metrics" and token:
        raise Unauthorized("/metrics needs the scrape token (metrics.scrape_token) as `Authorization: Bearer`."
                           if not presented else "Incorrect scrape token.")
    if not _loopback(client_ip):
        raise Forbidden("With auth.enabled off, the operators' pages answer only requests from this machine; "
                        "enable API keys (or set metrics.scrape_token for /metrics).", code="admin_required")
    return None


def identify(relay: Relay, path: str, headers: Any, client_ip: str) -> ApiKey | None:
    """The caller's key (None without auth), or the refusal. Auth on: /v1/* and /stats need a key, an admin
    key for the admin routes. Auth off: the admin data (/stats, /v1/accounts, /v1/sessions, /v1/usage)
    answers only this machine, as the operators' pages do (behind a trusted proxy the real client counts)."""
    if path in OPS_DATA:
        return guard_ops(relay, path, headers, client_ip)
    if relay.settings["auth.enabled"]:
        if path.startswith("/v1/") or path == "/stats":
            return require(relay.keys, headers, admin=path.startswith(ADMIN_PREFIXES))
        return None
    if path.startswith(ADMIN_DATA) and not _loopback(client_ip):
        raise Forbidden("With auth.enabled off, the admin data (/stats, /v1/accounts, /v1/sessions, /v1/usage) "
                        "answers only requests from this machine; enable API keys to read it from elsewhere.",
                        code="admin_required")
    return None


def anthropic_shaped() -> bool:
    """Whether this request's errors (and model list) take Anthropic's shape."""
    path = request.path
    return path == "/v1/messages" or path.startswith("/v1/messages/") or \
        (path.startswith("/v1/models") and "anthropic-version" in request.headers)


def _networks(items: list[str]) -> list[Any]:
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            log.error("trusted_proxies: ignoring %r (not an address or network)", item)
    return nets


def client_address(remote: str, forwarded_for: str | None, trusted: list[Any]) -> str:
    """The caller's address: X-Forwarded-For is believed only hop by hop from trusted proxies."""
    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr.strip())
        except ValueError:
            return False
        return any(ip in net for net in trusted)

    addr = remote or "unknown"
    if not forwarded_for or not is_trusted(addr):
        return addr
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops[-MAX_FORWARDED_HOPS:]):  # a client can prepend any number of fake hops
        addr = hop
        if not is_trusted(hop):
            break
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return remote or "unknown"


def host_allowed(host_header: str | None, allowed: set[str]) -> bool:
    """A Host header names this relay: a loopback name or a configured one, with any port.

    A browser led here by DNS rebinding sends the attacker's name, which is refused."""
    if not host_header or "*" in allowed:
        return True  # no Host at all is an HTTP/1.0 tool, not a browser
    host = host_header.strip().lower()
    if host.startswith("["):
        name = host[:host.find("]") + 1] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".") in allowed


def is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _allowed_origin(origins: list[str]) -> str | None:
    """The Access-Control-Allow-Origin for this request's Origin, if CORS allows it."""
    origin = request.headers.get("Origin")
    if not origin or not origins:
        return None
    return "*" if "*" in origins else origin if origin in origins else None


def install(app: Flask, relay: Relay) -> None:
    settings = relay.settings
    trusted = _networks(settings["trusted_proxies"])
    origins = settings["cors.allowed_origins"]
    hosts = {h.strip().lower().rstrip(".") for h in settings["allowed_hosts"]} | set(LOOPBACK_HOSTS)
    if settings["host"] not in ("0.0.0.0", "::", ""):
        hosts.add(settings["host"].lower() if ":" not in settings["host"] else f"[{settings['host'].lower()}]")
    allowed_origin = lambda: _allowed_origin(origins)  # noqa: E731

    @app.before_request
    def _identify() -> Response | None:
        rid = request.headers.get("x-request-id", "")
        g.request_id = rid if 0 < len(rid) <= 128 and rid.isprintable() else "req_" + secrets.token_hex(16)
        g.t0 = time.monotonic()
        g.client_ip = client_address(request.remote_addr or "", request.headers.get("X-Forwarded-For"), trusted)
        if not host_allowed(request.headers.get("Host"), hosts):
            raise Forbidden("This relay does not answer to that Host name; add it to allowed_hosts if it is "
                            "really this relay's.", param="Host", code="host_not_allowed")
        if request.method == "OPTIONS":  # CORS preflight: no auth, nothing else runs
            resp = Response(status=204)
            origin = allowed_origin()
            if origin:
                resp.headers["Access-Control-Allow-Origin"] = origin
                resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
                resp.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
                resp.headers["Access-Control-Max-Age"] = "600"
                resp.headers["Vary"] = "Origin"
            return resp
        if request.method in ("POST", "PUT", "PATCH") and request.routing_exception is None \
                and not is_json(request.mimetype):  # (unknown routes and methods keep their 404 / 405)
            # a form or text/plain post needs no CORS preflight: refusing it stops drive-by requests
            raise UnsupportedMediaType("Send the request body as JSON with `Content-Type: application/json`.",
                                       param="Content-Type")
        g.api_key, g.key_name = None, ""
        g.api_key = identify(relay, request.path, request.headers, g.client_ip)
        g.key_name = g.api_key.name if g.api_key is not None else ""
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["x-request-id"] = getattr(g, "request_id", "")
        resp.headers.setdefault("openai-version", "2020-10-01")
        if anthropic_shaped():
            resp.headers["request-id"] = getattr(g, "request_id", "")  # what the Anthropic SDKs report
        if getattr(g, "relay_account", None):
            resp.headers["x-relay-account"] = g.relay_account
        if getattr(g, "receipt", None) is not None:  # pipeline/receipts.py: the answer's receipt
            resp.headers.update(g.receipt.headers())
        origin = allowed_origin()
        if origin and request.method != "OPTIONS":
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
            resp.headers["Vary"] = "Origin"
        if request.path.startswith(COMPLETION_PATHS) and not request.path.endswith("/count_tokens"):
            try:
                add_headers(resp, relay.limiter)
            except Exception as exc:  # headers are a courtesy; never fail a response over them
                log.warning("rate-limit headers skipped: %s", exc)
        return resp

    def _json_error(err: RelayError) -> tuple[Response, int, dict[str, str]]:
        if anthropic_shaped():
            return jsonify(err.anthropic_body()), err.anthropic_status(), err.response_headers()
        return jsonify(err.body()), err.status, err.response_headers()

    @app.errorhandler(RelayError)
    def _relay_error(exc: RelayError) -> Any:
        return _json_error(exc)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(_: RateLimitExceeded) -> Any:
        assert relay.limiter is not None
        err = rate_limited_error(relay.limiter)
        if request.path.startswith(COMPLETION_PATHS):
            record_rejection(err, getattr(g, "t0", time.monotonic()))
        return _json_error(err)

    @app.errorhandler(404)
    def _not_found(_: Any) -> Any:
        log.info("%s: no route for %s %s (user agent %s)", getattr(g, "request_id", ""), request.method,
                 request.path, request.headers.get("User-Agent", "-")[:80])
        return _json_error(not_found_route(request.path))

    @app.errorhandler(413)
    def _too_large(_: Any) -> Any:
        return _json_error(PayloadTooLarge(f"The request body is larger than max_body_mb "
                                           f"({settings['max_body_mb']:g} MB).", param="body"))

    @app.errorhandler(Exception)
    def _crash(exc: Exception) -> Any:
        down = as_relay_error(exc)  # flask-limiter's own Redis connection, outside the relay's client
        if down is not None:
            return _json_error(down)
        if isinstance(exc, HTTPException):
            err = RelayError(exc.description or exc.name)
            err.type, err.code, err.status = "invalid_request_error", exc.name.lower().replace(" ", "_"), exc.code or 400
            return _json_error(err)
        log.exception("unexpected error on %s (request %s)", request.path, getattr(g, "request_id", ""))
        return _json_error(RelayError("Internal error in the relay; see its log (request id "
                                      f"{getattr(g, 'request_id', '')})."))

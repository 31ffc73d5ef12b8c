"""POST /v1/chat/completions: parse, open the exchange, answer in JSON or as an SSE stream."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from .cache import cache_key
from .chat import Context, Exchange
from .completion import new_id
from .errors import BadRequest, Forbidden, RelayError
from .images import check_limits
from .request import parse_chat_request

bp = Blueprint("chat", __name__)


def _body() -> bytes:
    """The raw body, capped at max_body_mb; chunked bodies (no Content-Length) are read here too,
    since werkzeug only reads those when the server marks the input terminated (gunicorn does not)."""
    if request.content_length is not None or "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
        return request.get_data(cache=False)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    stream, size = request.environ["wsgi.input"], 0
    chunks: list[bytes] = []
    while True:
        block = stream.read(65536)
        if not block:
            return b"".join(chunks)
        size += len(block)
        if limit is not None and size > limit:
            from werkzeug.exceptions import RequestEntityTooLarge

            raise RequestEntityTooLarge()
        chunks.append(block)


def read_json() -> Any:
    """The request body as JSON, with a clear 400 for every way it can be malformed."""
    raw = _body()
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.", param="body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid UTF-8.", param="body") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.", param="body") from None
    except ValueError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", param="body",
                         code="invalid_json") from None


def context() -> Context:
    from .agent import resolve

    key = getattr(g, "api_key", None)
    agent = resolve(current_app.extensions["relay"].settings, key.agent if key is not None else None)
    return Context(request_id=g.request_id, key_name=getattr(g, "key_name", ""), api_key=key, agent=agent,
                   scope=getattr(g, "key_name", "") or "anon",
                   session_header=request.headers.get("X-Session-Id"),
                   client_socket=request.environ.get("gunicorn.socket"))


def _from_cache(hit: dict[str, Any], req: Any, t0: float) -> Any:
    """An identical request answered within cache.ttl: same answer, new id, nothing spent upstream."""
    body = dict(hit, id=new_id(), created=int(time.time()))
    saved = int((hit.get("usage") or {}).get("total_tokens") or 0)
    current_app.extensions["relay"].record({
        "id": body["id"], "request_id": g.request_id, "timestamp": time.time(), "key": getattr(g, "key_name", ""),
        "model": hit.get("model"), "requested_model": req.model, "stream": False, "input_tokens": 0,
        "output_tokens": 0, "cache_read_tokens": 0, "cache_creation_tokens": 0, "estimated": False,
        "response_time_ms": int((time.monotonic() - t0) * 1000), "ttft_ms": None, "status": 200, "error": None,
        "first_message": None, "response_cache_hit": True, "tokens_saved": saved})
    resp = jsonify(body)
    resp.headers["x-relay-cache"] = "hit"
    return resp


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def record_rejection(exc: RelayError, t0: float, body: Any = None) -> None:
    """A request refused before any run started still counts once in the stats."""
    b = body if isinstance(body, dict) else {}
    current_app.extensions["relay"].record({
        "id": g.request_id, "request_id": g.request_id, "timestamp": time.time(), "key": getattr(g, "key_name", ""),
        "model": "none", "requested_model": str(b["model"])[:256] if isinstance(b.get("model"), str) else None,
        "stream": b.get("stream") is True, "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0,
        "cache_creation_tokens": 0, "estimated": False, "response_time_ms": int((time.monotonic() - t0) * 1000),
        "ttft_ms": None, "status": exc.status, "error": exc.code or type(exc).__name__, "first_message": None})


def vet(req: Any) -> Any:
    """Checks that need the caller or the settings: image limits, the key's allowed models."""
    settings = current_app.extensions["relay"].settings
    check_limits(req.messages, settings["images.max_count"], settings["images.max_bytes"])
    key = getattr(g, "api_key", None)
    if key is not None and not key.allows_model(req.model, req.cli_model):
        raise Forbidden(f"The API key {key.name!r} may not use the model {req.model!r}.", param="model",
                        code="model_not_allowed")
    return req


def open_exchange(relay: Any, req: Any, ctx: Context) -> Exchange:
    ex = Exchange(relay, req, ctx)
    try:
        ex.open()
    finally:
        g.token_budget = ex.token_budget  # for the rate-limit headers, refusals included
    return ex


@bp.post("/v1/chat/completions")
def chat_completions() -> Any:
    relay = current_app.extensions["relay"]
    t0 = time.monotonic()
    body: Any = None
    try:
        body = read_json()
        if isinstance(body, dict) and "messages" not in body and "input" in body:
            # Cursor posts Responses-shaped bodies here for OpenAI-named models and reads chat chunks back
            from .responses import to_chat_body

            body = dict(to_chat_body(body, None), stream_options=body.get("stream_options"))
        req = vet(parse_chat_request(body, relay.catalog))
    except RelayError as exc:
        record_rejection(exc, t0, body)
        raise
    ctx = context()
    cache = relay.response_cache
    cache_id = cache_key(req, ctx.scope) if cache.ttl and cache.applies(req, req.prompt_estimate, ctx.agent) else None
    if cache_id:
        hit = cache.get(cache_id)
        if hit is not None:
            return _from_cache(hit, req, t0)
    ex = open_exchange(relay, req, ctx)
    if req.stream:
        if ex.token_budget is not None:  # headers go out now: show the budget minus this prompt's estimate
            g.token_budget = dict(ex.token_budget, remaining=max(0, ex.token_budget["remaining"] - ex.estimate))
        return Response(ex.stream(), mimetype="text/event-stream", headers=SSE_HEADERS)
    body = ex.complete()
    if cache_id:
        cache.put(cache_id, body)
    if ex.token_budget is not None:
        g.token_budget = relay.quotas.state(getattr(g, "api_key", None))  # after charging actual usage
    return jsonify(body)

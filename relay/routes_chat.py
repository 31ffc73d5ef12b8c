"""POST /v1/chat/completions: parse, open the exchange, answer in JSON or as an SSE stream."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from .chat import Context, Exchange
from .errors import BadRequest
from .images import check_limits
from .request import parse_chat_request

bp = Blueprint("chat", __name__)
MAX_IMAGES = 20
MAX_IMAGE_BYTES = 5 * 1024 * 1024


def read_json() -> Any:
    """The request body as JSON, with a clear 400 for every way it can be malformed."""
    raw = request.get_data(cache=False)
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
    return Context(request_id=g.request_id, key_name=getattr(g, "key_name", ""),
                   scope=getattr(g, "key_name", "") or "anon",
                   session_header=request.headers.get("X-Session-Id"),
                   client_socket=request.environ.get("gunicorn.socket"))


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


@bp.post("/v1/chat/completions")
def chat_completions() -> Any:
    relay = current_app.extensions["relay"]
    req = parse_chat_request(read_json(), relay.catalog)
    check_limits(req.messages, MAX_IMAGES, MAX_IMAGE_BYTES)
    ex = Exchange(relay, req, context())
    ex.open()
    if req.stream:
        return Response(ex.stream(), mimetype="text/event-stream", headers=SSE_HEADERS)
    return jsonify(ex.complete())

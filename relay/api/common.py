"""What every route shares: the typed relay, the JSON body, the caller's context, vetting and refusals."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from flask import current_app, g, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from ..cli.agent import resolve
from ..core.images import check_limits
from ..core.record import RequestRecord
from ..core.request import ChatRequest
from ..errors import BadRequest, Forbidden, PayloadTooLarge, RelayError, RequestTimeout
from ..pipeline import Context
from ..runtime import Relay


def current_relay() -> Relay:
    relay = current_app.extensions["relay"]
    assert isinstance(relay, Relay)
    return relay


LONE_SURROGATE_HINT = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape somewhere in the text


def _body(limit: int | None = None, too_large: str = "") -> bytes:
    """The raw body within client_body_timeout_s (the server's socket raises an OSError past it); a route's
    own `limit` (bytes, below max_body_mb) is a 413 naming `too_large`, before anything is read if it can be."""
    if limit is not None and (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"The request body is larger than {too_large}.", param="body",
                              headers={"Connection": "close"})
    try:
        return _read_body(limit)
    except RequestEntityTooLarge:
        if limit is None:
            raise
        raise PayloadTooLarge(f"The request body is larger than {too_large}.", param="body",
                              headers={"Connection": "close"}) from None
    except (OSError, ClientDisconnected):  # werkzeug reports a failed read as a disconnect
        raise RequestTimeout("The request body did not arrive in time (client_body_timeout_s).", param="body",
                             headers={"Connection": "close"}) from None


def _read_body(limit: int | None = None) -> bytes:
    """The raw body, capped at max_body_mb (or a route's own `limit`); chunked bodies (no Content-Length) are
    read here too, since werkzeug only reads those when the server marks the input terminated (gunicorn does not)."""
    if request.content_length is not None or "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
        return request.get_data(cache=False)
    limit = limit or current_app.config["MAX_CONTENT_LENGTH"]
    stream, size = request.environ["wsgi.input"], 0
    chunks: list[bytes] = []
    while True:
        block = stream.read(65536)
        if not block:
            return b"".join(chunks)
        size += len(block)
        if limit is not None and size > limit:
            raise RequestEntityTooLarge()
        chunks.append(block)


def refuse_early() -> None:
    """Refusals that need no body, made before a (possibly 50 MB) body is read and parsed: the CLI or
    the subscription unusable, or the caller's daily token quota already spent."""
    relay = current_relay()
    relay.guard_spawning()
    g.token_budget = relay.quotas.check(getattr(g, "api_key", None), None)


def read_json(limit: int | None = None, too_large: str = "") -> Any:
    """The request body as JSON, with a clear 400 for every way it can be malformed."""
    raw = _body(limit, too_large)
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.", param="body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid UTF-8.", param="body") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.", param="body") from None
    except ValueError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", param="body",
                         code="invalid_json") from None
    if LONE_SURROGATE_HINT.search(text):  # escapes may pair up; only an unpaired one cannot be encoded
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("The request body holds an unpaired UTF-16 surrogate (such as \\ud800); "
                             "send valid Unicode text.", param="body", code="invalid_unicode") from None
    return body


def key_id() -> str:
    key = getattr(g, "api_key", None)
    return key.id if key is not None else ""


def caller_scope() -> str:
    """Whose data this is: the key's name plus its digest prefix, so a new key given an old name
    never sees its predecessor's conversations or stored responses."""
    key = getattr(g, "api_key", None)
    return key.scope if key is not None else "anon"


def context(endpoint: str) -> Context:
    key = getattr(g, "api_key", None)
    relay = current_relay()
    models = tuple(key.models or ()) if key is not None else ()
    models += tuple(relay.catalog.resolve(m) for m in models)  # what the CLI is run with for them
    agent = resolve(relay.settings, key.agent if key is not None else None, models)
    return Context(request_id=g.request_id, key_name=getattr(g, "key_name", ""), api_key=key, agent=agent,
                   scope=caller_scope(),
                   session_header=request.headers.get("X-Session-Id"),
                   client_socket=request.environ.get("gunicorn.socket"), endpoint=endpoint)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def record_rejection(exc: RelayError, t0: float, body: Any = None) -> None:
    """A request refused before any run started still counts once in the stats."""
    b = body if isinstance(body, dict) else {}
    current_relay().record(RequestRecord(
        id=g.request_id, request_id=g.request_id, key=getattr(g, "key_name", ""), key_id=key_id(),
        requested_model=str(b["model"])[:256] if isinstance(b.get("model"), str) else None,
        stream=b.get("stream") is True, status=exc.status, error=exc.code or type(exc).__name__,
        response_time_ms=int((time.monotonic() - t0) * 1000), endpoint=route_label()))


def route_label() -> str:
    """The route rule that matched (`/v1/responses/<rid>`), never the path: a label of the metrics and
    stats, whose number must not grow with the paths clients make up."""
    rule = request.url_rule
    return rule.rule if rule is not None else "other"


def vet(req: ChatRequest) -> ChatRequest:
    """Checks that need the caller or the settings: image limits, the key's allowed models."""
    settings = current_relay().settings
    check_limits(req.messages, settings["images.max_count"], settings["images.max_bytes"])
    key = getattr(g, "api_key", None)
    if key is not None and not key.allows_model(req.model, req.cli_model):
        raise Forbidden(f"The API key {key.name!r} may not use the model {req.model!r}.", param="model",
                        code="model_not_allowed")
    return req

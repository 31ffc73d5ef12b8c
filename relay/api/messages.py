"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API over the shared exchange.

Claude Code (`ANTHROPIC_BASE_URL`) and the Anthropic SDKs talk to these. Errors leave in Anthropic's
shape (the error handlers pick it by route); count_tokens is answered locally with tiktoken, without
the rate limiter, since editors send dozens of them at start-up.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from ..core import sse
from ..core.message_events import PING, MessageStream, message_object, new_id, usage_of
from ..core.messages import count_body, parse_messages_request
from ..core.upstream import finish_reason
from ..errors import RelayError
from ..exchange import Exchange
from .common import SSE_HEADERS, context, current_relay, open_exchange, read_json, record_rejection, refuse_early, vet

bp = Blueprint("messages", __name__)
count_bp = Blueprint("messages_count", __name__)  # not rate limited: it never reaches the CLI
log = logging.getLogger("relay.messages")
ENDPOINT = "/v1/messages"


@bp.post("/v1/messages")
def create_message() -> Any:
    relay = current_relay()
    t0 = time.monotonic()
    body: Any = None
    try:
        refuse_early()
        body = read_json()
        req = vet(parse_messages_request(body, relay.catalog))
    except RelayError as exc:
        record_rejection(exc, t0, body)
        raise
    log.info("%s: /v1/messages model=%s stream=%s tools=%d beta=%s", g.request_id, req.model, req.stream,
             len(req.tools.tools), request.headers.get("anthropic-beta", "-"))
    ex = open_exchange(relay, req, context(ENDPOINT))
    if req.stream:
        if ex.token_budget is not None:  # headers go out now: show the budget minus this prompt's estimate
            g.token_budget = dict(ex.token_budget, remaining=max(0, ex.token_budget["remaining"] - ex.estimate))
        return Response(_stream(ex), mimetype="text/event-stream", headers=SSE_HEADERS)
    chat = ex.complete()
    assert ex.run
    raw, _ = ex.raw_usage()
    choice = chat["choices"][0]
    answer = message_object(new_id(), chat["model"], choice["message"], choice["finish_reason"], usage_of(raw))
    if ex.token_budget is not None:
        g.token_budget = relay.quotas.state(getattr(g, "api_key", None))  # after charging actual usage
    return jsonify(answer)


def _stream(ex: Exchange) -> Iterator[bytes]:
    """message_start (with the upstream's input and cache usage), content blocks, pings while the
    model is silent, message_delta (stop reason, the turn's whole usage), message_stop. A failure
    after the start is an `error` event, and the stream ends without message_stop."""
    assert ex.run
    turn = ex.run.turn

    def final_arguments(call_id: str) -> str:
        call = next((c for c in turn.tool_calls if c.id == call_id), None)
        return (call.arguments or json.dumps(call.input or {}, ensure_ascii=False)) if call else "{}"

    events = MessageStream(new_id(), ex.model, final_arguments)
    try:
        start = usage_of(turn.start_usage, ex.req.prompt_estimate)
        yield from (sse.event(k, d) for k, d in events.start(start))
        for delta in ex.deltas():
            if delta is None:
                yield sse.event(*PING)
                continue
            for kind, data in events.delta(delta):
                yield sse.event(kind, data)
        raw, _ = ex.raw_usage()
        finished = events.finish(finish_reason(turn), usage_of(raw))
        ex.close(None)  # before the last events: the client's next request finds the conversation committed
        yield from (sse.event(k, d) for k, d in finished)
    except RelayError as exc:
        ex.close(exc)
        yield sse.event("error", exc.anthropic_body())
    except BaseException as exc:  # GeneratorExit when the client goes away
        ex.close(exc)
        raise


@count_bp.post("/v1/messages/count_tokens")
def count_tokens() -> Any:
    req = parse_messages_request(read_json(), current_relay().catalog, count_only=True)
    return jsonify(count_body(req))

"""POST /v1/chat/completions: parse, open the exchange, answer in JSON or as an SSE stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify

from ..core import sse
from ..core.completion import ChunkMaker, new_id
from ..core.record import RequestRecord
from ..core.request import ChatRequest, parse_chat_request
from ..core.responses import to_chat_body
from ..core.upstream import finish_reason
from ..errors import RelayError
from ..exchange import Exchange
from ..state.cache import cache_key
from .common import SSE_HEADERS, context, current_relay, open_exchange, read_json, record_rejection, refuse_early, vet

bp = Blueprint("chat", __name__)


def _from_cache(hit: dict[str, Any], req: ChatRequest, t0: float) -> Any:
    """An identical request answered within response_cache.ttl: same answer, new id, nothing spent upstream."""
    body = dict(hit, id=new_id(), created=int(time.time()))
    saved = int((hit.get("usage") or {}).get("total_tokens") or 0)
    current_relay().record(RequestRecord(
        id=body["id"], request_id=g.request_id, key=getattr(g, "key_name", ""), model=str(hit.get("model")),
        requested_model=req.model, status=200, response_time_ms=int((time.monotonic() - t0) * 1000),
        response_cache_hit=True, tokens_saved=saved, endpoint="/v1/chat/completions"))
    resp = jsonify(body)
    resp.headers["x-relay-cache"] = "hit"
    return resp


def chat_stream(ex: Exchange) -> Iterator[bytes]:
    """The chat-completions SSE stream: role first, deltas, the finish chunk, usage, [DONE]."""
    assert ex.run
    maker = ChunkMaker(ex.cid, ex.created, ex.model, ex.req.include_usage)
    legacy = ex.req.legacy_functions
    try:
        yield sse.data(maker.first())
        for d in ex.deltas():
            if d is None:
                yield sse.KEEPALIVE
                continue
            chunk = maker.delta(d, legacy)
            if chunk:
                yield sse.data(chunk)
        yield sse.data(maker.final(finish_reason(ex.run.turn, legacy)))
        if ex.req.include_usage:
            yield sse.data(maker.usage_chunk(ex.usage()[0]))
        yield sse.DONE
        ex.close(None)
    except RelayError as exc:
        ex.close(exc)
        yield sse.data(exc.body())  # mid-stream: no fake finish chunk, no [DONE]
    except BaseException as exc:  # GeneratorExit when the client goes away
        ex.close(exc)
        raise


@bp.post("/v1/chat/completions")
def chat_completions() -> Any:
    relay = current_relay()
    t0 = time.monotonic()
    body: Any = None
    try:
        refuse_early()
        body = read_json()
        if isinstance(body, dict) and "messages" not in body and "input" in body:
            # Cursor posts Responses-shaped bodies here for OpenAI-named models and reads chat chunks back
            body = dict(to_chat_body(body, None), stream_options=body.get("stream_options"))
        req = vet(parse_chat_request(body, relay.catalog))
    except RelayError as exc:
        record_rejection(exc, t0, body)
        raise
    ctx = context("/v1/chat/completions")
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
        return Response(chat_stream(ex), mimetype="text/event-stream", headers=SSE_HEADERS)
    answer = ex.complete()
    if cache_id:
        cache.put(cache_id, answer)
    if ex.token_budget is not None:
        g.token_budget = relay.quotas.state(getattr(g, "api_key", None))  # after charging actual usage
    return jsonify(answer)

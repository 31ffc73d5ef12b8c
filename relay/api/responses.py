"""POST /v1/responses (and GET /v1/responses/<id>): the Responses API over the same exchange as chat.

`previous_response_id` continues a conversation: the stored messages of that response plus the new
input extend the same relay conversation, so the CLI session is resumed, not replayed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify

from ..core import sse
from ..core.request import parse_chat_request
from ..core.responses import EventStream, call_item, message_item, new_id, response_object, to_chat_body, usage_of
from ..errors import NotFound, RelayError
from ..exchange import Exchange
from ..state.responses import ResponseStore
from .common import SSE_HEADERS, context, current_relay, open_exchange, read_json, record_rejection, refuse_early, vet

bp = Blueprint("responses", __name__)


def _scope() -> str:
    return getattr(g, "key_name", "") or "anon"


def _output(chat: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A finished chat completion as Responses output items, and as the assistant message to store."""
    msg = chat["choices"][0]["message"]
    items: list[dict[str, Any]] = []
    if msg.get("content"):
        items.append(message_item(new_id("msg_"), msg["content"]))
    calls = msg.get("tool_calls") or []
    for c in calls:
        items.append(call_item(new_id("fc_"), c["id"], c["function"]["name"], c["function"]["arguments"]))
    answer: dict[str, Any] = {"role": "assistant", "content": msg.get("content")}
    if calls:
        answer["tool_calls"] = calls
    return items, answer


@bp.post("/v1/responses")
def create_response() -> Any:
    relay = current_relay()
    t0 = time.monotonic()
    body: Any = None
    try:
        refuse_early()
        body = read_json()
        prev_id = body.get("previous_response_id") if isinstance(body, dict) else None
        prior, conv = None, None
        if prev_id is not None:
            prev = relay.responses.get(prev_id, _scope()) if isinstance(prev_id, str) else None
            if prev is None:
                raise NotFound(f"Previous response with id '{prev_id}' not found.", param="previous_response_id",
                               code="previous_response_not_found")
            prior, conv = prev["messages"], prev["conv"]
        req = vet(parse_chat_request(to_chat_body(body, prior), relay.catalog))
    except RelayError as exc:
        record_rejection(exc, t0, body)
        raise
    rid = new_id("resp_")
    ctx = context("/v1/responses")
    # without previous_response_id (or X-Session-Id), a full history is matched as chat matches it
    ctx.conversation = conv if ctx.session_header is None else None
    ex = open_exchange(relay, req, ctx)
    conv = ex.conv
    store = body.get("store") is not False
    if not req.stream:
        chat = ex.complete()
        items, answer = _output(chat)
        obj = response_object(rid, ex.created, chat["model"], body, "completed", items, usage_of(chat["usage"]))
        if store:
            relay.responses.save(_scope(), rid, conv, req.messages, answer, obj)
        return jsonify(obj)
    return Response(_stream(ex, relay.responses if store else None, rid, conv, body, _scope()), mimetype="text/event-stream", headers=SSE_HEADERS)


def _stream(ex: Exchange, store: ResponseStore | None, rid: str, conv: str, body: dict[str, Any],
            scope: str) -> Iterator[bytes]:
    events = None
    try:
        events = EventStream(response_object(rid, ex.created, ex.model, body, "in_progress", [], None))
        for kind, data in events.start():
            yield sse.event(kind, data)
        for d in ex.deltas():
            if d is None:
                yield sse.KEEPALIVE
                continue
            for kind, data in events.delta(d):
                yield sse.event(kind, data)
        assert ex.run
        final_args = {c.id: c for c in ex.run.turn.tool_calls}
        for item in events.output:  # calls that arrived whole (no argument deltas)
            call = final_args.get(item.get("call_id", ""))
            if item["type"] == "function_call" and call is not None and not item["arguments"]:
                item["arguments"] = call.arguments or json.dumps(call.input or {})
        usage = usage_of(ex.usage()[0])
        finished = events.finish(usage, ex.model)
        ex.close(None)
        if store is not None:
            msg = next((i for i in events.output if i["type"] == "message"), None)
            answer: dict[str, Any] = {"role": "assistant", "content": msg["content"][0]["text"] if msg else None}
            calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                     for i in events.output if i["type"] == "function_call"]
            if calls:
                answer["tool_calls"] = calls
            store.save(scope, rid, conv, ex.req.messages, answer, events.response)
        for kind, data in finished:
            yield sse.event(kind, data)
    except RelayError as exc:
        ex.close(exc)
        if events is not None:
            for kind, data in events.fail(exc.body()["error"]):
                yield sse.event(kind, data)
    except BaseException as exc:  # the client went away
        ex.close(exc)
        raise


@bp.get("/v1/responses/<rid>")
def get_response(rid: str) -> Any:
    stored = current_relay().responses.get(rid, _scope())
    if stored is None:
        raise NotFound(f"Response with id '{rid}' not found.", param="response_id", code="response_not_found")
    return jsonify(stored["response"])

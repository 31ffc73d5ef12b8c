"""POST /v1/responses (and GET /v1/responses/<id>): the Responses API over the same exchange as chat.

`previous_response_id` continues a conversation: the stored messages of that response plus the new
input extend the same relay conversation, so the CLI session is resumed, not replayed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from . import sse
from .chat import Exchange
from .errors import NotFound, RelayError
from .request import parse_chat_request
from .responses import EventStream, call_item, message_item, new_id, response_object, to_chat_body, usage_of
from .routes_chat import SSE_HEADERS, context, open_exchange, read_json, record_rejection, vet
from .store import PREFIX

bp = Blueprint("responses", __name__)


def _stored(rid: str) -> dict[str, Any] | None:
    raw = current_app.extensions["relay"].r.get(f"{PREFIX}resp:{rid}")
    return json.loads(raw) if raw else None


def _scope() -> str:
    return getattr(g, "key_name", "") or "anon"


def _save(relay: Any, scope: str, rid: str, conv: str, messages: list[dict[str, Any]], answer: dict[str, Any],
          obj: dict[str, Any]) -> None:
    """Keep what `previous_response_id` and GET need (runs inside a stream too: no app context)."""
    data = {"conv": conv, "scope": scope, "messages": messages + [answer], "response": obj}
    relay.r.set(f"{PREFIX}resp:{rid}", json.dumps(data), ex=int(relay.settings["sessions.ttl_hours"] * 3600))


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
    relay = current_app.extensions["relay"]
    t0 = time.monotonic()
    body: Any = None
    try:
        body = read_json()
        prev_id = body.get("previous_response_id") if isinstance(body, dict) else None
        prior, conv = None, None
        if prev_id is not None:
            prev = _stored(str(prev_id)) if isinstance(prev_id, str) else None
            if prev is None or prev["scope"] != _scope():
                raise NotFound(f"Previous response with id '{prev_id}' not found.", param="previous_response_id",
                               code="previous_response_not_found")
            prior, conv = prev["messages"], prev["conv"]
        req = vet(parse_chat_request(to_chat_body(body, prior), relay.catalog))
    except RelayError as exc:
        record_rejection(exc, t0, body)
        raise
    rid = new_id("resp_")
    conv = request.headers.get("X-Session-Id") or conv or "resp-" + rid
    ctx = context()
    ctx.session_header = conv
    ex = open_exchange(relay, req, ctx)
    store = body.get("store") is not False
    if not req.stream:
        chat = ex.complete()
        items, answer = _output(chat)
        obj = response_object(rid, ex.created, chat["model"], body, "completed", items, usage_of(chat["usage"]))
        if store:
            _save(relay, _scope(), rid, conv, req.messages, answer, obj)
        return jsonify(obj)
    return Response(_stream(ex, rid, conv, body, store, _scope()), mimetype="text/event-stream", headers=SSE_HEADERS)


def _stream(ex: Exchange, rid: str, conv: str, body: dict[str, Any], store: bool, scope: str) -> Iterator[bytes]:
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
        usage = usage_of(ex._usage()[0])
        finished = events.finish(usage, ex.model)
        ex.close(None)
        if store:
            msg = next((i for i in events.output if i["type"] == "message"), None)
            answer: dict[str, Any] = {"role": "assistant", "content": msg["content"][0]["text"] if msg else None}
            calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                     for i in events.output if i["type"] == "function_call"]
            if calls:
                answer["tool_calls"] = calls
            _save(ex.relay, scope, rid, conv, ex.req.messages, answer, events.response)
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
    stored = _stored(rid)
    if stored is None or stored["scope"] != _scope():
        raise NotFound(f"Response with id '{rid}' not found.", param="response_id", code="response_not_found")
    return jsonify(stored["response"])

"""The Anthropic Messages API (`POST /v1/messages`): the `message` object and its stream events. Pure.

`usage_of` gives the CLI's usage as Anthropic reports it: input without the cache reads and writes,
which have their own fields.
"""

from __future__ import annotations

import json
from typing import Any

from ...errors import RelayError
from .. import sse
from ..events import Delta
from ..messages import parse_messages_request
from ..models import ModelCatalog
from .base import Parsed, StreamHead, TurnView, new_id

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}


def usage_of(raw: dict[str, Any] | None, estimate: int = 0) -> dict[str, Any]:
    """The CLI's usage as Anthropic reports it: input excludes the cache reads and writes."""
    u = raw or {"input_tokens": estimate}
    return {"input_tokens": int(u.get("input_tokens", 0)),
            "cache_creation_input_tokens": int(u.get("cache_creation_input_tokens", 0)),
            "cache_read_input_tokens": int(u.get("cache_read_input_tokens", 0)),
            "output_tokens": int(u.get("output_tokens", 0)), "service_tier": "standard"}


def stop_reason(finish: str) -> str:
    return STOP_REASONS.get(finish, "end_turn")


def _arguments(raw: str) -> Any:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def message_object(view: TurnView, msg_id: str) -> dict[str, Any]:
    """A finished turn as an Anthropic `message`: thinking, text, then tool_use blocks."""
    content: list[dict[str, Any]] = []
    if view.reasoning:
        content.append({"type": "thinking", "thinking": view.reasoning, "signature": ""})
    text = view.content or (view.refusal if view.finish == "content_filter" else "")
    if text:
        content.append({"type": "text", "text": text})
    for call in view.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _arguments(call.arguments)})
    return {"id": msg_id, "type": "message", "role": "assistant", "model": view.model, "content": content,
            "stop_reason": stop_reason(view.finish), "stop_sequence": None, "usage": usage_of(view.usage)}


Event = tuple[str, dict[str, Any]]


class MessageStream:
    """Deltas as Anthropic stream events: message_start, then content blocks opened, filled and
    stopped in order (text, thinking, tool_use with input_json_delta), message_delta and message_stop.

    A tool call's whole input arrives as one argument delta when the CLI did not stream it (`Turn`
    sees to that); a call with no input at all gets `{}`."""

    def __init__(self, msg_id: str, model: str) -> None:
        self.msg_id, self.model = msg_id, model
        self.index = -1
        self.open: dict[str, Any] | None = None   # {"type", "call_id", "args"} of the block being streamed
        self.calls: dict[int, int] = {}           # tool call index -> content block index

    def start(self, usage: dict[str, Any]) -> list[Event]:
        message: dict[str, Any] = {"id": self.msg_id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": dict(usage, output_tokens=1)}
        return [("message_start", {"type": "message_start", "message": message})]

    def _close(self) -> list[Event]:
        block, self.open = self.open, None
        if block is None:
            return []
        out: list[Event] = []
        if block["type"] == "tool_use" and not block["args"]:
            out.append(self._delta({"type": "input_json_delta", "partial_json": "{}"}))
        if block["type"] == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": ""}))
        out.append(("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        return out

    def _open(self, kind: str, block: dict[str, Any], call_id: str = "") -> list[Event]:
        out = self._close()
        self.index += 1
        self.open = {"type": kind, "call_id": call_id, "args": ""}
        out.append(("content_block_start", {"type": "content_block_start", "index": self.index,
                                            "content_block": block}))
        return out

    def _delta(self, delta: dict[str, Any]) -> Event:
        return ("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def delta(self, d: Delta) -> list[Event]:
        out: list[Event] = []
        if d.kind == "text" and d.text:
            if self.open is None or self.open["type"] != "text":
                out += self._open("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": d.text}))
        elif d.kind == "reasoning" and d.text:
            if self.open is None or self.open["type"] != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": d.text}))
        elif d.kind == "tool_start":
            out += self._open("tool_use", {"type": "tool_use", "id": d.call_id, "name": d.name, "input": {}},
                              d.call_id)
            self.calls[d.index] = self.index
        elif d.kind == "tool_args" and d.text and self.open is not None and self.open["type"] == "tool_use" \
                and self.calls.get(d.index) == self.index:
            self.open["args"] += d.text
            out.append(self._delta({"type": "input_json_delta", "partial_json": d.text}))
        return out

    def finish(self, finish: str, usage: dict[str, Any]) -> list[Event]:
        """Close the last block; message_delta carries the stop reason and the turn's whole usage."""
        out = self._close()
        final = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                                       "output_tokens")}
        out.append(("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason(finish), "stop_sequence": None},
                                      "usage": final}))
        out.append(("message_stop", {"type": "message_stop"}))
        return out


PING: Event = ("ping", {"type": "ping"})


class MessagesStream:
    """message_start (with the upstream's input and cache usage), content blocks, pings while the
    model is silent, message_delta (stop reason, the turn's whole usage), message_stop. A failure
    after the start is an `error` event, and the stream ends without message_stop."""

    def __init__(self, head: StreamHead, parsed: Parsed) -> None:
        self.events = MessageStream(parsed.id, head.model)
        self.start_usage = usage_of(head.start_usage)
        self.final: dict[str, Any] | None = None

    @staticmethod
    def _frames(events: list[Event]) -> bytes:
        return b"".join(sse.event(kind, data) for kind, data in events)

    def start(self) -> bytes:
        return self._frames(self.events.start(self.start_usage))

    def delta(self, d: Delta) -> bytes:
        return self._frames(self.events.delta(d))

    def keepalive(self) -> bytes:
        return sse.event(*PING)

    def finish(self, view: TurnView) -> bytes:
        return self._frames(self.events.finish(view.finish, usage_of(view.usage)))

    def error(self, err: RelayError) -> bytes:
        return sse.event("error", err.anthropic_body())


class MessagesFormat:
    endpoint = "/v1/messages"
    cacheable = False  # agents act on each answer: see ChatFormat.cacheable

    def parse(self, body: Any, catalog: ModelCatalog, prior: list[dict[str, Any]] | None = None) -> Parsed:
        return Parsed(parse_messages_request(body, catalog), body, new_id("msg_"))

    def complete(self, view: TurnView, parsed: Parsed) -> dict[str, Any]:
        return message_object(view, parsed.id)

    def stream(self, head: StreamHead, parsed: Parsed) -> MessagesStream:
        return MessagesStream(head, parsed)

    def from_cache(self, hit: dict[str, Any], parsed: Parsed, created: int) -> dict[str, Any]:
        return dict(hit, id=parsed.id)


FORMAT = MessagesFormat()

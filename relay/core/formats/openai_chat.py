"""OpenAI chat completions (`POST /v1/chat/completions`): the completion object and its chunk stream. Pure."""

from __future__ import annotations

from typing import Any

from ...errors import RelayError
from .. import sse
from ..events import Delta
from ..models import ModelCatalog
from ..request import parse_chat_request
from ..responses import to_chat_body
from .base import Parsed, StreamHead, TurnView, call_dict, new_id

FINGERPRINT = "fp_claude_max_relay"


def openai_usage(usage: dict[str, int] | None, estimated: bool = False) -> dict[str, Any]:
    """Claude usage in OpenAI terms: prompt = input + cache read + cache creation."""
    u = usage or {}
    cached = int(u.get("cache_read_input_tokens", 0))
    written = int(u.get("cache_creation_input_tokens", 0))
    prompt = int(u.get("input_tokens", 0)) + cached + written
    completion = int(u.get("output_tokens", 0))
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": int(u.get("reasoning_tokens", 0)), "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }
    if estimated:
        out["estimated"] = True
    return out


def message_of(view: TurnView, legacy_functions: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": view.content, "refusal": None, "annotations": []}
    if view.finish == "content_filter":
        msg["refusal"] = view.content or view.refusal
        msg["content"] = None
    calls = [call_dict(c) for c in view.tool_calls]
    if calls:
        msg["content"] = view.content or None
        if legacy_functions:
            msg["function_call"] = calls[0]["function"]
        else:
            msg["tool_calls"] = calls
    if view.reasoning:
        msg["reasoning_content"] = view.reasoning
    return msg


def completion_object(view: TurnView, legacy_functions: bool) -> dict[str, Any]:
    finish = "function_call" if legacy_functions and view.finish == "tool_calls" else view.finish
    return {
        "id": view.id, "object": "chat.completion", "created": view.created, "model": view.model,
        "choices": [{"index": 0, "message": message_of(view, legacy_functions), "logprobs": None,
                     "finish_reason": finish}],
        "usage": openai_usage(view.usage, view.estimated), "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }


class ChunkMaker:
    """Chunks of one stream: same id/created/model throughout, `role` only in the first."""

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        self.cid, self.created, self.model, self.include_usage = cid, created, model, include_usage

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def delta(self, d: Delta, legacy_functions: bool = False) -> dict[str, Any] | None:
        if d.kind == "text":
            return self.chunk({"content": d.text})
        if d.kind == "reasoning":
            return self.chunk({"reasoning_content": d.text})
        if legacy_functions:
            if d.kind == "tool_start":
                return self.chunk({"function_call": {"name": d.name, "arguments": ""}})
            return self.chunk({"function_call": {"arguments": d.text}})
        if d.kind == "tool_start":
            return self.chunk({"tool_calls": [{"index": d.index, "id": d.call_id, "type": "function",
                                                "function": {"name": d.name, "arguments": ""}}]})
        if d.kind == "tool_args":
            return self.chunk({"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]})
        return None

    def final(self, finish: str) -> dict[str, Any]:
        return self.chunk({}, finish)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT, "choices": [], "usage": usage}


class ChatStream:
    """Role first, deltas, the finish chunk, the usage chunk when asked for, [DONE]. An error after
    the start is one `data: {"error"}` frame, with no fake finish chunk and no [DONE]."""

    def __init__(self, head: StreamHead, parsed: Parsed) -> None:
        self.req = parsed.req
        self.maker = ChunkMaker(head.id, head.created, head.model, self.req.include_usage)
        self.final: dict[str, Any] | None = None

    def start(self) -> bytes:
        return sse.data(self.maker.first())

    def delta(self, d: Delta) -> bytes:
        chunk = self.maker.delta(d, self.req.legacy_functions)
        return sse.data(chunk) if chunk else b""

    def keepalive(self) -> bytes:
        return sse.KEEPALIVE

    def finish(self, view: TurnView) -> bytes:
        legacy = self.req.legacy_functions
        finish = "function_call" if legacy and view.finish == "tool_calls" else view.finish
        out = sse.data(self.maker.final(finish))
        if self.req.include_usage:
            out += sse.data(self.maker.usage_chunk(openai_usage(view.usage, view.estimated)))
        return out + sse.DONE

    def error(self, err: RelayError) -> bytes:
        return sse.data(err.body())


class ChatFormat:
    endpoint = "/v1/chat/completions"
    # Chat alone: a chat completion is self-contained, so an identical request may get the same answer
    # again. A Response is stored and chained by id, and a Messages request comes from agents whose
    # next step depends on acting on this answer (Claude Code), so neither is served from the cache.
    cacheable = True

    def parse(self, body: Any, catalog: ModelCatalog, prior: list[dict[str, Any]] | None = None) -> Parsed:
        if isinstance(body, dict) and "messages" not in body and "input" in body:
            # Cursor posts Responses-shaped bodies here for OpenAI-named models and reads chat chunks back
            body = dict(to_chat_body(body, None), stream_options=body.get("stream_options"))
        return Parsed(parse_chat_request(body, catalog), body, new_id("chatcmpl-"))

    def complete(self, view: TurnView, parsed: Parsed) -> dict[str, Any]:
        return completion_object(view, parsed.req.legacy_functions)

    def stream(self, head: StreamHead, parsed: Parsed) -> ChatStream:
        return ChatStream(head, parsed)

    def from_cache(self, hit: dict[str, Any], parsed: Parsed, created: int) -> dict[str, Any]:
        return dict(hit, id=parsed.id, created=created)


FORMAT = ChatFormat()

"""OpenAI chat-completion objects and stream chunks built from a finished or running turn. Pure."""

from __future__ import annotations

import json
import secrets
from typing import Any

from .events import Delta, Turn

FINGERPRINT = "fp_claude_max_relay"


def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + secrets.token_hex(12)


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


def tool_calls_of(turn: Turn) -> list[dict[str, Any]]:
    out = []
    for call in turn.tool_calls:
        args = call.arguments or (json.dumps(call.input) if call.input is not None else "{}")
        out.append({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": args}})
    return out


def message_of(turn: Turn, content: str | None, finish: str, expose_reasoning: bool,
               legacy_functions: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
    if finish == "content_filter":
        msg["refusal"] = content or str(turn.result.get("result") or "")
        msg["content"] = None
    calls = tool_calls_of(turn)
    if calls:
        msg["content"] = content or None
        if legacy_functions:
            msg["function_call"] = calls[0]["function"]
        else:
            msg["tool_calls"] = calls
    if expose_reasoning and turn.reasoning:
        msg["reasoning_content"] = "\n\n".join(turn.reasoning)
    return msg


def completion_object(cid: str, created: int, model: str, message: dict[str, Any], finish: str,
                      usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage, "service_tier": "default", "system_fingerprint": FINGERPRINT,
    }


class ChunkMaker:
    """Chunks of one stream: same id/created/model throughout, `role` only in the first."""

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        self.cid, self.created, self.model, self.include_usage = cid, created, model, include_usage
        self.started = False

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
        self.started = True
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

"""Validate an OpenAI chat-completions body into a `ChatRequest`. Pure: no Flask, no I/O.

Every problem is a `BadRequest` naming the offending `param`, so the client sees a clear 400.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest
from .models import ModelCatalog
from .tokens import count_messages, count_text
from .tools import ToolSpec, parse_response_format, parse_tools

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# The user turn the model receives when a request holds only system/developer messages.
SYSTEM_ONLY_TURN = "(No user message was sent: respond as the system instructions direct.)"
# Accepted and ignored: the CLI has no way to apply them (listed in the README).
IGNORED = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "logit_bias",
           "top_logprobs", "service_tier", "store", "metadata", "prompt_cache_key", "safety_identifier",
           "verbosity", "prediction", "web_search_options", "audio", "modalities", "stop")


@dataclass
class ChatRequest:
    model: str                      # what the client asked for
    cli_model: str                  # what the CLI gets as --model
    messages: list[dict[str, Any]]  # non-system messages, content normalised to a list of parts
    system: str                     # system + developer texts, joined
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    reasoning_effort: str | None = None
    max_tokens: int | None = None
    tools: ToolSpec = field(default_factory=ToolSpec)
    json_schema: dict[str, Any] | None = None
    expose_reasoning: bool | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    system_may_change: bool = False  # a client that rewrites its system prompt mid-conversation (Claude Code)

    @property
    def legacy_functions(self) -> bool:
        return self.tools.legacy

    @functools.cached_property
    def prompt_estimate(self) -> int:
        """tiktoken estimate of the prompt, computed once (quota check, response cache, fallback usage)."""
        return count_messages(self.messages) + count_text(self.system)


def _expect(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise BadRequest(message, param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def normalise_content(content: Any, param: str, role: str) -> list[dict[str, Any]]:
    """A message's content as a list of parts; strings become one text part."""
    if content is None:
        _expect(role in ("assistant", "function", "tool"), f"{param} must not be null", param)
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    _expect(isinstance(content, list), f"{param} must be a string or an array of content parts", param)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if isinstance(part, str):  # lenient: some clients send bare strings
            parts.append({"type": "text", "text": part})
            continue
        _expect(isinstance(part, dict), f"{p} must be an object", p)
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            text = part.get("text")
            _expect(isinstance(text, str), f"{p}.text must be a string", f"{p}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal") or "")})
        elif kind in ("image_url", "image", "input_image", "document"):
            parts.append(part)  # checked and converted by images.py
        elif kind == "input_audio":
            raise BadRequest("Audio input is not supported by Claude.", param=p, code="unsupported_content")
        elif kind == "file":
            parts.append(part)
        else:
            raise BadRequest(f"{p}.type {kind!r} is not a supported content part type", param=f"{p}.type")
    return parts


def text_of(parts: list[dict[str, Any]]) -> str:
    return "\n".join(p["text"] for p in parts if p.get("type") == "text")


METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512  # OpenAI's own limits


def check_metadata(meta: Any) -> None:
    """`metadata` as OpenAI accepts it: up to 16 string pairs, keys up to 64 and values up to 512
    characters (it is stored with the response, so it must stay small)."""
    if meta is None:
        return
    _expect(isinstance(meta, dict), "'metadata' must be an object of string keys and values.", "metadata")
    _expect(len(meta) <= METADATA_MAX_PAIRS, f"'metadata' may hold at most {METADATA_MAX_PAIRS} pairs.", "metadata")
    for k, v in meta.items():
        _expect(len(k) <= METADATA_MAX_KEY, f"'metadata' keys may be at most {METADATA_MAX_KEY} characters.",
                "metadata")
        _expect(isinstance(v, str), "'metadata' values must be strings.", "metadata")
        _expect(len(v) <= METADATA_MAX_VALUE, f"'metadata' values may be at most {METADATA_MAX_VALUE} characters.",
                "metadata")


def parse_chat_request(body: Any, catalog: ModelCatalog) -> ChatRequest:
    _expect(isinstance(body, dict), "The request body must be a JSON object.", "body")
    msgs = body.get("messages")
    _expect(msgs is not None, "Missing required parameter: 'messages'.", "messages")
    _expect(isinstance(msgs, list), "'messages' must be an array of message objects.", "messages")
    _expect(len(msgs) > 0, "'messages' must contain at least one message.", "messages")

    model = body.get("model")
    _expect(model is None or isinstance(model, str), "'model' must be a string.", "model")
    _expect(model is None or len(model) <= 256, "'model' must be at most 256 characters.", "model")
    n = body.get("n", 1)
    _expect(n is None or _is_int(n), "'n' must be an integer.", "n")
    if n not in (None, 1):
        raise BadRequest("Only n=1 is supported: the Claude CLI produces one answer per run.", param="n",
                         code="unsupported_parameter")
    stream = body.get("stream", False)
    _expect(stream is None or isinstance(stream, bool), "'stream' must be a boolean.", "stream")
    opts = body.get("stream_options")
    _expect(opts is None or isinstance(opts, dict), "'stream_options' must be an object.", "stream_options")
    include_usage = bool((opts or {}).get("include_usage"))
    for key in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        _expect(body.get(key) is None or _is_num(body[key]), f"'{key}' must be a number.", key)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    _expect(max_tokens is None or (_is_int(max_tokens) and max_tokens > 0),
            "'max_completion_tokens' must be a positive integer.", "max_completion_tokens")
    effort = body.get("reasoning_effort")
    _expect(effort is None or effort in EFFORTS, "'reasoning_effort' must be one of " + ", ".join(EFFORTS),
            "reasoning_effort")
    check_metadata(body.get("metadata"))
    user = body.get("user")
    _expect(user is None or isinstance(user, str), "'user' must be a string.", "user")
    if body.get("logprobs"):
        raise BadRequest("logprobs are not available from Claude.", param="logprobs",
                         code="unsupported_parameter")
    stop = body.get("stop")
    _expect(stop is None or isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4 and
            all(isinstance(s, str) for s in stop)), "'stop' must be a string or up to 4 strings.", "stop")

    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(msgs):
        p = f"messages[{i}]"
        _expect(isinstance(msg, dict), f"{p} must be an object", p)
        role = msg.get("role")
        _expect(role in ROLES, f"{p}.role must be one of " + ", ".join(ROLES), f"{p}.role")
        parts = normalise_content(msg.get("content"), f"{p}.content", role)
        if role in ("system", "developer"):
            for part in parts:
                _expect(part["type"] == "text", f"{p}.content may only hold text", f"{p}.content")
            system.append(text_of(parts))
            continue
        out: dict[str, Any] = {"role": role, "content": parts}
        if role == "assistant":
            calls = msg.get("tool_calls")
            _expect(calls is None or isinstance(calls, list), f"{p}.tool_calls must be an array", f"{p}.tool_calls")
            for j, call in enumerate(calls or []):
                cp = f"{p}.tool_calls[{j}]"
                _expect(isinstance(call, dict) and isinstance(call.get("function"), dict), f"{cp} must be an object "
                        "with a function object", cp)
                _expect(isinstance(call["function"].get("name"), str), f"{cp}.function.name must be a string",
                        f"{cp}.function.name")
                args = call["function"].get("arguments")
                _expect(args is None or isinstance(args, (str, dict)), f"{cp}.function.arguments must be a string",
                        f"{cp}.function.arguments")
                _expect(call.get("id") is None or isinstance(call.get("id"), str), f"{cp}.id must be a string",
                        f"{cp}.id")
            if calls:
                out["tool_calls"] = calls
            if isinstance(msg.get("function_call"), dict):
                out["tool_calls"] = [{"id": "call_legacy", "type": "function", "function": msg["function_call"]}]
        if role == "tool":
            _expect(isinstance(msg.get("tool_call_id"), str), f"{p}.tool_call_id must be a string",
                    f"{p}.tool_call_id")
            out["tool_call_id"] = msg["tool_call_id"]
            if msg.get("is_error") is True:  # Anthropic tool_result blocks may say the tool failed
                out["is_error"] = True
        if role == "function":
            out = {"role": "tool", "content": parts, "tool_call_id": "call_legacy", "name": msg.get("name")}
        messages.append(out)
    if not messages:  # only system/developer messages: answered, as OpenAI does (README, "Messages")
        messages.append({"role": "user", "content": [{"type": "text", "text": SYSTEM_ONLY_TURN}]})

    expose = body.get("expose_reasoning")
    _expect(expose is None or isinstance(expose, bool), "'expose_reasoning' must be a boolean.", "expose_reasoning")
    return ChatRequest(
        model=model or catalog.default_model,
        cli_model=catalog.resolve(model),
        messages=messages,
        system="\n\n".join(s for s in system if s),
        stream=bool(stream),
        include_usage=include_usage,
        user=user,
        reasoning_effort=effort,
        max_tokens=max_tokens,
        tools=parse_tools(body),
        json_schema=parse_response_format(body.get("response_format")),
        expose_reasoning=expose,
        extras={k: body[k] for k in IGNORED if k in body},
    )

"""One adapter per client API behind one protocol, `Format`. Pure: no Flask, Redis or I/O.

A route serves a format (`api/completions.py`): the format parses the client's body into the relay's
request, and turns the pipeline's view of the finished turn (`TurnView`) into the client's answer, or
a running turn into its stream (`Stream`: start, deltas, keep-alives, finish, error). A new endpoint is
one `Format` and one route line.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...errors import RelayError
from ..events import Delta, ToolCall, Turn
from ..models import ModelCatalog
from ..request import ChatRequest
from ..upstream import finish_reason


def new_id(prefix: str = "chatcmpl-") -> str:
    """Every id the relay makes up (completions, responses, messages, output items)."""
    return prefix + secrets.token_hex(12)


@dataclass
class Parsed:
    """A client's request as the relay runs it, with what the format needs to answer it."""
    req: ChatRequest
    body: dict[str, Any]                  # the client's own body (the Responses object echoes parts of it)
    id: str                               # the answer's id, which the request's record also carries
    conversation: str | None = None       # a conversation the body names itself (previous_response_id)


@dataclass
class TurnView:
    """One view of a finished turn for every API, made by the pipeline's answer stage."""
    id: str
    created: int
    model: str
    content: str | None                   # the answer's text, or the structured output as JSON
    finish: str                           # OpenAI's finish reason: stop, length, tool_calls, content_filter
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str | None = None          # only when the client may see it
    refusal: str = ""                     # the refusal's text when finish is content_filter
    usage: dict[str, int] = field(default_factory=dict)   # Claude's terms, from the CLI's own events
    estimated: bool = False               # usage counted with tiktoken because the CLI reported none


def turn_view(turn: Turn, *, id: str, created: int, model: str, content: str | None, expose_reasoning: bool,
              usage: dict[str, int], estimated: bool) -> TurnView:
    """A finished turn as every format reads it (the pipeline decides the content and the usage)."""
    return TurnView(id=id, created=created, model=model, content=content, finish=finish_reason(turn),
                    tool_calls=list(turn.tool_calls),
                    reasoning="\n\n".join(turn.reasoning) if expose_reasoning and turn.reasoning else None,
                    refusal=str(turn.result.get("result") or ""), usage=usage, estimated=estimated)


@dataclass
class StreamHead:
    """What a stream knows before the first delta."""
    id: str
    created: int
    model: str
    start_usage: dict[str, Any]           # the first API call's input and cache usage (or the estimate)


def stored_answer(view: TurnView) -> dict[str, Any]:
    """The assistant message a conversation (and a stored response) keeps, in the relay's message shape."""
    answer: dict[str, Any] = {"role": "assistant", "content": [{"type": "text", "text": view.content or ""}]}
    if view.tool_calls:
        answer["tool_calls"] = [call_dict(c) for c in view.tool_calls]
    return answer


def call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments or "{}"}}


class Stream(Protocol):
    """The events of one streamed answer, as SSE bytes."""

    final: dict[str, Any] | None          # the complete answer object after `finish` (what a store keeps)

    def start(self) -> bytes: ...
    def delta(self, d: Delta) -> bytes: ...
    def keepalive(self) -> bytes: ...
    def finish(self, view: TurnView) -> bytes: ...
    def error(self, err: RelayError) -> bytes: ...


class Format(Protocol):
    """A client API: how its requests parse and how its answers and streams look."""

    endpoint: str
    # The response cache (`response_cache.ttl`) answers identical non-streaming requests of this API
    # from Redis. Each format states whether it may, and why.
    cacheable: bool

    def parse(self, body: Any, catalog: ModelCatalog, prior: list[dict[str, Any]] | None = None) -> Parsed: ...
    def complete(self, view: TurnView, parsed: Parsed) -> dict[str, Any]: ...
    def stream(self, head: StreamHead, parsed: Parsed) -> Stream: ...
    def from_cache(self, hit: dict[str, Any], parsed: Parsed, created: int) -> dict[str, Any]: ...

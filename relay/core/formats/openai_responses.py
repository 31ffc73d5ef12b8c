"""The OpenAI Responses API (`POST /v1/responses`): the `response` object and its `response.*` events. Pure."""

from __future__ import annotations

from typing import Any

from ...errors import RelayError
from .. import sse
from ..events import Delta
from ..models import ModelCatalog
from ..request import parse_chat_request
from ..responses import to_chat_body
from .base import Parsed, StreamHead, TurnView, new_id
from .openai_chat import openai_usage


def usage_of(raw: dict[str, int], estimated: bool = False) -> dict[str, Any]:
    """Claude's usage as the Responses API reports it (input counts the cache reads and writes)."""
    u = openai_usage(raw, estimated)
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": u["prompt_tokens_details"]["cache_write_tokens"]},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": u["total_tokens"]}


def _effort(body: dict[str, Any]) -> Any:
    reasoning = body.get("reasoning")
    return reasoning.get("effort") if isinstance(reasoning, dict) else None


def response_object(rid: str, created: int, model: str, body: dict[str, Any], status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None,
                    error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "background": False,
        "error": error, "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": _effort(body), "summary": None},
        "service_tier": "default", "store": body.get("store") is not False,
        "temperature": body.get("temperature", 1.0), "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": usage,
        "user": body.get("user"), "metadata": body.get("metadata") or {},
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or
            status == "completed" else []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class EventStream:
    """Turns deltas into `response.*` events with sequence numbers, items opened and closed in order."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None   # the item being streamed
        self.calls: dict[int, int] = {}           # tool call index -> output index

    def ev(self, kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return kind, data

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        snap = dict(self.response, status="in_progress", output=[], usage=None)
        return [self.ev("response.created", response=snap), self.ev("response.in_progress", response=snap)]

    def _close_open(self) -> list[tuple[str, dict[str, Any]]]:
        item, self.open = self.open, None
        if item is None:
            return []
        idx = self.output.index(item)
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = item["content"][0]
            item["status"] = "completed"
            return [self.ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                            text=text, logprobs=[]),
                    self.ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                            part=part),
                    self.ev("response.output_item.done", output_index=idx, item=item)]
        item["status"] = "completed"
        return [self.ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                        arguments=item["arguments"]),
                self.ev("response.output_item.done", output_index=idx, item=item)]

    def delta(self, d: Delta) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if d.kind == "text":
            if self.open is None or self.open["type"] != "message":
                out += self._close_open()
                item = message_item(new_id("msg_"), "", "in_progress")
                self.output.append(item)
                self.open = item
                idx = len(self.output) - 1
                out.append(self.ev("response.output_item.added", output_index=idx, item=dict(item, content=[])))
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                item["content"] = [part]
                out.append(self.ev("response.content_part.added", item_id=item["id"], output_index=idx,
                                   content_index=0, part=dict(part)))
            idx = self.output.index(self.open)
            self.open["content"][0]["text"] += d.text
            out.append(self.ev("response.output_text.delta", item_id=self.open["id"], output_index=idx,
                               content_index=0, delta=d.text, logprobs=[]))
        elif d.kind == "tool_start":
            out += self._close_open()
            item = call_item(new_id("fc_"), d.call_id, d.name, "", "in_progress")
            self.output.append(item)
            self.open = item
            self.calls[d.index] = len(self.output) - 1
            out.append(self.ev("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        elif d.kind == "tool_args":
            pos = self.calls.get(d.index)
            if pos is not None:
                item = self.output[pos]
                item["arguments"] += d.text
                out.append(self.ev("response.function_call_arguments.delta", item_id=item["id"], output_index=pos,
                                   delta=d.text))
        return out

    def finish(self, usage: dict[str, Any], model: str) -> list[tuple[str, dict[str, Any]]]:
        out = self._close_open()
        self.response.update(status="completed", output=self.output, usage=usage, model=model)
        out.append(self.ev("response.completed", response=self.response))
        return out

    def fail(self, error: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        self.response.update(status="failed", output=self.output, error={"code": error.get("code") or "server_error",
                                                                          "message": error["message"]})
        return [self.ev("response.failed", response=self.response)]


def output_items(view: TurnView) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if view.content and view.finish != "content_filter":  # a refusal is no output text
        items.append(message_item(new_id("msg_"), view.content))
    for c in view.tool_calls:
        items.append(call_item(new_id("fc_"), c.id, c.name, c.arguments or "{}"))
    return items


class ResponsesStream:
    """`response.created` and `response.in_progress`, items opened, filled and closed in order,
    `response.completed`; a failure after the start is `response.failed`."""

    def __init__(self, head: StreamHead, parsed: Parsed) -> None:
        self.events = EventStream(response_object(parsed.id, head.created, head.model, parsed.body, "in_progress",
                                                  [], None))
        self.final: dict[str, Any] | None = None

    @staticmethod
    def _frames(events: list[tuple[str, dict[str, Any]]]) -> bytes:
        return b"".join(sse.event(kind, data) for kind, data in events)

    def start(self) -> bytes:
        return self._frames(self.events.start())

    def delta(self, d: Delta) -> bytes:
        return self._frames(self.events.delta(d))

    def keepalive(self) -> bytes:
        return sse.KEEPALIVE

    def finish(self, view: TurnView) -> bytes:
        out = self._frames(self.events.finish(usage_of(view.usage, view.estimated), view.model))
        self.final = self.events.response
        return out

    def error(self, err: RelayError) -> bytes:
        # `response.error.code` is a closed set in the API (and the SDKs' types): the relay's own code
        # goes in the message
        code = "rate_limit_exceeded" if err.status == 429 else "server_error"
        return self._frames(self.events.fail({"code": code, "message": f"{err.message} ({err.code})"}))


class ResponsesFormat:
    endpoint = "/v1/responses"
    cacheable = False  # a Response is stored and chained by id: see ChatFormat.cacheable

    def parse(self, body: Any, catalog: ModelCatalog, prior: list[dict[str, Any]] | None = None) -> Parsed:
        return Parsed(parse_chat_request(to_chat_body(body, prior), catalog), body, new_id("resp_"))

    def complete(self, view: TurnView, parsed: Parsed) -> dict[str, Any]:
        return response_object(parsed.id, view.created, view.model, parsed.body, "completed", output_items(view),
                               usage_of(view.usage, view.estimated))

    def stream(self, head: StreamHead, parsed: Parsed) -> ResponsesStream:
        return ResponsesStream(head, parsed)

    def from_cache(self, hit: dict[str, Any], parsed: Parsed, created: int) -> dict[str, Any]:
        return dict(hit, id=parsed.id, created_at=created)


FORMAT = ResponsesFormat()

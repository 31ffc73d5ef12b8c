"""The Responses API (`POST /v1/responses`) on top of chat completions. Pure translation.

A Responses body becomes a chat-completions body (so validation, tools and JSON output are shared);
the turn's deltas become `response.*` events; the finished turn becomes a `response` object.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..errors import BadRequest
from .events import Delta

CHAT_FIELDS = ("model", "temperature", "top_p", "user", "metadata", "store", "parallel_tool_calls", "stream")


def _content_parts(content: Any, param: str) -> Any:
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{param} must be a string or an array", param=param)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequest(f"{param}[{j}] must be an object", param=f"{param}[{j}]")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text")})
        elif kind == "input_image":
            url = part.get("image_url") or part.get("url")
            if part.get("file_id"):
                raise BadRequest("input_image.file_id is not supported; send image_url.", param=f"{param}[{j}]")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "input_file":
            parts.append({"type": "file", "file": {"file_data": part.get("file_data"), "filename": part.get("filename")}})
        elif kind == "refusal":
            parts.append({"type": "text", "text": part.get("refusal") or ""})
        else:
            raise BadRequest(f"{param}[{j}].type {kind!r} is not supported", param=f"{param}[{j}].type")
    return parts


def input_messages(value: Any) -> list[dict[str, Any]]:
    """Responses `input` (a string or items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise BadRequest("'input' must be a string or an array of items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{p} must be an object", param=p)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"{p}.role must be user, assistant, system or developer", param=f"{p}.role")
            out.append({"role": role, "content": _content_parts(item.get("content"), f"{p}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant":
                # the model's text and its calls are one assistant message, as chat completions has it
                # (so the digest of a full history matches what the CLI session holds)
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):  # content parts: images and files reach the model as blocks
                content: Any = _content_parts(output, f"{p}.output")
            else:
                content = output if isinstance(output, str) else json.dumps(output)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind in ("reasoning", "item_reference"):
            continue  # nothing the CLI can use: its own session holds the reasoning
        else:
            raise BadRequest(f"{p}.type {kind!r} is not supported", param=f"{p}.type")
    return out


def to_chat_body(body: Any, prior: list[dict[str, Any]] | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", param="body")
    if "input" not in body:
        raise BadRequest("Missing required parameter: 'input'.", param="input")
    chat: dict[str, Any] = {k: body[k] for k in CHAT_FIELDS if k in body}
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages += [m for m in (prior or []) if m["role"] not in ("system", "developer")]
    messages += input_messages(body["input"])
    chat["messages"] = messages
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be an array", param="tools")
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise BadRequest("'reasoning' must be an object", param="reasoning")
    if reasoning and reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]
    for name in ("text", "metadata"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise BadRequest(f"'{name}' must be an object", param=name)
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    return chat


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def usage_of(openai_usage: dict[str, Any]) -> dict[str, Any]:
    details = openai_usage.get("prompt_tokens_details") or {}
    return {"input_tokens": openai_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0),
                                     "cache_write_tokens": details.get("cache_write_tokens", 0)},
            "output_tokens": openai_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": (openai_usage.get("completion_tokens_details") or {})
                                      .get("reasoning_tokens", 0)},
            "total_tokens": openai_usage["total_tokens"]}


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

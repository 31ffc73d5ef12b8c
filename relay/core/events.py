"""Fold the CLI's stream-json events into one turn: deltas to stream, full text, usage, errors. Pure.

`Turn.feed(event)` returns what a client should see next (text and reasoning deltas, tool-call
fragments); after the `result` event `Turn.error()` says whether the turn failed and how.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .record import figure

TOOL_PREFIX = "mcp__client__"
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


@dataclass
class Delta:
    kind: str            # "text" | "reasoning" | "tool_start" | "tool_args" | "activity"
    text: str = ""
    index: int = 0       # tool call index (0, 1, ...) for tool deltas
    call_id: str = ""
    name: str = ""
    msg: str = ""        # the API message a text delta belongs to


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    input: dict[str, Any] | None = None


@dataclass
class Turn:
    model: str | None = None
    session_id: str | None = None
    committed: bool = False            # the upstream API accepted the request (or the turn ended)
    done: bool = False                 # the result event arrived
    result: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)   # final text of each API message, in order
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    error_kind: str | None = None       # the `error` of a synthetic assistant message
    rate_limit: dict[str, Any] | None = None
    stop_reasons: list[str] = field(default_factory=list)
    retries: int = 0
    tool_msg_uuid: str | None = None    # the CLI's uuid of the message holding the client's tool calls
    streamed_tools: bool = False        # tool calls arrived as stream events (so wait for message_delta)
    interrupted_for_tools: bool = False
    structured_output: Any = None
    start_usage: dict[str, Any] | None = None   # the first API call's message_start usage (input and cache)
    # A held tool step (the process waits for the client's results, cli/run.py): the CLI's turn spans
    # several requests, and its `result` (cumulative over the whole turn) comes only at the end, so each
    # request counts the usage of its own API calls, from their message_start / message_delta events.
    held: bool = False                  # this request ended at the client's tool calls, its process held
    continued: bool = False             # this request continued a held process's turn
    _call_usage: dict[str, dict[str, int]] = field(default_factory=dict)  # API message id -> its usage
    _msg_text: dict[str, str] = field(default_factory=dict)      # message id -> assembled text
    _streamed: dict[str, str] = field(default_factory=dict)      # message id -> streamed text
    _current: str = ""
    _stream_id: str = ""
    _seps: list[str] = field(default_factory=list)               # separator before each message
    _ids: list[str] = field(default_factory=list)                # message id of each entry in messages
    msg_stops: dict[str, str] = field(default_factory=dict)      # message id -> its stop reason
    _tool_index: dict[str, int] = field(default_factory=dict)    # tool_use id -> call index
    _block_tool: dict[int, str] = field(default_factory=dict)    # content block index -> tool_use id

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, ev: dict[str, Any]) -> list[Delta]:
        kind = ev.get("type")
        if kind == "system":
            sub = ev.get("subtype")
            if sub == "init":
                self.model = ev.get("model") or self.model
                self.session_id = ev.get("session_id") or self.session_id
            elif sub == "api_retry":
                self.retries += 1
            return []
        if kind == "stream_event":
            if ev.get("parent_tool_use_id"):
                return []
            event = ev.get("event") or {}
            msg_id = ev.get("api_message_id") or (event.get("message") or {}).get("id") or self._stream_id
            self._stream_id = str(msg_id)
            return self._stream(event, self._stream_id)
        if kind == "assistant":
            if ev.get("parent_tool_use_id"):
                return []
            return self._assistant(ev)
        if kind == "rate_limit_event":
            self.rate_limit = ev.get("rate_limit_info") or {}
            return []
        if kind == "result":
            self.done = self.committed = True
            self.result = ev
            if "structured_output" in ev:
                self.structured_output = ev["structured_output"]
            self.session_id = ev.get("session_id") or self.session_id
            if not self.model and ev.get("modelUsage"):
                self.model = next(iter(ev["modelUsage"]))
            return []
        return []

    def _separator(self, msg_id: str) -> str:
        """Text of separate API messages is joined by a blank line, except a max_tokens continuation."""
        if msg_id == self._current:
            return ""
        previous = [t for t in self.messages if t]
        cut = bool(self.stop_reasons) and self.stop_reasons[-1] == "max_tokens"
        return "" if not previous or cut else "\n\n"

    def _open(self, msg_id: str) -> str:
        sep = ""
        if msg_id != self._current:
            sep = self._separator(msg_id)
            self._current = msg_id
            self.messages.append("")
            self._seps.append(sep)
            self._ids.append(msg_id)
        return sep

    def _stream(self, e: dict[str, Any], msg_id: str) -> list[Delta]:
        et = e.get("type")
        if et == "message_start":
            self.committed = True
            msg = e.get("message") or {}
            self.model = msg.get("model") or self.model
            if self.start_usage is None and isinstance(msg.get("usage"), dict):
                self.start_usage = {k: figure(v) for k, v in msg["usage"].items() if k in USAGE_KEYS}
            self._count_usage(msg_id, msg.get("usage"))
            return []
        if et == "message_delta":
            self._count_usage(msg_id, e.get("usage"))
            reason = (e.get("delta") or {}).get("stop_reason")
            if reason:
                self.stop_reasons.append(reason)
                self.msg_stops[msg_id] = reason
            return []
        if et == "content_block_start":
            block = e.get("content_block") or {}
            if block.get("type") == "tool_use" and str(block.get("name", "")).startswith(TOOL_PREFIX):
                self.streamed_tools = True
                return self._tool_start(str(block.get("id")), str(block["name"]), e.get("index", 0))
            return []
        if et != "content_block_delta":
            return []
        d = e.get("delta") or {}
        dt = d.get("type")
        if dt == "text_delta" and d.get("text"):
            sep = self._open(msg_id)
            self._streamed[msg_id] = self._streamed.get(msg_id, "") + d["text"]
            return [Delta("text", sep + d["text"], msg=msg_id)]
        if dt == "thinking_delta" and d.get("thinking"):
            return [Delta("reasoning", d["thinking"])]
        if dt == "input_json_delta":
            tool_id = self._block_tool.get(e.get("index", -1))
            if tool_id is not None and d.get("partial_json"):
                idx = self._tool_index[tool_id]
                self.tool_calls[idx].arguments += d["partial_json"]
                return [Delta("tool_args", d["partial_json"], index=idx)]
        return []

    def _count_usage(self, msg_id: str, usage: Any) -> None:
        """message_start carries input and cache, message_delta the output so far (cumulative per message)."""
        if isinstance(usage, dict):
            seen = self._call_usage.setdefault(msg_id, {})
            seen.update({k: figure(v) for k, v in usage.items() if k in USAGE_KEYS})

    def _tool_start(self, tool_id: str, name: str, block_index: int) -> list[Delta]:
        if tool_id in self._tool_index:
            return []
        idx = len(self.tool_calls)
        self._tool_index[tool_id] = idx
        self._block_tool[block_index] = tool_id
        short = name[len(TOOL_PREFIX):]
        self.tool_calls.append(ToolCall(tool_id, short))
        return [Delta("tool_start", index=idx, call_id=tool_id, name=short)]

    def _assistant(self, ev: dict[str, Any]) -> list[Delta]:
        msg = ev.get("message") or {}
        if ev.get("error") or msg.get("model") == "<synthetic>":
            self.error_kind = ev.get("error") or self.error_kind
            return []  # CLI-made error text: reported through the result, never as an answer
        self.committed = True
        self.model = msg.get("model") or self.model
        msg_id = str(msg.get("id") or "")
        out: list[Delta] = []
        for block in msg.get("content") or []:
            btype = block.get("type")
            if btype == "text":
                out += self._assistant_text(msg_id, block.get("text") or "")
            elif btype == "thinking":
                if not self.reasoning or self.reasoning[-1] != block.get("thinking"):
                    self.reasoning.append(block.get("thinking") or "")
            elif btype == "tool_use" and str(block.get("name", "")).startswith(TOOL_PREFIX):
                self.tool_msg_uuid = ev.get("uuid") or self.tool_msg_uuid
                out += self._tool_start(str(block.get("id")), str(block["name"]), -1)
                idx = self._tool_index[str(block.get("id"))]
                call = self.tool_calls[idx]
                call.input = block.get("input") or {}
                if not call.arguments:  # not streamed (the CLI's non-streaming fallback): the whole input at once
                    call.arguments = json.dumps(call.input, ensure_ascii=False)
                    out.append(Delta("tool_args", call.arguments, index=idx))
            elif btype == "tool_use":  # the CLI's own tool (agent mode): the message is an intermediate step
                self.msg_stops.setdefault(msg_id, "tool_use")
                args = json.dumps(block.get("input") or {}, ensure_ascii=False)
                out.append(Delta("activity", f"[{block.get('name')}] {args[:500]}\n", msg=msg_id))
        return out

    def _assistant_text(self, msg_id: str, text: str) -> list[Delta]:
        """A complete text block: emit whatever streaming did not deliver (e.g. a non-stream retry)."""
        sep = self._open(msg_id)
        assembled = self._msg_text.get(msg_id, "") + text
        self._msg_text[msg_id] = assembled
        self.messages[-1] = assembled
        streamed = self._streamed.get(msg_id, "")
        if len(assembled) > len(streamed) and assembled.startswith(streamed):
            self._streamed[msg_id] = assembled
            return [Delta("text", sep + assembled[len(streamed):], msg=msg_id)]
        return []

    # -- results ---------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        return "".join(sep + text for sep, text in zip(self._seps, self.messages) if text)

    @property
    def final_text(self) -> str:
        """Agent mode: only the answer, without the messages that led to tool calls."""
        parts = [t for t, i in zip(self.messages, self._ids) if t and self.msg_stops.get(i) != "tool_use"]
        return "\n\n".join(parts)

    @property
    def partial_text(self) -> str:
        """Everything the client may have seen, finished or not (for estimates after a cancel)."""
        streamed = "".join(self._streamed.values())
        return streamed if len(streamed) > len(self.text) else self.text

    @property
    def usage(self) -> dict[str, int] | None:
        if self.held or self.continued:  # this request's own API calls (see `held`)
            if not self._call_usage:
                return None
            out = {k: sum(u.get(k, 0) for u in self._call_usage.values()) for k in USAGE_KEYS}
            out["reasoning_tokens"] = 0
            return out
        u = self.result.get("usage")
        if not isinstance(u, dict):
            return None
        out = {k: figure(u.get(k)) for k in USAGE_KEYS}  # a forged or broken report counts as 0, never below
        details = u.get("output_tokens_details")
        out["reasoning_tokens"] = figure(details.get("thinking_tokens")) if isinstance(details, dict) else 0
        return out

    @property
    def stop_reason(self) -> str | None:
        return self.result.get("stop_reason") or (self.stop_reasons[-1] if self.stop_reasons else None)

"""Turn OpenAI messages into what the CLI reads: one stream-json user line and a system prompt. Pure.

The CLI reorders `assistant` lines given on stdin (see CLI-PROTOCOL §3), so history that the CLI's
own session does not hold yet is rendered as a tagged transcript inside a single user message.
Every line carries `"client_composed": true`: no `@file` expansion, no slash commands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .images import to_anthropic_block

HISTORY_INTRO = "Here is the conversation so far:\n\n"
HISTORY_OUTRO = "Continue the conversation: reply to the latest message above as the assistant."
NOT_RUN = "The client did not run this tool call."
LATEST = "The user's latest message, to which you reply as the assistant:\n\n"


@dataclass
class Prompt:
    system_text: str          # goes to a --system-prompt-file / --append-system-prompt-file
    system_flag: str | None   # which flag carries it (None in embed mode)
    content: list[dict[str, Any]]  # Anthropic content blocks of the single user line

    def stdin_line(self) -> bytes:
        line = {"type": "user", "client_composed": True, "session_id": "", "parent_tool_use_id": None,
                "message": {"role": "user", "content": self.content}}
        return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _tool_call_text(call: Any) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return ""
    return (f'<tool_call id="{call.get("id", "")}" name="{fn.get("name", "")}">'
            f'{fn.get("arguments", "")}</tool_call>')


def blocks_of(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """A message's parts as Anthropic blocks (text and images)."""
    out: list[dict[str, Any]] = []
    for part in msg["content"]:
        if part.get("type") == "text":
            if part["text"]:
                out.append({"type": "text", "text": part["text"]})
        else:
            out.append(to_anthropic_block(part))
    return out


def tool_result_block(call_id: str, msg: dict[str, Any] | None) -> dict[str, Any]:
    """The tool_result block of one call: the client's `tool` message, or an error when it sent none."""
    if msg is None:
        return {"type": "tool_result", "tool_use_id": call_id, "is_error": True, "content": NOT_RUN}
    blocks = [b for b in blocks_of(msg) if b["type"] in ("text", "image", "document")]
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id,
                              "content": blocks or [{"type": "text", "text": "(empty)"}]}
    if msg.get("is_error"):
        result["is_error"] = True
    return result


def _merge_text(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for b in blocks:
        if b["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + b["text"]}
        elif b["type"] != "text" or b["text"]:
            merged.append(b)
    return merged


def transcript(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as tagged turns: `<user>…</user>`, `<assistant>…</assistant>`, `<tool_result …>`."""
    blocks: list[dict[str, Any]] = []
    for msg in messages:
        role = msg["role"]
        if role == "tool":
            name = f' name="{msg["name"]}"' if msg.get("name") else ""
            name += ' is_error="true"' if msg.get("is_error") else ""
            blocks.append({"type": "text", "text": f'<tool_result tool_call_id="{msg["tool_call_id"]}"{name}>\n'})
            blocks += blocks_of(msg)
            blocks.append({"type": "text", "text": "\n</tool_result>\n\n"})
            continue
        blocks.append({"type": "text", "text": f"<{role}>\n"})
        blocks += blocks_of(msg)
        for call in msg.get("tool_calls") or []:
            blocks.append({"type": "text", "text": "\n" + _tool_call_text(call)})
        blocks.append({"type": "text", "text": f"\n</{role}>\n\n"})
    return blocks


def tool_results_content(messages: list[dict[str, Any]], pending: list[str]) -> list[dict[str, Any]]:
    """The turn after the model called the client's tools: one real tool_result block per call
    (matched by id; a call the client did not answer gets an error result), then any new text."""
    results = {m.get("tool_call_id"): m for m in messages if m["role"] == "tool"}
    content: list[dict[str, Any]] = []
    for call_id in pending:
        content.append(tool_result_block(call_id, results.pop(call_id, None)))
    rest = [m for m in messages if m["role"] != "tool" or m.get("tool_call_id") in results]
    if len(rest) == 1 and rest[0]["role"] == "user":
        content += blocks_of(rest[0])
    elif rest:
        content += _merge_text(transcript(rest))
    return content


def held_results(messages: list[dict[str, Any]], pending: list[str]) -> dict[str, dict[str, Any]] | None:
    """The client's results for a held tool step, as the MCP results the waiting process returns (one
    per pending call, by id); None when the step cannot continue that way (the client also sent new
    text, or a result holds what MCP cannot carry, e.g. a document or an image by URL, or any image: the
    CLI 2.1.330 saves an image an MCP tool returns under its config folder and tells the model that path):
    the step then resumes from the transcript with the same exact history."""
    content = tool_results_content(messages, pending)
    results = [b for b in content if b.get("type") == "tool_result"]
    if len(results) != len(content) or [b["tool_use_id"] for b in results] != pending:
        return None
    out: dict[str, dict[str, Any]] = {}
    for b in results:
        parts = b["content"] if isinstance(b["content"], list) else [{"type": "text", "text": b["content"]}]
        if any(part.get("type") != "text" for part in parts):
            return None
        mcp = [{"type": "text", "text": part.get("text", "")} for part in parts]
        out[b["tool_use_id"]] = {"content": mcp, "isError": bool(b.get("is_error"))}
    return out


def build_prompt(system: str, messages: list[dict[str, Any]], mode: str, first_turn: bool,
                 pending_calls: list[str] | None = None) -> Prompt:
    """The prompt for `messages` (the ones the CLI session has not seen yet).

    One trailing user message is sent as it is; anything more (history for a fresh session, or
    several new messages) becomes a transcript. In `embed` mode the system text leads the first turn.
    """
    if pending_calls:
        content = tool_results_content(messages, pending_calls)
    elif len(messages) == 1 and messages[0]["role"] == "user":
        content = blocks_of(messages[0])
    elif messages[-1]["role"] == "user":
        content = [{"type": "text", "text": HISTORY_INTRO}] + transcript(messages[:-1])
        content.append({"type": "text", "text": LATEST})
        content += blocks_of(messages[-1])
    else:
        content = [{"type": "text", "text": HISTORY_INTRO}] + transcript(messages)
        content.append({"type": "text", "text": HISTORY_OUTRO})
    if mode == "embed" and system and first_turn:
        content.insert(0, {"type": "text", "text": f"<system_instructions>\n{system}\n</system_instructions>\n\n"})
    content = content if pending_calls else _merge_text(content)
    if not content:
        content = [{"type": "text", "text": "(empty message)"}]
    if mode == "embed":
        return Prompt("", None, content)
    flag = "--append-system-prompt-file" if mode == "append" else "--system-prompt-file"
    return Prompt(system, flag, content)

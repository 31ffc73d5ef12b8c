"""A conversation's history as the CLI's own transcript records, for a session the CLI never held. Pure.

When a conversation cannot resume its CLI session (it moved to another host or account, its session
vanished, the client rewrote its history), the relay writes a transcript from the client's structured
messages and resumes that: the model then sees each earlier turn, tool call and result under its own id,
exactly as the client sent them, instead of one flattened text. Records as the CLI reads them back
(docs/cli-observations.md §3): `{type, uuid, parentUuid, message: {role, content}}`, one per line.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from .events import TOOL_PREFIX
from .prompt import blocks_of, tool_result_block

# what stands in for the CLI's "# Environment" text (the relay host's folders and OS) in a written
# transcript: measured with 2.1.330, an empty `rendered` is re-rendered from the snapshot, a blank one is not
BLANK_ENVIRONMENT = [{"content": " "}]


@dataclass
class WrittenHistory:
    records: list[dict[str, Any]]            # the transcript, ending with the model's last message
    tail: list[dict[str, Any]]               # what the client sent after it: the resumed turn's prompt
    resume_at: str | None = None             # the record of the model's tool calls, when they await results
    pending_calls: list[str] = field(default_factory=list)


def _tool_use(call: Any) -> dict[str, Any] | None:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(call.get("id"), str) or not call["id"]:
        return None
    args = fn.get("arguments")
    try:
        value = json.loads(args) if isinstance(args, str) and args.strip() else (args or {})
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    return {"type": "tool_use", "id": call["id"], "name": TOOL_PREFIX + str(fn.get("name", "")), "input": value}


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]] | None:
    """The messages as alternating Anthropic turns: each tool call answered by its result in the next
    user turn (in the order of the calls; a call the client did not answer gets an error result),
    consecutive user messages joined. None when they do not fit that shape (a call without an id,
    arguments that are not a JSON object, a result for no call)."""
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    open_calls: list[str] = []
    results: dict[str, dict[str, Any]] = {}

    def close_calls() -> None:
        if open_calls:
            blocks = [tool_result_block(cid, results.pop(cid, None)) for cid in open_calls]
            turns.append(("user", blocks))
            open_calls.clear()

    for msg in messages:
        role = msg["role"]
        if role == "tool":
            cid = msg.get("tool_call_id")
            if cid not in open_calls or cid in results:
                return None
            results[cid] = msg
            continue
        close_calls()
        if role == "assistant":
            blocks = blocks_of(msg)
            for call in msg.get("tool_calls") or []:
                use = _tool_use(call)
                if use is None or use["id"] in open_calls:
                    return None
                blocks.append(use)
                open_calls.append(use["id"])
            if blocks:
                turns.append(("assistant", blocks))
            continue
        blocks = blocks_of(msg) or [{"type": "text", "text": "(empty message)"}]
        if turns and turns[-1][0] == "user":
            turns[-1] = ("user", turns[-1][1] + blocks)
        else:
            turns.append(("user", blocks))
    return turns  # the model's last calls stay open: their results are the resumed turn's prompt


def write_history(messages: list[dict[str, Any]], tools_declared: bool, environment: dict[str, Any] | None,
                  system_embed: str = "") -> WrittenHistory | None:
    """The transcript for `messages`, or None when a flattened history must do: nothing the model said
    yet, a history that ends with the model's own message, tool calls while the request declares no
    tools (the API refuses tool blocks without tools), or messages that do not form valid turns.

    `environment` is the CLI's live environment snapshot: with it, the transcript carries an environment
    record whose text is blank, so the model is not told the relay host's folders and OS. `system_embed`
    (embed mode) leads the first user turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0 or last == len(messages) - 1:
        return None
    history, tail = messages[:last + 1], messages[last + 1:]
    pending = [c.get("id") for c in history[-1].get("tool_calls") or [] if isinstance(c, dict)]
    if any(m["role"] == "tool" for m in tail) and not pending:
        return None
    if not tools_declared and any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return None
    turns = _turns(history)
    if turns is None or turns[0][0] != "user" or turns[-1][0] != "assistant":
        return None
    records: list[dict[str, Any]] = []
    parent: str | None = None

    def add(record: dict[str, Any]) -> None:
        nonlocal parent
        record.update(uuid=str(uuid.uuid4()), parentUuid=parent)
        records.append(record)
        parent = record["uuid"]

    for i, (role, blocks) in enumerate(turns):
        if i == 0 and system_embed:
            blocks = [{"type": "text", "text": f"<system_instructions>\n{system_embed}\n</system_instructions>\n\n"}] + blocks
        add({"type": role, "message": {"role": role, "content": blocks}})
        if i == 0 and environment is not None:
            add({"type": "attachment", "attachment": {"type": "environment", "snapshot": environment},
                 "rendered": BLANK_ENVIRONMENT, "renderedRole": "system"})
    if pending:
        return WrittenHistory(records, tail, resume_at=records[-1]["uuid"], pending_calls=[str(p) for p in pending])
    joined = {"role": "user", "content": [p for m in tail for p in m.get("content") or []]}
    return WrittenHistory(records, [joined])

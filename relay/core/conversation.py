"""Which conversation a request belongs to, and the digest that proves what a CLI session holds. Pure."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest

SESSION_ID = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")


def _norm(msg: dict[str, Any]) -> Any:
    """What identifies a message for the digest: role, text, images and tool calls, not formatting."""
    parts = []
    for p in msg.get("content") or []:
        if p.get("type") == "text":
            parts.append(p["text"])
        else:
            parts.append(hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:16])
    text = "\n".join(parts).strip()
    calls = []
    for c in msg.get("tool_calls") or []:
        fn = c.get("function") if isinstance(c, dict) else None
        fn = fn if isinstance(fn, dict) else {}
        args = fn.get("arguments")
        try:
            args = json.dumps(json.loads(args), sort_keys=True) if isinstance(args, str) else args
        except ValueError:
            pass
        calls.append([c.get("id") if isinstance(c, dict) else None, fn.get("name"), args])
    return [msg["role"], text, calls, msg.get("tool_call_id")]


def digest(system: str, messages: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(["system", system.strip()]).encode())
    for m in messages:
        h.update(json.dumps(_norm(m), ensure_ascii=False).encode())
    return h.hexdigest()


def _user_id(user: str) -> str:
    return "u:" + hashlib.sha256(user.encode()).hexdigest()[:24]


def client_ids(value: str) -> list[str]:
    """The conversation ids a client's own name may stand for: its X-Session-Id, or its `user`."""
    return (["s:" + value] if SESSION_ID.match(value) else []) + [_user_id(value)]


def conversation_id(header: str | None, user: str | None, system: str, messages: list[dict[str, Any]]) -> str:
    if header is not None:
        if not SESSION_ID.match(header):
            raise BadRequest("X-Session-Id must be 1-128 characters of letters, digits and . _ : @ + = -",
                             param="X-Session-Id", code="invalid_session_id")
        return "s:" + header
    if user:
        return _user_id(user)
    first = next((m for m in messages if m["role"] == "user"), messages[0])
    return "h:" + digest(system, [first])[:24]


def named(conv_id: str) -> bool:
    """Whether the client named the conversation (X-Session-Id, `user`), rather than the relay from its opening."""
    return not conv_id.startswith("h:")


@dataclass
class Plan:
    """What one turn sends to the CLI and how it uses the CLI's session store."""
    conv_key: str | None
    cli_session: str | None
    resume: bool
    send: list[dict[str, Any]]          # the messages the CLI has not seen
    first_turn: bool
    all_messages: list[dict[str, Any]] = field(default_factory=list)
    system: str = ""
    model: str = ""
    scope: str = ""
    resume_at: str | None = None        # cut the CLI session back to the model's tool-call message
    pending_calls: list[str] = field(default_factory=list)  # tool_use ids that await the client's results
    warm: str | None = None             # "host|process|turns" of the pool process holding this session
    account: str | None = None          # the Claude account whose config dir holds the CLI session
    persist: bool = True                # False: the CLI session is resumed for this turn only (sessions off)
    written: bool = False               # the session was written from the client's history (core.history)

"""Server-sent events framing for OpenAI streams. Pure: bytes in, bytes out."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def data(obj: Any) -> bytes:
    """One chat-completions frame: `data: <json>` and a blank line, no `event:` line."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def event(kind: str, obj: Any) -> bytes:
    """One Responses-API frame, which does carry the event name."""
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"


def comment(text: str) -> bytes:
    return b": " + text.replace("\n", " ").encode() + b"\n\n"

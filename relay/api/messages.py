"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages format on the shared handler.

Claude Code (`ANTHROPIC_BASE_URL`) and the Anthropic SDKs talk to these. Errors leave in Anthropic's
shape (the error handlers pick it by route); count_tokens is answered locally with tiktoken, on the
worker's CPU: outside the completions' limits (editors send dozens of them at start-up) but with its own
per key (`rate_limit.count_tokens_per_minute`) and a smaller body cap (`count_tokens_max_body_mb`).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from ..core.formats.anthropic_messages import FORMAT
from ..core.messages import count_body, parse_messages_request
from .common import current_relay, read_json
from .completions import serve

bp = Blueprint("messages", __name__)
count_bp = Blueprint("messages_count", __name__)  # its own rate limit: it never reaches the CLI


@bp.post("/v1/messages")
def create_message() -> Any:
    return serve(FORMAT)


@count_bp.post("/v1/messages/count_tokens")
def count_tokens() -> Any:
    relay = current_relay()
    name, cap_mb = min(("count_tokens_max_body_mb", relay.settings["count_tokens_max_body_mb"]),
                       ("max_body_mb", relay.settings["max_body_mb"]), key=lambda c: c[1])
    body = read_json(limit=int(cap_mb * 1024 * 1024), too_large=f"{name} ({cap_mb:g} MB)")
    req = parse_messages_request(body, relay.catalog, count_only=True)
    return jsonify(count_body(req))

"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages format on the shared handler.

Claude Code (`ANTHROPIC_BASE_URL`) and the Anthropic SDKs talk to these. Errors leave in Anthropic's
shape (the error handlers pick it by route); count_tokens is answered locally with tiktoken, without
the rate limiter, since editors send dozens of them at start-up.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from ..core.formats.anthropic_messages import FORMAT
from ..core.messages import count_body, parse_messages_request
from .common import current_relay, read_json
from .completions import serve

bp = Blueprint("messages", __name__)
count_bp = Blueprint("messages_count", __name__)  # not rate limited: it never reaches the CLI


@bp.post("/v1/messages")
def create_message() -> Any:
    return serve(FORMAT)


@count_bp.post("/v1/messages/count_tokens")
def count_tokens() -> Any:
    req = parse_messages_request(read_json(), current_relay().catalog, count_only=True)
    return jsonify(count_body(req))

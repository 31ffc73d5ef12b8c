"""POST /v1/chat/completions: the OpenAI chat format on the shared handler."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from ..core.formats.openai_chat import FORMAT
from .completions import serve

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
def chat_completions() -> Any:
    return serve(FORMAT)

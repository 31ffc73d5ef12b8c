"""POST /v1/responses (and GET /v1/responses/<id>): the Responses format on the shared handler.

`previous_response_id` continues a conversation: the stored messages of that response plus the new
input extend the same relay conversation, so the CLI session is resumed, not replayed.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from ..core.formats.base import Parsed, TurnView, stored_answer
from ..core.formats.openai_responses import FORMAT
from ..errors import NotFound, RedisUnavailable
from ..pipeline import Exchange
from .common import caller_scope, current_relay
from .completions import RouteIO, serve

bp = Blueprint("responses", __name__)


def _prior(body: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    prev_id = body.get("previous_response_id") if isinstance(body, dict) else None
    if prev_id is None:
        return None, None
    prev = current_relay().responses.get(prev_id, caller_scope()) if isinstance(prev_id, str) else None
    if prev is None:
        raise NotFound(f"Previous response with id '{prev_id}' not found.", param="previous_response_id",
                       code="previous_response_not_found")
    return prev["messages"], prev["conv"]


def _keep(parsed: Parsed, ex: Exchange, view: TurnView, answer: dict[str, Any]) -> None:
    if parsed.body.get("store") is False:
        return
    try:
        kept = current_relay().responses.save(caller_scope(), parsed.id, ex.conv, parsed.req.messages,
                                              stored_answer(view), answer, ex.conv)
    except RedisUnavailable:  # the answer is whole: give it, unstored, rather than an error
        kept = False
    if not kept:
        answer["store"] = False  # over responses.max_stored_kb (or Redis away): answered, but not kept


IO = RouteIO(prior=_prior, keep=_keep)


@bp.post("/v1/responses")
def create_response() -> Any:
    return serve(FORMAT, IO)


@bp.get("/v1/responses/<rid>")
def get_response(rid: str) -> Any:
    stored = current_relay().responses.get(rid, caller_scope())
    if stored is None:
        raise NotFound(f"Response with id '{rid}' not found.", param="response_id", code="response_not_found")
    return jsonify(stored["response"])

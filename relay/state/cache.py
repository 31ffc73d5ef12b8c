"""The response cache (`response_cache.ttl`, `response_cache.min_tokens`): identical non-streaming requests answered from
Redis instead of a new CLI run. Off by default (ttl 0); never used for tools, agent runs or streams."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..core.request import ChatRequest
from .connection import PREFIX


def cache_key(req: ChatRequest, scope: str) -> str:
    ident = [scope, req.cli_model, req.system, req.messages, req.json_schema, req.reasoning_effort,
             req.expose_reasoning]
    return PREFIX + "cache:" + hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


class ResponseCache:
    def __init__(self, r: Any, ttl: int, min_tokens: int) -> None:
        self.r, self.ttl, self.min_tokens = r, ttl, min_tokens

    def applies(self, req: ChatRequest, estimate: int, agent: Any) -> bool:
        return bool(self.ttl) and not req.stream and not req.tools.active and agent is None \
            and estimate >= self.min_tokens

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self.r.get(key)
        return json.loads(raw) if raw else None

    def put(self, key: str, body: dict[str, Any]) -> None:
        self.r.set(key, json.dumps(body), ex=self.ttl)

"""Stored Responses (`store: true`): what `previous_response_id` and `GET /v1/responses/<id>` need."""

from __future__ import annotations

import json
from typing import Any

from .connection import PREFIX


class ResponseStore:
    def __init__(self, r: Any, ttl_hours: float) -> None:
        self.r = r
        self.ttl = int(ttl_hours * 3600)

    def _key(self, rid: str) -> str:
        return f"{PREFIX}resp:{rid}"

    def get(self, rid: str, scope: str) -> dict[str, Any] | None:
        """The stored response `rid` if it belongs to `scope` (else None: other callers' ids do not exist)."""
        raw = self.r.get(self._key(rid))
        data = json.loads(raw) if raw else None
        return data if data is not None and data.get("scope") == scope else None

    def save(self, scope: str, rid: str, conv: str, messages: list[dict[str, Any]], answer: dict[str, Any],
             obj: dict[str, Any]) -> None:
        data = {"conv": conv, "scope": scope, "messages": messages + [answer], "response": obj}
        self.r.set(self._key(rid), json.dumps(data), ex=self.ttl)

"""Stored Responses (`store: true`): what `previous_response_id` and `GET /v1/responses/<id>` need.

Each stored object is capped (`responses.max_stored_kb`) and indexed under its conversation, so
forgetting a conversation forgets its stored Responses too.
"""

from __future__ import annotations

import json
from typing import Any

from .connection import PREFIX


class ResponseStore:
    def __init__(self, r: Any, ttl_hours: float, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.r = r
        self.ttl = int(ttl_hours * 3600)
        self.max_bytes = max_bytes

    def _key(self, rid: str) -> str:
        return f"{PREFIX}resp:{rid}"

    def _index(self, scope: str, conv: str) -> str:
        return f"{PREFIX}resp-conv:{scope}:{conv}"

    def get(self, rid: str, scope: str) -> dict[str, Any] | None:
        """The stored response `rid` if it belongs to `scope` (else None: other callers' ids do not exist)."""
        raw = self.r.get(self._key(rid))
        data = json.loads(raw) if raw else None
        return data if data is not None and data.get("scope") == scope else None

    def save(self, scope: str, rid: str, conv: str, messages: list[dict[str, Any]], answer: dict[str, Any],
             obj: dict[str, Any], conv_id: str | None = None) -> bool:
        """Store it unless it is bigger than the cap; returns whether it was stored. `conv` is how the
        client named the conversation; `conv_id` the relay's id for it (the index forgetting uses)."""
        data = json.dumps({"conv": conv, "scope": scope, "messages": messages + [answer], "response": obj})
        if len(data) > self.max_bytes:
            return False
        index = self._index(scope, conv_id or conv)
        pipe = self.r.pipeline()
        pipe.set(self._key(rid), data, ex=self.ttl)
        pipe.sadd(index, rid)
        pipe.expire(index, self.ttl)
        pipe.execute()
        return True

    def delete_conversation(self, scope: str, conv: str) -> int:
        """Forget every stored response of one conversation; returns how many there were."""
        index = self._index(scope, conv)
        rids = list(self.r.smembers(index))
        if rids:
            self.r.delete(*[self._key(r) for r in rids])
        self.r.delete(index)
        return len(rids)

    def delete_scope(self, scope: str | None) -> int:
        """Forget the stored responses of every conversation of `scope` (None: of everyone)."""
        pattern = self._index(scope, "*") if scope else f"{PREFIX}resp-conv:*"
        removed = 0
        for index in list(self.r.scan_iter(match=pattern, count=500)):
            rids = list(self.r.smembers(index))
            if rids:
                self.r.delete(*[self._key(r) for r in rids])
            self.r.delete(index)
            removed += len(rids)
        return removed

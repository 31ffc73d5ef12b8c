"""Why a conversation's warm process went, remembered until its next turn asks for it, so that the
miss is counted as "evicted: lru" (or idle_ttl, max_turns...) rather than "not held on this host"."""

from __future__ import annotations

from collections import OrderedDict

REMEMBERED = 4096   # conversations whose eviction is remembered (the oldest is forgotten first)
NOT_EVICTIONS = ("replaced", "shutdown")   # the conversation got another process, or the host stops


class Evictions:
    def __init__(self, limit: int = REMEMBERED) -> None:
        self.limit = limit
        self._why: OrderedDict[str, str] = OrderedDict()

    def note(self, conv: str, why: str) -> None:
        """The process kept for `conv` was ended for `why`."""
        if not conv or why in NOT_EVICTIONS:
            return
        self._why[conv] = why
        self._why.move_to_end(conv)
        while len(self._why) > self.limit:
            self._why.popitem(last=False)

    def forget(self, conv: str) -> None:
        """The conversation has a process again (or its miss was explained otherwise)."""
        self._why.pop(conv, None)

    def explain(self, conv: str, otherwise: str) -> str:
        """Why `conv` has no process here: its eviction (counted once), else `otherwise`."""
        why = self._why.pop(conv, None)
        return f"evicted: {why}" if why else otherwise

"""The runaway guard's counters per conversation, shared by every worker and host.

`relay:runaway:<scope>:<conversation>` is a hash (replays in a row, the window's turns, a stop) that
expires once its window and any cooldown are over; `relay:runaways` holds the conversations stopped
now (scored by the end of their cooldown) and `relay:runaway-stops` counts every stop. Read and
written under the conversation's lock, one turn at a time.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..core.runaway import Counters, Limits, Stop, stopped
from .connection import PREFIX

STOPPED = PREFIX + "runaways"
STOPS = PREFIX + "runaway-stops"


class Runaways:
    def __init__(self, r: Any, limits: Limits) -> None:
        self.r = r
        self.limits = limits

    def key(self, scope: str, conv: str) -> str:
        return f"{PREFIX}runaway:{scope}:{conv}"

    def load(self, scope: str, conv: str) -> Counters:
        h = self.r.hgetall(self.key(scope, conv))
        turns = [(float(t[0]), int(t[1]), int(t[2])) for t in json.loads(h.get("turns") or "[]")]
        return Counters(replays=int(h.get("replays") or 0), turns=turns,
                        stopped_until=float(h.get("stopped_until") or 0), stop_kind=h.get("stop_kind") or "",
                        reason=h.get("reason") or "")

    def save(self, scope: str, conv: str, c: Counters, now: float | None = None) -> None:
        now = time.time() if now is None else now
        key = self.key(scope, conv)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"replays": c.replays, "turns": json.dumps(c.turns), "stopped_until": c.stopped_until,
                                "stop_kind": c.stop_kind, "reason": c.reason})
        pipe.expire(key, int(max(self.limits.window_s, c.stopped_until - now)) + 60)
        pipe.execute()

    def stop(self, scope: str, conv: str, stop: Stop, now: float | None = None) -> None:
        """Refuse the conversation until `stop.until`; its counters start afresh after that."""
        now = time.time() if now is None else now
        self.save(scope, conv, stopped(stop), now)
        pipe = self.r.pipeline()
        pipe.zadd(STOPPED, {f"{scope}:{conv}": stop.until})
        pipe.zremrangebyscore(STOPPED, "-inf", now)
        pipe.incr(STOPS)
        pipe.execute()

    def forget(self, scope: str, conv: str) -> None:
        """A deleted conversation starts afresh (an operator's way to lift a stop early)."""
        pipe = self.r.pipeline()
        pipe.delete(self.key(scope, conv))
        pipe.zrem(STOPPED, f"{scope}:{conv}")
        pipe.execute()

    def forget_all(self, scope: str | None) -> None:
        pattern = f"{PREFIX}runaway:{scope}:*" if scope else f"{PREFIX}runaway:*"
        for key in self.r.scan_iter(match=pattern, count=500):
            self.r.delete(key)
        if scope is None:
            self.r.delete(STOPPED)
        else:
            for member in self.r.zrange(STOPPED, 0, -1):
                if member.startswith(f"{scope}:"):
                    self.r.zrem(STOPPED, member)

    def summary(self) -> dict[str, Any]:
        """For /stats: the conversations refused now (soonest end first) and how many stops there were."""
        now = time.time()
        self.r.zremrangebyscore(STOPPED, "-inf", now)
        stopped_now = self.r.zrange(STOPPED, 0, 49, withscores=True)
        return {"stopped": int(self.r.zcard(STOPPED)), "stops": int(self.r.get(STOPS) or 0),
                "conversations": [{"conversation": m, "retry_after_s": round(until - now)} for m, until in stopped_now],
                "limits": {"max_replays_in_a_row": self.limits.max_replays, "burn_ratio": self.limits.burn_ratio,
                           "burn_min_tokens": self.limits.burn_min_tokens, "cooldown_s": self.limits.cooldown_s,
                           "window_s": self.limits.window_s}}

"""Each API key's share of each subscription window, shared in Redis by every worker and host.

One hash per account, window and window reset (`relay:share:<account>:<window>:<reset>`), so a share
restarts with its window: a field per key id holds the utilization the key's turns added, and `_last` the
highest utilization any turn on that window reported. A turn adds `after - max(before, _last)` (clamped at
0), where `before` is what the account's meter said when the turn was admitted: two turns running at once
on one account never count the same rise twice. The hash expires an hour after the window resets.
"""

from __future__ import annotations

import time
from typing import Any

from ..core.receipt import Window, turn_delta, windows
from .connection import PREFIX

LAST = "_last"


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
# KEYS[1] the window's hash; ARGV: key id, the turn's rise (or '' when unknown), after, ttl -> the key's total
_ADD = """
local last = tonumber(redis.call('hget', KEYS[1], '_last') or '-1')
local after = tonumber(ARGV[3])
local d = 0
if ARGV[2] ~= '' then
  local before = after - tonumber(ARGV[2])
  if last > before then before = last end
  d = after - before
  if d < 0 then d = 0 end
end
if after > last then redis.call('hset', KEYS[1], '_last', ARGV[3]) end
local total = redis.call('hincrbyfloat', KEYS[1], ARGV[1], d)
redis.call('expire', KEYS[1], tonumber(ARGV[4]))
return total
"""


def account_id(accounts: Any, name: str) -> str:
    """The account as its meter's Redis key names it (the host's own login is per host)."""
    return str(accounts.key(name)).removeprefix(f"{PREFIX}acct:")


def live(wins: dict[str, Window], now: float) -> dict[str, Window]:
    """The windows still running: one whose reset passed has started again, with every share at 0."""
    return {k: w for k, w in wins.items() if w.resets_at is None or w.resets_at > now}


class WindowShares:
    def __init__(self, r: Any) -> None:
        self.r = r
        self._add = r.register_script(_ADD)

    @staticmethod
    def key(account_id: str, window: str, resets_at: float | None) -> str:
        return f"{PREFIX}share:{account_id}:{window}:{int(resets_at or 0)}"

    def add(self, account_id: str, member: str, before: dict[str, Window],
            after: dict[str, Window]) -> dict[str, float]:
        """Attribute one turn's rise of every window to `member` (a key id); its share of each window after it."""
        now = time.time()
        out: dict[str, float] = {}
        for name, win in after.items():
            delta = turn_delta(before.get(name), win)
            ttl = max(3600, int((win.resets_at or now) - now) + 3600)
            total = self._add(keys=[self.key(account_id, name, win.resets_at)],
                              args=[member, "" if delta is None else repr(delta), repr(win.utilization), ttl])
            out[name] = round(float(total), 6)
        return out

    def of_key(self, accounts: Any, member: str, cap: float | None) -> list[dict[str, Any]]:
        """A key's own view (`/me`): per account and running window, its share, the cap and the reset."""
        now, out = time.time(), []
        for spec in accounts.specs:
            wins = live(windows(accounts.state(spec.name)), now)
            used = self.used(account_id(accounts, spec.name), member, wins)
            for name, win in wins.items():
                out.append({"account": spec.name, "window": name, "share": used[name], "limit": cap,
                            "left": None if cap is None else round(max(0.0, cap - used[name]), 6),
                            "window_utilization": win.utilization,
                            "resets_at": iso(win.resets_at) if win.resets_at else None,
                            "resets_in_s": round(win.resets_at - now) if win.resets_at else None})
        return out

    def used(self, account_id: str, member: str, wins: dict[str, Window]) -> dict[str, float]:
        """`member`'s share of each of these windows (0 for a window it has not used)."""
        if not wins:
            return {}
        pipe = self.r.pipeline()
        for name, win in wins.items():
            pipe.hget(self.key(account_id, name, win.resets_at), member)
        return {name: round(float(v or 0), 6) for name, v in zip(wins, pipe.execute(), strict=True)}

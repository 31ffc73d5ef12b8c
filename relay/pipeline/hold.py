"""Hold instead of refuse (`accounts_hold_s`): when every account is at its limit and the earliest reset
is near, a request waits for it in place of a 429.

A request that holds keeps what admission gave it (the conversation's lock and its run slots, renewed
by its heartbeat), so it runs as soon as the reset comes, before newer requests. A plain request simply
waits; a stream's route sends its head and SSE keep-alive comments while it waits (`AccountsHold` tells
it to), so clients and proxies with read timeouts see a live stream. The wait over all holds of one
request is at most `accounts_hold_s`; a client that hangs up stops it.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import RelayError, SubscriptionLimited
from .admission import Flight

MARGIN_S = 1.0   # after the reset: the account's first answer must come from the new window


class AccountsHold(Exception):
    """Every account is limited until `until` (epoch seconds), within the request's hold budget."""

    def __init__(self, until: float, err: RelayError) -> None:
        super().__init__("every account is limited; holding until its reset")
        self.until, self.err = until, err
        self.since = time.time()
        self.exchange: Any = None   # set by the route that holds it


def hold_until(f: Flight, err: RelayError) -> float | None:
    """When to try again, if this refusal may be held: every account is limited (not a broken login or
    a busy account) and its earliest reset is within what is left of the request's hold budget."""
    budget = float(f.cfg["accounts_hold_s"]) - f.held_s
    if budget <= 0 or not isinstance(err, SubscriptionLimited) or err.retry_after is None:
        return None
    wait = float(err.retry_after) + MARGIN_S
    return time.time() + wait if wait <= budget else None


def wait(f: Flight, hold: AccountsHold, tick: float = 1.0) -> bool:
    """Sleep until the hold's time (counted against the budget); False if the client left meanwhile."""
    t0 = time.monotonic()
    try:
        while (left := hold.until - time.time()) > 0:
            if f.watcher is not None and f.watcher.gone:
                return False
            time.sleep(min(tick, left))
        return True
    finally:
        f.held_s += time.monotonic() - t0

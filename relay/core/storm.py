"""Storm control after a failover. Pure.

When an account goes down, its conversations move to the next one on their next turns: a herd. The
receiving account's concurrency for moving runs ramps up over `ramp_s` from `start` runs at once to its
full limit, instead of the whole herd landing in the same second (a burst that can trip Anthropic's own
rate limits on the account that is now carrying everyone)."""

from __future__ import annotations

import math


def ramp_cap(elapsed: float, ramp_s: float, start: int, full: int) -> int:
    """Runs a receiving account may hold for moving conversations, `elapsed` seconds into its ramp."""
    if ramp_s <= 0 or elapsed >= ramp_s or full <= start:
        return full
    return max(1, min(full, start + math.floor(max(0.0, elapsed) / ramp_s * (full - start))))

"""A request's share of a window before it runs, learnt from each account's own turns. Pure.

Anthropic reports a window's utilization, not what a request costs in it. Each account's turns teach the
relay its utilization per token: the tokens its turns used (the CLI's real usage, cache reads included)
since the window's utilization last moved, against how far it moved. The figure is smoothed over moves
(`ALPHA`) because the API rounds utilization (to 1 % or finer) and weighs tokens by model and cache.
A request's estimated share is then its estimated tokens times that rate: a rough figure, used only to keep
an account from crossing its reserve (or its limit) with the request that would do it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALPHA = 0.3                  # weight of the newest move in the smoothed rate
MIN_TOKENS = 1_000           # fewer tokens than this behind a move teach nothing (rounding noise)


@dataclass(frozen=True)
class Learnt:
    rate: float | None       # utilization per token (None: not learnt yet)
    pending: int             # tokens since the utilization last moved
    util: float | None       # the utilization last seen
    reset: float | None      # the window's reset last seen


def learn(prev: Learnt, util: float | None, reset: float | None, tokens: int) -> Learnt:
    """After a turn of `tokens` tokens that left the window at `util` (resetting at `reset`)."""
    if util is None:
        return Learnt(prev.rate, prev.pending + tokens, prev.util, prev.reset)
    if prev.util is None or (reset is not None and prev.reset is not None and reset != prev.reset) \
            or util < prev.util:  # a new window: what came before says nothing of its start
        return Learnt(prev.rate, 0, util, reset)
    pending = prev.pending + tokens
    moved = util - prev.util
    if moved <= 0:
        return Learnt(prev.rate, pending, util, reset)
    if pending < MIN_TOKENS:
        return Learnt(prev.rate, 0, util, reset)
    sample = moved / pending
    rate = sample if prev.rate is None else ALPHA * sample + (1 - ALPHA) * prev.rate
    return Learnt(rate, 0, util, reset)


def would_cross(util: float | None, rate: float | None, tokens: int, line: float) -> bool:
    """Whether a request of about `tokens` tokens would take a window at `util` to `line` or past it."""
    if util is None:
        return False
    if util >= line:
        return True
    return rate is not None and util + rate * tokens >= line


def _num(v: Any) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def learnt_fields(stored: dict[str, Any], windows: dict[str, dict[str, Any]], tokens: int) -> dict[str, Any]:
    """The account hash's `<window>_upt` (utilization per token) and `<window>_pending` (tokens since the
    last move) after a turn of `tokens` tokens that reported `windows` (core/routing.py `windows_of`)."""
    out: dict[str, Any] = {}
    for w, vals in windows.items():
        prev = Learnt(_num(stored.get(f"{w}_upt")), int(_num(stored.get(f"{w}_pending")) or 0),
                      _num(stored.get(f"{w}_util")), _num(stored.get(f"{w}_reset")))
        now = learn(prev, _num(vals.get("utilization")), _num(vals.get("resets_at")), max(0, tokens))
        if now.rate is not None:
            out[f"{w}_upt"] = now.rate
        out[f"{w}_pending"] = now.pending
    return out

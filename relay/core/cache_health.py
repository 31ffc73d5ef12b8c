"""Prompt-cache health: is an account's or a key's cache hit rate over the last hour far below its usual
level, and what is the likely cause. Pure; the counts live in Redis (state/cache_health.py).

The hit rate is the share of the prompt read from the cache: cache reads over all input (uncached input,
cache writes and cache reads). A subscription's windows fill far faster when it falls: a conversation
that is not resumed (its session lost, expired or moved to another account) or a prompt that changes
each turn pays for its whole context again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counts:
    """One span of answered requests."""
    read: int = 0          # cache read tokens
    total: int = 0         # every input token: uncached + cache write + cache read
    requests: int = 0
    resumed: int = 0       # requests that resumed their conversation's CLI session
    moved: int = 0         # requests whose conversation moved to another account

    def __add__(self, o: Counts) -> Counts:
        return Counts(self.read + o.read, self.total + o.total, self.requests + o.requests,
                      self.resumed + o.resumed, self.moved + o.moved)

    @property
    def rate(self) -> float:
        return self.read / self.total if self.total else 0.0


@dataclass(frozen=True)
class Rules:
    min_tokens: int = 20_000      # the last hour and the usual level each need this much input to count
    min_usual_rate: float = 0.3   # below this the usual level is too low to fall "far"
    drop: float = 0.5             # far below: under this fraction of the usual rate


@dataclass(frozen=True)
class Verdict:
    rate: float
    usual: float
    cause: str


def verdict(last_hour: Counts, usual: Counts, rules: Rules = Rules()) -> Verdict | None:
    """A verdict when the last hour's hit rate fell far below the usual one, else None."""
    if last_hour.total < rules.min_tokens or usual.total < rules.min_tokens:
        return None
    if usual.rate < rules.min_usual_rate or last_hour.rate >= usual.rate * rules.drop:
        return None
    return Verdict(last_hour.rate, usual.rate, cause(last_hour, usual))


def cause(last_hour: Counts, usual: Counts) -> str:
    share = last_hour.resumed / last_hour.requests if last_hour.requests else 0.0
    usual_share = usual.resumed / usual.requests if usual.requests else 0.0
    if last_hour.moved and last_hour.moved * 4 >= last_hour.requests:
        return ("conversations switched accounts (a prompt cache stays with its account, so each moved "
                "conversation pays for its whole history again)")
    if share < usual_share * 0.5:
        return ("conversations were not resumed: new CLI sessions replayed their history (sessions lost, "
                "expired, forgotten, or the relay or its Redis restarted)")
    return "the prompts changed between turns (a system prompt, tools or early messages that vary per request)"

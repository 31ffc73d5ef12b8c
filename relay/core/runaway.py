"""The runaway guard's decisions, pure: a conversation that replays its whole history turn after turn,
or burns far more tokens than its history explains, is stopped for a cooldown (issue 18).

A *replay* is a turn that starts a new CLI session for a conversation that has history (more than one
message): the model reads all of it again, from no prompt cache. A resumed turn ends a run of replays;
a conversation's first message neither counts nor ends one, nor does a fresh turn of a conversation the
client did not name (see `kind_of`). The *burn* of the recent window is the
prompt tokens the CLI reported for its turns (input, cache writes and cache reads); what the history
explains is the sum of those turns' prompt estimates, what each turn reads once when all goes well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["first", "resume", "replay"]
MAX_TURNS_KEPT = 200  # the window's turns kept per conversation; older ones go first


@dataclass(frozen=True)
class Limits:
    """`runaway.*` in the config; a zero turns its check off."""
    max_replays: int = 5              # replays in a row that may run; the next is refused
    burn_ratio: float = 20.0
    burn_min_tokens: int = 200_000    # a window that burnt less is never stopped for its burn
    cooldown_s: float = 900.0
    window_s: float = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.max_replays or self.burn_ratio)


@dataclass
class Counters:
    """One conversation's state as the guard keeps it (state/runaway.py stores it)."""
    replays: int = 0                  # replays in a row, up to the last turn
    turns: list[tuple[float, int, int]] = field(default_factory=list)  # (when, burnt, explained) in the window
    stopped_until: float = 0.0
    stop_kind: str = ""
    reason: str = ""

    @property
    def burnt(self) -> int:
        return sum(t[1] for t in self.turns)

    @property
    def explained(self) -> int:
        return sum(t[2] for t in self.turns)


@dataclass(frozen=True)
class Stop:
    """Why and until when a conversation is refused."""
    kind: Literal["replays", "burn"]
    reason: str                       # a sentence for the client and the operator
    until: float
    new: bool = True                  # False: an earlier stop whose cooldown has not ended

    def retry_after(self, now: float) -> float:
        return max(1.0, self.until - now)


def kind_of(resume: bool, messages: int, named: bool = True) -> Kind:
    """What a turn does to the conversation's CLI session. A conversation the client did not name (its id
    is its opening's digest) is shared by every conversation that opens the same way ("hi"): a fresh turn
    there may be another person's conversation, not a replay, so it counts as a first turn."""
    if resume:
        return "resume"
    return "replay" if messages > 1 and named else "first"


def admit(c: Counters, lim: Limits, kind: Kind, now: float) -> Stop | None:
    """Before a turn runs: a stopped conversation stays stopped until its cooldown ends, and a replay
    beyond `max_replays` in a row stops it now (it is not run)."""
    if c.stopped_until > now:
        return Stop("burn" if c.stop_kind == "burn" else "replays", c.reason, c.stopped_until, new=False)
    if lim.max_replays and kind == "replay" and c.replays >= lim.max_replays:
        return Stop("replays", f"The relay stopped this conversation: its last {c.replays} turns in a row each "
                    "replayed its whole history in a new Claude Code session instead of resuming the last one "
                    f"(runaway guard, runaway.max_replays_in_a_row = {lim.max_replays}). A client that changes or "
                    "re-sends a different history every turn does this. It is refused for "
                    f"{lim.cooldown_s:g} s.", now + lim.cooldown_s)
    return None


def record(c: Counters, lim: Limits, kind: Kind, burnt: int, explained: int, now: float) -> Stop | None:
    """After a turn ran: count it in `c`; a window that burnt far more than its history explains stops
    the conversation (this turn was answered; the next ones are refused)."""
    c.replays = c.replays + 1 if kind == "replay" else 0 if kind == "resume" else c.replays
    c.turns = [t for t in c.turns if t[0] > now - lim.window_s][-(MAX_TURNS_KEPT - 1):]
    c.turns.append((now, max(0, burnt), max(0, explained)))
    total, reads = c.burnt, c.explained
    if lim.burn_ratio and total >= lim.burn_min_tokens and total > lim.burn_ratio * reads:
        ratio = f"{total / reads:.0f} times" if reads else "far more than"
        return Stop("burn", f"The relay stopped this conversation: its last {len(c.turns)} turns burnt {total:,} "
                    f"prompt tokens, {ratio} what its history explains ({reads:,}) (runaway guard, "
                    f"runaway.burn_ratio = {lim.burn_ratio:g}). It is refused for {lim.cooldown_s:g} s.",
                    now + lim.cooldown_s)
    return None


def stopped(stop: Stop) -> Counters:
    """The counters of a conversation just stopped: it starts afresh once its cooldown ends."""
    return Counters(stopped_until=stop.until, stop_kind=stop.kind, reason=stop.reason)

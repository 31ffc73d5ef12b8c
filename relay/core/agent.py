"""Agent mode's policy (which CLI tools a caller may use, and how) and its smart streaming. Pure.

Off by default. An operator turns it on globally (`agent.enabled`) or for chosen keys
(`auth.api_keys[].agent`): those keys can run commands on this host, inside their own folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .events import Delta, Turn

FIELDS = ("enabled", "allowed_tools", "permission_mode", "workdir_root", "max_turns", "max_budget_usd",
          "intermediate", "user")


@dataclass(frozen=True)
class ProxyLimits:
    """What one run's credential proxy admits (`agent.proxy_*`)."""
    max_body_bytes: int = 32 * 1024 * 1024   # Anthropic's own request size limit
    max_connections: int = 16                # open at once; as many more are answered 429, the rest closed
    read_timeout_s: float = 30.0             # a request's head and body must arrive within this of its connection


@dataclass(frozen=True)
class Agent:
    allowed_tools: tuple[str, ...]
    permission_mode: str
    workdir_root: str               # absolute
    max_turns: int
    max_budget_usd: float
    intermediate: str
    user: str
    config_root: str = ""           # absolute; each conversation's own CLI state (transcripts) under here
    models: tuple[str, ...] = ()    # the key's allowed models (and what they resolve to); empty: any
    proxy: ProxyLimits = ProxyLimits()


def smart_deltas(turn: Turn, batches: Iterable[list[Delta] | None], shown: Callable[[Delta], bool],
                 as_reasoning: bool, keepalive_s: float) -> Iterator[Delta | None]:
    """Smart streaming: a message's text is held until its stop reason is known; only the final
    answer is content; the steps before tool calls are dropped or sent as reasoning."""
    held: list[Delta] = []
    last_out = time.monotonic()

    def flush(final: bool) -> Iterator[Delta]:
        keep = []
        for d in held:
            stop = turn.msg_stops.get(d.msg)
            if stop is None and not final:
                keep.append(d)
            elif d.kind == "text" and stop != "tool_use":
                yield d
            elif as_reasoning and d.kind in ("text", "activity"):
                yield Delta("reasoning", d.text)
        held[:] = keep
    for batch in batches:
        if batch is None:
            yield None
            continue
        for d in batch:
            if d.kind in ("text", "activity"):
                held.append(d)
            elif shown(d):
                yield d
        out = list(flush(False))
        yield from out
        if out:
            last_out = time.monotonic()
        elif time.monotonic() - last_out > keepalive_s:
            last_out = time.monotonic()
            yield None  # tokens are arriving but held back: keep the connection visibly alive
    yield from flush(True)

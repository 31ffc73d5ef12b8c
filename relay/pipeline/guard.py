"""The runaway guard in the pipeline: admission refuses a stopped conversation (or the replay that stops
it) before it takes a run slot, and finish counts every turn that ran, before the conversation's lock
is released. The decisions are core/runaway.py's; the counters live in state/runaway.py.

The guard needs conversations (`sessions.enabled`): without them every turn replays by design.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..core import runaway
from ..core.conversation import Plan, named
from ..errors import RunawayStopped
from ..runtime import Relay

log = logging.getLogger("relay.pipeline")
PROMPT_TOKENS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _active(relay: Relay, plan: Plan) -> bool:
    return relay.runaways.limits.enabled and relay.sessions.enabled and bool(plan.conv_key)


def _kind(conv: str, plan: Plan) -> runaway.Kind:
    # a history written as a transcript (core.history) is resumed by the CLI, but it is a replay all the same
    return runaway.kind_of(plan.resume and not plan.written, len(plan.all_messages), named(conv))


def check(relay: Relay, scope: str, conv: str, plan: Plan, request_id: str) -> None:
    """Raise RunawayStopped (429, not to be retried before its Retry-After) for a stopped conversation."""
    if not _active(relay, plan):
        return
    now = time.time()
    counters = relay.runaways.load(scope, conv)
    stop = runaway.admit(counters, relay.runaways.limits, _kind(conv, plan), now)
    if stop is None:
        return
    if stop.new:
        _stopped(relay, scope, conv, plan, stop, counters, request_id, now)
    raise RunawayStopped(stop.reason, stop.retry_after(now))


def record(relay: Relay, scope: str, conv: str, plan: Plan, usage: dict[str, Any], estimate: int,
           request_id: str) -> None:
    """Count a turn that ran (replay or resume, the prompt tokens the CLI reported); never raises."""
    if not _active(relay, plan):
        return
    now = time.time()
    burnt = sum(int(usage.get(k) or 0) for k in PROMPT_TOKENS)
    try:
        counters = relay.runaways.load(scope, conv)
        stop = runaway.record(counters, relay.runaways.limits, _kind(conv, plan), burnt, estimate, now)
        if stop is None:
            relay.runaways.save(scope, conv, counters, now)
        else:
            _stopped(relay, scope, conv, plan, stop, counters, request_id, now)
    except Exception as exc:  # the turn was answered; its record must not be lost over the guard
        log.error("%s: the runaway guard could not count the turn: %s", request_id, exc)


def _stopped(relay: Relay, scope: str, conv: str, plan: Plan, stop: runaway.Stop, counters: runaway.Counters,
             request_id: str, now: float) -> None:
    """Store the stop and tell the operator, once per stop (the alert's id names the stop)."""
    relay.runaways.stop(scope, conv, stop, now)
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stop.until))
    log.warning("%s: runaway guard: conversation %s (%s) refused until %s (%s)", request_id, conv, scope, until,
                stop.kind)
    relay.alerts.emit("runaway_conversation", plan.account,
                      f"Runaway conversation {conv} (caller {scope}) is refused until {until}. {stop.reason}",
                      f"runaway:{scope}:{conv}:{int(stop.until)}", ttl=int(stop.until - now) + 60,
                      details={"scope": scope, "conversation": conv, "kind": stop.kind, "until": until,
                               "replays_in_a_row": counters.replays, "burnt_tokens": counters.burnt,
                               "explained_tokens": counters.explained, "turns": len(counters.turns),
                               "request_id": request_id})

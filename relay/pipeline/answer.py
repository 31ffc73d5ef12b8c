"""The answer stage: one view of the turn for every API (`TurnView`), and the deltas a stream shows."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

from ..core.agent import smart_deltas
from ..core.events import Delta
from ..core.formats.base import StreamHead, TurnView, turn_view
from ..core.models import display_model
from ..core.tokens import count_text
from ..errors import PoolLost, UpstreamError
from .admission import Flight
from .runner import classify_turn, retry_cold, witness


def model(f: Flight) -> str:
    return display_model(f.run.turn.model if f.run else None, f.req.cli_model)


def raw_usage(f: Flight) -> tuple[dict[str, int], bool]:
    """The CLI's usage in Claude's terms (input, cache read/creation, output), or an estimate. An agent
    run's is what its credential proxy saw answered: every call, its tools' own included."""
    assert f.run
    seen = witness(f)
    if seen is not None:
        return seen.total(), False
    usage = f.run.turn.usage
    if usage is not None:
        return usage, False
    return {"input_tokens": f.req.prompt_estimate, "output_tokens": count_text(f.run.turn.partial_text)}, True


def content(f: Flight) -> str:
    """The answer's text; with response_format, the structured output as JSON (or an error)."""
    assert f.run
    turn = f.run.turn
    if f.req.json_schema is None:
        return turn.final_text if f.ctx.agent else turn.text
    if turn.structured_output is None:
        raise UpstreamError("The model produced no output matching the requested JSON schema "
                            "(response_format).", code="structured_output_missing")
    return json.dumps(turn.structured_output, ensure_ascii=False)


def expose(f: Flight) -> bool:
    if f.req.expose_reasoning is not None:
        return f.req.expose_reasoning
    return bool(f.relay.expose_reasoning)


def head(f: Flight) -> StreamHead:
    assert f.run
    start: dict[str, Any] = f.run.turn.start_usage or {"input_tokens": f.req.prompt_estimate}
    return StreamHead(f.cid, f.created, model(f), start)


def head_before_run(f: Flight) -> StreamHead:
    return StreamHead(f.cid, f.created, display_model(None, f.req.cli_model), {"input_tokens": f.req.prompt_estimate})


def view(f: Flight) -> TurnView:
    """The finished turn, as every format reads it."""
    assert f.run
    usage, estimated = raw_usage(f)
    return turn_view(f.run.turn, id=f.cid, created=f.created, model=model(f), content=content(f),
                     expose_reasoning=expose(f), usage=usage, estimated=estimated)


def complete(f: Flight) -> TurnView:
    """Run the turn to its end; raises its error. The client has nothing yet: a run whose pool server
    died under it is run again here, once."""
    assert f.run
    try:
        for _ in f.run.pump():
            pass
    except PoolLost:
        retry_cold(f)
        assert f.run
        for _ in f.run.pump():
            pass
    err = classify_turn(f)
    if err:
        raise err
    return view(f)


def deltas(f: Flight) -> Iterator[Delta | None]:
    """What the client should see, in order: deltas (reasoning only when exposed; with a JSON
    schema, the JSON as one text delta at the end) and None for keep-alives. Raises a RelayError
    if the turn failed; the caller closes the exchange."""
    assert f.run
    run, shown_reasoning, json_mode = f.run, expose(f), f.req.json_schema is not None

    def shown(d: Delta) -> bool:
        return not (d.kind == "reasoning" and not shown_reasoning) and not (d.kind == "text" and json_mode)
    pending, f.buffer = f.buffer, []
    if f.ctx.agent:
        yield from smart_deltas(run.turn, itertools.chain([pending], run.pump()), shown,
                                f.ctx.agent.intermediate == "reasoning", f.cfg["keepalive_s"])
    else:
        yield from (d for d in pending if shown(d))
        for batch in run.pump():
            if batch is None:
                yield None
            else:
                yield from (d for d in batch if shown(d))
    err = classify_turn(f)
    if err:
        raise err
    if json_mode:
        yield Delta("text", content(f))

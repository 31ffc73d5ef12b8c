"""The one handler every completion API is served by: the front, the cache rule, the exchange, the
stream wrapper, the budget headers. A route is a blueprint and one `serve(FORMAT)` call.

The front refuses what needs no body, reads the JSON, parses it with the client's `Format`, vets it,
and records a refusal once. Streams set their headers before the first byte and close the exchange
(committing the conversation) before their last event, on every API.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Response, g, jsonify, request, stream_with_context

from ..core.formats.base import Format, Parsed, TurnView
from ..core.messages import in_claude_code_session
from ..core.record import RequestRecord
from ..core.sse import KEEPALIVE
from ..errors import RedisUnavailable, RelayError
from ..pipeline import AccountsHold, Exchange
from ..state.cache import cache_key
from .common import SSE_HEADERS, context, current_relay, key_id, read_json, record_rejection, refuse_early, vet

log = logging.getLogger("relay.http")


@dataclass
class RouteIO:
    """What a route adds around the shared path (the Responses API's store); both optional."""
    # body -> (the earlier messages it continues, the conversation they belong to)
    prior: Callable[[Any], tuple[list[dict[str, Any]] | None, str | None]] | None = None
    # called with the finished answer before its last event reaches the client; may amend the answer
    keep: Callable[[Parsed, Exchange, TurnView, dict[str, Any]], None] | None = None


NO_IO = RouteIO()


def _front(fmt: Format, io: RouteIO, t0: float) -> Parsed:
    body: Any = None
    try:
        refuse_early()
        body = read_json()
        prior, conv = io.prior(body) if io.prior else (None, None)
        parsed = fmt.parse(body, current_relay().catalog, prior)
        parsed.conversation = conv
        session = request.headers.get("X-Claude-Code-Session-Id", "")
        if fmt.endpoint == "/v1/messages" and not parsed.req.user and 0 < len(session) <= 128:
            in_claude_code_session(parsed.req, session)  # Claude Code without metadata.user_id
        vet(parsed.req)
        return parsed
    except RelayError as exc:
        record_rejection(exc, t0, body)
        raise


def serve(fmt: Format, io: RouteIO = NO_IO) -> Any:
    relay, t0 = current_relay(), time.monotonic()
    parsed = _front(fmt, io, t0)
    req = parsed.req
    log.info("%s: %s model=%s stream=%s tools=%d beta=%s", g.request_id, fmt.endpoint, req.model, req.stream,
             len(req.tools.tools), request.headers.get("anthropic-beta", "-"))
    ctx = context(fmt.endpoint)
    if parsed.conversation is not None and ctx.session_header is None:
        ctx.conversation = parsed.conversation  # previous_response_id names the conversation
    cache = relay.response_cache
    cache_id = cache_key(req, ctx.scope) if fmt.cacheable and cache.ttl and \
        cache.applies(req, req.prompt_estimate, ctx.agent) else None
    if cache_id:
        hit = cache.get(cache_id)
        if hit is not None:
            return _from_cache(fmt, parsed, hit, t0)
    try:
        ex = _open(Exchange(relay, req, ctx, parsed.id))
    except AccountsHold as hold:  # every account limited, its reset near: a live stream waits for it
        held = Response(stream_with_context(_held(fmt, parsed, hold, io)), mimetype="text/event-stream",
                        headers=SSE_HEADERS)
        held.call_on_close(_closer(hold.exchange))  # a stream never started: its leases go too
        return held
    if req.stream:
        if ex.token_budget is not None:  # headers go out now: the budget minus this prompt's estimate
            g.token_budget = dict(ex.token_budget, remaining=max(0, ex.token_budget["remaining"] - ex.estimate))
        g.receipt = _head_receipt(ex)  # the head has only what is known before the turn
        # the request's context stays with the stream: a route's `keep` may read the caller and the relay
        return Response(stream_with_context(_stream(fmt, parsed, ex, io)), mimetype="text/event-stream", headers=SSE_HEADERS)
    view = ex.complete()
    g.receipt = ex.receipt
    answer = fmt.complete(view, parsed)
    if io.keep:
        io.keep(parsed, ex, view, answer)
    try:  # the answer is whole: a Redis outage now must not turn it into an error
        if cache_id:
            cache.put(cache_id, answer)
        if ex.token_budget is not None:
            g.token_budget = relay.quotas.state(getattr(g, "api_key", None))  # after charging actual usage
    except RedisUnavailable:
        log.warning("%s: Redis unreachable after the answer: not cached, budget headers as admitted", g.request_id)
    return jsonify(answer)


def _open(ex: Exchange) -> Exchange:
    try:
        ex.open()
    except AccountsHold as hold:
        hold.exchange = ex
        raise
    finally:
        g.token_budget = ex.token_budget  # for the rate-limit headers, refusals included
    g.relay_account = ex.account          # the x-relay-account header: which subscription answers
    return ex


def _closer(ex: Exchange) -> Callable[[], None]:
    return lambda: ex.close(GeneratorExit())


def _held(fmt: Format, parsed: Parsed, hold: AccountsHold, io: RouteIO) -> Iterator[bytes]:
    """A stream held for an account's reset (pipeline/hold.py): its head went out with no account yet,
    keep-alive comments until the reset, then the run; a refusal after the hold is the stream's error."""
    ex: Exchange = hold.exchange
    tick = current_relay().settings["keepalive_s"]
    try:
        while True:
            while (left := hold.until - time.time()) > 0:
                yield KEEPALIVE
                time.sleep(min(tick, left))
            ex.flight.held_s += max(0.0, time.time() - hold.since)
            try:
                ex.resume()
                break
            except AccountsHold as again:
                hold = again
    except RelayError as exc:
        events = fmt.stream(ex.hold_head(), parsed)
        yield events.start() + events.error(exc)
        return
    except BaseException as exc:  # the client went away while held
        ex.close(exc)
        raise
    yield from _stream(fmt, parsed, ex, io)


def _head_receipt(ex: Exchange) -> Any:
    try:
        return ex.head_receipt()
    except Exception as exc:  # the stream goes on without its receipt
        log.warning("%s: no receipt in the stream's head: %s", g.request_id, exc)
        return None


def _stream(fmt: Format, parsed: Parsed, ex: Exchange, io: RouteIO) -> Iterator[bytes]:
    events = fmt.stream(ex.head(), parsed)
    try:
        yield events.start()
        for d in ex.deltas():
            frame = events.keepalive() if d is None else events.delta(d)
            if frame:
                yield frame
        view = ex.view()
        last = events.finish(view)
        ex.settle()  # before the last events: the client's next request finds the conversation committed
        if io.keep and events.final is not None:
            io.keep(parsed, ex, view, events.final)
        if ex.receipt is not None and ex.receipt.utilization:  # an SSE comment: every parser skips it
            yield b": x-relay-receipt " + json.dumps(ex.receipt.headers(), separators=(",", ":")).encode() + b"\n\n"
        yield last
        ex.close(None)  # the CLI's exit is waited for after the client has its whole answer
    except RelayError as exc:
        ex.close(exc)
        yield events.error(exc)
    except BaseException as exc:  # GeneratorExit when the client goes away
        ex.close(exc)
        raise


def _from_cache(fmt: Format, parsed: Parsed, hit: dict[str, Any], t0: float) -> Any:
    """An identical request answered within response_cache.ttl: same answer, new id, nothing spent upstream."""
    body = fmt.from_cache(hit, parsed, int(time.time()))
    saved = int((hit.get("usage") or {}).get("total_tokens") or 0)
    current_relay().record(RequestRecord(
        id=parsed.id, request_id=g.request_id, key=getattr(g, "key_name", ""), key_id=key_id(),
        model=str(hit.get("model")), requested_model=parsed.req.model, status=200,
        response_time_ms=int((time.monotonic() - t0) * 1000), response_cache_hit=True, tokens_saved=saved,
        endpoint=fmt.endpoint))
    resp = jsonify(body)
    resp.headers["x-relay-cache"] = "hit"
    return resp

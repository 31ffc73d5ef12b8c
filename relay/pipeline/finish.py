"""The finish stage, run exactly once: the status, keep the process warm, commit the conversation
(before a stream's last event, so the client's next request finds it), count the turn for the runaway
guard, release, record, alert.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..core.formats.base import stored_answer
from ..core.record import RequestRecord
from ..core.request import text_of
from ..errors import ClientStalled, RelayError, Timeout
from . import guard, receipts
from .admission import Flight
from .answer import model, raw_usage, view
from .runner import end_run

log = logging.getLogger("relay.pipeline")


def settle(f: Flight) -> None:
    """A turn that ended well: keep its process warm and commit the conversation, before the stream's
    last event, so a follow-up sent the instant it arrives resumes (it waits on the conversation's lock
    while the CLI exits). `close` then finishes the rest, whatever happens to the last event."""
    if f.closed or f.settled or not f.run:
        return
    f.settled = True
    receipts.take(f)  # the stream's last comment carries it
    cancelled = f.run.cancelled or (f.watcher is not None and f.watcher.gone)
    warm = _keep_warm(f, not cancelled)
    try:
        _update_conversation(f, True, warm)
    except Exception as e:  # never lose the stats record over a session update
        log.error("%s: session update failed: %s", f.ctx.request_id, e)


def close(f: Flight, exc: BaseException | None) -> None:
    if f.closed:
        return
    f.closed = True
    if f.watcher:
        f.watcher.stop()
    if f.settled and (exc is None or isinstance(exc, GeneratorExit)):
        exc = None  # the answer was whole when the client left at its last event
    cancelled = bool(f.run and f.run.cancelled) or isinstance(exc, GeneratorExit) or \
        (f.watcher is not None and f.watcher.gone and not f.settled)
    ok = exc is None
    if isinstance(exc, GeneratorExit) and getattr(f.ctx.client_socket, "stalled", False):
        log.warning("%s: the client stopped reading the answer (client_send_timeout_s or total_timeout_s); "
                    "run stopped, slots released", f.ctx.request_id)
        exc = ClientStalled("The client stopped reading the answer.")
    f.status = exc.status if isinstance(exc, RelayError) else 500 if exc is not None else 200
    if cancelled and not ok:
        f.status = 499
    warm = None
    if f.run:
        if not ok and not f.run.turn.done:
            f.run.cancel()
        if not f.settled:
            warm = _keep_warm(f, ok and not cancelled)
        end_run(f)
    try:
        if not f.settled:
            _update_conversation(f, ok, warm)
    except Exception as e:  # never lose the stats record over a session update
        log.error("%s: session update failed: %s", f.ctx.request_id, e)
    finally:
        if f.run and f.plan:  # counted before the lock goes: the conversation's next turn reads it
            guard.record(f.relay, f.ctx.scope, f.conv, f.plan, raw_usage(f)[0], f.estimate, f.ctx.request_id)
        _release(f)
        if isinstance(exc, Timeout):
            f.relay.alerts.emit("run_timeout", f.account, f"A run on account {f.account} timed out "
                                f"({exc.code}): {exc.message}", f"timeout:{f.cid}",
                                details={"request_id": f.ctx.request_id, "code": exc.code})
        if isinstance(exc, RelayError) and exc.code == "cli_too_old":  # once per host and CLI version
            version = f.relay.check_cli().get("version")
            f.relay.alerts.emit("cli_too_old", f.account, f"Host {f.relay.host}: Anthropic refuses the relay's Claude "
                                f"Code CLI {version}: {exc.message}", f"cli_too_old:{f.relay.host}:{version}",
                                details={"version": version, "request_id": f.ctx.request_id})
        if f.run:
            receipts.take(f)
        f.relay.record(record_of(f, exc))


def _update_conversation(f: Flight, ok: bool, warm: str | None) -> None:
    relay, plan, run = f.relay, f.plan, f.run
    if not (plan and plan.conv_key and run):
        return
    if ok:
        relay.sessions.commit(plan, stored_answer(view(f)), relay.host, resume_at=run.turn.tool_msg_uuid, warm=warm)
        if f.account:
            relay.accounts.hold(f.account, plan.conv_key, f.moved_from)
    else:
        relay.sessions.forget(plan)
        relay.accounts.release(plan.account, plan.conv_key)


def _release(f: Flight) -> None:
    if f.member:
        try:
            f.relay.slots.forget(f.member)
        except Exception as e:  # it vanishes with the slot's lease anyway
            log.warning("%s: could not forget the run: %s", f.ctx.request_id, e)
    f.heartbeat.release()


def _keep_warm(f: Flight, ok: bool) -> str | None:
    """After a clean turn on a pool process: keep it for the conversation's next turn, and return
    the marker the conversation's record carries. Anything else (an error, a cancel, the client's
    tool calls, unless the turn paused for them: then it is held) leaves it to be killed when the run ends."""
    assert f.run
    turn = f.run.turn
    if not (ok and turn.done and f.plan and f.plan.conv_key):
        return None
    if turn.held:  # the turn paused at the client's calls: its process waits for their results
        return f.relay.pool.hold(f.run.proc, f.run.pending)
    if turn.tool_calls or turn.interrupted_for_tools or turn.result.get("is_error"):
        return None
    return f.relay.pool.keep(f.run.proc)


def _reminder(part: dict[str, Any]) -> bool:
    """Claude Code's `<system-reminder>` blocks: not what a person reading the stats wants to see."""
    return part.get("type") == "text" and str(part.get("text", "")).lstrip().startswith("<system-reminder>")


def record_of(f: Flight, exc: BaseException | None) -> RequestRecord:
    usage: dict[str, Any] = {}
    estimated = False
    if f.run:
        usage, estimated = raw_usage(f)
    first_user = next((text_of([p for p in m["content"] if not _reminder(p)]) for m in f.req.messages
                       if m["role"] == "user"), "")
    return RequestRecord(
        id=f.cid, request_id=f.ctx.request_id, key=f.ctx.key_name,
        key_id=f.ctx.api_key.id if f.ctx.api_key else "", model=model(f),
        requested_model=f.req.model, stream=f.req.stream, status=f.status,
        error=(getattr(exc, "code", None) or type(exc).__name__) if exc is not None else None,
        input_tokens=usage.get("input_tokens", 0), output_tokens=usage.get("output_tokens", 0),
        cache_read_tokens=usage.get("cache_read_input_tokens", 0),
        cache_creation_tokens=usage.get("cache_creation_input_tokens", 0), estimated=estimated,
        response_time_ms=int((time.monotonic() - f.t0) * 1000),
        ttft_ms=f.run.ttft_ms if f.run else None, first_message=first_user[:200],
        resumed=bool(f.plan and f.plan.resume and not f.plan.written), moved=bool(f.moved_from),
        bytes_to_cli=f.bytes_to_cli, worker=os.getpid(),
        endpoint=f.ctx.endpoint, account=f.account or "", pool=f.pool_use,
        receipt=f.receipt.record() if f.receipt else None)

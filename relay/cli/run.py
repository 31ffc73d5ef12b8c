"""One CLI run seen from the relay: its timeouts, its events folded into a `Turn`, its clean-up.

`Run.pump()` yields lists of deltas as the model produces them and `None` when it is time for a
keep-alive; it raises a `RelayError` on timeouts and crashes. `Run.finish()` always runs last.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..core.events import TOOL_PREFIX, Delta, Turn
from ..core.upstream import SessionMissing, session_gone
from ..errors import PoolLost, RelayError, Timeout, UpstreamError
from .mcp_server import RESULT_KEY
from .process import EOF, CliLike, CliProcess, RunSpec

log = logging.getLogger("relay.run")


class Limits:
    def __init__(self, first_token: float, idle: float, total: float, keepalive: float) -> None:
        self.first_token, self.idle, self.total, self.keepalive = first_token, idle, total, keepalive


class Run:
    def __init__(self, spec: RunSpec | None, limits: Limits, allow_tools: frozenset[str] = frozenset(),
                 proc: CliLike | None = None, hold_tools: bool = False, request_id: str = "") -> None:
        self.spec = spec
        self.request_id = request_id  # names the run in the log, and in a crash's message to the client
        self.limits = limits
        if proc is None:  # spawned here from `spec`, unless the host's pool serves it (cli/pool/client.py)
            if spec is None:
                raise ValueError("a run needs a spec to spawn or a process to drive")
            proc = CliProcess(spec)
        self.proc: CliLike = proc
        self.turn = Turn()
        self.allow_tools = allow_tools | {"StructuredOutput"}
        self.started = 0.0
        self.first_token_at: float | None = None
        self.last_event_at = 0.0
        self.cancelled = False
        self.finished = False
        # hold_tools: a turn that calls the client's functions pauses with their permission requests
        # unanswered (the process is then held in the pool) instead of being interrupted
        self.hold_tools = hold_tools
        self.pending: dict[str, dict[str, Any]] = {}   # tool_use id -> {"request_id", "input"}

    def start(self) -> None:
        self.started = self.last_event_at = time.monotonic()
        self.proc.start()

    @property
    def ttft_ms(self) -> int | None:
        return None if self.first_token_at is None else int((self.first_token_at - self.started) * 1000)

    def _wait_budget(self, now: float) -> tuple[float, RelayError | None]:
        """Seconds to wait for the next event, or the timeout that has fired."""
        lim = self.limits
        total_left = self.started + lim.total - now
        if total_left <= 0:
            return 0, Timeout(f"The run took longer than total_timeout_s ({lim.total:g} s) and was stopped.",
                              code="total_timeout")
        if self.first_token_at is None:
            left = self.started + lim.first_token - now
            if left <= 0:
                return 0, Timeout(f"The model produced no output within first_token_timeout_s "
                                  f"({lim.first_token:g} s); the run was stopped.", code="first_token_timeout")
        else:
            left = self.last_event_at + lim.idle - now
            if left <= 0:
                return 0, Timeout(f"The model's output stopped for idle_timeout_s ({lim.idle:g} s); "
                                  "the run was stopped.", code="idle_timeout")
        return min(left, total_left, lim.keepalive), None

    def pump(self, until_committed: bool = False) -> Iterator[list[Delta] | None]:
        while not self.turn.done:
            if until_committed and self.turn.committed:
                return
            wait, fired = self._wait_budget(time.monotonic())
            if fired:
                raise fired
            ev = self.proc.next_event(wait)
            if ev is None:
                if self._wait_budget(time.monotonic())[1] is None:
                    yield None  # keep-alive tick
                continue
            if ev is EOF:
                raise self._crash()
            now = self.last_event_at = time.monotonic()
            if ev.get("type") == "control_request":
                self._control(ev)
                self._pause_if_asked()
                continue
            deltas = self.turn.feed(ev)
            if self.turn.tool_calls and self.turn.stop_reasons[-1:] == ["tool_use"] and not self.hold_tools:
                self._interrupt_for_tools()
            if deltas:
                if self.first_token_at is None:
                    self.first_token_at = now
                yield deltas
            self._pause_if_asked()

    def _pause_if_asked(self) -> None:
        """A held step ends here: the model's message is complete and the CLI asks to run each of the
        client's calls in it. The process waits, unanswered, for the request that brings the results."""
        turn = self.turn
        if not (self.hold_tools and turn.tool_calls and not turn.done):
            return
        if turn.streamed_tools and turn.stop_reasons[-1:] != ["tool_use"]:
            return
        if all(c.id in self.pending for c in turn.tool_calls):
            turn.held = turn.done = turn.committed = True

    def give_results(self, pending: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
        """A held process's next step: allow each waiting call with the client's result, which the
        relay's MCP server returns as the tool's output (the model's own call keeps its input)."""
        self.turn.continued = True
        for tool_id, asked in pending.items():
            given = dict(asked.get("input") or {}, **{RESULT_KEY: results[tool_id]})
            self.proc.send({"type": "control_response", "response": {
                "subtype": "success", "request_id": asked.get("request_id"),
                "response": {"behavior": "allow", "updatedInput": given}}})

    def _control(self, ev: dict[str, Any]) -> None:
        """Permission requests (`--permission-prompt-tool stdio`): the client's functions are taken
        from here and never run; the relay's own allowed tools are approved; anything else is denied."""
        req = ev.get("request") or {}
        if req.get("subtype") != "can_use_tool":
            self.proc.send({"type": "control_response", "response": {
                "subtype": "error", "request_id": ev.get("request_id"), "error": "not supported by the relay"}})
            return
        name = str(req.get("tool_name") or "")
        if name.startswith(TOOL_PREFIX) and self.hold_tools:
            self.pending[str(req.get("tool_use_id") or "")] = {"request_id": ev.get("request_id"),
                                                               "input": req.get("input") or {}}
            return
        if name.startswith(TOOL_PREFIX):
            # a call of the API client's: stop the turn once the model's message is complete
            if not self.turn.streamed_tools or self.turn.stop_reasons[-1:] == ["tool_use"]:
                self._interrupt_for_tools()
            return
        if name in self.allow_tools:
            decision = {"behavior": "allow", "updatedInput": req.get("input") or {}}
        else:
            decision = {"behavior": "deny", "message": f"The tool {name} is not enabled on this relay."}
        self.proc.send({"type": "control_response", "response": {
            "subtype": "success", "request_id": ev.get("request_id"), "response": decision}})

    def _interrupt_for_tools(self) -> None:
        if not self.turn.interrupted_for_tools:
            self.turn.interrupted_for_tools = True
            self.proc.send({"type": "control_request", "request_id": "relay-interrupt",
                            "request": {"subtype": "interrupt"}})

    def _crash(self) -> RelayError:
        if self.cancelled:
            return UpstreamError("The run was cancelled.", code="cancelled")
        if self.proc.host_lost:
            log.error("the pool server went away during the run (its CLI died with it)")
            return PoolLost("The relay's pool server stopped during the run; retry the request.")
        rc = self.proc.wait_exit(2)
        err = self.proc.stderr_text  # the operators' to read, never the client's: it can name paths and secrets
        rid = self.request_id or "-"
        if session_gone(err):
            log.info("%s: the CLI has no such session: %s", rid, err[-500:])
            return SessionMissing("The CLI no longer has this conversation's session.")
        log.error("%s: the CLI exited without a result: rc=%s stderr=%s", rid, rc, err[-2000:])
        return UpstreamError(f"The Claude CLI exited (code {rc}) without an answer; its error output is in the "
                             f"relay's log under request {rid}.", code="cli_crashed")

    def finish(self) -> None:
        """Let a finished CLI exit by itself (it may still be saving the session), then kill the rest."""
        if self.finished:
            return
        self.finished = True
        if self.turn.done and not self.cancelled and not self.turn.held:
            self.proc.close_stdin()
            # a turn stopped at the client's tool calls is resumed at its tool-call record: give the CLI
            # time to finish writing its transcript even on a loaded host
            self.proc.wait_exit(10 if self.turn.interrupted_for_tools else 3)
        self.proc.kill()

    def cancel(self) -> None:
        self.cancelled = True
        self.proc.kill()


class DisconnectWatcher:
    """Notices a client that hung up while the relay is still working, and calls `on_gone` once.

    Peeks at the client socket: EOF means the client closed it. Works for streaming and
    non-streaming requests alike (a worker otherwise notices only when it next writes).
    """

    def __init__(self, sock: Any, on_gone: Callable[[], None]) -> None:
        self.sock = sock
        self.on_gone = on_gone
        self._stop = threading.Event()
        self.gone = False

    def start(self) -> DisconnectWatcher:
        if self.sock is not None:
            threading.Thread(target=self._watch, daemon=True).start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([self.sock], [], [], 0.2)
                if self._stop.is_set():
                    return
                if readable:
                    data = self.sock.recv(1, socket.MSG_PEEK)
                    if data:
                        return  # a pipelined request: nothing to learn here
                    self.gone = True
                    self.on_gone()
                    return
            except (OSError, ValueError):
                if not self._stop.is_set():
                    self.gone = True
                    self.on_gone()
                return

    def stop(self) -> None:
        self._stop.set()

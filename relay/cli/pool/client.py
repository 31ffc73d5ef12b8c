"""A worker's side of the pool server (`server.py`): a CLI run served by the host's pool.

`PoolClient.run()` opens one connection per run and returns a `PooledProcess`, a `CliLike` that
`cli/run.Run` drives, or None with why (the pool server is not there, or speaks another protocol
version): the caller then spawns the CLI itself, as without a pool. Hanging up without `keep()`
kills the run's CLI in the pool server; so does this worker's death.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..process import EOF, CliLike
from .protocol import (
    Channel,
    EndOfRun,
    Header,
    HoldRequest,
    KeepReply,
    KeepRequest,
    ProtocolError,
    RunRequest,
    StatsRequest,
    parse_pool_line,
    parse_stats,
)

log = logging.getLogger("relay.pool")

MISMATCH_PAUSE_S = 30.0   # after a version refusal, skip the pool for this long (the old server stays until a restart)


class PooledProcess:
    """One run on a CLI process owned by the pool server."""

    def __init__(self, chan: Channel, header: Header, sent: int) -> None:
        self.chan = chan          # its reader read the header: it may already hold the first events
        self.how = header.how     # spare | warm | cold
        self.reason = header.reason
        self.session_id = header.session_id
        self.pool_pid = header.pid
        self.pending = header.pending   # a held process: the permission requests it waits on
        self.events: queue.Queue[Any] = queue.Queue()
        self.replies: queue.Queue[KeepReply | None] = queue.Queue()
        self.bytes_written = sent
        self.stderr = ""
        self.rc: int | None = None
        self.kept = False
        self.lost = False         # the pool server went away under the run (no end-of-run line)
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self.pool_pid

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        ended = False
        try:
            while (obj := self.chan.read()) is not None:
                msg = parse_pool_line(obj)
                if msg is None:
                    self.events.put(obj)
                elif isinstance(msg, EndOfRun):
                    self.rc, self.stderr, ended = msg.rc, msg.stderr, True
                    break
                elif isinstance(msg, KeepReply):
                    self.replies.put(msg)
        finally:
            if not ended and not self._closed:  # the server died (or hung up) before the run ended
                self.lost = True
                self.stderr = self.stderr or "the pool server went away during the run"
            self.events.put(EOF)
            self.replies.put(None)

    def send(self, obj: dict[str, Any]) -> None:
        """A line for the CLI's stdin (control responses, interrupts)."""
        if not self._closed:
            self.bytes_written += self.chan.write(obj)

    def next_event(self, timeout: float) -> Any:
        try:
            return self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def keep(self, timeout: float = 10.0) -> tuple[str, int] | None:
        """Ask the pool to keep the process for the conversation's next turn: its (id, turn count)."""
        return self._ask(KeepRequest().to_wire(), timeout)

    def hold(self, wait_s: float, pending: dict[str, Any], timeout: float = 10.0) -> tuple[str, int] | None:
        """The turn paused at the client's tool calls: ask the pool to keep the process waiting for the
        results (for up to `wait_s`), with the permission requests it waits on: its (id, turn count)."""
        return self._ask(HoldRequest(wait_s, pending).to_wire(), timeout)

    def _ask(self, line: dict[str, Any], timeout: float) -> tuple[str, int] | None:
        if self._closed:
            return None
        self.bytes_written += self.chan.write(line)
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            return None
        if reply is not None and reply.kept:
            self.kept = True
            return reply.proc, reply.turns
        return None

    def close_stdin(self) -> None:
        """Nothing to do: the pool keeps the process's stdin open, or closes it with the process."""

    def wait_exit(self, timeout: float = 5.0) -> int | None:
        return self.rc

    @property
    def stderr_text(self) -> str:
        return self.stderr.strip()

    @property
    def host_lost(self) -> bool:
        return self.lost

    def kill(self) -> None:
        """Hang up: the pool server kills the CLI unless `keep()` succeeded. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.chan.close()


class PoolClient:
    """How a worker reaches its host's pool server."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._mismatch_until = 0.0
        self._mismatch = ""

    def _connect(self, timeout: float) -> Channel | None:
        if not self.enabled:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            return None
        return Channel(sock)

    def run(self, request: RunRequest, timeout: float = 30.0) -> tuple[PooledProcess | None, str]:
        """Start a run in the pool; (None, why) if the pool cannot (spawn the CLI yourself)."""
        if time.monotonic() < self._mismatch_until:
            return None, self._mismatch
        chan = self._connect(timeout)
        if chan is None:
            return None, "pool server unavailable"
        try:
            sent = chan.write(request.to_wire())
            obj = chan.read() if sent else None
            header = Header.from_wire(obj) if obj is not None else None
        except ProtocolError as exc:  # a server of another version: its header (or refusal) says which
            chan.close()
            return None, self._mismatched(str(exc))
        if header is None or not header.started:
            chan.close()
            if header is not None and request.want == "held":  # expired, recycled: resume from the transcript
                return None, header.error
            log.warning("pool: the pool server could not start the run: %s", header.error if header else "no answer")
            return None, "pool server unavailable"
        chan.sock.settimeout(None)
        return PooledProcess(chan, header, len(request.line)), ""

    def _mismatched(self, problem: str) -> str:
        log.warning("pool: %s; running the CLI here meanwhile", problem)
        self._mismatch_until, self._mismatch = time.monotonic() + MISMATCH_PAUSE_S, "pool protocol mismatch"
        return self._mismatch

    def stats(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False}
        chan = self._connect(5.0)
        if chan is None:
            return {"enabled": True, "ok": False, "problem": f"the pool server is not running ({self.path})"}
        try:
            obj = chan.read() if chan.write(StatsRequest().to_wire()) else None
            if obj is None:
                return {"enabled": True, "ok": False, "problem": "the pool server did not answer"}
            return {"enabled": True, "ok": True, **parse_stats(obj)}
        except ProtocolError as exc:
            return {"enabled": True, "ok": False, "problem": str(exc)}
        finally:
            chan.close()


if TYPE_CHECKING:  # mypy proves that a pooled process is driven like a local one
    _pooled_is_cli_like: type[CliLike] = PooledProcess

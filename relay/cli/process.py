"""The Claude Code CLI as a subprocess: spawn, NDJSON events, kill; and `CliLike`, what a run drives.

One `CliProcess` is one run. Its stdout is read by a background thread (a greenlet under gevent)
into a queue, so the caller can wait with a timeout and send keep-alives. `kill()` ends the whole
process tree (the CLI and any tool children, which may sit in their own process groups) and removes
the run's temp files; it is safe to call more than once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from ..errors import Unavailable
from .witness import Witness

log = logging.getLogger("relay.cli")

EOF = object()


class CliLike(Protocol):
    """A CLI process as `cli/run.Run` drives it: spawned here (`CliProcess`) or held by the host's pool
    (`cli/pool/client.PooledProcess`)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def stderr_text(self) -> str: ...
    def start(self) -> None: ...
    def send(self, obj: dict[str, Any]) -> None: ...
    def next_event(self, timeout: float) -> Any: ...
    def close_stdin(self) -> None: ...
    def kill(self) -> None: ...
    def wait_exit(self, timeout: float = 5.0) -> int | None: ...
    @property
    def host_lost(self) -> bool:
        """The process died because what held it went away (the pool server), not by its own fault."""
        ...


@dataclass
class RunSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stdin: bytes
    keep_stdin_open: bool = False
    temp_dir: str | None = None      # removed when the run ends
    user: str | None = None          # run as this user (agent mode)
    meta: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)  # called when the run ends (its proxy)
    witness: Witness | None = None   # agent mode: what its credential proxy saw (usage, account state)
    socket_stdio: bool = False       # stdin/stdout/stderr are socketpairs, not pipes (agent mode: see below)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGKILL the CLI if the worker that spawned it dies (e.g. SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class CliProcess:
    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: queue.Queue[Any] = queue.Queue()
        self.stderr = bytearray()
        self.bytes_written = 0
        self.started_at = 0.0
        self._killed = False
        self._stdin_lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._socks: list[socket.socket] = []   # the relay's ends of the socketpairs (socket_stdio)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        try:
            extra: dict[str, Any] = {}
            if self.spec.user:
                import pwd

                pw = pwd.getpwnam(self.spec.user)
                extra = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            if self.spec.socket_stdio:
                self._start_on_sockets(extra)
            else:
                self.proc = subprocess.Popen(
                    self.spec.argv, cwd=self.spec.cwd, env=self.spec.env, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                    preexec_fn=_die_with_parent, close_fds=True, **extra)
        except (FileNotFoundError, PermissionError, NotADirectoryError, KeyError) as exc:
            self._cleanup_files()
            raise Unavailable(f"The Claude Code CLI could not be started ({exc}). Operator: install it "
                              "or fix claude_bin / CLAUDE_BIN.", code="cli_unavailable") from exc
        except OSError as exc:  # out of memory or processes (EAGAIN, ENOMEM): the host is overloaded
            self._cleanup_files()
            raise Unavailable(f"The relay host could not start another Claude Code CLI ({exc}); retry shortly.",
                              code="overloaded", retry_after=5) from exc
        self.started_at = time.monotonic()
        for target in (self._read_stdout, self._read_stderr, self._write_stdin):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            if target != self._write_stdin:
                self._readers.append(t)

    def _start_on_sockets(self, extra: dict[str, Any]) -> None:
        """Agent mode: the CLI's stdio are unix socketpairs. A tool in the sandbox runs as the CLI's user
        in its PID namespace; a pipe could be reopened by it (`echo ... > /proc/2/fd/1`, `/dev/stdout`)
        and forged events written to the relay, but opening /proc/<pid>/fd/N of a socket fails (ENXIO)."""
        pairs = [socket.socketpair() for _ in range(3)]
        try:
            self.proc = subprocess.Popen(
                self.spec.argv, cwd=self.spec.cwd, env=self.spec.env, stdin=pairs[0][1].fileno(),
                stdout=pairs[1][1].fileno(), stderr=pairs[2][1].fileno(), start_new_session=True,
                preexec_fn=_die_with_parent, close_fds=True, **extra)
        finally:
            for _, child in pairs:
                child.close()
        self._socks = [mine for mine, _ in pairs]
        self.proc.stdin = self._socks[0].makefile("wb")
        self.proc.stdout = self._socks[1].makefile("rb")
        self.proc.stderr = self._socks[2].makefile("rb")

    def _close_socks(self, which: slice) -> None:
        for s in self._socks[which]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    # -- I/O threads -----------------------------------------------------------------------------
    def _write_stdin(self) -> None:
        assert self.proc and self.proc.stdin
        try:
            with self._stdin_lock:
                self.proc.stdin.write(self.spec.stdin)
                self.proc.stdin.flush()
                self.bytes_written += len(self.spec.stdin)
            if not self.spec.keep_stdin_open:
                self.close_stdin()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def send(self, obj: dict[str, Any]) -> None:
        """Write one more stream-json line (control responses) while stdin is kept open."""
        if not self.proc or not self.proc.stdin or self.proc.stdin.closed:
            return
        data = (json.dumps(obj) + "\n").encode()
        try:
            with self._stdin_lock:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
                self.bytes_written += len(data)
        except (BrokenPipeError, OSError, ValueError):
            pass

    def close_stdin(self) -> None:
        if self.proc and self.proc.stdin and not self.proc.stdin.closed:
            try:
                with self._stdin_lock:
                    self.proc.stdin.close()
                    self._close_socks(slice(0, 1))   # a socket's file closing leaves the socket open
            except OSError:
                pass

    def _read_stdout(self) -> None:
        assert self.proc and self.proc.stdout
        try:
            for raw in self.proc.stdout:
                line = raw.strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    log.warning("cli: ignoring a non-JSON line: %r", line[:200])
                    continue
                if isinstance(ev, dict):
                    self.events.put(ev)
        except (OSError, ValueError):
            pass
        finally:
            self.events.put(EOF)

    def _read_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        try:
            for raw in self.proc.stderr:
                self.stderr += raw
                if len(self.stderr) > 65536:
                    del self.stderr[:-65536]
        except (OSError, ValueError):
            pass

    # -- consumer API ----------------------------------------------------------------------------
    def next_event(self, timeout: float) -> Any:
        """The next event dict, `EOF` when stdout closed, or None if nothing came within `timeout`."""
        try:
            return self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def wait_exit(self, timeout: float = 5.0) -> int | None:
        if not self.proc:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()

    @property
    def host_lost(self) -> bool:
        return False  # this worker is its host: if it dies, so does the request

    def kill(self) -> None:
        """End the CLI and every descendant within about a second; reap; remove temp files."""
        proc = self.proc
        if proc is not None and not self._killed:
            self._killed = True
            if proc.poll() is not None:
                self._kill_leftovers(proc.pid)
            else:
                try:
                    family = psutil.Process(proc.pid).children(recursive=True)
                except psutil.Error:
                    family = []
                self._signal(proc.pid, family, signal.SIGTERM)
                try:
                    proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
                self._signal(proc.pid, family, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                log.error("cli: pid %s did not exit after SIGKILL", proc.pid)
            for t in self._readers:  # the pipes reach EOF once every process holding them is gone
                t.join(1.0)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    if stream:
                        stream.close()
                except (OSError, RuntimeError):  # RuntimeError: a reader still inside read() (gevent)
                    pass
            self._close_socks(slice(None))
        self._cleanup_files()

    def _kill_leftovers(self, pgid: int) -> None:
        """The CLI already exited: kill what its tools left in its process group (e.g. `cmd &`).
        Only processes older than the CLI's exit, so a later process reusing the id is never hit."""
        exited = time.time()
        for p in psutil.process_iter(["create_time"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["create_time"] <= exited and p.pid != os.getpid():
                    p.kill()
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue

    @staticmethod
    def _signal(pid: int, family: list[psutil.Process], sig: int) -> None:
        try:
            os.killpg(pid, sig)  # start_new_session: the CLI leads its own group
        except (ProcessLookupError, PermissionError):
            pass
        for child in family:
            try:
                child.send_signal(sig)
            except psutil.Error:
                pass

    def _cleanup_files(self) -> None:
        while self.spec.closers:
            try:
                self.spec.closers.pop()()
            except Exception as exc:  # clean-up goes on regardless
                log.warning("cli: run clean-up failed: %s", exc)
        if self.spec.temp_dir:
            shutil.rmtree(self.spec.temp_dir, ignore_errors=True)


if TYPE_CHECKING:  # mypy proves that the local process implements the protocol `Run` drives
    _local_is_cli_like: type[CliLike] = CliProcess

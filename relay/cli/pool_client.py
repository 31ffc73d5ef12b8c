"""A worker's side of the pool server (`pool_server.py`): a CLI run served by the host's pool.

`PoolClient.run()` opens one connection per run and returns a `PooledProcess`, which has the
interface `cli/run.Run` drives (`start`, `send`, `next_event`, `close_stdin`, `kill`, `wait_exit`,
`stderr_text`, `bytes_written`), or None when the pool server cannot be reached (the caller then
spawns the CLI itself, as without a pool). Closing the connection without `keep()` kills the run's
CLI in the pool server; so does this worker's death.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from pathlib import Path
from typing import Any

from ..core.metrics import WarmStats
from .process import EOF

log = logging.getLogger("relay.pool")


class PooledProcess:
    """One run on a CLI process owned by the pool server."""

    def __init__(self, sock: socket.socket, rfile: Any, header: dict[str, Any], sent: int) -> None:
        self.sock = sock
        self.rfile = rfile   # the reader that read the header: it may already hold the first events
        self.how: str = header.get("how") or "cold"       # spare | warm | cold
        self.reason: str = header.get("reason") or ""
        self.session_id: str = header.get("session_id") or ""
        self.pool_pid: int | None = header.get("pid")
        self.events: queue.Queue[Any] = queue.Queue()
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.bytes_written = sent
        self.stderr = ""
        self.rc: int | None = None
        self.kept = False
        self._closed = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.pool_pid

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.rfile:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(ev, dict):
                    continue
                if ev.get("type") != "pool":
                    self.events.put(ev)
                elif ev.get("eof"):
                    self.rc, self.stderr = ev.get("rc"), str(ev.get("stderr") or "")
                    break
                else:
                    self.replies.put(ev)
        except (OSError, ValueError):
            pass
        finally:
            self.events.put(EOF)
            self.replies.put({})

    def _write(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                self.sock.sendall(data)
            self.bytes_written += len(data)
        except OSError:
            pass

    def send(self, obj: dict[str, Any]) -> None:
        """A line for the CLI's stdin (control responses, interrupts)."""
        if not self._closed:
            self._write(obj)

    def next_event(self, timeout: float) -> Any:
        try:
            return self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def keep(self, timeout: float = 10.0) -> tuple[str, int] | None:
        """Ask the pool to keep the process for the conversation's next turn: its (id, turn count)."""
        if self._closed:
            return None
        self._write({"type": "pool", "op": "keep"})
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            return None
        if reply.get("kept"):
            self.kept = True
            return str(reply["proc"]), int(reply["turns"])
        return None

    def close_stdin(self) -> None:
        """Nothing to do: the pool keeps the process's stdin open, or closes it with the process."""

    def wait_exit(self, timeout: float = 5.0) -> int | None:
        return self.rc

    @property
    def stderr_text(self) -> str:
        return self.stderr.strip()

    def kill(self) -> None:
        """Hang up: the pool server kills the CLI unless `keep()` succeeded. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class PoolClient:
    """How a worker reaches its host's pool server."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def _connect(self, timeout: float) -> socket.socket | None:
        if not self.enabled:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            return None
        return sock

    def run(self, request: dict[str, Any], timeout: float = 30.0) -> PooledProcess | None:
        """Start a run in the pool; None if the pool server is not there (spawn the CLI yourself)."""
        sock = self._connect(timeout)
        if sock is None:
            return None
        data = (json.dumps(dict(request, op="run"), separators=(",", ":")) + "\n").encode()
        rfile = sock.makefile("rb")
        try:
            sock.sendall(data)
            header = json.loads(rfile.readline() or b"{}")
        except (OSError, ValueError):
            sock.close()
            return None
        if header.get("how") not in ("spare", "warm", "cold"):
            sock.close()
            log.warning("pool: the pool server could not start the run: %s", header.get("error"))
            return None
        sock.settimeout(None)
        return PooledProcess(sock, rfile, header, len(request.get("line") or ""))

    def note(self, reason: str) -> None:
        """Count a run the pool could not take (agent mode, function calling...)."""
        sock = self._connect(2.0)
        if sock is not None:
            try:
                sock.sendall((json.dumps({"op": "note", "reason": reason}) + "\n").encode())
            except OSError:
                pass
            finally:
                sock.close()

    def stats(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False}
        sock = self._connect(5.0)
        if sock is None:
            return {"enabled": True, "ok": False, "problem": f"the pool server is not running ({self.path})"}
        try:
            sock.sendall(b'{"op":"stats"}\n')
            body = json.loads(sock.makefile("rb").readline() or b"{}")
            return {"enabled": True, "ok": True, **body}
        except (OSError, ValueError) as exc:
            return {"enabled": True, "ok": False, "problem": str(exc)}
        finally:
            sock.close()


class PoolMetrics:
    """The pool's figures as the metrics read them (`Relay.warm_pool`)."""

    def __init__(self, client: PoolClient) -> None:
        self.client = client

    def stats(self) -> WarmStats:
        st = self.client.stats()
        if not st.get("ok"):
            return WarmStats()
        spares = st["spares"]
        return WarmStats(processes=len(st["warm"]) + spares["ready"] + spares["starting"] + st["busy"],
                         spares=spares["ready"], hits=sum(st["hits"].values()), misses=sum(st["misses"].values()))

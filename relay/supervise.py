"""The gunicorn master's helpers (the private Redis, the pool server), restarted whenever one dies.

One daemon thread in the master watches each helper's process; a dead one is started again at once
with the same socket and files, and after `BURST` restarts within `WINDOW_S` ever more slowly (a helper
that crash-loops is logged, and retried every `MAX_DELAY_S` at most). Nothing is restarted once the
master is shutting down. What each helper is doing goes to `var/helpers.json`, which every worker reads
for /health and its alerts (`read_status`).

The master never imports the app: this module is standard library only. The thread that spawns a helper
never ends before the master does (PR_SET_PDEATHSIG fires when the spawning *thread* exits).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUS_FILE = "helpers.json"
BURST = 5              # restarts within WINDOW_S before the supervisor slows down
WINDOW_S = 60.0
FIRST_DELAY_S = 5.0    # then doubling, up to MAX_DELAY_S
MAX_DELAY_S = 60.0
PR_SET_PDEATHSIG = 1


class HelperFailed(Exception):
    """A helper did not come up (its start function says why)."""


def die_with_parent(sig: int = signal.SIGKILL) -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to send `sig` to this (child) process when the thread that forked it dies, which for
    the master's helpers means the master. Kept across exec; a no-op where prctl does not exist."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def redis_command(sock: Path, command: bytes, timeout: float = 2.0) -> bytes | None:
    """Send one inline command to the Redis on unix socket `sock`; its first reply line, None if it
    cannot be reached (b"" if it closed the connection, as SHUTDOWN does)."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(command + b"\r\n")
            return s.recv(256)
    except OSError:
        return None


def redis_ready(sock: Path) -> bool:
    """It answers PING (not -LOADING while it reads its append-only file)."""
    reply = redis_command(sock, b"PING")
    return bool(reply and reply.startswith(b"+PONG"))


def how_it_ended(rc: int | None) -> str:
    if rc is None:
        return "running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    # gunicorn's SIGCHLD handler reaps every child of the master, so a 0 may be a status never seen
    return f"exit code {rc}" if rc else "exited"


@dataclass
class Helper:
    name: str                                       # "redis" | "pool"
    label: str                                      # "the private Redis", for the log
    spawn: Callable[[], subprocess.Popen[bytes]]    # starts it and returns once it serves (or HelperFailed)
    proc: subprocess.Popen[bytes] | None
    state: str = "up"                               # up | down | backoff
    since: float = field(default_factory=time.time)
    restarts: list[float] = field(default_factory=list)   # when each restart was tried (the last WINDOW_S)
    total_restarts: int = 0
    next_try: float = 0.0
    problem: str = ""
    last_outage: dict[str, Any] | None = None       # {down_since, back_at, downtime_s, exit}

    def view(self, now: float) -> dict[str, Any]:
        return {"state": self.state, "pid": self.proc.pid if self.proc else None, "since": round(self.since, 3),
                "restarts": self.total_restarts,
                "restarts_last_minute": sum(1 for t in self.restarts if now - t < WINDOW_S),
                "next_try": round(self.next_try, 3) if self.state != "up" else None,
                "problem": self.problem, "last_outage": self.last_outage}


def delay(restarts: list[float], now: float) -> float:
    """Seconds to wait before the next restart: none until BURST restarts within WINDOW_S, then
    FIRST_DELAY_S, doubling with each further one, at most MAX_DELAY_S."""
    recent = [t for t in restarts if now - t < WINDOW_S]
    if len(recent) < BURST:
        return 0.0
    return float(min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (len(recent) - BURST)))


class Supervisor:
    def __init__(self, status_path: Path, log: Any, interval: float = 0.2) -> None:
        self.status_path = status_path
        self.log = log
        self.interval = interval
        self.helpers: dict[str, Helper] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()   # held while a helper is (re)started, so `stop()` waits for it
        self._thread: threading.Thread | None = None

    def watch(self, name: str, label: str, proc: subprocess.Popen[bytes] | None,
              spawn: Callable[[], subprocess.Popen[bytes]]) -> None:
        """Supervise a helper from now on (`proc` None: it did not start; it is tried again)."""
        with self._lock:
            h = Helper(name, label, spawn, proc)
            if proc is None:
                h.state, h.problem = "down", f"{label} did not start"
                h.last_outage = {"down_since": round(h.since, 3), "back_at": None, "downtime_s": None,
                                 "exit": "did not start"}
            self.helpers[name] = h
            self._write()

    def publish(self) -> None:
        """Write the status file now (a master with no helpers says so, replacing an older file)."""
        with self._lock:
            self._write()

    def proc(self, name: str) -> subprocess.Popen[bytes] | None:
        h = self.helpers.get(name)
        return h.proc if h else None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="relay-supervisor", daemon=True)
            self._thread.start()

    def shutting_down(self) -> None:
        """Restart nothing from now on (safe in a signal handler: it only sets a flag)."""
        self._stopping.set()

    def stop(self) -> None:
        """The master is shutting down: restart nothing from now on; waits for a restart under way."""
        self._stopping.set()
        with self._lock:
            self._write()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            with self._lock:
                if self._stopping.is_set():
                    break
                for h in self.helpers.values():
                    try:
                        self._check(h)
                    except Exception:  # never let the supervisor die: the next round tries again
                        self.log.exception("supervisor: checking %s failed", h.label)
        # Park rather than return: the helpers this thread spawned get PR_SET_PDEATHSIG when it exits,
        # and the master's on_exit still needs them (the last stats snapshot, then SHUTDOWN).
        threading.Event().wait()

    def _check(self, h: Helper) -> None:
        now = time.time()
        if h.state == "up":
            if h.proc is not None and h.proc.poll() is None:
                return
            rc = h.proc.returncode if h.proc is not None else None
            wait = delay(h.restarts, now)
            h.state, h.since, h.next_try = "backoff" if wait else "down", now, now + wait
            h.last_outage = {"down_since": round(now, 3), "back_at": None, "downtime_s": None,
                             "exit": how_it_ended(rc)}
            self.log.error("%s (pid %s) %s; restarting it", h.label, h.proc.pid if h.proc else "?", how_it_ended(rc))
            self._write()
        if now < h.next_try:
            return
        self._restart(h, now)

    def _restart(self, h: Helper, now: float) -> None:
        h.restarts = [t for t in h.restarts if now - t < WINDOW_S] + [now]
        h.total_restarts += 1
        try:
            proc = h.spawn()
        except Exception as exc:  # HelperFailed, or the binary gone: tried again, more slowly if it repeats
            h.problem = str(exc) or type(exc).__name__
            after = time.time()
            wait = max(delay(h.restarts, after), 1.0)
            h.state, h.next_try = ("backoff" if delay(h.restarts, after) else "down"), after + wait
            self.log.error("%s did not restart: %s; next try in %.0f s", h.label, h.problem, wait)
            self._write()
            return
        back = time.time()
        h.proc, h.state, h.since, h.problem = proc, "up", back, ""
        if h.last_outage is not None:
            h.last_outage = dict(h.last_outage, back_at=round(back, 3),
                                 downtime_s=round(back - h.last_outage["down_since"], 3))
        recent = len(h.restarts)
        self.log.warning("%s restarted (pid %s) %.2f s after it went down; %d restart(s) in the last minute",
                         h.label, proc.pid, (h.last_outage or {}).get("downtime_s") or 0.0, recent)
        if delay(h.restarts, back):
            self.log.error("%s is crash-looping (%d restarts in %.0f s): the next one waits %.0f s", h.label,
                           recent, WINDOW_S, delay(h.restarts, back))
        self._write()

    def _write(self) -> None:
        now = time.time()
        data = {"master_pid": os.getpid(), "written": round(now, 3), "stopping": self.stopping,
                "helpers": {name: h.view(now) for name, h in self.helpers.items()}}
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.status_path)
        except OSError as exc:  # /health then shows an older picture; supervision goes on
            self.log.warning("supervisor: could not write %s: %s", self.status_path, exc)


def read_status(var_dir: Path, master_pid: int | None = None) -> dict[str, Any]:
    """What the master's supervisor last wrote; {} without one (or one written by another master than
    `master_pid`: a file left by an earlier start)."""
    try:
        data = json.loads((Path(var_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or (master_pid is not None and data.get("master_pid") != master_pid):
        return {}
    return data


# The one supervisor of this master. gunicorn reads its config file afresh on `kill -HUP` (a new module
# each time), so the master's state lives here, in a module imported once.
current: Supervisor | None = None

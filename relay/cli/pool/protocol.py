"""The pool socket's wire format: typed, versioned messages, the one NDJSON codec both ends use, and
the warm marker a conversation's record carries. Standard library only: gunicorn's master imports it.

One connection is one run (or one stats request):

    worker -> RunRequest (op "run", v)            | StatsRequest (op "stats", v) -> server -> stats, v
    server -> Header (how spare|warm|cold, or none with the refusal's error)
    server -> the CLI's stdout lines, then EndOfRun, or after `result` nothing until
    worker -> KeepRequest                           -> server -> KeepReply
    worker -> HoldRequest (the turn paused at the client's tool calls, before any `result`) -> KeepReply
    worker -> any other line goes to the CLI's stdin (control responses, interrupts)

A held process (want "held") is taken by the worker that has the client's results: its Header lists
the permission requests the CLI is waiting on, and the worker answers them on the CLI's stdin.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# 1 was the unversioned protocol (relay/cli/pool_server.py). A server left running by `kill -HUP` with
# workers of another version refuses them, or they hang up on it: either way they run the CLI cold.
# 3 added held tool steps (want "held", HoldRequest, Header.pending). 4 added RunRequest.held_fingerprint.
PROTOCOL_VERSION = 4
SERVER_MODULE = "relay.cli.pool.server"   # `python -m` it; gunicorn's master does
POOL_TYPE = "pool"                        # the `type` of the pool's own lines among the CLI's events


# credentials the CLI reads from its environment; an account's own environment never carries the host's
CREDENTIAL_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")


def server_env(environ: dict[str, str], accounts: list[dict[str, Any]]) -> dict[str, str]:
    """The pool server's environment. With `accounts` configured every run brings its account's own
    environment from the worker and no request runs on the host's own login, so the server (and so every
    spare) holds neither the host's credentials nor any account's token variable. Without, it keeps the
    host's login: its spares run on it."""
    if not accounts:
        return dict(environ)
    drop = set(CREDENTIAL_ENV) | {str(a["oauth_token_env"]) for a in accounts if a.get("oauth_token_env")}
    return {k: v for k, v in environ.items() if k not in drop}


def socket_path(var_dir: Path) -> Path:
    """Where a host's pool server listens (one per var_dir)."""
    return Path(var_dir) / "pool.sock"


class ProtocolError(ValueError):
    """A message that cannot be served: another protocol version, or not the expected shape."""


# -- the codec ---------------------------------------------------------------------------------------
def encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def decode(raw: bytes | str) -> dict[str, Any] | None:
    """One line as a dict; None for a line that is not a JSON object (the peers skip those)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class Channel:
    """NDJSON over one connected socket, for either end: one reader, writes serialised by a lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any] | None:
        """The next message; None once the peer is gone (EOF, reset, or the socket's timeout)."""
        while True:
            try:
                raw = self.rfile.readline()
            except (OSError, ValueError):
                return None
            if not raw:
                return None
            obj = decode(raw)
            if obj is not None:
                return obj

    def write(self, obj: dict[str, Any]) -> int:
        """Bytes sent; 0 if the peer is gone."""
        data = encode(obj)
        try:
            with self._lock:
                self.sock.sendall(data)
        except OSError:
            return 0
        return len(data)

    def close(self) -> None:
        """Hang up (the pool server kills a run's CLI when its worker hangs up). Safe to call twice."""
        for step in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            try:
                step()
            except OSError:
                pass


def _strs(d: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}


def _check_version(obj: dict[str, Any], who: str) -> None:
    v = obj.get("v", 1)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"{who} speaks pool protocol {v}, this one {PROTOCOL_VERSION}: restart the relay "
                            "(a `kill -HUP` keeps the old pool server)")


# -- worker -> server --------------------------------------------------------------------------------
@dataclass
class ColdSpec:
    """How the pool starts the run's CLI itself when no spare or warm process can take it."""
    argv: list[str]
    cwd: str
    env: dict[str, str]              # over the pool's private socket: the account's login, the run's temp folder
    session_id: str = ""
    temp_dir: str | None = None      # the worker's run folder: the cold process removes it, else the server does


@dataclass
class RunRequest:
    want: str | None                 # "spare" | "warm" | "held" | None (cold in the pool)
    why: str                         # why not the preferred process (counted as the miss when cold)
    conv: str
    model: str
    fingerprint: str                 # a warm process serves only turns with the settings it was given
    line: str                        # the prompt: one stream-json user line
    cold: ColdSpec
    controls: list[dict[str, Any]] = field(default_factory=list)   # what a spare is given before the prompt
    flavour: dict[str, str] = field(default_factory=dict)          # the prompt caching a spare must have
    proc: str = ""                   # the warm process the conversation's record names, and its turns
    turns: int = 0
    held_fingerprint: str = ""       # what a held step must share with the step that made the calls

    def to_wire(self) -> dict[str, Any]:
        return {"op": "run", "v": PROTOCOL_VERSION, **asdict(self)}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> RunRequest:
        _check_version(obj, "the worker")
        cold = obj.get("cold")
        if not isinstance(cold, dict) or obj.get("want") not in ("spare", "warm", "held", None):
            raise ProtocolError("a run request needs `cold` and a known `want`")
        controls = obj.get("controls")
        return cls(want=obj.get("want"), why=str(obj.get("why") or ""), conv=str(obj.get("conv") or ""),
                   model=str(obj.get("model") or ""), fingerprint=str(obj.get("fingerprint") or ""),
                   line=str(obj.get("line") or ""),
                   cold=ColdSpec(argv=[str(a) for a in cold.get("argv") or []], cwd=str(cold.get("cwd") or ""),
                                 env=_strs(cold.get("env")), session_id=str(cold.get("session_id") or ""),
                                 temp_dir=str(cold["temp_dir"]) if cold.get("temp_dir") else None),
                   controls=[c for c in controls if isinstance(c, dict)] if isinstance(controls, list) else [],
                   flavour=_strs(obj.get("flavour")), proc=str(obj.get("proc") or ""),
                   turns=int(obj.get("turns") or 0), held_fingerprint=str(obj.get("held_fingerprint") or ""))


@dataclass
class StatsRequest:
    def to_wire(self) -> dict[str, Any]:
        return {"op": "stats", "v": PROTOCOL_VERSION}


def parse_request(obj: dict[str, Any]) -> RunRequest | StatsRequest:
    """A connection's first line; raises ProtocolError for another version or an unknown op."""
    op = obj.get("op")
    if op == "stats":
        _check_version(obj, "the worker")
        return StatsRequest()
    if op == "run":
        return RunRequest.from_wire(obj)
    raise ProtocolError(f"unknown op {op!r}")


@dataclass
class KeepRequest:
    """After `result`: keep the process for the conversation's next turn."""
    def to_wire(self) -> dict[str, Any]:
        return {"type": POOL_TYPE, "op": "keep"}


@dataclass
class HoldRequest:
    """The turn paused at the client's tool calls: keep the process waiting (its permission requests
    unanswered) for up to `wait_s`, for the request that brings the results. `pending` is what it waits
    on (tool_use id -> {"request_id", "input"}), handed to that request in its Header."""
    wait_s: float
    pending: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"type": POOL_TYPE, "op": "hold", "wait_s": self.wait_s, "pending": self.pending}


# -- server -> worker --------------------------------------------------------------------------------
@dataclass
class Header:
    """The server's first line: which process took the run, or (how "none") why none could."""
    how: str                         # spare | warm | cold | none
    reason: str = ""                 # why not the preferred process
    session_id: str = ""             # a spare's own session id (fixed at its spawn)
    pid: int | None = None
    proc: str = ""
    error: str = ""                  # how "none": the refusal
    # how "held": tool_use id -> {"request_id", "input"} of each permission request the CLI waits on
    pending: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def refusal(cls, error: str) -> Header:
        return cls(how="none", error=error)

    @property
    def started(self) -> bool:
        return self.how in ("spare", "warm", "held", "cold")

    def to_wire(self) -> dict[str, Any]:
        return {"type": POOL_TYPE, "v": PROTOCOL_VERSION, **asdict(self)}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Header:
        _check_version(obj, "the pool server")
        pid = obj.get("pid")
        return cls(how=str(obj.get("how") or "none"), reason=str(obj.get("reason") or ""),
                   session_id=str(obj.get("session_id") or ""), pid=pid if isinstance(pid, int) else None,
                   proc=str(obj.get("proc") or ""), error=str(obj.get("error") or ""),
                   pending=obj["pending"] if isinstance(obj.get("pending"), dict) else {})


@dataclass
class EndOfRun:
    """The CLI's stdout closed before a result (it exited, or the pool's watchdog killed it)."""
    rc: int | None
    stderr: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"type": POOL_TYPE, "eof": True, "rc": self.rc, "stderr": self.stderr}


@dataclass
class KeepReply:
    kept: bool
    reason: str = ""                 # why not
    proc: str = ""
    turns: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"type": POOL_TYPE, **asdict(self)}


def parse_pool_line(obj: dict[str, Any]) -> EndOfRun | KeepReply | KeepRequest | HoldRequest | None:
    """One of the pool's own lines after the header; None for a CLI line (an event, or stdin)."""
    if obj.get("type") != POOL_TYPE:
        return None
    if obj.get("eof"):
        rc = obj.get("rc")
        return EndOfRun(rc if isinstance(rc, int) else None, str(obj.get("stderr") or ""))
    if obj.get("op") == "keep":
        return KeepRequest()
    if obj.get("op") == "hold":
        wait, pending = obj.get("wait_s"), obj.get("pending")
        return HoldRequest(float(wait) if isinstance(wait, (int, float)) else 0.0,
                           pending if isinstance(pending, dict) else {})
    return KeepReply(bool(obj.get("kept")), str(obj.get("reason") or ""), str(obj.get("proc") or ""),
                     int(obj.get("turns") or 0))


def stats_reply(stats: dict[str, Any]) -> dict[str, Any]:
    return {**stats, "v": PROTOCOL_VERSION}


def parse_stats(obj: dict[str, Any]) -> dict[str, Any]:
    _check_version(obj, "the pool server")
    return {k: v for k, v in obj.items() if k != "v"}


# -- the conversation's record -----------------------------------------------------------------------
@dataclass(frozen=True)
class WarmMarker:
    """Which pool process holds exactly a conversation's state, as stored in its record's `warm` field:
    "host|process|turns". Records written before this module used the same text, so they still parse."""
    host: str
    proc: str
    turns: int

    def __str__(self) -> str:
        return f"{self.host}|{self.proc}|{self.turns}"

    @classmethod
    def parse(cls, text: str | None) -> WarmMarker | None:
        host, _, rest = (text or "").partition("|")
        proc, _, turns = rest.partition("|")
        if not host or not proc or not turns.isdigit():
            return None
        return cls(host, proc, int(turns))

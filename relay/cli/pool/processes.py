"""The host's Claude CLI processes kept alive between runs: spares spawned ahead, and warm conversations.

Owned by the pool server (`server.py`, one per host); this module holds the state and the
lifecycle rules, not the sockets. A *spare* is spawned with everything fixed at spawn (CLI, environment
and login, working directory, base flags, a fresh `--session-id`) and probed ready with `mcp_status`.
A *warm* process has answered a turn cleanly and waits for its conversation's next turn; the worker
proves from the shared record that it holds exactly the conversation's state (process id and turn
count) before it is used. Anything that does not match is killed: a cold run resumes from the
transcript on disk, so nothing is lost.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ...config import Settings
from ..invocation import cli_tmpdir, spare_argv, withhold_image_store
from ..leftovers import folder_prefix
from ..process import EOF, CliProcess, RunSpec
from .evictions import Evictions
from .memory import private_mb
from .sizing import WarmCap

log = logging.getLogger("relay.pool")

CUMULATIVE = ("total_cost_usd", "duration_api_ms")   # a long-lived process reports these summed over its life
MODEL_USAGE_SUMS = ("inputTokens", "outputTokens", "cacheReadInputTokens", "cacheCreationInputTokens",
                    "webSearchRequests", "costUSD", "thinkingTokens", "cacheCreationEphemeral5mInputTokens",
                    "cacheCreationEphemeral1hInputTokens")


@dataclass
class PoolLimits:
    spares: int = 1            # spare processes kept ready on this host
    max_warm: int = 4          # warm conversation processes on this host (least recently used goes first)
    idle_ttl: float = 600.0    # a warm process unused for this long is ended
    max_turns: int = 100       # recycle after this many turns
    max_age: float = 3600.0    # recycle after this age (a stale credential snapshot, slow leaks)
    max_rss_mb: float = 600.0  # recycle above this resident size
    watchdog: float = 130.0    # a run whose CLI prints nothing for this long is killed

    @classmethod
    def from_settings(cls, settings: Settings, max_warm: int) -> PoolLimits:
        """The limits of the settings, with the warm cap the pool server chose (`pool.max_warm` may be "auto")."""
        return cls(spares=settings["pool.spares"], max_warm=max_warm,
                   idle_ttl=settings["pool.idle_ttl_s"], max_turns=settings["pool.max_turns"],
                   max_age=settings["pool.max_age_s"], max_rss_mb=settings["pool.max_rss_mb"],
                   watchdog=max(settings["first_token_timeout_s"], settings["idle_timeout_s"]) + 10)


def identity_probe(cli_path: str, env: dict[str, str]) -> Callable[[], Any]:
    """What changes when the CLI is upgraded or the login is renewed: the binary's file and the
    credentials file (stat only: this runs every second)."""
    config_dir = Path(env.get("CLAUDE_CONFIG_DIR") or Path.home() / ".claude").expanduser()

    def stat(p: Path) -> tuple[float, int] | None:
        try:
            st = p.stat()
            return (st.st_mtime, st.st_size)
        except OSError:
            return None

    def probe() -> Any:  # (binary, its stat, the login's stat): [:2] is the CLI itself
        real = Path(os.path.realpath(cli_path))
        return (str(real), stat(real), stat(config_dir / ".credentials.json"))
    return probe


class Managed:
    """One CLI process owned by the pool, with what it holds and its cumulative counters."""

    def __init__(self, proc: CliProcess, session_id: str, model: str, origin: str) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.proc = proc
        self.session_id = session_id
        self.model = model                 # the model it was spawned with
        self.origin = origin               # spare | cold
        self.born = self.last_used = time.monotonic()
        self.ready = False
        self.conv: str | None = None
        self.fingerprint: str | None = None
        self.held_fingerprint: str | None = None  # what the rest of a held turn must share (settings_fingerprint)
        self.turns = 0
        self.identity: tuple[Any, ...] = ()
        self.flavour: dict[str, str] = {}  # prompt-caching environment a spare was spawned with
        # a held tool step: the permission requests the CLI waits on (tool_use id -> request id, input)
        self.pending: dict[str, dict[str, Any]] = {}
        self.hold_until = 0.0
        self._seen: dict[str, Any] = {"modelUsage": {}}

    @property
    def alive(self) -> bool:
        return bool(self.proc.proc) and self.proc.proc.poll() is None  # type: ignore[union-attr]

    def drain(self) -> bool:
        """Drop anything the idle process printed since its last turn (so a turn starts clean);
        False if it exited meanwhile."""
        while True:
            ev = self.proc.next_event(0)
            if ev is None:
                return self.alive
            if ev is EOF:
                return False

    def rss_mb(self) -> float:
        try:
            return psutil.Process(self.proc.pid or 0).memory_info().rss / 1e6
        except psutil.Error:
            return 0.0

    def per_turn(self, result: dict[str, Any]) -> dict[str, Any]:
        """The `result` event with this turn's share of the cumulative fields (`usage` is per turn already)."""
        out = dict(result)
        for k in CUMULATIVE:
            if isinstance(result.get(k), (int, float)):
                out[k] = result[k] - self._seen.get(k, 0)
                self._seen[k] = result[k]
        mu = result.get("modelUsage")
        if isinstance(mu, dict):
            seen = self._seen["modelUsage"]
            turn: dict[str, Any] = {}
            for model, u in mu.items():
                before = seen.get(model, {})
                if isinstance(u, dict):
                    turn[model] = {k: (v - before.get(k, 0) if k in MODEL_USAGE_SUMS and isinstance(v, (int, float))
                                       else v) for k, v in u.items()}
                    # a model that did nothing this turn is dropped: the relay reads the answering model from here
                    if not any(turn[model].get(k) for k in ("inputTokens", "outputTokens", "cacheReadInputTokens",
                                                            "cacheCreationInputTokens")):
                        del turn[model]
            self._seen["modelUsage"] = {m: dict(u) for m, u in mu.items() if isinstance(u, dict)}
            out["modelUsage"] = turn
        return out

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"pid": self.proc.pid, "origin": self.origin, "turns": self.turns,
                "age_s": round(now - self.born, 1), "idle_s": round(now - self.last_used, 1),
                "rss_mb": round(self.rss_mb(), 1)}


def control(m: Managed, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any] | None:
    """Send one control request and wait for its answer; None unless it succeeded."""
    rid = "pool-" + uuid.uuid4().hex[:8]
    m.proc.send({"type": "control_request", "request_id": rid, "request": request})
    deadline = time.monotonic() + timeout
    while True:
        ev = m.proc.next_event(deadline - time.monotonic())
        if ev is None or ev is EOF or ev.get("type") == "result":  # a refused `initialize` ends in a result
            return None
        if ev.get("type") == "control_response" and (ev.get("response") or {}).get("request_id") == rid:
            resp = ev["response"]
            return resp if resp.get("subtype") == "success" else None


def recycle_reason(m: Managed, lim: PoolLimits, identity: Any) -> str:
    """Why a process must go now rather than serve another turn, or ""."""
    if not m.alive:
        return "exited"
    if m.turns >= lim.max_turns:
        return "max_turns"
    if time.monotonic() - m.born >= lim.max_age:
        return "max_age"
    if lim.max_rss_mb and m.rss_mb() >= lim.max_rss_mb:
        return "max_rss"
    if m.identity != identity:
        return "cli_changed"
    return ""


class WarmPool:
    """Spares and warm processes of one host. Every method runs on the pool server's one OS thread
    (gevent), which also spawns every CLI, so PR_SET_PDEATHSIG ties them to the server's life."""

    def __init__(self, limits: PoolLimits, cli_path: str, env: dict[str, str], cwd: str, model: str,
                 identity: Any, tmp_root: str = "", cap: WarmCap | None = None,
                 cli_gate: Callable[[], tuple[str, str]] | None = None) -> None:
        self.limits = limits
        self.cap = cap or WarmCap(limits.max_warm, "config")   # how limits.max_warm was chosen
        self.evictions = Evictions()       # why each conversation's process went, for its next miss
        self.tmp_root = tmp_root
        self.flavour: dict[str, str] = {}  # the prompt-caching environment new conversations last asked for
        self.cli_path, self.env, self.cwd, self.model = cli_path, env, cwd, model
        self.identity_of = identity        # () -> what identifies the CLI binary and the login now
        self.identity = identity()
        # the CLI watch's verdict on the binary on disk (cli/watch.py `gate`): new processes only once it passed
        self.cli_gate = cli_gate
        self.cli_hold = ""                 # why spares wait for the CLI's self-test, or ""
        self.spares: list[Managed] = []
        self.warm: dict[str, Managed] = {}     # conversation key -> its idle warm process
        self.held: dict[str, Managed] = {}     # conversation key -> its process waiting for tool results
        self.busy: set[Managed] = set()
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self.killed: Counter[str] = Counter()
        self.spawn_failures = 0
        self._backoff_until = 0.0
        self.last_problem = ""

    # -- spares ----------------------------------------------------------------------------------
    def spawn_spare(self) -> Managed | None:
        sid = str(uuid.uuid4())
        # like every run, its own CLAUDE_CODE_TMPDIR, removed with the process
        tmp = tempfile.mkdtemp(prefix=folder_prefix("spare"), dir=self.tmp_root) if self.tmp_root else None
        env = dict(self.env, **self.flavour)
        if tmp:
            env = dict(env, CLAUDE_CODE_TMPDIR=cli_tmpdir(tmp, None))
            withhold_image_store(env["CLAUDE_CODE_TMPDIR"], self.cwd, sid)
        proc = CliProcess(RunSpec(argv=spare_argv(self.cli_path, self.model, sid), env=env, cwd=self.cwd,
                                  stdin=b"", keep_stdin_open=True, temp_dir=tmp))
        try:
            proc.start()
        except Exception as exc:  # a missing CLI: back off, the workers run cold
            self._failed(f"spawn failed: {exc}")
            return None
        m = Managed(proc, sid, self.model, "spare")
        m.identity, m.flavour = self.identity, dict(self.flavour)
        self.spares.append(m)
        return m

    def probe(self, m: Managed, timeout: float = 60.0) -> bool:
        """Wait until the spare answers `mcp_status` (nothing is printed before the first input)."""
        reply = control(m, {"subtype": "mcp_status"}, timeout)
        if m not in self.spares:   # discarded meanwhile (shutdown, CLI changed)
            return False
        if reply is None:
            self._failed(f"a spare did not become ready: {m.proc.stderr_text[-300:] or 'no reply'}")
            self.discard(m, "probe_failed")
            return False
        m.ready = True
        self.spawn_failures = 0
        self._measure(m)
        return True

    def _measure(self, m: Managed) -> None:
        """An auto cap is recomputed once, with the private memory of the first ready process."""
        if self.cap.wants_measure:
            self.cap = self.cap.measure(private_mb(m.proc.pid))
            self.limits.max_warm = self.cap.max_warm
            log.info("pool: max_warm auto: %d (%.0f MB private per process)", self.cap.max_warm, self.cap.per_process_mb)

    def _failed(self, problem: str) -> None:
        self.spawn_failures += 1
        self.last_problem = problem
        self._backoff_until = time.monotonic() + min(300.0, 5.0 * 2 ** min(self.spawn_failures, 6))
        log.warning("pool: %s", problem)

    def wants_spare(self) -> bool:
        return len(self.spares) < self.limits.spares and time.monotonic() >= self._backoff_until \
            and self.cli_usable()

    def cli_usable(self) -> bool:
        """Whether the binary on disk passed its self-test (or needs none); logs when that changes."""
        hold = cli_hold(self.cli_gate, self.cli_hold)
        self.cli_hold = hold
        return not hold

    def take_spare(self, flavour: dict[str, str]) -> tuple[Managed | None, str]:
        """A ready spare spawned with this prompt-caching environment; spares follow what was asked last."""
        self.flavour = dict(flavour)
        for m in list(self.spares):
            if not (m.ready and m.identity == self.identity and m.flavour == flavour) or m not in self.spares:
                continue
            # claimed before `drain`, which may yield to another request's greenlet that would take the
            # same spare (the pool server once logged "list.remove(x): x not in list" doing it after)
            self.spares.remove(m)
            self.busy.add(m)
            if m.drain():
                return m, ""
            self.discard(m, "exited")
        return None, "no spare ready" if self.limits.spares else "spares off"

    # -- warm processes --------------------------------------------------------------------------
    def take_warm(self, conv: str, proc_id: str, turns: int, fingerprint: str) -> tuple[Managed | None, str]:
        m = self.warm.pop(conv, None)
        if m is None:
            return None, self.evictions.explain(conv, "not held on this host")
        why = ""
        if m.id != proc_id or m.turns != turns:
            why = "stale (a turn ran elsewhere)"
        elif m.fingerprint != fingerprint:
            why = "settings changed"
        elif not m.drain():
            why = "exited"
        elif m.identity != self.identity:
            why = "cli or login changed"
        return self._taken(m, conv, why)

    def _taken(self, m: Managed, conv: str, why: str) -> tuple[Managed | None, str]:
        """A conversation's process, taken for its next turn, or discarded and why (the miss says it)."""
        if why:
            self.discard(m, "stale" if why.startswith("stale") else why.replace(" ", "_"))
            self.evictions.forget(conv)
            return None, why
        self.busy.add(m)
        return m, ""

    def drop_conversation(self, conv: str, why: str) -> None:
        """The conversation starts over elsewhere (a fresh session or a cold resume): its old process goes."""
        for group in (self.warm, self.held):
            m = group.pop(conv, None)
            if m is not None:
                self.discard(m, why)

    def adopt(self, proc: CliProcess, session_id: str, model: str) -> Managed:
        """A cold run started by the pool: it can be kept warm afterwards like any other."""
        m = Managed(proc, session_id, model, "cold")
        m.identity, m.ready = self.identity, True
        self.busy.add(m)
        return m

    def keep(self, m: Managed, conv: str, fingerprint: str) -> str:
        """After a clean turn: keep `m` for the conversation's next turn; returns why not, or ""."""
        self.busy.discard(m)
        m.turns += 1
        m.last_used = time.monotonic()
        why = recycle_reason(m, self.limits, self.identity)
        if not why and self.limits.max_warm <= 0:
            why = "warm_off"
        if why:
            self.discard(m, why)
            self.evictions.note(conv, why)
            return why
        self.drop_conversation(conv, "replaced")
        self._make_room()
        m.conv, m.fingerprint = conv, fingerprint
        self.warm[conv] = m
        self.evictions.forget(conv)
        self._measure(m)   # spares off: the first kept process is measured instead
        return ""

    def _make_room(self) -> None:
        """Held and warm processes share `max_warm`: the least recently used idle one goes first, a held
        one (waiting for a client's tool results) only when no idle one is left."""
        while self.warm or self.held:
            if len(self.warm) + len(self.held) < self.limits.max_warm:
                return
            group = self.warm or self.held
            lru = min(group, key=lambda c: group[c].last_used)
            self.discard(group.pop(lru), "lru" if group is self.warm else "lru_held")

    # -- held tool steps -------------------------------------------------------------------------
    def hold(self, m: Managed, conv: str, fingerprint: str, held_fingerprint: str, wait_s: float) -> str:
        """The turn paused at the client's tool calls: `m` waits (its permission requests unanswered)
        until the results come or `wait_s` passes; returns why not, or ""."""
        self.busy.discard(m)
        why = ("hold_off" if wait_s <= 0 or self.limits.max_warm <= 0 else "exited" if not m.alive
               else "nothing_pending" if not m.pending else "")
        if why:
            self.discard(m, why)
            self.evictions.note(conv, why)
            return why
        self.drop_conversation(conv, "replaced")
        old = self.held.pop(conv, None)
        if old is not None:
            self.discard(old, "replaced")
        self._make_room()
        m.conv, m.fingerprint, m.held_fingerprint = conv, fingerprint, held_fingerprint
        m.last_used = time.monotonic()
        m.hold_until = m.last_used + wait_s
        self.held[conv] = m
        self.evictions.forget(conv)
        return ""

    def take_held(self, conv: str, proc_id: str, held_fingerprint: str) -> tuple[Managed | None, str]:
        """The conversation's held process for the request that brings the results (not drained: it
        printed nothing since, and must lose nothing). Its settings are matched by `held_fingerprint`:
        a system prompt the client rewrote mid-turn (Claude Code) does not end the turn's process."""
        m = self.held.pop(conv, None)
        if m is None:
            return None, self.evictions.explain(conv, "not held on this host")
        why = ("stale (a turn ran elsewhere)" if m.id != proc_id else "settings changed"
               if m.held_fingerprint != held_fingerprint else "exited" if not m.alive else "")
        return self._taken(m, conv, why)

    def discard(self, m: Managed, why: str) -> None:
        self.busy.discard(m)
        if m in self.spares:
            self.spares.remove(m)
        if m.conv and self.warm.get(m.conv) is m:
            del self.warm[m.conv]
        if m.conv and self.held.get(m.conv) is m:
            del self.held[m.conv]
        if m.conv:
            self.evictions.note(m.conv, why)
        self.killed[why] += 1
        m.proc.kill()

    # -- housekeeping ----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Idle TTL, age, RSS and exits; spares and idle processes of a changed CLI or login."""
        ident = self.identity_of()
        # a new login is taken at once; a new binary only once it passed its self-test: until then (or
        # after a failure) the processes of the old one keep serving
        if ident != self.identity and (ident[:2] == self.identity[:2] or self.cli_usable()):
            log.info("pool: the CLI or its login changed; replacing spares and idle processes")
            self.identity = ident
            self._backoff_until = 0.0
        for m, why in expired(self, time.monotonic()):
            self.discard(m, why)

    def shutdown(self) -> None:
        for m in list(self.spares) + list(self.warm.values()) + list(self.held.values()) + list(self.busy):
            self.discard(m, "shutdown")

    def stats(self) -> dict[str, Any]:
        return {"spares": {"target": self.limits.spares, "ready": sum(1 for m in self.spares if m.ready),
                           "starting": sum(1 for m in self.spares if not m.ready), "prompt_cache_env": self.flavour},
                "warm": [m.stats() for m in self.warm.values()], "busy": len(self.busy),
                "held": [dict(m.stats(), calls=len(m.pending), waits_s=round(m.hold_until - time.monotonic(), 1))
                         for m in self.held.values()],
                "max_warm": self.limits.max_warm, "max_warm_basis": self.cap.stats(), "hits": dict(self.hits), "misses": dict(self.misses),
                "killed": dict(self.killed), "problem": self.cli_hold or self.last_problem or None,
                "cli_hold": self.cli_hold or None, "pid": os.getpid()}


def cli_hold(gate: Callable[[], tuple[str, str]] | None, was: str) -> str:
    """Why new spares wait for the CLI's self-test ("" when they need not), logged when it changes."""
    if gate is None:
        return ""
    verdict, why = gate()
    hold = "" if verdict == "ok" else why
    if hold != was:
        if hold:
            log.warning("pool: %s; new spares wait, warm processes of the old CLI keep serving", hold)
        else:
            log.info("pool: the CLI's self-test passed; spares use it")
    return hold


def expired(pool: WarmPool, now: float) -> list[tuple[Managed, str]]:
    """The pool's processes that must go now, and why: exited, of an older CLI or prompt caching, past
    their age, idle TTL or size, or held past the client's tool wait."""
    out: list[tuple[Managed, str]] = []
    for m in list(pool.spares):
        why = ("exited" if not m.alive else "cli_changed" if m.identity != pool.identity else
               "prompt_cache_changed" if m.flavour != pool.flavour else
               "max_age" if now - m.born >= pool.limits.max_age else "")
        if why:
            out.append((m, why))
    for m in list(pool.held.values()):
        if now >= m.hold_until:
            out.append((m, "tool_wait"))  # the client never sent its results: the next turn resumes
        elif not m.alive:
            out.append((m, "exited"))
    for m in list(pool.warm.values()):
        why = "idle_ttl" if now - m.last_used >= pool.limits.idle_ttl else recycle_reason(m, pool.limits, pool.identity)
        if why:
            out.append((m, why))
    return out

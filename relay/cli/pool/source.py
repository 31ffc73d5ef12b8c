"""The process source: a run's CLI process from the host's pool where the policy allows (or None and
why: the worker spawns it), and a finished one kept warm, named by the marker the conversation keeps."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from ...core.conversation import Plan
from ...core.metrics import WarmStats
from ...core.run_description import RunDescription
from ..invocation import settings_fingerprint, spare_controls
from ..process import CliLike, RunSpec
from .client import PoolClient, PooledProcess
from .policy import route
from .protocol import ColdSpec, RunRequest, WarmMarker

log = logging.getLogger("relay.pool")


class Tally(Protocol):
    """Runs the pool was never asked about, by reason, shared by the host's workers (so that asking is
    not a socket round trip per request); `stats()` merges them into the pool's misses."""

    def add(self, reason: str) -> None: ...
    def counts(self) -> dict[str, int]: ...


class ProcessSource:
    def __init__(self, path: Path, enabled: bool, host: str, host_env: dict[str, str], default_model: str,
                 tally: Tally | None = None, tool_wait_s: float = 0.0) -> None:
        self.client = PoolClient(path, enabled)
        self.host, self.host_env, self.default_model = host, host_env, default_model
        self.tally = tally
        self.tool_wait_s = tool_wait_s   # > 0: client tool steps are held warm for this long

    @property
    def enabled(self) -> bool:
        return self.client.enabled

    def acquire(self, desc: RunDescription, plan: Plan, spec: RunSpec,
                account: str | None = None) -> tuple[PooledProcess | None, str]:
        """The run on a process of the host's pool (a spare, this conversation's warm process, or a cold
        one the pool may keep afterwards), or (None, why) when this worker must spawn the CLI itself."""
        if not self.enabled:
            return None, ""
        r = route(desc, plan, spec.env, account, self.host, self.host_env, self.default_model,
                  hold_tools=self.tool_wait_s > 0)
        if not r.pooled:
            self._count(r.why)
            return None, r.why
        request = RunRequest(
            want=r.want, why=r.why, conv=plan.conv_key or "", model=desc.model,
            fingerprint=f"{settings_fingerprint(desc)}:{account or ''}", line=spec.stdin.decode(),
            cold=ColdSpec(argv=spec.argv, cwd=spec.cwd, env=spec.env, session_id=plan.cli_session or "",
                          temp_dir=spec.temp_dir),
            controls=spare_controls(desc) if r.want == "spare" else [], flavour=r.flavour,
            proc=r.warm.proc if r.warm else "", turns=r.warm.turns if r.warm else 0,
            held_fingerprint=f"{settings_fingerprint(desc, held=True)}:{account or ''}")
        if r.want == "held":
            request.line = ""  # the worker answers the held process's permission requests itself
        return self.client.run(request)

    def holds(self, proc: CliLike) -> bool:
        """Whether a run on `proc` may pause at the client's tool calls and be held warm."""
        return isinstance(proc, PooledProcess) and self.tool_wait_s > 0

    def hold(self, proc: CliLike, pending: dict[str, Any]) -> str | None:
        """The turn paused at the client's tool calls: keep its process waiting for the results; the
        marker for the conversation's record, or None (the next step then resumes from the transcript)."""
        if not self.holds(proc):
            return None
        assert isinstance(proc, PooledProcess)
        try:
            held = proc.hold(self.tool_wait_s, pending)
        except Exception as exc:  # never fail the answer over it: the next step resumes instead
            log.warning("could not hold the process for its tool results: %s", exc)
            return None
        return str(WarmMarker(self.host, *held)) if held else None

    def keep(self, proc: CliLike) -> str | None:
        """After a clean turn on a pool process: keep it for the conversation's next turn; the marker for
        the conversation's record, or None (a local process, or the pool would not)."""
        if not isinstance(proc, PooledProcess):
            return None
        try:
            held = proc.keep()
        except Exception as exc:  # the pool is an optimisation: never fail the answer over it
            log.warning("could not keep the warm process: %s", exc)
            return None
        return str(WarmMarker(self.host, *held)) if held else None

    def _count(self, reason: str) -> None:
        if self.tally is not None:
            try:
                self.tally.add(reason[:60])
            except Exception as exc:  # a statistic: never fail the run over it
                log.warning("could not count a run the pool did not serve: %s", exc)

    def stats(self) -> dict[str, Any]:
        """The pool server's figures (/stats, /health), with the workers' own count of runs it never saw."""
        st = self.client.stats()
        if st.get("ok") and self.tally is not None:
            try:
                st["misses"] = dict(Counter(st.get("misses") or {}) + Counter(self.tally.counts()))
            except Exception as exc:  # Redis trouble: the server's own figures still stand
                log.warning("could not read the runs the pool did not serve: %s", exc)
        return st

    def warm_stats(self) -> WarmStats:
        """The pool's figures as the metrics read them."""
        st = self.stats()
        if not st.get("ok"):
            return WarmStats()
        spares = st["spares"]
        return WarmStats(processes=len(st["warm"]) + spares["ready"] + spares["starting"] + st["busy"],
                         spares=spares["ready"], hits=sum(st["hits"].values()), misses=sum(st["misses"].values()))

"""The CLI self-test (`python -m relay check --conformance`): does this `claude` still do what the relay relies on?

Runs the CLI the relay's own way (`invocation.build_spec` → `run.Run`, events folded by `core.events`,
failures read by `core.upstream`) against a loopback mock of the Messages API (`mock_api.py`, no tokens
spent), in three lanes side by side (`checks.LANES`). Each named check passes or says exactly what changed.
The same report is what the relay's CLI watch (`cli/watch.py`) records when the binary changes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..setup import probe_cli
from .checks import LANES, Changed, Lane
from .lab import Lab

__all__ = ["CheckResult", "Report", "run_conformance"]


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str          # what it saw, or what changed
    seconds: float

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name} ({self.seconds:.1f} s): {self.detail}"


@dataclass
class Report:
    cli: str
    version: str | None
    checks: list[CheckResult] = field(default_factory=list)
    problem: str | None = None     # the CLI could not be tested at all
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.problem is None and bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        """One line: what passed, or which checks failed and why."""
        who = f"Claude Code CLI {self.version or '?'} at {self.cli}"
        if self.problem:
            return f"{who}: cannot be tested: {self.problem}"
        if self.ok:
            return f"{who}: all {len(self.checks)} conformance checks passed ({self.seconds:.0f} s)"
        return f"{who}: {len(self.failed)} of {len(self.checks)} conformance checks failed: " + \
            "; ".join(f"{c.name}: {c.detail}" for c in self.failed)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "cli": self.cli, "version": self.version, "problem": self.problem,
                "seconds": round(self.seconds, 1), "summary": self.summary(),
                "checks": [asdict(c) for c in self.checks]}


def _lane(lab: Lab, name: str, checks: tuple[Any, ...]) -> list[CheckResult]:
    lane = Lane(lab.bench(name))
    out = []
    for check in checks:
        t = time.monotonic()
        try:
            ok, detail = True, check(lane)
        except Changed as exc:
            ok, detail = False, str(exc)
        except Exception as exc:  # a crash of the check is a failure too, never the whole test
            ok, detail = False, f"the check crashed: {type(exc).__name__}: {exc}"
        out.append(CheckResult(check.__name__, ok, detail, time.monotonic() - t))
    return out


def run_conformance(claude_bin: str, host_env: dict[str, str], timeout: float = 45.0) -> Report:
    """Every check against `claude_bin`, with the host's CLI environment minus its login (never raises)."""
    t = time.monotonic()
    info = probe_cli(claude_bin, host_env)
    report = Report(str(info.get("path") or claude_bin), info.get("version"))
    if not info.get("ok"):  # missing, broken, or older than the relay accepts (MIN_VERSION)
        report.problem = str(info.get("problem"))
        return report
    with Lab(str(info["path"]), host_env, timeout) as lab, ThreadPoolExecutor(len(LANES)) as pool:
        for results in pool.map(lambda lane: _lane(lab, *lane), LANES):
            report.checks += results
    order = [c.__name__ for _, checks in LANES for c in checks]
    report.checks.sort(key=lambda c: order.index(c.name))
    report.seconds = time.monotonic() - t
    return report

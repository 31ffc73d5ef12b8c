"""The CLI watch: notices when the host's `claude` binary changes and self-tests the new one, once per host.

One process per host is the watcher: the first worker to take an flock on `var_dir/cli-watch.lock` (another
takes over if it dies). Every `cli_watch_s` it reads what identifies the binary (resolved path, mtime and
size, version); when that differs from the last verdict's, it runs the self-test (`python -m relay check
--conformance`, in a subprocess) on the new binary and writes the verdict to `var_dir/cli-selftest.json`.
The first binary a host ever sees is recorded untested (`baseline`). Every worker reads the verdict for
`/health`; the pool server reads it (`gate`) before it spawns spares with a changed binary.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .invocation import PACKAGE_PARENT
from .setup import probe_cli

log = logging.getLogger("relay.cli")

VERDICT = "cli-selftest.json"
LOCK = "cli-watch.lock"
GOOD = ("baseline", "passed")        # verdicts that let new spares use the binary
SELFTEST_TIMEOUT_S = 300.0
SETTLE_S = 2.0                       # a binary modified this recently may still be being written
Verdict = dict[str, Any]


def binary_stat(claude_bin: str) -> dict[str, Any] | None:
    """The binary's resolved path, mtime and size (stat only: the pool server asks every half second)."""
    path = shutil.which(claude_bin) if os.sep not in claude_bin else claude_bin
    if not path:
        return None
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    return {"path": real, "mtime": st.st_mtime, "size": st.st_size}


def same_binary(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if not a or not b:
        return False
    return all(a.get(k) == b.get(k) for k in ("path", "mtime", "size"))


def read_verdict(var_dir: Path) -> Verdict | None:
    try:
        data = json.loads((var_dir / VERDICT).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def write_verdict(var_dir: Path, verdict: Verdict) -> None:
    """Atomically: readers never see half a file."""
    tmp = var_dir / f".{VERDICT}.{os.getpid()}"
    tmp.write_text(json.dumps(verdict))
    os.replace(tmp, var_dir / VERDICT)


def gate(var_dir: Path, claude_bin: str) -> tuple[str, str]:
    """May new processes use the binary now? ("ok" | "pending" | "failed", why). Without any verdict
    (the watch is off or has not run yet on a new host) the binary is the one the relay started with: ok."""
    v = read_verdict(var_dir)
    if v is None:
        return "ok", ""
    if not same_binary(v.get("identity"), binary_stat(claude_bin)):
        return "pending", "the CLI binary changed; its self-test has not finished"
    if v.get("status") in GOOD:
        return "ok", ""
    if v.get("status") == "failed":
        return "failed", f"the CLI's self-test failed: {v.get('summary')}"
    return "pending", "the CLI's self-test is running"


def subprocess_selftest(path: str) -> dict[str, Any]:
    """`python -m relay check --conformance --json` on `path`: the report as a dict (never raises)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-m", "relay", "check", "--conformance", "--json", "--claude-bin", path]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=SELFTEST_TIMEOUT_S, env=env,
                             stdin=subprocess.DEVNULL)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        report = json.loads(lines[-1]) if lines else None
        if isinstance(report, dict):
            return report
        problem = (out.stderr or out.stdout).strip()[-500:] or f"exit code {out.returncode}"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        problem = str(exc)
    return {"ok": False, "checks": [], "summary": f"the self-test could not run: {problem}", "problem": problem}


def failure_alert(verdict: Verdict, host: str) -> tuple[str, str, int, dict[str, Any]]:
    """A failed verdict as an alert's text, id (one per host and binary), ttl and details."""
    ident = verdict.get("identity") or {}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    text = (f"Host {host}: the Claude Code CLI changed and fails the relay's self-test; warm processes of the "
            f"old CLI keep serving, new spares wait: {verdict.get('summary')}")
    return text, f"cli_selftest:{host}:{digest}", 8 * 86400, {
        "version": ident.get("version"), "path": ident.get("path"), "failed": verdict.get("failed") or []}


class CliWatch:
    def __init__(self, claude_bin: str, env: dict[str, str], var_dir: Path, interval_s: float,
                 selftest: Callable[[str], dict[str, Any]] = subprocess_selftest,
                 on_verdict: Callable[[Verdict, Verdict | None], None] | None = None) -> None:
        self.claude_bin, self.env, self.var_dir, self.interval_s = claude_bin, env, var_dir, interval_s
        self.selftest, self.on_verdict = selftest, on_verdict
        self._lock_fd: int | None = None
        self._first = True
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def verdict(self) -> Verdict | None:
        return read_verdict(self.var_dir)

    def identity(self) -> dict[str, Any] | None:
        """The binary's stat and its version (`claude --version`, a fraction of a second)."""
        ident = binary_stat(self.claude_bin)
        if ident is not None:
            ident["version"] = probe_cli(ident["path"], self.env).get("version")
        return ident

    def is_watcher(self) -> bool:
        """Take (or keep) the host's watch: an flock held for this process's life."""
        if self._lock_fd is not None:
            return True
        self.var_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.var_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def close(self) -> None:
        """Give up the host's watch (another process takes it at its next tick)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def tick(self, now: float | None = None) -> Verdict | None:
        """One look, at most every `interval_s`; the new verdict when this call made one."""
        now = time.monotonic() if now is None else now
        if not self.enabled or now < self._next or not self.is_watcher():
            return None
        self._next = now + self.interval_s
        first, self._first = self._first, False
        ident = self.identity()
        if ident is None or ident["version"] is None:
            return None  # no binary, or one that cannot say its version: the CLI probe reports it (503 cli_unavailable)
        old = self.verdict()
        if old is None:
            verdict = {"status": "baseline", "identity": ident, "at": time.time(),
                       "summary": f"Claude Code CLI {ident.get('version')} at {ident['path']}: the CLI the relay "
                                  "started with (not self-tested)"}
            write_verdict(self.var_dir, verdict)
            return verdict
        unchanged = old.get("identity") == ident
        if not unchanged and time.time() - float(ident["mtime"]) < SETTLE_S:
            self._next = now + 1.0  # still being written (an install in progress): look again shortly
            return None
        # a failed or interrupted test is tried again when a watcher starts (a loaded host can time out)
        if unchanged and not (first and old.get("status") in ("failed", "checking")):
            return None
        return self._test(ident, old)

    def _test(self, ident: dict[str, Any], old: Verdict) -> Verdict:
        before = old.get("identity") or {}
        log.warning("cli watch: the Claude Code CLI changed (%s %s -> %s %s); self-testing it before new spares "
                    "use it", before.get("version"), before.get("path"), ident.get("version"), ident["path"])
        write_verdict(self.var_dir, {"status": "checking", "identity": ident, "at": time.time(),
                                     "summary": "the self-test is running", "previous": before})
        report = self.selftest(ident["path"])
        verdict = {"status": "passed" if report.get("ok") else "failed", "identity": ident, "at": time.time(),
                   "summary": report.get("summary") or "", "previous": before,
                   "failed": [c["name"] for c in report.get("checks") or [] if not c.get("ok")],
                   "checks": report.get("checks") or []}
        write_verdict(self.var_dir, verdict)
        if verdict["status"] == "passed":
            log.info("cli watch: self-test passed: %s", verdict["summary"])
        else:
            log.error("cli watch: self-test FAILED: %s", verdict["summary"])
        if self.on_verdict:
            self.on_verdict(verdict, old)
        return verdict

    def run(self, stop: Callable[[float], bool]) -> None:
        """The loop of a background thread: `stop(seconds)` waits and says whether to end."""
        while not stop(min(1.0, self.interval_s or 1.0)):
            try:
                self.tick()
            except Exception:  # the watch must never take the worker down
                log.exception("cli watch failed")

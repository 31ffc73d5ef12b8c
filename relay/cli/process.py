"""The Claude Code CLI as a subprocess: environment, version probe, spawn, NDJSON events, kill.

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
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from ..errors import Unavailable

log = logging.getLogger("relay.cli")

MIN_VERSION = (2, 1, 248)  # first release honouring "client_composed" (CLI-PROTOCOL §14)
SCRUB_ENV = ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "CLAUDE_CODE_SSE_PORT", "CLAUDE_AGENT_SDK_VERSION",
             "CLAUDE_CODE_SESSION_ID", "API_KEYS", "REDIS_URL", "RELAY_AUTH__API_KEYS")
EOF = object()


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


def child_env(base: dict[str, str], max_retries: int, config_dir: str = "") -> dict[str, str]:
    """The relay's environment for the CLI, minus nesting markers and the relay's own secrets."""
    env = {k: v for k, v in base.items() if k not in SCRUB_ENV and not k.startswith("RELAY_")}
    env["CLAUDE_CODE_MAX_RETRIES"] = str(max_retries)
    env.setdefault("DISABLE_AUTOUPDATER", "1")
    if config_dir:
        env["CLAUDE_CONFIG_DIR"] = config_dir
    return env


# credentials the CLI would prefer over an account's own login; an account's env never carries them
CREDENTIAL_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")


def account_env(base: dict[str, str], config_dir: str, token_env: str, all_token_envs: list[str]) -> dict[str, str]:
    """The CLI environment of one configured account: its config directory and/or its OAuth token,
    with every other credential (the host's API key, the other accounts' tokens) removed."""
    env = {k: v for k, v in base.items() if k not in CREDENTIAL_ENV and k not in all_token_envs}
    if config_dir:
        env["CLAUDE_CONFIG_DIR"] = os.path.expanduser(config_dir)
    if token_env and base.get(token_env):
        env["CLAUDE_CODE_OAUTH_TOKEN"] = base[token_env]
    return env


def account_envs(specs: list[Any], cli_env: dict[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Each account's CLI environment, and the accounts whose login is known broken on this host
    (their token variable is not set and they have no config directory)."""
    envs: dict[str, dict[str, str]] = {}
    problems: dict[str, str] = {}
    token_envs = [s.oauth_token_env for s in specs if s.oauth_token_env]
    for spec in specs:
        if spec.implicit:
            envs[spec.name] = cli_env
            continue
        envs[spec.name] = account_env(cli_env, spec.config_dir, spec.oauth_token_env, token_envs)
        if spec.oauth_token_env and not cli_env.get(spec.oauth_token_env):
            problem = f"the environment variable {spec.oauth_token_env} (its OAuth token) is not set"
            if not spec.config_dir:
                problems[spec.name] = problem
            log.warning("account %s: %s", spec.name, problem)
    return envs, problems


def login_status(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """What `claude auth status --json` says about a login (never raises)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
        info = json.loads(out.stdout or "{}")
        return info if isinstance(info, dict) else {"loggedIn": False, "error": "unexpected output"}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"loggedIn": False, "error": str(exc)}


def parse_version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else None


def probe_cli(claude_bin: str, env: dict[str, str]) -> dict[str, Any]:
    """Path and version of the CLI, or why it cannot be used (never raises)."""
    path = shutil.which(claude_bin) if os.sep not in claude_bin else claude_bin
    if not path or not os.path.exists(path):
        return {"ok": False, "path": claude_bin, "version": None,
                "problem": f"Claude Code CLI not found ({claude_bin!r}). Install it "
                           "(npm install -g @anthropic-ai/claude-code) or set claude_bin / CLAUDE_BIN."}
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, env=env,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"ok": False, "path": path, "version": None, "problem": f"cannot run {path}: {exc}"}
    version = parse_version(out.stdout)
    if out.returncode != 0 or version is None:
        return {"ok": False, "path": path, "version": None,
                "problem": f"{path} --version failed: {(out.stderr or out.stdout).strip()[:200]}"}
    info = {"ok": True, "path": path, "version": ".".join(map(str, version)), "problem": None}
    if version < MIN_VERSION:
        info.update(ok=False, too_old=True,
                    problem=f"Claude Code CLI {info['version']} is too old: the relay needs "
                            f"{'.'.join(map(str, MIN_VERSION))} or newer for verbatim prompts "
                            "(client_composed). Update it: npm install -g @anthropic-ai/claude-code@latest")
    return info


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
            threading.Thread(target=target, daemon=True).start()

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
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    if stream:
                        stream.close()
                except OSError:
                    pass
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
        if self.spec.temp_dir:
            shutil.rmtree(self.spec.temp_dir, ignore_errors=True)

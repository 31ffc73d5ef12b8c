"""The pool socket's messages (relay/cli/pool/protocol.py): each survives the codec, another protocol version
is refused cleanly (the worker runs the CLI itself), and warm markers stored by older relays still parse."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from relay.cli.pool.client import PoolClient
from relay.cli.pool.policy import route
from relay.cli.pool.protocol import (
    PROTOCOL_VERSION,
    SERVER_MODULE,
    Channel,
    ColdSpec,
    EndOfRun,
    Header,
    KeepReply,
    KeepRequest,
    ProtocolError,
    RunRequest,
    StatsRequest,
    WarmMarker,
    decode,
    encode,
    parse_pool_line,
    parse_request,
    parse_stats,
    socket_path,
    stats_reply,
)
from relay.core.conversation import Plan
from relay.core.prompt import Prompt
from relay.core.run_description import RunDescription


def wire(obj: dict[str, Any]) -> dict[str, Any]:
    """Through the one codec, as a peer reads it."""
    out = decode(encode(obj))
    assert out is not None
    return out


def a_run_request(**kw: Any) -> RunRequest:
    fields: dict[str, Any] = dict(
        want="warm", why="", conv="relay:conv:s:x", model="sonnet", fingerprint="fp:acct", line='{"type":"user"}',
        cold=ColdSpec(argv=["claude", "-p"], cwd="/srv/cwd", env={"A": "1"}, session_id="sid", temp_dir="/tmp/run-1"),
        controls=[{"subtype": "set_model", "model": "opus"}], flavour={"CLAUDE_CODE_PROMPT_CACHE_TTL": "1h"},
        proc="abc123", turns=3, held_fingerprint="hfp:acct")
    fields.update(kw)
    return RunRequest(**fields)


def test_a_run_request_round_trips_with_its_version() -> None:
    req = a_run_request()
    obj = wire(req.to_wire())
    assert obj["op"] == "run" and obj["v"] == PROTOCOL_VERSION
    assert parse_request(obj) == req
    cold = a_run_request(want=None, cold=ColdSpec([], "/", {}), controls=[], flavour={}, proc="", turns=0,
                         held_fingerprint="")
    assert parse_request(wire(cold.to_wire())) == cold


def test_a_stats_request_and_reply_round_trip() -> None:
    assert isinstance(parse_request(wire(StatsRequest().to_wire())), StatsRequest)
    stats = {"spares": {"ready": 1}, "warm": [], "busy": 0, "hits": {"warm": 2}, "misses": {}}
    assert parse_stats(wire(stats_reply(stats))) == stats


def test_header_keep_and_end_of_run_round_trip() -> None:
    header = Header(how="spare", reason="", session_id="sid-1", pid=4242, proc="p1")
    assert Header.from_wire(wire(header.to_wire())) == header
    assert Header.from_wire(wire(header.to_wire())).started
    refusal = Header.from_wire(wire(Header.refusal("no CLI").to_wire()))
    assert not refusal.started and refusal.error == "no CLI"
    assert isinstance(parse_pool_line(wire(KeepRequest().to_wire())), KeepRequest)
    reply = KeepReply(kept=True, reason="", proc="p1", turns=4)
    assert parse_pool_line(wire(reply.to_wire())) == reply
    assert parse_pool_line(wire(EndOfRun(rc=1, stderr="boom").to_wire())) == EndOfRun(1, "boom")
    # the CLI's own events pass through untouched
    assert parse_pool_line({"type": "result", "subtype": "success"}) is None


def test_garbage_lines_are_skipped_not_fatal() -> None:
    assert decode(b"not json\n") is None
    assert decode(b"[1, 2]\n") is None
    with pytest.raises(ProtocolError):
        parse_request({"op": "dance", "v": PROTOCOL_VERSION})
    with pytest.raises(ProtocolError):
        parse_request({"op": "run", "v": PROTOCOL_VERSION, "want": "spare"})  # no cold spec


@pytest.mark.parametrize("version", [None, 1, PROTOCOL_VERSION + 1])
def test_another_protocol_version_is_refused_on_either_side(version: int | None) -> None:
    run = a_run_request().to_wire()
    header = Header(how="warm", proc="p1").to_wire()
    stats = stats_reply({"busy": 0})
    for obj in (run, header, stats):
        if version is None:
            obj.pop("v")      # what the unversioned pool server (protocol 1) sent and expected
        else:
            obj["v"] = version
    with pytest.raises(ProtocolError, match="restart the relay"):
        parse_request(run)
    with pytest.raises(ProtocolError):
        Header.from_wire(header)
    with pytest.raises(ProtocolError):
        parse_stats(stats)


class FakeServer:
    """A pool server on a real unix socket that answers every connection with `answer(first line)`."""

    def __init__(self, path: Path, answer: Any) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.answer = answer
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            chan = Channel(sock)
            first = chan.read()
            if first is not None:
                self.seen.append(first)
                reply = self.answer(first)
                if reply is not None:
                    chan.write(reply)
            chan.close()

    def close(self) -> None:
        self.listener.close()


def test_a_server_of_another_version_degrades_to_a_local_run(tmp_path: Path) -> None:
    """After `kill -HUP` the old pool server stays: the new worker must run the CLI itself, not crash."""
    old = FakeServer(tmp_path / "pool.sock", lambda req: {"type": "pool", "how": "spare", "pid": 1})  # no "v"
    try:
        client = PoolClient(tmp_path / "pool.sock", True)
        proc, why = client.run(a_run_request())
        assert proc is None and why == "pool protocol mismatch"
        assert client.run(a_run_request()) == (None, "pool protocol mismatch")
        assert len(old.seen) == 1   # the worker stops asking the old server for a while
        st = client.stats()
        assert st["ok"] is False and "restart the relay" in st["problem"]
    finally:
        old.close()


def test_the_pool_server_refuses_a_worker_of_another_version_clearly(tmp_path: Path) -> None:
    """The server's side of a mismatch (the real server, without spares): a refusal naming both versions,
    then it hangs up; it keeps serving workers of its own version."""
    import signal
    import subprocess
    import sys

    from harness import ROOT, relay_env, wait_until

    env = relay_env("redis://127.0.0.1:1/0", "/nonexistent/claude", "http://127.0.0.1:1", tmp_path,
                    {"RELAY_POOL__ENABLED": "true", "RELAY_POOL__SPARES": "0"})
    server = subprocess.Popen([sys.executable, "-m", SERVER_MODULE], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = socket_path(tmp_path / "var")
    try:
        assert wait_until(path.exists, timeout=30)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        worker = Channel(sock)
        old_request = a_run_request().to_wire()
        old_request.pop("v")   # what a worker of the unversioned protocol sends
        worker.write(old_request)
        answer = worker.read()
        assert answer is not None and answer["how"] == "none" and answer["v"] == PROTOCOL_VERSION
        assert "protocol 1" in answer["error"] and f"this one {PROTOCOL_VERSION}" in answer["error"]
        assert worker.read() is None
        worker.close()
        st = PoolClient(path, True).stats()
        assert st["ok"] and st["busy"] == 0 and st["misses"] == {}
    finally:
        server.send_signal(signal.SIGUSR1)
        server.wait(20)


def test_a_missing_pool_server_means_a_local_run(tmp_path: Path) -> None:
    client = PoolClient(tmp_path / "absent.sock", True)
    assert client.run(a_run_request()) == (None, "pool server unavailable")
    assert client.stats()["ok"] is False


@pytest.mark.parametrize("stored, parsed", [
    ("host-a|0123456789abcdef|3", WarmMarker("host-a", "0123456789abcdef", 3)),   # written by the relay before the pool package
    ("ip-10-0-0-7.ec2.internal|ffee00112233aabb|100", WarmMarker("ip-10-0-0-7.ec2.internal", "ffee00112233aabb", 100)),
])
def test_warm_markers_already_stored_in_redis_still_parse(stored: str, parsed: WarmMarker) -> None:
    assert WarmMarker.parse(stored) == parsed
    assert str(parsed) == stored   # and new records are written the same way


@pytest.mark.parametrize("bad", [None, "", "host-a", "host-a|proc", "host-a|proc|x", "|proc|3", "host-a||3"])
def test_a_damaged_warm_marker_means_no_warm_process(bad: str | None) -> None:
    assert WarmMarker.parse(bad) is None


def _plan(**kw: Any) -> Plan:
    plan = Plan("relay:conv:s:x", "sid", True, [], False)
    for k, v in kw.items():
        setattr(plan, k, v)
    return plan


def test_the_policy_reads_a_legacy_marker_and_sends_the_turn_to_that_process() -> None:
    desc = RunDescription(model="sonnet", prompt=Prompt("", None, []))
    env = {"HOME": "/h"}
    r = route(desc, _plan(warm="host-a|0123456789abcdef|3"), env, None, "host-a", env, "sonnet")
    assert (r.pooled, r.want, r.warm) == (True, "warm", WarmMarker("host-a", "0123456789abcdef", 3))
    r = route(desc, _plan(warm="host-b|0123456789abcdef|3"), env, None, "host-a", env, "sonnet")
    assert (r.pooled, r.want, r.why) == (True, None, "held by another host")


def test_the_policy_keeps_tool_and_sessionless_runs_local() -> None:
    env = {"HOME": "/h"}
    tools = RunDescription(model="sonnet", prompt=Prompt("", None, []), client_tools=[{"name": "f"}])
    assert route(tools, _plan(), env, None, "h", env, "sonnet") == route(tools, _plan(), env, None, "h", env, "sonnet")
    assert route(tools, _plan(), env, None, "h", env, "sonnet").why == "function calling"
    assert not route(tools, _plan(), env, None, "h", env, "sonnet").pooled
    plain = RunDescription(model="sonnet", prompt=Prompt("", None, []))
    assert route(plain, _plan(cli_session=None), env, None, "h", env, "sonnet").why == "sessions off"
    first = _plan(resume=False, first_turn=True)
    assert route(plain, first, env, None, "h", env, "sonnet").want == "spare"
    assert route(plain, first, dict(env, CLAUDE_CONFIG_DIR="/other"), "b", "h", env, "sonnet").why.startswith(
        "account b")


def test_a_held_step_of_claude_code_goes_on_when_only_its_system_prompt_changed() -> None:
    """The rest of a held turn is matched without the system prompt only for a client that rewrites it
    mid-task (Claude Code); a warm process (a new turn) always needs the same prompt."""
    from relay.cli.invocation import settings_fingerprint

    def desc(system: str, may_change: bool, model: str = "sonnet") -> RunDescription:
        return RunDescription(model=model, prompt=Prompt(system, "--system-prompt-file", []),
                              client_tools=[{"name": "f"}], system_may_change=may_change)
    old, new = desc("base", True), desc("base\n\nThe user hasn't heard from you in a while.", True)
    assert settings_fingerprint(old, held=True) == settings_fingerprint(new, held=True)
    assert settings_fingerprint(old) != settings_fingerprint(new)
    assert settings_fingerprint(desc("base", False), held=True) != settings_fingerprint(desc("other", False), held=True)
    assert settings_fingerprint(old, held=True) != settings_fingerprint(desc("base", True, "opus"), held=True)

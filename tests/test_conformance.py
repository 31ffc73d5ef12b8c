"""A CLI you can upgrade safely: `python -m relay check --conformance`, the CLI watch of a running relay,
and the API's refusal of an old CLI (`cli_too_old`).

The self-test runs the real CLI (or a wrapper made to misbehave around it) against the package's own
loopback mock; the relay tests use the suite's mock (tests/mock_anthropic.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests
from harness import ROOT, anthropic_client, free_port, openai_client, wait_until
from test_accounts import Receiver

from relay.cli.pool.processes import PoolLimits, WarmPool
from relay.cli.watch import CliWatch, gate, read_verdict
from relay.core.events import Turn
from relay.core.upstream import classify
from relay.errors import Unavailable

CHECKS = ("stream_json", "rate_limit_event", "resume", "resume_session_at", "client_tool", "bad_login",
          "pool_controls", "version_refusal")


def wrapper(path: Path, cli_bin: str, filter_cmd: str = "cat") -> Path:
    """A `claude` that runs the real CLI with its stdout through `filter_cmd` (written atomically: a
    running relay must never see half a script)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    tmp.write_text(f"#!/bin/bash\nset -o pipefail\n{cli_bin} \"$@\" | {filter_cmd}\n")
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


# renames the stream events and drops the rate-limit event: two things the relay relies on
MISBEHAVING = ("sed -u -e 's/\"type\":\"stream_event\"/\"type\":\"stream_evt\"/g' "
               "-e '/\"type\":\"rate_limit_event\"/d'")


def conformance(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "ANTHROPIC_", "CLAUDE"))}
    env.update(RELAY_CONFIG=str(ROOT / "config.json"), PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-m", "relay", "check", "--conformance", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_check_conformance_passes_on_the_pinned_cli(cli_bin):
    t = time.monotonic()
    out = conformance({"CLAUDE_BIN": cli_bin})
    took = time.monotonic() - t
    assert out.returncode == 0, out.stdout + out.stderr
    for name in CHECKS:
        assert f"PASS {name} (" in out.stdout, out.stdout
    assert "all 8 conformance checks passed" in out.stdout
    assert took < 120, f"the self-test took {took:.0f} s"   # about 20 s on an idle 2-core host


@pytest.mark.slow
def test_check_conformance_names_what_a_misbehaving_cli_changed(cli_bin, tmp_path):
    bad = wrapper(tmp_path / "claude", cli_bin, MISBEHAVING)
    out = conformance({"CLAUDE_BIN": cli_bin}, "--claude-bin", str(bad), "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["ok"] and report["cli"] == str(bad) and report["version"]
    result = {c["name"]: c for c in report["checks"]}
    assert set(result) == set(CHECKS)
    assert "no `stream_event` events" in result["stream_json"]["detail"]
    assert "stream_evt" in result["stream_json"]["detail"]          # what it printed instead
    assert "no `rate_limit_event`" in result["rate_limit_event"]["detail"]
    assert {n for n, c in result.items() if not c["ok"]} == {"stream_json", "rate_limit_event"}
    assert "stream_json: no `stream_event` events" in report["summary"]


# -- the watch, without a relay --------------------------------------------------------------------
def fake_report(ok: bool) -> dict[str, Any]:
    checks = [{"name": "stream_json", "ok": ok, "detail": "fine" if ok else "no `stream_event` events", "seconds": 1}]
    return {"ok": ok, "checks": checks, "summary": "passed" if ok else "1 of 1 failed: stream_json"}


def test_the_watch_records_the_first_binary_and_self_tests_each_change(tmp_path):
    cli = tmp_path / "claude"
    cli.write_text("#!/bin/sh\necho '2.1.330 (Claude Code)'\n")
    cli.chmod(0o755)
    os.utime(cli, (time.time() - 10, time.time() - 10))
    tested: list[str] = []
    verdicts: list[dict[str, Any]] = []
    watch = CliWatch(str(cli), {"PATH": os.environ["PATH"]}, tmp_path / "var", 5,
                     selftest=lambda p: tested.append(p) or fake_report(False),
                     on_verdict=lambda v, old: verdicts.append(v))
    first = watch.tick(0)
    assert first and first["status"] == "baseline" and first["identity"]["version"] == "2.1.330"
    assert gate(tmp_path / "var", str(cli)) == ("ok", "")
    assert watch.tick(1) is None and watch.tick(6) is None and not tested   # unchanged: nothing to test
    cli.write_text("#!/bin/sh\necho '2.1.400 (Claude Code)'\n")
    os.utime(cli, (time.time() - 10, time.time() - 10))
    assert gate(tmp_path / "var", str(cli))[0] == "pending"                 # changed, not tested yet
    v = watch.tick(12)
    assert tested == [str(cli)] and v and v["status"] == "failed" and v["failed"] == ["stream_json"]
    assert verdicts == [v] and v["previous"]["version"] == "2.1.330" and v["identity"]["version"] == "2.1.400"
    status, why = gate(tmp_path / "var", str(cli))
    assert status == "failed" and "stream_json" in why
    other = CliWatch(str(cli), {"PATH": os.environ["PATH"]}, tmp_path / "var", 5, selftest=lambda p: fake_report(True))
    assert other.tick(100) is None                                          # one watcher per host (flock)
    assert read_verdict(tmp_path / "var")["status"] == "failed"
    watch.close()                                                           # the watcher's worker is gone:
    assert other.tick(200)["status"] == "passed"                            # the next one retests the failure
    assert gate(tmp_path / "var", str(cli)) == ("ok", "")


def test_a_binary_still_being_written_is_tested_once_it_settles(tmp_path):
    cli = tmp_path / "claude"
    cli.write_text("#!/bin/sh\necho 2.1.330\n")
    cli.chmod(0o755)
    os.utime(cli, (time.time() - 10, time.time() - 10))
    watch = CliWatch(str(cli), {}, tmp_path, 5, selftest=lambda p: fake_report(True))
    watch.tick(0)
    cli.write_text("#!/bin/sh\necho 2.1.331\n")    # just now
    assert watch.tick(10) is None
    os.utime(cli, (time.time() - 10, time.time() - 10))
    assert watch.tick(11.5)["status"] == "passed"


def test_the_pool_keeps_the_old_clis_processes_and_spawns_no_spare_until_the_new_one_passed(tmp_path):
    verdict = ["pending", "the CLI binary changed; its self-test has not finished"]
    ident = [("/x/claude", (1.0, 10), None)]
    pool = WarmPool(PoolLimits(spares=1), "/x/claude", {}, str(tmp_path), "sonnet", lambda: ident[-1],
                    cli_gate=lambda: (verdict[0], verdict[1]))
    old = pool.identity
    ident.append(("/x/claude", (2.0, 11), None))                      # the binary changed
    pool.sweep()
    assert pool.identity == old and not pool.wants_spare()             # the old processes keep serving
    assert "self-test has not finished" in pool.stats()["problem"]
    verdict[:] = ["failed", "the CLI's self-test failed: stream_json"]
    pool.sweep()
    assert pool.identity == old and not pool.wants_spare() and "stream_json" in pool.stats()["cli_hold"]
    ident.append(("/x/claude", (2.0, 11), (5.0, 1)))                  # a new login is taken at once...
    pool.sweep()
    assert pool.identity == old                                        # ...but not with a failed binary
    verdict[:] = ["ok", ""]
    pool.sweep()
    assert pool.identity == ident[-1] and pool.wants_spare() and pool.stats()["cli_hold"] is None


# -- the API refuses the CLI's version ----------------------------------------------------------------
def test_a_version_refusal_is_cli_too_old_naming_the_version():
    turn = Turn()
    turn.result = {"is_error": True, "subtype": "success", "api_error_status": 400,
                   "api_error_type": "claude_code_version_too_old",
                   "result": "API Error: 400 This version of Claude Code is no longer supported. Please update to "
                             "version 2.9.0 or later."}
    err = classify(turn, time.time(), 30)
    assert isinstance(err, Unavailable) and err.status == 503 and err.code == "cli_too_old"
    assert "version 2.9.0 or newer" in err.message and "check --conformance" in err.message
    turn.result = {"is_error": True, "api_error_status": 400,
                   "result": "API Error: 400 Claude Code 2.1.1 is too old: the minimum version is 2.2.0"}
    err = classify(turn, time.time(), 30)
    assert err is not None and err.code == "cli_too_old" and "2.2.0" in err.message
    turn.result = {"is_error": True, "api_error_status": 400, "result": "API Error: 400 prompt is too long"}
    assert classify(turn, time.time(), 30).code == "upstream_invalid_request"


def test_cli_too_old_is_a_503_in_the_openai_and_anthropic_shapes(relay):
    with openai_client(relay.url) as c:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as e:
                out = c.chat.completions.create(model="sonnet", stream=stream, messages=[
                    {"role": "user", "content": f"hi MOCK:too_old=3.1.4 {stream}"}])
                if stream:
                    list(out)
            assert e.value.status_code == 503 and e.value.code == "cli_too_old"
            assert "version 3.1.4 or newer" in e.value.message
    with anthropic_client(relay.url) as a:
        for stream in (False, True):
            with pytest.raises(anthropic.InternalServerError) as e:
                kw: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 100,
                                      "messages": [{"role": "user", "content": f"hi MOCK:too_old=3.1.4 a{stream}"}]}
                if stream:
                    with a.messages.stream(**kw) as s:
                        list(s)
                else:
                    a.messages.create(**kw)
            assert e.value.status_code == 503
            assert e.value.body["error"]["type"] == "api_error"
            assert "version 3.1.4 or newer" in e.value.body["error"]["message"]
    assert wait_until(lambda: "alert cli_too_old" in relay.log(), 10)
    assert relay.log().count("alert cli_too_old") == 1                 # once per host and CLI version


# -- a running relay whose claude is swapped ------------------------------------------------------------
@pytest.mark.slow
def test_a_swapped_cli_is_self_tested_and_a_failing_one_alerts_while_warm_processes_serve(relay_factory, cli_bin,
                                                                                         tmp_path):
    claude = wrapper(tmp_path / "claude", cli_bin, "cat")
    port = free_port()
    receiver = Receiver(port)
    srv = relay_factory({"CLAUDE_BIN": str(claude), "RELAY_POOL__ENABLED": "true", "RELAY_CLI_WATCH_S": "1",
                         "RELAY_ALERTS__WEBHOOKS": json.dumps([{"url": f"http://127.0.0.1:{port}/hook"}])})
    try:
        def health() -> dict[str, Any]:
            return requests.get(srv.url + "/health", timeout=10).json()

        def selftest() -> str | None:
            return (health()["cli"]["selftest"] or {}).get("status")

        assert wait_until(lambda: selftest() == "baseline", 30)
        time.sleep(1.1)   # a new mtime even on a coarse clock
        wrapper(claude, cli_bin, "cat -u")                                 # another CLI that behaves
        assert wait_until(lambda: selftest() == "passed", 240, 0.5), srv.log()[-3000:]
        assert "cli watch: self-test passed" in srv.log() and health()["status"] == "ok"
        assert wait_until(lambda: "self-test passed; spares use it" in srv.log(), 10)   # the pool took it
        sid, msgs = "conformance-swap", [{"role": "user", "content": "swap turn one"}]
        with openai_client(srv.url) as c:
            first = c.chat.completions.create(model="sonnet", messages=msgs, extra_headers={"X-Session-Id": sid})
            msgs += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "swap turn two"}]
            assert wait_until(lambda: len(requests.get(srv.url + "/stats", timeout=10).json()["pool"]["warm"]) == 1, 20)

            time.sleep(1.1)
            wrapper(claude, cli_bin, MISBEHAVING)
            assert wait_until(lambda: srv.log().count("self-testing it before new spares") == 2, 60)
            assert wait_until(lambda: selftest() == "failed", 240, 0.5), srv.log()[-3000:]
            h = health()
            assert h["status"] == "degraded" and set(h["cli"]["selftest"]["failed"]) == {"stream_json",
                                                                                       "rate_limit_event"}
            assert "stream_event" in h["cli"]["selftest"]["summary"] and "self-test FAILED" in srv.log()
            assert wait_until(lambda: any(b["event"] == "cli_selftest_failed" for _, b in receiver.got), 20)
            alert = next(b for _, b in receiver.got if b["event"] == "cli_selftest_failed")
            assert "rate_limit_event" in alert["details"]["failed"] and "warm processes" in alert["text"]
            assert wait_until(lambda: "self-test" in str(health()["pool"].get("problem")), 10)

            second = c.chat.completions.create(model="sonnet", messages=msgs, extra_headers={"X-Session-Id": sid})
            assert second.choices[0].message.content == "Hello from mock. You said: swap turn two"
            rec = requests.get(srv.url + "/v1/usage/recent?limit=1", timeout=10).json()["data"][0]
            assert rec["pool"] == "warm"       # the old CLI's warm process still serves
    finally:
        receiver.stop()

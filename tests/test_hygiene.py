"""Process hygiene: disconnects, timeouts and crashes leave no CLI process, zombie or temp file behind;
the concurrency cap answers 429."""

import json
import socket
import stat
import threading
import time

import psutil
import pytest
import requests
from harness import wait_until


def cli_processes(srv):
    """Live (non-zombie) descendants of the relay's workers: CLI processes and their children."""
    out = []
    for w in srv.worker_pids():
        try:
            for c in psutil.Process(w).children(recursive=True):
                try:
                    if c.status() != psutil.STATUS_ZOMBIE:
                        out.append(c)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
    return out


def zombies(srv):
    out = []
    for w in srv.worker_pids():
        for c in psutil.Process(w).children(recursive=True):
            try:
                if c.status() == psutil.STATUS_ZOMBIE:
                    out.append(c.pid)
            except psutil.Error:
                pass
    return out


def body(text, stream=True):
    return {"model": "sonnet", "stream": stream, "messages": [{"role": "user", "content": text}]}


def read_until(sock, token, limit=30.0):
    sock.settimeout(limit)
    buf = b""
    while token not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return token in buf


def raw_request(srv, payload):
    s = socket.create_connection(("127.0.0.1", srv.port))
    data = json.dumps(payload).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


@pytest.fixture(scope="module")
def quick(relay_factory):
    """A relay with short timeouts (long enough for a cold CLI start on a loaded 2-core machine)."""
    return relay_factory({"RELAY_FIRST_TOKEN_TIMEOUT_S": "15", "RELAY_IDLE_TIMEOUT_S": "4",
                          "RELAY_TOTAL_TIMEOUT_S": "20", "RELAY_KEEPALIVE_S": "0.5"})


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_kills_the_cli(quick, stream):
    s = raw_request(quick, body("bye MOCK:slow=200 MOCK:words=40", stream))
    assert wait_until(lambda: cli_processes(quick), 15)
    if stream:
        assert read_until(s, b"data:")
    time.sleep(0.3)
    s.close()
    assert wait_until(lambda: not cli_processes(quick), 5, 0.02)
    assert wait_until(lambda: not zombies(quick), 5)  # reaped, not left as zombies
    assert wait_until(lambda: list((quick.tmp / "var" / "tmp").iterdir()) == [], 10)


def test_first_token_timeout(quick, mock_api):
    r = requests.post(quick.url + "/v1/chat/completions", json=body("ftt MOCK:stall=30", False), timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "first_token_timeout"
    assert wait_until(lambda: not cli_processes(quick), 10)


def test_idle_timeout_mid_stream(quick):
    with requests.post(quick.url + "/v1/chat/completions", json=body("idle MOCK:pause=30"), stream=True,
                       timeout=30) as r:
        raw = r.raw.read().decode()
    assert r.status_code == 200 and "partial te" in raw
    assert ": keep-alive" in raw  # keep-alive comments while the model is silent
    last = json.loads([f for f in raw.split("\n\n") if f.startswith("data: ")][-1][6:])
    assert last["error"]["code"] == "idle_timeout" and "[DONE]" not in raw
    assert wait_until(lambda: not cli_processes(quick), 10)


def test_total_timeout(quick):
    with requests.post(quick.url + "/v1/chat/completions", json=body("total MOCK:slow=400 MOCK:words=60"),
                       stream=True, timeout=30) as r:
        raw = r.raw.read().decode()
    last = json.loads([f for f in raw.split("\n\n") if f.startswith("data: ")][-1][6:])
    assert last["error"]["code"] == "total_timeout"
    assert wait_until(lambda: not cli_processes(quick), 10)


def test_concurrency_cap_answers_429_with_retry_after(relay_factory):
    srv = relay_factory({"RELAY_MAX_CONCURRENT_RUNS": "1", "RELAY_QUEUE_TIMEOUT_S": "0.5"})
    first = {}

    def slow():
        first["r"] = requests.post(srv.url + "/v1/chat/completions", json=body("cap MOCK:slow=100 MOCK:words=30", False),
                                   timeout=60)
    t = threading.Thread(target=slow)
    t.start()
    assert wait_until(lambda: cli_processes(srv), 15)
    r = requests.post(srv.url + "/v1/chat/completions", json=body("second", False), timeout=30)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    t.join(60)
    assert first["r"].status_code == 200
    # the slot is free again
    assert requests.post(srv.url + "/v1/chat/completions", json=body("third", False), timeout=60).status_code == 200


def fake_cli(tmp_path, script):
    """A stand-in CLI for faults the real one cannot show; `--version` answers like the real one."""
    f = tmp_path / "fake-claude"
    f.write_text("#!/usr/bin/env python3\nimport sys, time, json\n"
                 "if '--version' in sys.argv:\n    print('2.1.330 (Claude Code)'); sys.exit(0)\n"
                 "sys.stdin.readline()\n" + script)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return str(f)


def test_a_hanging_cli_is_killed_by_the_first_token_timeout(relay_factory, tmp_path):
    srv = relay_factory({"CLAUDE_BIN": fake_cli(tmp_path, "time.sleep(600)\n"), "RELAY_FIRST_TOKEN_TIMEOUT_S": "2"})
    r = requests.post(srv.url + "/v1/chat/completions", json=body("x", False), timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "first_token_timeout"
    assert wait_until(lambda: not cli_processes(srv), 10)


def test_garbage_output_is_a_502_not_a_crash(relay_factory, tmp_path):
    srv = relay_factory({"CLAUDE_BIN": fake_cli(tmp_path, "print('<html>oops</html>'); print('{not json');"
                                                          "sys.stderr.write('boom\\n'); sys.exit(3)\n")})
    for stream in (False, True):
        r = requests.post(srv.url + "/v1/chat/completions", json=body("x", stream), timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "cli_crashed"
        assert "boom" not in r.json()["error"]["message"]  # the CLI's stderr is the log's (test_leaks)


def test_a_cli_crash_mid_stream_ends_with_an_error_frame(relay_factory, tmp_path, cli_bin):
    # Replay the first real events of a turn, then die: the stream must not pretend it finished.
    import os
    import subprocess

    from relay.cli.invocation import base_argv

    env = dict(os.environ, ANTHROPIC_BASE_URL=srv_mock_url(relay_factory), ANTHROPIC_API_KEY="k",
               CLAUDE_CONFIG_DIR=str(tmp_path), CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    line = json.dumps({"type": "user", "client_composed": True, "message": {"role": "user", "content": "MOCK:words=8"}})
    out = subprocess.run(base_argv(cli_bin, "sonnet") + ["--no-session-persistence"], input=line + "\n",
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60).stdout
    recorded = tmp_path / "recorded.ndjson"
    events = out.splitlines()
    cut = next(i for i, e in enumerate(events) if '"text_delta"' in e) + 3
    recorded.write_text("\n".join(events[:cut]) + "\n")
    script = f"sys.stdout.write(open({str(recorded)!r}).read()); sys.stdout.flush(); time.sleep(0.2); sys.exit(1)\n"
    srv = relay_factory({"CLAUDE_BIN": fake_cli(tmp_path, script)})
    with requests.post(srv.url + "/v1/chat/completions", json=body("x"), stream=True, timeout=30) as r:
        raw = r.raw.read().decode()
    assert r.status_code == 200 and '"content":"w0 "' in raw
    last = json.loads([f for f in raw.split("\n\n") if f.startswith("data: ")][-1][6:])
    assert last["error"]["code"] == "cli_crashed" and "[DONE]" not in raw


def srv_mock_url(factory):
    # the mock's URL, read back from any relay this factory made
    srv = factory({}, start=False)
    return srv.env["ANTHROPIC_BASE_URL"]

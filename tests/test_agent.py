"""Agent mode: the CLI's own tools only when an operator enables them; smart streaming; cancellation
kills the tools' processes too."""

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests
from harness import ROOT, openai_client, wait_until

from relay.state.apikeys import digest

AGENT_KEY = "sk-agent-test-1"
AUTH = {"RELAY_AUTH__ENABLED": "true", "API_KEYS": AGENT_KEY}  # agent mode needs auth


@pytest.fixture(scope="module", autouse=True)
def bubblewrap():
    """Agent runs need bubblewrap: install it from Debian's packages if it is missing, else skip visibly."""
    if shutil.which("bwrap"):
        return
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "bubblewrap"], check=True, timeout=300,
                       capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"bubblewrap is not installed and could not be installed: {exc}")
    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not available on this machine")


def ask(srv, text, key=AGENT_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(srv.url + "/v1/chat/completions", headers=headers, timeout=90,
                         json={"model": "sonnet", "messages": [{"role": "user", "content": text}]} | kw)


def test_agent_tools_are_off_by_default(relay, mock_api):
    r = ask(relay, "ag0 MOCK:tool=Bash", key=None)
    assert r.status_code == 200
    assert "hi-from-bash" not in r.json()["choices"][0]["message"]["content"]  # nothing ran
    assert [t["name"] for t in mock_api.bodies("ag0")[0]["tools"]] == []


@pytest.fixture(scope="module")
def agent_relay(relay_factory):
    return relay_factory({"RELAY_AGENT__ENABLED": "true", "RELAY_AGENT__INTERMEDIATE": "reasoning", **AUTH})


def test_agent_mode_runs_a_real_bash_tool_and_answers_with_the_final_text(agent_relay, mock_api):
    r = ask(agent_relay, "ag1 MOCK:tool=Bash")
    msg = r.json()["choices"][0]["message"]
    assert msg["content"] == "Tool said: hi-from-bash"  # the real Bash output reached the model
    tools = [t["name"] for t in mock_api.bodies("ag1")[0]["tools"]]
    assert "Bash" in tools and "Write" in tools
    second = mock_api.bodies("ag1")[-1]["messages"][-1]["content"]
    assert any(b.get("type") == "tool_result" and "hi-from-bash" in json.dumps(b) for b in second)


def test_agent_smart_streaming_sends_steps_as_reasoning(agent_relay):
    with openai_client(agent_relay.url, api_key=AGENT_KEY) as c:
        chunks = list(c.chat.completions.create(model="sonnet", stream=True,
                                                messages=[{"role": "user", "content": "ag2 MOCK:tool=Bash"}]))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    assert content == "Tool said: hi-from-bash"
    assert "[Bash]" in reasoning and "echo hi-from-bash" in reasoning


def test_each_conversation_gets_its_own_working_directory(agent_relay):
    for sid in ("agent-a", "agent-b"):
        requests.post(agent_relay.url + "/v1/chat/completions", timeout=90, json={
            "model": "s", "messages": [{"role": "user", "content": f"ag3 MOCK:tool=Bash MOCK:bash=touch_made-by-{sid}"}]},
            headers={"X-Session-Id": sid, "Authorization": f"Bearer {AGENT_KEY}"})
    root = agent_relay.tmp / "var" / "agent"
    dirs = [d for d in root.iterdir() if any(d.glob("made-by-*"))]
    assert sorted(f.name for d in dirs for f in d.glob("made-by-*")) == ["made-by-agent-a", "made-by-agent-b"]
    assert len(dirs) == 2  # one private directory each


def test_cancelling_kills_the_tool_processes_too(agent_relay):
    s = socket.create_connection(("127.0.0.1", agent_relay.port))
    data = json.dumps({"model": "s", "stream": True, "messages": [
        {"role": "user", "content": "ag4 MOCK:tool=Bash MOCK:bash=python3_-c_\"import_time;time.sleep(47.5)\""}]}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + AGENT_KEY.encode() + b"\r\nContent-Length: "
              + str(len(data)).encode() + b"\r\n\r\n" + data)

    def sleepers():
        return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and "47.5" in " ".join(p.info["cmdline"])
                and "sleep" in " ".join(p.info["cmdline"])]
    assert wait_until(sleepers, 20)
    s.close()
    assert wait_until(lambda: not sleepers(), 3)


def test_agent_mode_per_key_only(relay_factory, tmp_path, mock_api):
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": [{"name": "dev", "key": "sk-dev-1", "agent": {"enabled": True}},
                                                 {"name": "plain", "key": "sk-plain-1"}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    srv = relay_factory({"RELAY_CONFIG": str(path)})
    r = ask(srv, "ag5 MOCK:tool=Bash", key="sk-dev-1")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Tool said: hi-from-bash"
    assert "hi-from-bash" not in ask(srv, "ag6 MOCK:tool=Bash", key="sk-plain-1").json()["choices"][0]["message"]["content"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_agent_runs_as_a_non_root_user(relay_factory, tmp_path):
    user = "relayagent"
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", user], check=True)
    srv = relay_factory({"RELAY_AGENT__ENABLED": "true", "RELAY_AGENT__USER": user,
                         "RELAY_AGENT__PERMISSION_MODE": "bypassPermissions", **AUTH}, start=False)
    pw = pwd.getpwnam(user)
    cfg_dir = srv.tmp / "claude-config"
    for d in (cfg_dir, srv.tmp):
        os.chown(d, pw.pw_uid, pw.pw_gid)
    for d in (srv.tmp.parent, srv.tmp):  # the agent user must reach the relay's run files
        os.chmod(d, 0o755)
    srv.start()
    r = ask(srv, "ag7 MOCK:tool=Bash MOCK:bash=id_-un")
    assert r.status_code == 200, (r.text, srv.log()[-2000:])
    assert r.json()["choices"][0]["message"]["content"] == f"Tool said: {user}"


def test_bypass_mode_as_root_without_a_user_is_refused_at_start(relay_factory):
    if os.geteuid() != 0:
        pytest.skip("only root is refused")
    srv = relay_factory({"RELAY_AGENT__ENABLED": "true", "RELAY_AGENT__PERMISSION_MODE": "bypassPermissions",
                         **AUTH}, start=False)
    with pytest.raises(RuntimeError) as e:
        srv.start()
    assert "agent.permission_mode bypassPermissions cannot run as root" in str(e.value)
    time.sleep(0)
    assert digest("x")


# -- containment: each agent conversation sees only its own folder ---------------------------------------

def bash_script(script):
    """MOCK:bash turns '_' into spaces: ship any script as base64 piped to bash."""
    import base64

    return f"MOCK:tool=Bash MOCK:bash=echo_{base64.b64encode(script.encode()).decode()}_|_base64_-d_|_bash"


@pytest.fixture(scope="module")
def boxed(relay_factory, tmp_path_factory):
    """An agent relay with its private Redis (a unix socket under var/), keys in its own config.json,
    and other conversations' secrets lying next to its folders."""
    d = tmp_path_factory.mktemp("boxed")
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": [{"name": "agent", "key": AGENT_KEY},
                                                 {"name": "boss", "key": "sk-boss-1", "admin": True}]}
    cfg["agent"] = {"enabled": True}
    path = d / "config.json"
    path.write_text(json.dumps(cfg))
    srv = relay_factory({"RELAY_CONFIG": str(path), "REDIS_URL": ""}, start=False)
    var = srv.tmp / "var"
    sibling = var / "agent" / ("b" * 24)
    sibling.mkdir(parents=True)
    (sibling / "secret.txt").write_text("secret-of-B\n")
    other = var / "agent-config" / ("c" * 24) / "projects" / "-conv-c"
    other.mkdir(parents=True)
    (other / "s.jsonl").write_text('{"t":"transcript-of-C"}\n')
    shared = srv.tmp / "claude-config" / "projects" / "-relay"
    shared.mkdir(parents=True)
    (shared / "s.jsonl").write_text('{"t":"transcript-of-relay"}\n')
    srv.start()
    srv.config_path = path
    srv.sibling = sibling
    return srv


def test_an_agent_conversation_cannot_reach_anything_but_its_own_folder(boxed, mock_api):
    var = boxed.tmp / "var"
    config_before = boxed.config_path.read_bytes()
    assert (var / "redis.sock").exists()  # the private Redis is really there
    probe = (f"echo own-ok > own.txt && cat own.txt; pwd\n"
             f"cat ../*/secret.txt {boxed.sibling}/secret.txt 2>&1\n"
             f"ls {boxed.tmp}/claude-config/projects 2>&1; ls {var}/agent-config | wc -l; "
             f"grep -rho 'transcript-of-[A-Za-z]*' {var}/agent-config {boxed.tmp}/claude-config 2>&1 | sort -u\n"
             "(env; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; echo; done) 2>/dev/null "
             "| grep -E 'KEY|TOKEN|sk-' | sort -u\n"
             f"python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('{var}/redis.sock'); "
             f"s.send(b'PING\\r\\n'); print(s.recv(64))\" 2>&1 | tail -1\n"
             f"echo pwned >> {boxed.config_path} && echo CONFIG-WRITTEN\n"
             "ls /root /home 2>&1; ls /\n"
             f"curl -sS -m 3 {mock_api.url}/v1/models 2>&1 | head -c 200\n")
    r = ask(boxed, "esc1 " + bash_script(probe))
    assert r.status_code == 200, r.text
    out = r.json()["choices"][0]["message"]["content"]
    assert out.startswith("Tool said: own-ok")                           # its own folder works
    assert "secret-of-B" not in out and "No such file" in out            # no sibling conversation
    assert "transcript-of-C" not in out and "transcript-of-relay" not in out  # no other transcripts
    assert "sk-ant-test" not in out and "sk-boss-1" not in out           # no credentials in any environ
    assert "sk-ant-sandbox-" in out                                      # only the run's placeholder
    assert "PONG" not in out                                             # no Redis
    assert "CONFIG-WRITTEN" not in out and boxed.config_path.read_bytes() == config_before
    assert "cannot access '/root'" in out and "cannot access '/home'" in out
    assert mock_api.url.split("//")[1] not in out or "Couldn't connect" in out or "Failed" in out
    workdir = next(d for d in (var / "agent").iterdir() if (d / "own.txt").exists())
    assert (workdir / "own.txt").read_text() == "own-ok\n"
    # the model calls themselves carried the real credential, added outside the sandbox
    assert {rec["headers"].get("x-api-key") or rec["headers"].get("X-Api-Key") for rec in mock_api.records("esc1")} \
        == {"sk-ant-test"}


def test_the_in_process_read_and_write_tools_are_contained_too(boxed):
    config_before = boxed.config_path.read_bytes()
    r = ask(boxed, f"esc2 MOCK:tool=Read MOCK:read={boxed.sibling}/secret.txt")
    assert r.status_code == 200 and "secret-of-B" not in r.json()["choices"][0]["message"]["content"]
    r = ask(boxed, f"esc3 MOCK:tool=Write MOCK:write={boxed.config_path}")
    assert r.status_code == 200
    assert boxed.config_path.read_bytes() == config_before


def test_tools_cannot_use_the_credential_proxy_beyond_messages(boxed):
    probe = ("curl -sS -m 5 --unix-socket /run/anthropic.sock http://localhost/v1/models; echo; "
             "curl -sS -m 5 --unix-socket /run/anthropic.sock -H 'x-api-key: guess' -d '{}' "
             "http://localhost/v1/messages; echo")
    r = ask(boxed, "esc4 " + bash_script(probe))
    assert r.status_code == 200, r.text
    out = r.json()["choices"][0]["message"]["content"]
    assert out.count("relay proxy:") == 2 and "sk-ant-test" not in out


def test_agent_mode_without_auth_is_refused_at_start(relay_factory):
    srv = relay_factory({"RELAY_AGENT__ENABLED": "true"}, start=False)
    with pytest.raises(RuntimeError) as e:
        srv.start()
    assert "agent.enabled needs auth.enabled" in str(e.value)
    out = subprocess.run([sys.executable, "-m", "relay", "check"], cwd=ROOT, env=srv.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "agent.enabled needs auth.enabled" in out.stderr


def test_agent_mode_without_bubblewrap_is_refused_at_start(relay_factory, tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH without bwrap
    bin_dir.mkdir()
    for tool in ("python3",):
        os.symlink(shutil.which(tool), bin_dir / tool)
    srv = relay_factory({"RELAY_AGENT__ENABLED": "true", **AUTH, "PATH": str(bin_dir)}, start=False)
    with pytest.raises(RuntimeError) as e:
        srv.start()
    assert "bubblewrap" in str(e.value) and "apt-get install bubblewrap" in str(e.value)


def test_forgetting_an_agent_conversation_removes_its_folders_transcripts_and_responses(boxed):
    import hashlib

    h = {"Authorization": f"Bearer {AGENT_KEY}", "X-Session-Id": "purge-me"}
    r = requests.post(boxed.url + "/v1/chat/completions", headers=h, timeout=90, json={
        "model": "s", "messages": [{"role": "user", "content": "purge1 " + bash_script("echo kept > kept.txt")}]})
    assert r.status_code == 200, r.text
    r = requests.post(boxed.url + "/v1/responses", headers=h, timeout=90, json={"model": "sonnet", "input": "purge2"})
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    scope = "agent~" + digest(AGENT_KEY)[:12]
    name = hashlib.sha256(f"{scope}\x00s:purge-me".encode()).hexdigest()[:24]
    work, state = boxed.tmp / "var" / "agent" / name, boxed.tmp / "var" / "agent-config" / name
    assert (work / "kept.txt").exists() and list(state.rglob("*.jsonl"))  # its folder and its transcripts
    r = requests.delete(boxed.url + "/v1/sessions/s:purge-me", headers={"Authorization": "Bearer sk-boss-1"},
                        params={"scope": scope, "purge_files": "true"})
    assert r.status_code == 200 and r.json()["files_removed"] >= 2
    assert not work.exists() and not state.exists()
    assert requests.get(boxed.url + "/v1/responses/" + rid, headers=h).status_code == 404
    assert boxed.sibling.exists()  # nobody else's folder


def test_client_functions_work_inside_the_sandbox(boxed, mock_api):
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}, "required": ["city"]}}}
    r = ask(boxed, "fn1 MOCK:tool=get_weather", tools=[weather])
    assert r.status_code == 200, r.text
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]  # served by the MCP server inside
    assert "mcp__client__get_weather" in [t["name"] for t in mock_api.bodies("fn1")[0]["tools"]]


# -- the credential proxy's limits, probed from inside a real agent run ---------------------------------

PROXY_PROBE = r'''
import json, os, socket, threading, time
KEY = os.environ["ANTHROPIC_API_KEY"]

def conn():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect("/run/anthropic.sock")
    return s

def status(s, raw=b""):
    try:
        s.sendall(raw)
    except OSError:
        pass
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    s.close()
    if not data:
        return "closed"
    code = data.split(b" ", 2)[1].decode()
    body = data.partition(b"\r\n\r\n")[2]
    try:
        err = json.loads(body).get("error") or {}
    except ValueError:
        err = {}
    return code + ":" + str(err.get("type", "ok"))

def req(path="/v1/messages", method="POST", model="claude-sonnet-5-5", key=KEY, body=None):
    data = body if body is not None else json.dumps({"model": model, "max_tokens": 5,
        "messages": [{"role": "user", "content": "proxyprobe"}]}).encode()
    return status(conn(), (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\n"
                           f"Content-Length: {len(data)}\r\n\r\n").encode() + data)

for p in ("/v1/messages/batches", "/v1/messages/batches/msgbatch_1/cancel", "/v1/messages_anything",
          "/v1/messages/../../v1/files", "/v1/messages/%2e%2e/%2e%2e/v1/files", "/v1/messages%2Fbatches"):
    print("path", p, req(p))
for m in ("GET", "PUT", "DELETE", "PATCH"):
    print("method", m, req(method=m))
print("model opus", req(model="claude-opus-4-1"))
print("model sonnet", req())
print("body big", req(body=b"{" + b" " * (2 * 1024 * 1024) + b"}"))
idle = [conn() for _ in range(4)]
time.sleep(0.5)
print("conn fifth", req(key="wrong"))
for s in idle:
    s.close()
for _ in range(100):
    if req(key="wrong") != "429:rate_limit_error":
        break
    time.sleep(0.1)
print("conn freed", req(key="wrong"))
print("read idle", status(conn()))
s = conn()
def trickle():
    try:
        for b in b"POST /v1/messages HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 200:
            s.send(bytes([b]))
            time.sleep(0.2)
    except OSError:
        pass
threading.Thread(target=trickle, daemon=True).start()
print("read slow", status(s))
'''


@pytest.fixture(scope="module")
def limited(relay_factory, tmp_path_factory):
    """An agent relay whose key may use only sonnet, with small credential-proxy caps."""
    d = tmp_path_factory.mktemp("limited")
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": [{"name": "agent", "key": AGENT_KEY, "models": ["sonnet"]}]}
    cfg["agent"] = {"enabled": True, "proxy_max_body_mb": 1, "proxy_max_connections": 4, "proxy_read_timeout_s": 5}
    path = d / "config.json"
    path.write_text(json.dumps(cfg))
    return relay_factory({"RELAY_CONFIG": str(path)})


def test_the_credential_proxy_refuses_everything_but_its_two_routes_within_its_limits(limited, mock_api):
    import base64

    script = f"echo {base64.b64encode(PROXY_PROBE.encode()).decode()} | base64 -d > /tmp/p.py && python3 /tmp/p.py"
    r = ask(limited, "cap1 " + bash_script(script))
    assert r.status_code == 200, r.text
    out = r.json()["choices"][0]["message"]["content"]
    lines = dict(line.rsplit(" ", 1) for line in out.removeprefix("Tool said: ").splitlines() if " " in line)
    assert sum(k.startswith("path ") for k in lines) == 6, out
    assert all(v == "404:not_found_error" for k, v in lines.items() if k.startswith("path ")), out
    assert all(v == "405:invalid_request_error" for k, v in lines.items() if k.startswith("method ")), out
    assert lines["model opus"] == "400:invalid_request_error" and lines["model sonnet"] == "200:ok", out
    assert lines["body big"] == "413:request_too_large", out
    assert lines["conn fifth"] == "429:rate_limit_error" and lines["conn freed"] == "403:permission_error", out
    assert lines["read idle"] == "408:invalid_request_error" and lines["read slow"] == "408:invalid_request_error", out
    # only the probe's one allowed call and the CLI's own requests reached the API, each with the real key
    assert len(mock_api.records("proxyprobe")) == 1
    paths = {rec["path"] for rec in mock_api.records("cap1")}
    assert paths == {"/v1/messages?beta=true"}


def test_an_agent_run_of_a_model_outside_the_keys_models_never_starts(limited):
    r = ask(limited, "cap2", model="opus")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"

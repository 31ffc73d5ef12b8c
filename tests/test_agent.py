"""Agent mode: the CLI's own tools only when an operator enables them; smart streaming; cancellation
kills the tools' processes too."""

import json
import os
import pwd
import socket
import subprocess
import time

import psutil
import pytest
import requests
from harness import ROOT, openai_client, wait_until

from relay.state.apikeys import digest


def ask(srv, text, key=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(srv.url + "/v1/chat/completions", headers=headers, timeout=90,
                         json={"model": "sonnet", "messages": [{"role": "user", "content": text}], **kw})


def test_agent_tools_are_off_by_default(relay, mock_api):
    r = ask(relay, "ag0 MOCK:tool=Bash")
    assert r.status_code == 200
    assert "hi-from-bash" not in r.json()["choices"][0]["message"]["content"]  # nothing ran
    assert [t["name"] for t in mock_api.bodies("ag0")[0]["tools"]] == []


@pytest.fixture(scope="module")
def agent_relay(relay_factory):
    return relay_factory({"RELAY_AGENT__ENABLED": "true", "RELAY_AGENT__INTERMEDIATE": "reasoning"})


def test_agent_mode_runs_a_real_bash_tool_and_answers_with_the_final_text(agent_relay, mock_api):
    r = ask(agent_relay, "ag1 MOCK:tool=Bash")
    msg = r.json()["choices"][0]["message"]
    assert msg["content"] == "Tool said: hi-from-bash"  # the real Bash output reached the model
    tools = [t["name"] for t in mock_api.bodies("ag1")[0]["tools"]]
    assert "Bash" in tools and "Write" in tools
    second = mock_api.bodies("ag1")[-1]["messages"][-1]["content"]
    assert any(b.get("type") == "tool_result" and "hi-from-bash" in json.dumps(b) for b in second)


def test_agent_smart_streaming_sends_steps_as_reasoning(agent_relay):
    with openai_client(agent_relay.url) as c:
        chunks = list(c.chat.completions.create(model="sonnet", stream=True,
                                                messages=[{"role": "user", "content": "ag2 MOCK:tool=Bash"}]))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    assert content == "Tool said: hi-from-bash"
    assert "[Bash]" in reasoning and "echo hi-from-bash" in reasoning


def test_each_conversation_gets_its_own_working_directory(agent_relay):
    for sid in ("agent-a", "agent-b"):
        requests.post(agent_relay.url + "/v1/chat/completions", headers={"X-Session-Id": sid}, timeout=90, json={
            "model": "s", "messages": [{"role": "user", "content": f"ag3 MOCK:tool=Bash MOCK:bash=touch_made-by-{sid}"}]})
    root = agent_relay.tmp / "var" / "agent"
    dirs = [d for d in root.iterdir() if any(d.glob("made-by-*"))]
    assert sorted(f.name for d in dirs for f in d.glob("made-by-*")) == ["made-by-agent-a", "made-by-agent-b"]
    assert len(dirs) == 2  # one private directory each


def test_cancelling_kills_the_tool_processes_too(agent_relay):
    s = socket.create_connection(("127.0.0.1", agent_relay.port))
    data = json.dumps({"model": "s", "stream": True, "messages": [
        {"role": "user", "content": "ag4 MOCK:tool=Bash MOCK:bash=python3_-c_\"import_time;time.sleep(47.5)\""}]}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
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
    assert ask(srv, "ag5 MOCK:tool=Bash", key="sk-dev-1").json()["choices"][0]["message"]["content"] == \
        "Tool said: hi-from-bash"
    assert "hi-from-bash" not in ask(srv, "ag6 MOCK:tool=Bash", key="sk-plain-1").json()["choices"][0]["message"]["content"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_agent_runs_as_a_non_root_user(relay_factory, tmp_path):
    user = "relayagent"
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", user], check=True)
    srv = relay_factory({"RELAY_AGENT__ENABLED": "true", "RELAY_AGENT__USER": user,
                         "RELAY_AGENT__PERMISSION_MODE": "bypassPermissions"}, start=False)
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
    srv = relay_factory({"RELAY_AGENT__ENABLED": "true", "RELAY_AGENT__PERMISSION_MODE": "bypassPermissions"},
                        start=False)
    with pytest.raises(RuntimeError) as e:
        srv.start()
    assert "agent.permission_mode bypassPermissions cannot run as root" in str(e.value)
    time.sleep(0)
    assert digest("x")

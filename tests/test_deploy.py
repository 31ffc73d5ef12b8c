"""Deployment: behind a real nginx, several hosts on one Redis, graceful shutdown on SIGTERM."""

import json
import shutil
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager

import psutil
import pytest
import requests
from harness import ROOT, anthropic_client, free_port, openai_client, wait_until
from mock_anthropic import all_text

from relay.core.prompt import HISTORY_INTRO


def cli_pids(srv):
    out = set()
    for w in srv.worker_pids():
        try:
            out |= {c.pid for c in psutil.Process(w).children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE}
        except psutil.Error:
            pass
    return out


def alive(pids):
    live = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.Error:
            pass
    return live


def stream_lines(url, text, out, headers=None):
    body = {"model": "sonnet", "stream": True, "messages": [{"role": "user", "content": text}]}
    try:
        with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=60, headers=headers) as r:
            for line in r.iter_lines():
                if line:
                    out.append((time.time(), line.decode()))
    except requests.RequestException as exc:
        out.append((time.time(), f"EXC {exc}"))


def test_sigterm_lets_running_streams_finish(relay_factory):
    srv = relay_factory()
    got = []
    t = threading.Thread(target=stream_lines, args=(srv.url, "graceful MOCK:slow=100 MOCK:words=25", got))
    t.start()
    assert wait_until(lambda: len(got) > 2, 15)
    pids = cli_pids(srv)
    assert pids
    srv.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert got[-1][1] == "data: [DONE]"  # the stream ran to its end
    srv.proc.wait(30)
    assert not alive(pids)


def test_sigterm_kills_streams_that_outlast_the_bound(relay_factory):
    srv = relay_factory({"RELAY_GRACEFUL_TIMEOUT_S": "2"})
    got = []
    t = threading.Thread(target=stream_lines, args=(srv.url, "outlast MOCK:slow=300 MOCK:words=80", got))
    t.start()
    assert wait_until(lambda: len(got) > 2, 15)
    pids = cli_pids(srv)
    start = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(30)
    t.join(10)
    assert time.time() - start < 25  # the streams were stopped, not waited out
    assert not any(line == "data: [DONE]" for _, line in got)
    assert wait_until(lambda: not alive(pids), 3)  # nothing left running


@pytest.fixture(scope="module")
def nginx_bin():
    found = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin:/sbin"))
    if not found:
        try:
            subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, timeout=300,
                           capture_output=True, env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
        except (OSError, subprocess.SubprocessError) as exc:
            try:
                subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300, capture_output=True)
                subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, timeout=300,
                               capture_output=True, env={"DEBIAN_FRONTEND": "noninteractive",
                                                         "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
            except (OSError, subprocess.SubprocessError):
                pytest.skip(f"nginx is not installed and could not be installed from Debian packages: {exc}")
        found = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin")
    if not found:
        pytest.skip("nginx is not available on this machine")
    return found


SERVER_LINE = "    server 127.0.0.1:3456 max_fails=3 fail_timeout=10s;\n"
HASH_LINE = "    hash $relay_affinity consistent;\n"


def nginx_conf(tmp, port, *upstream_ports, hashing=True):
    """deploy/nginx.conf with the test's ports (one upstream server line each), wrapped in a minimal
    main config; `hashing=False` drops the `hash` line, leaving nginx's round-robin."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    assert SERVER_LINE in site and HASH_LINE in site
    site = site.replace(SERVER_LINE, "".join(SERVER_LINE.replace("3456", str(p)) for p in upstream_ports))
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    if not hashing:
        site = site.replace(HASH_LINE, "")
    main = f"""
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    log_format affinity '$upstream_addr "$relay_affinity" $request_uri';
    access_log {tmp}/access.log affinity;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    {site}
}}"""
    path = tmp / ("nginx.conf" if hashing else "nginx-rr.conf")
    path.write_text(main)
    return path


@contextmanager
def nginx_in_front(nginx_bin, tmp, *upstream_ports, hashing=True):
    """A real nginx with the shipped site config in front of these relays; yields its base URL."""
    port = free_port()
    conf = nginx_conf(tmp, port, *upstream_ports, hashing=hashing)
    proc = subprocess.Popen([nginx_bin, "-c", str(conf), "-p", str(tmp)], stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: _up(f"http://127.0.0.1:{port}/health"), 10), proc.stderr
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_streams_arrive_chunk_by_chunk_through_nginx(relay, nginx_bin, tmp_path):
    port = free_port()
    conf = nginx_conf(tmp_path, port, relay.port)
    proc = subprocess.Popen([nginx_bin, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: _up(f"http://127.0.0.1:{port}/health"), 10), proc.stderr
        got = []
        stream_lines(f"http://127.0.0.1:{port}", "nginx MOCK:slow=250 MOCK:words=8", got)
        content = [t for t, line in got if '"content":"w' in line]
        assert len(content) == 8 and got[-1][1] == "data: [DONE]"
        assert content[-1] - content[0] > 1.2  # spread over time, not delivered all at the end
        r = requests.get(f"http://127.0.0.1:{port}/v1/models", headers={"X-Request-Id": "via-nginx-1"})
        assert r.headers["x-request-id"] == "via-nginx-1"
        rec = requests.get(f"http://127.0.0.1:{port}/v1/usage/recent?limit=1").json()["data"][0]
        assert rec["first_message"].startswith("nginx")
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_affinity_key_is_the_claude_code_session_then_x_session_id_then_the_api_key(relay, nginx_bin, tmp_path):
    cases = [  # headers -> the value nginx hashes on
        ({"X-Claude-Code-Session-Id": "cc-1", "X-Session-Id": "s-1", "Authorization": "Bearer k"}, "cc-1"),
        ({"X-Session-Id": "s-1", "Authorization": "Bearer k", "x-api-key": "ak"}, "s-1"),
        ({"Authorization": "Bearer k", "x-api-key": "ak"}, "Bearer k"),
        ({"x-api-key": "ak"}, "ak"),
        ({}, ""),
    ]
    with nginx_in_front(nginx_bin, tmp_path, relay.port) as url:
        for i, (headers, _) in enumerate(cases):
            requests.get(f"{url}/v1/models?case={i}", headers=headers, timeout=10)
        log = lambda: (tmp_path / "access.log").read_text()  # noqa: E731
        assert wait_until(lambda: f"case={len(cases) - 1}" in log(), 5)
    got = {line.rsplit("case=", 1)[1]: line.split('"')[1] for line in log().splitlines() if "case=" in line}
    assert got == {str(i): want for i, (_, want) in enumerate(cases)}


def _up(url):
    try:
        return requests.get(url, timeout=1).status_code in (200, 503)
    except requests.RequestException:
        return False


def test_several_hosts_share_redis_and_conversations_move_between_them(relay_factory, redis_server, mock_api):
    db = redis_server.fresh_db()
    env = {"RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE": "5"}
    a = relay_factory(dict(env, RELAY_HOST_ID="host-a"), redis_url=db)
    b = relay_factory(dict(env, RELAY_HOST_ID="host-b"), redis_url=db)
    sid = {"X-Session-Id": "roaming-1"}
    with openai_client(a.url) as ca, openai_client(b.url) as cb:
        first = ca.chat.completions.create(model="sonnet", extra_headers=sid,
                                           messages=[{"role": "user", "content": "MH1 remember PLUM"}])
        answer = first.choices[0].message.content
        r = cb.chat.completions.create(model="sonnet", extra_headers=sid, messages=[
            {"role": "user", "content": "MH1 remember PLUM"}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "MH2 which fruit?"}])
    assert r.choices[0].message.content.endswith("MH2 which fruit?")  # never an error
    body = mock_api.bodies("MH2 which fruit?")[-1]
    assert "MH1 remember PLUM" in json.dumps(body)  # host B replayed the full history
    conv = next(c for c in requests.get(a.url + "/v1/sessions").json()["data"] if c["id"] == "s:roaming-1")
    assert conv["host"] == "host-b"
    # limits and stats are global: 2 requests made so far, 3 more allowed on either host
    bad = {"model": "s", "messages": []}
    codes = [requests.post(h.url + "/v1/chat/completions", json=bad).status_code for h in (a, b, a, b)]
    assert codes == [400, 400, 400, 429]
    assert requests.get(b.url + "/v1/usage").json()["total"]["requests"] == requests.get(
        a.url + "/v1/usage").json()["total"]["requests"] >= 4


# -- several hosts behind one nginx: a conversation comes back to the host that holds its warm process --

POOL_ON = {"RELAY_POOL__ENABLED": "true"}


@pytest.fixture(scope="module")
def two_hosts(relay_factory, redis_server):
    """Two relay hosts (2 gevent workers and a warm pool each) on one Redis, as host-a and host-b."""
    db = redis_server.fresh_db()
    hosts = {name: relay_factory(dict(POOL_ON, RELAY_HOST_ID=name), redis_url=db) for name in ("host-a", "host-b")}
    for srv in hosts.values():
        assert wait_until(lambda s=srv: _pool(s)["spares"]["ready"] >= 1, 60, 0.2)
    return hosts


def _pool(srv):
    return requests.get(srv.url + "/stats", timeout=10).json()["pool"]


def _last_record(hosts):
    """The newest request record (statistics are shared: any host answers) and the host whose worker
    served it."""
    rec = requests.get(next(iter(hosts.values())).url + "/v1/usage/recent?limit=1", timeout=10).json()["data"][0]
    served = [name for name, srv in hosts.items() if rec["worker"] in srv.worker_pids()]
    assert len(served) == 1, (rec, served)
    return served[0], rec["pool"]


def _warm_hits(hosts):
    return {name: _pool(srv)["hits"].get("warm", 0) for name, srv in hosts.items()}


@pytest.mark.slow
def test_a_named_chat_conversation_keeps_its_host_and_its_warm_process(two_hosts, nginx_bin, tmp_path, mock_api):
    tag = uuid.uuid4().hex[:6]
    hits_before = _warm_hits(two_hosts)
    turns, msgs = [], []
    with nginx_in_front(nginx_bin, tmp_path, *(s.port for s in two_hosts.values())) as url:
        for i in range(4):
            msgs.append({"role": "user", "content": f"NA{i}-{tag} question {i}"})
            # a new connection and another API key each turn: only X-Session-Id can keep it on one host
            with openai_client(url, api_key=f"sk-turn-{i}-{tag}") as c:
                r = c.chat.completions.create(model="sonnet", messages=msgs, extra_headers={"X-Session-Id": f"na-{tag}"})
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})
            turns.append(_last_record(two_hosts))
    hosts = {h for h, _ in turns}
    assert len(hosts) == 1, turns
    assert [how for _, how in turns[1:]] == ["warm", "warm", "warm"], turns  # the first: a spare, or cold
    host = hosts.pop()
    hits = _warm_hits(two_hosts)
    assert hits[host] - hits_before[host] == 3 and all(hits[h] == hits_before[h] for h in hits if h != host), hits
    last = mock_api.bodies(f"NA3-{tag}")[-1]
    assert HISTORY_INTRO.strip() not in all_text(last)  # the warm process had the history: nothing replayed
    print(f"chat turns (host, pool): {turns}")


@pytest.mark.slow
def test_a_claude_code_session_keeps_its_host(two_hosts, nginx_bin, tmp_path, mock_api):
    session, tag = str(uuid.uuid4()), uuid.uuid4().hex[:6]
    user_id = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})
    system = "You are an agent working with the user toward their goals. (test prompt)"
    turns, msgs = [], []
    with nginx_in_front(nginx_bin, tmp_path, *(s.port for s in two_hosts.values())) as url:
        for i in range(4):
            msgs.append({"role": "user", "content": f"CA{i}-{tag} step {i}"})
            with anthropic_client(url, api_key=f"sk-cc-{i}-{tag}") as c:  # x-api-key changes: the session counts
                r = c.messages.create(model="sonnet", max_tokens=64, system=system, messages=msgs,
                                      metadata={"user_id": user_id}, extra_headers={"X-Claude-Code-Session-Id": session})
            msgs.append({"role": "assistant", "content": r.content[0].text})
            turns.append(_last_record(two_hosts))
    assert len({h for h, _ in turns}) == 1, turns
    assert all(how == "warm" for _, how in turns[1:]), turns
    last = mock_api.bodies(f"CA3-{tag}")[-1]
    assert HISTORY_INTRO.strip() not in all_text(last)
    print(f"Claude Code turns (host, pool): {turns}")


@pytest.mark.slow
def test_without_hashing_a_conversation_moves_between_hosts_and_keeps_its_history(two_hosts, nginx_bin, tmp_path,
                                                                                mock_api):
    tag = uuid.uuid4().hex[:6]
    turns, msgs = [], []
    with nginx_in_front(nginx_bin, tmp_path, *(s.port for s in two_hosts.values()), hashing=False) as url:
        for i in range(4):
            msgs.append({"role": "user", "content": f"RR{i}-{tag} question {i}"})
            with openai_client(url) as c:
                r = c.chat.completions.create(model="sonnet", messages=msgs, extra_headers={"X-Session-Id": f"rr-{tag}"})
            answer = r.choices[0].message.content
            assert answer.endswith(f"RR{i}-{tag} question {i}")  # never an error
            msgs.append({"role": "assistant", "content": answer})
            turns.append(_last_record(two_hosts))
    print(f"round-robin turns (host, pool): {turns}")
    assert all(a != b for (a, _), (b, _) in zip(turns, turns[1:])), turns  # round-robin moved every turn
    last = mock_api.bodies(f"RR3-{tag}")[-1]
    text = all_text(last)
    said = [m["content"] for m in msgs[:-1]]  # every earlier turn, user and assistant, then the new question
    at = [text.find(t) for t in said]
    assert -1 not in at and at == sorted(at), at
    assert HISTORY_INTRO.strip() not in text  # the host without the CLI session wrote it from the history
    assert "Primary working directory" not in text  # ... and told the model nothing about itself
    turns_seen = [m for m in last["messages"] if m["role"] in ("user", "assistant")]
    assert [m["role"] for m in turns_seen] == ["user", "assistant"] * 3 + ["user"]
    assert [t in all_text({"messages": [m]}) for t, m in zip(said, turns_seen)] == [True] * 7

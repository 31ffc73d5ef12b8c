"""Security (issue 9): no drive-by use from a browser, slow clients bounded, stored data bounded and
scoped to the key that made it, private files, forget means forget, no host details to the model."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import redis
import requests
from harness import ROOT, relay_keys, wait_until

from relay.api.hooks import client_address, host_allowed
from relay.state.apikeys import digest

ALICE, BOB, BOSS = "sk-sec-alice-1", "sk-sec-bob-1", "sk-sec-boss-1"


def chat(srv, text, key=None, session=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if session:
        headers["X-Session-Id"] = session
    return requests.post(srv.url + "/v1/chat/completions", headers=headers, timeout=90,
                         json={"model": "sonnet", "messages": [{"role": "user", "content": text}], **kw})


def write_config(path, keys, **extra):
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": keys}
    cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="module")
def team(relay_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec-team")
    path = write_config(tmp / "config.json", [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB},
                                              {"name": "boss", "key": BOSS, "admin": True}])
    srv = relay_factory({"RELAY_CONFIG": str(path)})
    srv.config_path = path
    return srv


def scope_of(name, key):
    return f"{name}~{digest(key)[:12]}"


# -- 1. CSRF and DNS rebinding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type, data", [
    ("text/plain", '{"model":"sonnet","messages":[{"role":"user","content":"csrf1"}]}'),
    ("application/x-www-form-urlencoded", "model=sonnet&messages=csrf1"),
    ("multipart/form-data; boundary=x", "--x\r\nContent-Disposition: form-data; name=a\r\n\r\ncsrf1\r\n--x--\r\n"),
    (None, '{"model":"sonnet","messages":[{"role":"user","content":"csrf1"}]}'),
])
def test_a_body_that_is_not_json_is_refused_before_anything_runs(relay, mock_api, content_type, data):
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/v1/responses"):
        r = requests.post(relay.url + path, data=data.encode(), headers=headers, timeout=30)
        assert r.status_code == 415
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["code"] == "unsupported_media_type"
    assert mock_api.bodies("csrf1") == []


def test_json_with_a_charset_is_still_json(relay):
    r = requests.post(relay.url + "/v1/chat/completions", timeout=60,
                      headers={"Content-Type": "application/json; charset=utf-8"},
                      data=json.dumps({"model": "sonnet", "messages": [{"role": "user", "content": "csrf2"}]}))
    assert r.status_code == 200


def test_a_foreign_host_name_is_refused_on_every_route(relay):
    for method, path in (("GET", "/v1/usage/recent"), ("GET", "/v1/sessions"), ("GET", "/stats"),
                         ("DELETE", "/v1/sessions"), ("GET", "/v1/models"), ("GET", "/health")):
        r = requests.request(method, relay.url + path, headers={"Host": "rebind.attacker.example"}, timeout=30)
        assert r.status_code == 403, path
        assert r.json()["error"]["code"] == "host_not_allowed"
    for host in ("localhost", f"localhost:{relay.port}", "127.0.0.1:1", "[::1]", "[::1]:8080", "LOCALHOST."):
        assert requests.get(relay.url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host


def test_configured_host_names_are_accepted(relay_factory):
    srv = relay_factory({"RELAY_ALLOWED_HOSTS": '["relay.example.com"]'})
    assert requests.get(srv.url + "/v1/models", headers={"Host": "relay.example.com:443"}).status_code == 200
    assert requests.get(srv.url + "/v1/models", headers={"Host": "localhost"}).status_code == 200
    assert requests.get(srv.url + "/v1/models", headers={"Host": "evil.example.com"}).status_code == 403


def test_host_names_are_parsed_strictly():
    allowed = {"localhost", "127.0.0.1", "[::1]", "relay.example.com"}
    assert host_allowed("relay.example.com:8443", allowed)
    assert not host_allowed("relay.example.com.evil.example", allowed)
    assert not host_allowed("[::2]:80", allowed)
    assert not host_allowed("localhost:80:80", allowed)
    assert host_allowed("anything", {"*"})


# -- 3. slow clients ----------------------------------------------------------------------------------------------

class Trickler:
    """Ten connections that each send a request a few bytes at a time, forever."""

    def __init__(self, port, head, piece, every=1.0, n=10):
        self.stop = threading.Event()
        self.socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head)
            self.socks.append(s)
        self.piece, self.every = piece, every
        self.answers = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        live = list(self.socks)
        while live and not self.stop.wait(self.every):
            for s in list(live):
                try:
                    s.sendall(self.piece)
                except OSError:
                    self._collect(s)
                    live.remove(s)

    def _collect(self, s):
        try:
            s.settimeout(1)
            self.answers.append(s.recv(65536))
        except OSError:
            pass

    def closed_by_server(self):
        """How many of the connections the relay has closed (EOF or reset)."""
        n = 0
        for s in self.socks:
            s.settimeout(10)
            try:
                while s.recv(65536):  # an answer (e.g. the 401) may come first
                    pass
                n += 1
            except TimeoutError:
                pass
            except OSError:
                n += 1
        return n

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def health_while(srv, trickler):
    t0 = time.monotonic()
    try:
        r = requests.get(srv.url + "/health", timeout=30)
        elapsed = time.monotonic() - t0
        closed = trickler.closed_by_server()
    finally:
        trickler.close()
    print(f"/health answered in {elapsed:.1f} s with 10 slow connections holding the worker")
    assert closed == 10  # the relay hung up on every slow client
    return r


@pytest.mark.slow
def test_slow_headers_do_not_stop_a_one_worker_relay(relay_factory):
    srv = relay_factory({"RELAY_WORKERS": "1", "RELAY_WORKER_CONNECTIONS": "10",
                         "RELAY_CLIENT_HEADER_TIMEOUT_S": "3"})
    t = Trickler(srv.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n", b"X-Slow: 1\r\n")
    time.sleep(1)  # all ten are in
    assert health_while(srv, t).status_code == 200


@pytest.mark.slow
def test_slow_bodies_do_not_stop_an_auth_relay(relay_factory, tmp_path):
    path = write_config(tmp_path / "config.json", [{"name": "alice", "key": ALICE}])
    srv = relay_factory({"RELAY_CONFIG": str(path), "RELAY_WORKERS": "1", "RELAY_WORKER_CONNECTIONS": "10",
                         "RELAY_CLIENT_HEADER_TIMEOUT_S": "3", "RELAY_CLIENT_BODY_TIMEOUT_S": "3"})
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{")
    t = Trickler(srv.port, head, b" ")  # no key: refused at once, then the body is drained slowly
    time.sleep(1)
    assert health_while(srv, t).status_code == 200
    # with a key, the app reads the body itself: a slow one gets a 408 in the OpenAI shape
    t = Trickler(srv.port, head.replace(b"Host:", b"Authorization: Bearer " + ALICE.encode() + b"\r\nHost:"), b" ",
                 n=1)
    assert wait_until(lambda: t.answers, 20)
    t.close()
    status, _, rest = t.answers[0].partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408")
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_nginx_buffers_request_bodies():
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    directives = [line.split("#")[0].strip() for line in conf.splitlines()]
    assert "proxy_request_buffering off;" not in directives
    assert any(d.startswith("client_body_timeout") for d in directives)


# -- 4. stored Responses bounded --------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata, problem", [
    ({f"k{i}": "v" for i in range(17)}, "16 pairs"),
    ({"k" * 65: "v"}, "64 characters"),
    ({"k": "v" * 513}, "512 characters"),
    ({"k": 5}, "strings"),
])
def test_metadata_beyond_openai_limits_is_a_400(relay, mock_api, metadata, problem):
    for path, body in (("/v1/responses", {"model": "sonnet", "input": "meta1", "metadata": metadata}),
                       ("/v1/chat/completions", {"model": "sonnet", "metadata": metadata,
                                                 "messages": [{"role": "user", "content": "meta1"}]})):
        r = requests.post(relay.url + path, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
        assert problem in r.json()["error"]["message"]
    assert mock_api.bodies("meta1") == []


def test_metadata_within_the_limits_is_stored(relay):
    meta = {f"k{i}": "v" * 512 for i in range(16)}
    r = requests.post(relay.url + "/v1/responses", json={"model": "sonnet", "input": "meta2", "metadata": meta},
                      timeout=60)
    assert r.status_code == 200 and r.json()["metadata"] == meta
    assert requests.get(relay.url + "/v1/responses/" + r.json()["id"]).json()["metadata"] == meta


def test_a_stored_response_over_the_cap_is_answered_but_not_kept(relay_factory):
    srv = relay_factory({"RELAY_RESPONSES__MAX_STORED_KB": "4"})
    r = requests.post(srv.url + "/v1/responses", json={"model": "sonnet", "input": "big1 " + "x" * 8000}, timeout=60)
    assert r.status_code == 200 and r.json()["store"] is False
    assert requests.get(srv.url + "/v1/responses/" + r.json()["id"]).status_code == 404
    small = requests.post(srv.url + "/v1/responses", json={"model": "sonnet", "input": "small1"}, timeout=60)
    assert requests.get(srv.url + "/v1/responses/" + small.json()["id"]).status_code == 200


@pytest.fixture(scope="module")
def private_redis_relay(relay_factory):
    """A relay on its own private Redis (as `make run` starts it), keys in a 0600 config file."""
    srv = relay_factory({"REDIS_URL": "", "RELAY_REDIS_MAXMEMORY_MB": "64"}, start=False)
    path = write_config(srv.tmp / "config.json", [{"name": "boss", "key": BOSS, "admin": True}])
    os.chmod(path, 0o600)
    srv.env["RELAY_CONFIG"] = str(path)
    srv.config_path = path
    return srv.start()


def test_the_private_redis_has_a_memory_limit(private_redis_relay):
    r = redis.Redis(unix_socket_path=str(private_redis_relay.tmp / "var" / "redis.sock"), decode_responses=True)
    assert r.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


# -- 5. X-Forwarded-For -------------------------------------------------------------------------------------------

def test_forwarded_for_is_walked_from_the_right():
    import ipaddress

    trusted = [ipaddress.ip_network("127.0.0.1/32")]
    spoofed = ", ".join(f"10.0.0.{i}" for i in range(40))
    assert client_address("127.0.0.1", spoofed + ", 203.0.113.9", trusted) == "203.0.113.9"
    assert client_address("127.0.0.1", spoofed + ", 203.0.113.9, 127.0.0.1", trusted) == "203.0.113.9"
    assert client_address("198.51.100.1", "203.0.113.9", trusted) == "198.51.100.1"  # untrusted peer


def test_spoofed_hops_do_not_escape_the_per_ip_limit(relay_factory):
    srv = relay_factory({"RELAY_RATE_LIMIT__MAX_REQUESTS_PER_MINUTE_PER_IP": "2"})
    statuses = []
    for n in range(3):  # each time 40 fresh fake hops before the one our proxy (127.0.0.1) appended
        hops = ", ".join(f"10.{n}.0.{i}" for i in range(40)) + ", 203.0.113.7"
        statuses.append(requests.post(srv.url + "/v1/chat/completions", json={}, timeout=30,
                                      headers={"X-Forwarded-For": hops}).status_code)
    assert statuses == [400, 400, 429]


# -- 6. a re-issued key name inherits nothing -----------------------------------------------------------------

def test_a_reissued_key_name_sees_none_of_the_old_holders_data(relay_factory, tmp_path, mock_api):
    path = tmp_path / "config.json"
    write_config(path, [{"name": "boss", "key": BOSS, "admin": True}])
    srv = relay_factory({"RELAY_CONFIG": str(path)})
    env = dict(srv.env, RELAY_CONFIG=str(path))

    def keys(*args):
        return relay_keys(env, *args)
    old = keys("add", "carol")
    assert wait_until(lambda: chat(srv, "ping", key=old).status_code == 200, 10)
    first = [{"role": "user", "content": "reissue1 carol-private-words"}]
    r = requests.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {old}",
                      "X-Session-Id": "carol-conv"}, json={"model": "sonnet", "messages": first}, timeout=60)
    assert r.status_code == 200
    stored = requests.post(srv.url + "/v1/responses", headers={"Authorization": f"Bearer {old}"},
                           json={"model": "sonnet", "input": "reissue2"}, timeout=60).json()["id"]
    keys("revoke", "carol")
    new = keys("add", "carol")
    assert wait_until(lambda: chat(srv, "ping2", key=new).status_code == 200, 10)
    h = {"Authorization": f"Bearer {new}"}
    recent = requests.get(srv.url + "/v1/usage/recent?limit=1000", headers=h).json()["data"]
    assert recent and not any("carol-private-words" in (x.get("first_message") or "") for x in recent)
    assert requests.get(srv.url + "/v1/usage", headers=h).json()["total"]["requests"] == 1  # only ping2
    assert requests.get(srv.url + "/v1/responses/" + stored, headers=h).status_code == 404
    r = requests.post(srv.url + "/v1/responses", headers=h, timeout=60,
                      json={"model": "sonnet", "input": "x", "previous_response_id": stored})
    assert r.status_code == 404
    follow = first + [{"role": "assistant", "content": "Hello from mock. You said: reissue1 carol-private-words"},
                      {"role": "user", "content": "reissue3"}]
    r = requests.post(srv.url + "/v1/chat/completions", headers={**h, "X-Session-Id": "carol-conv"}, timeout=60,
                      json={"model": "sonnet", "messages": follow})
    assert r.status_code == 200
    listing = requests.get(srv.url + "/v1/sessions", headers={"Authorization": f"Bearer {BOSS}"}).json()
    convs = [c for c in listing["data"] if c["id"] == "s:carol-conv"]
    assert len(convs) == 2 and {c["turns"] for c in convs} == {1}  # a new conversation, not the old one resumed


# -- 7. private files -----------------------------------------------------------------------------------------------

def test_keys_add_keeps_the_config_file_private(private_redis_relay):
    env = dict(private_redis_relay.env, RELAY_CONFIG=str(private_redis_relay.config_path))
    out = subprocess.run([sys.executable, "-m", "relay", "keys", "add", "dave"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(private_redis_relay.config_path.stat().st_mode) == 0o600


def test_the_private_redis_writes_only_private_files(private_redis_relay):
    requests.post(private_redis_relay.url + "/v1/responses", headers={"Authorization": f"Bearer {BOSS}"},
                  json={"model": "sonnet", "input": "aof1 stored text"}, timeout=60)
    var = private_redis_relay.tmp / "var"
    r = redis.Redis(unix_socket_path=str(var / "redis.sock"))
    r.bgsave()
    assert wait_until(lambda: (var / "relay.rdb").exists(), 10)
    written = [p for p in var.rglob("*") if p.name.startswith(("relay.", "appendonly")) or p.parent.name ==
               "appendonlydir"]
    assert any("aof" in p.name for p in written)
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))


# -- 8. forget means all of it, scoped ------------------------------------------------------------------------------

def test_deleting_a_conversation_id_touches_only_one_scope(team):
    for key in (ALICE, BOB):
        assert chat(team, "scope1", key=key, session="shared-id").status_code == 200
    boss = {"Authorization": f"Bearer {BOSS}"}
    r = requests.delete(team.url + "/v1/sessions/s:shared-id", params={"scope": scope_of("alice", ALICE)}, headers=boss)
    assert r.status_code == 200
    left = [c["scope"] for c in requests.get(team.url + "/v1/sessions", headers=boss).json()["data"]
            if c["id"] == "s:shared-id"]
    assert left == [scope_of("bob", BOB)]
    # without ?scope= an admin deletes in its own scope only
    assert requests.delete(team.url + "/v1/sessions/s:shared-id", headers=boss).status_code == 404


def test_forgetting_a_conversation_forgets_its_stored_responses(team):
    h = {"Authorization": f"Bearer {ALICE}", "X-Session-Id": "forget-me"}
    rid = requests.post(team.url + "/v1/responses", headers=h, json={"model": "sonnet", "input": "forget1"},
                        timeout=60).json()["id"]
    assert requests.get(team.url + "/v1/responses/" + rid, headers=h).status_code == 200
    r = requests.delete(team.url + "/v1/sessions/s:forget-me", params={"scope": scope_of("alice", ALICE)},
                        headers={"Authorization": f"Bearer {BOSS}"})
    assert r.status_code == 200
    assert requests.get(team.url + "/v1/responses/" + rid, headers=h).status_code == 404


# -- 10. lone surrogates --------------------------------------------------------------------------------------------

def test_a_lone_surrogate_is_a_400_and_a_pair_is_fine(relay):
    raw = '{"model":"sonnet","messages":[{"role":"user","content":"sur1 \\ud800"}]}'
    r = requests.post(relay.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_unicode"
    r = requests.post(relay.url + "/v1/responses", data='{"model":"sonnet","input":"\\udc00 x"}',
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    raw = '{"model":"sonnet","messages":[{"role":"user","content":"sur2 \\ud83d\\ude00"}]}'
    r = requests.post(relay.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == 200 and "\U0001F600" in r.json()["choices"][0]["message"]["content"]
    assert "Traceback" not in relay.log()


# -- 11. host details ---------------------------------------------------------------------------------------------

def test_the_model_never_sees_the_relays_git_checkout(relay_factory, tmp_path, mock_api):
    repo = tmp_path / "checkout"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=Relay Owner", "-c", "user.email=owner@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "secret-branch-zz", str(repo)], check=True)
    (repo / "README").write_text("x\n")
    subprocess.run(git + ["add", "README"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "secret-commit-message-zz"], check=True)
    srv = relay_factory({"RELAY_VAR_DIR": str(repo / "var"), "RELAY_SYSTEM_PROMPT_MODE": "append"})
    assert chat(srv, "git1 hello").status_code == 200
    sent = json.dumps(mock_api.bodies("git1"))
    assert "secret-commit-message-zz" not in sent and "secret-branch-zz" not in sent and str(repo) not in sent


def test_health_shows_paths_and_host_only_to_operators(team, relay):
    bare = requests.get(team.url + "/health").json()
    text = json.dumps(bare)
    assert bare["status"] == "ok" and "host" not in bare and "/" not in text and socket.gethostname() not in text
    admin = requests.get(team.url + "/health", headers={"Authorization": f"Bearer {BOSS}"}).json()
    assert admin["host"] and admin["cli"]["path"]
    assert "host" not in requests.get(team.url + "/health", headers={"Authorization": f"Bearer {ALICE}"}).json()
    # auth off: the machine itself sees details, a client behind the proxy does not
    assert requests.get(relay.url + "/health").json()["cli"]["path"]
    remote = requests.get(relay.url + "/health", headers={"X-Forwarded-For": "203.0.113.5"}).json()
    assert "host" not in remote and "path" not in remote["cli"]

"""Issue 20: a client that stops reading, idle keep-alive connections, the admin data without auth, a key's
own page after a re-issue, purging superseded transcripts, count_tokens bounded."""

import json
import socket
import threading

import anthropic
import psutil
import pytest
import requests
from harness import ROOT, anthropic_client, relay_keys, wait_until

ALICE, BOB, BOSS = "sk-slow-alice-1", "sk-slow-bob-1", "sk-slow-boss-1"


def write_config(path, keys, **extra):
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": keys}
    cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def stalled_stream(port, text, session):
    """A streamed chat whose client reads its first bytes two at a time, then stops reading."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    body = json.dumps({"model": "sonnet", "stream": True, "messages": [{"role": "user", "content": text}]}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"X-Session-Id: " + session.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    s.settimeout(120)
    got = b""
    while b"data:" not in got:
        got += s.recv(2)
    assert got.startswith(b"HTTP/1.1 200")
    return s


def recent(srv, n=50):
    return requests.get(srv.url + f"/v1/usage/recent?limit={n}", timeout=30).json()["data"]


# -- 3. a client that stops reading ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("limit, pool", [("total", "false"), ("send", "false"), ("total", "true")])
def test_a_client_that_stops_reading_frees_its_slot_lock_and_cli(relay_factory, mock_api, limit, pool):
    """Its writes block (the answer is bigger than every buffer): past total_timeout_s (or a write's
    client_send_timeout_s) the relay drops it, kills the CLI and releases the run slot and the lock."""
    total, send = ("20", "600") if limit == "total" else ("900", "3")
    srv = relay_factory({"RELAY_TOTAL_TIMEOUT_S": total, "RELAY_CLIENT_SEND_TIMEOUT_S": send,
                         "RELAY_MAX_CONCURRENT_RUNS": "1", "RELAY_QUEUE_TIMEOUT_S": "120",
                         "RELAY_SESSIONS__LOCK_WAIT_S": "120", "RELAY_POOL__ENABLED": pool})
    marker = f"stall-{limit}-{pool}"
    # 200 deltas of 50 KB (10 MB), one every 20 ms: the answer outgrows the socket buffers within a second
    s = stalled_stream(srv.port, f"{marker} MOCK:words=200 MOCK:wide=50000 MOCK:slow=20", f"conv-{marker}")
    try:
        cli = None
        if pool == "false":  # each run's CLI is a child of its worker (with the pool: of the pool server)
            assert wait_until(lambda: len(srv.cli_pids()) == 1, 60)
            cli = psutil.Process(srv.cli_pids()[0])
        else:
            assert wait_until(lambda: mock_api.bodies(f"{marker} MOCK"), 60)
        answers: dict[str, requests.Response] = {}

        def ask(name, session=None):
            headers = {"X-Session-Id": session} if session else {}
            answers[name] = requests.post(srv.url + "/v1/chat/completions", headers=headers, timeout=300, json={
                "model": "sonnet", "messages": [{"role": "user", "content": f"{marker} {name}"}]})
        # another conversation waits for the only run slot, a follow-up in the same one for its lock
        threads = [threading.Thread(target=ask, args=("other",)),
                   threading.Thread(target=ask, args=("same", f"conv-{marker}"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert answers["other"].status_code == 200, answers["other"].text
        assert answers["same"].status_code == 200, answers["same"].text
        assert cli is None or wait_until(lambda: not cli.is_running() or cli.status() == psutil.STATUS_ZOMBIE, 30)
        rec = next(r for r in recent(srv) if (r.get("first_message") or "").startswith(f"{marker} MOCK"))
        assert (rec["status"], rec["error"]) == (499, "client_stalled")
        # the relay hung up: what the buffers held, then EOF, never the end of the answer
        tail = b""
        while chunk := s.recv(1 << 20):
            tail = (tail + chunk)[-4096:]
        assert b"[DONE]" not in tail
    finally:
        s.close()


@pytest.mark.slow
def test_idle_keep_alive_connections_are_closed_after_the_header_timeout(relay_factory):
    srv = relay_factory({"RELAY_WORKERS": "1", "RELAY_WORKER_CONNECTIONS": "4",
                         "RELAY_CLIENT_HEADER_TIMEOUT_S": "3"})
    socks = []
    for _ in range(4):  # every connection of the only worker, each idle after one keep-alive request
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.settimeout(60)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        socks.append(s)
    try:
        assert requests.get(srv.url + "/health", timeout=40).status_code == 200  # a connection came free
        for s in socks:  # each was closed by the relay (gunicorn's own keep-alive was 75 s)
            rest = b""
            while chunk := s.recv(65536):
                rest += chunk
            assert b"HTTP/1.1" not in rest.split(b"\r\n\r\n", 1)[-1]
    finally:
        for s in socks:
            s.close()


# -- 6. the admin data without auth ------------------------------------------------------------------------------

ADMIN_DATA = [("GET", "/stats"), ("GET", "/v1/accounts"), ("GET", "/v1/sessions"),
              ("DELETE", "/v1/sessions"), ("DELETE", "/v1/sessions/no-such-conv"), ("GET", "/v1/usage/recent"),
              ("GET", "/v1/usage"), ("GET", "/metrics"), ("GET", "/dashboard/data")]


def test_without_auth_the_admin_data_answers_only_this_machine(relay):
    remote = {"X-Forwarded-For": "203.0.113.9"}  # from our trusted proxy (127.0.0.1): the real client is remote
    for method, path in ADMIN_DATA:
        r = requests.request(method, relay.url + path, headers=remote, timeout=30)
        assert r.status_code == 403, (method, path, r.status_code)
        assert r.json()["error"]["code"] == "admin_required", (method, path)
    for method, path in ADMIN_DATA:
        if (method, path) == ("DELETE", "/v1/sessions"):
            continue  # the shared relay's conversations stay
        r = requests.request(method, relay.url + path, headers={"X-Forwarded-For": "127.0.0.1"}, timeout=30)
        assert r.status_code == (404 if method == "DELETE" else 200), (method, path, r.text)
    # completions still answer remote clients (auth off is a choice), and /health without details
    r = requests.post(relay.url + "/v1/chat/completions", headers=remote, timeout=90,
                      json={"model": "sonnet", "messages": [{"role": "user", "content": "admin6 remote"}]})
    assert r.status_code == 200
    assert "host" not in requests.get(relay.url + "/health", headers=remote, timeout=30).json()


# -- 8. a key's own page after a re-issue -------------------------------------------------------------------------

def test_me_after_a_reissued_key_name_shows_nothing_of_the_old_key(relay_factory, tmp_path):
    path = write_config(tmp_path / "config.json", [{"name": "boss", "key": BOSS, "admin": True}])
    srv = relay_factory({"RELAY_CONFIG": str(path)})
    env = dict(srv.env, RELAY_CONFIG=str(path))

    def keys(*args):
        return relay_keys(env, *args)

    def chat(key, text):
        return requests.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "sonnet", "messages": [{"role": "user", "content": text}]}, timeout=90)

    def me(key):  # a worker learns a key added on the command line within a moment
        got = []
        assert wait_until(lambda: got.append(requests.get(srv.url + "/me/data", timeout=30, headers={
            "Authorization": f"Bearer {key}"})) or got[-1].status_code == 200, 20)
        return got[-1].json()

    old = keys("add", "carol")
    assert wait_until(lambda: chat(old, "me8 old one").status_code == 200, 20)
    assert chat(old, "me8 old two").status_code == 200
    before = me(old)
    assert before["today"]["tokens_used"] > 0 and " · carol: " in before["charts"][0]["svg"]
    keys("revoke", "carol")
    new = keys("add", "carol")
    fresh = me(new)
    assert fresh["today"]["tokens_used"] == 0 and fresh["usage"]["total"]["requests"] == 0
    assert fresh["recent"] == []
    assert all(" · carol: " not in c["svg"] for c in fresh["charts"])  # no bar of the old key's
    assert wait_until(lambda: chat(new, "me8 new one").status_code == 200, 20)  # every worker knows it by now
    after = me(new)
    spent = after["recent"][0]
    assert after["today"]["tokens_used"] == spent["input_tokens"] + spent["output_tokens"] + \
        spent["cache_read_tokens"] + spent["cache_creation_tokens"]
    hour = next(c["svg"] for c in after["charts"] if c["name"] == "hour_key")
    assert " · carol: 1</title>" in hour  # this key's one request, none of the old key's two
    # the admin dashboard still counts by name, and shows the tokens of the key the name has now
    dash = requests.get(srv.url + "/dashboard/data", headers={"Authorization": f"Bearer {BOSS}"}, timeout=30).json()
    row = next(k for k in dash["keys"] if k["name"] == "carol")
    assert row["tokens_today"] == after["today"]["tokens_used"]


# -- 9. purge removes superseded transcripts ----------------------------------------------------------------------

def test_purge_removes_the_transcripts_of_superseded_sessions(relay):
    def ask(messages):
        r = requests.post(relay.url + "/v1/chat/completions", headers={"X-Session-Id": "purge9"}, timeout=90,
                          json={"model": "sonnet", "messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def session_id():
        listing = requests.get(relay.url + "/v1/sessions", timeout=30).json()["data"]
        return next(c["cli_session_id"] for c in listing if c["id"] == "s:purge9")
    first = [{"role": "user", "content": "purge9 one"}]
    answer = ask(first)
    sessions = [session_id()]
    ask([{"role": "user", "content": "purge9 rewritten"}])  # a changed history: a new CLI session
    sessions.append(session_id())
    ask(first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "purge9 again"}])
    sessions.append(session_id())
    assert len(set(sessions)) == 3
    files = [next((relay.tmp / "claude-config" / "projects").rglob(f"{sid}.jsonl"), None) for sid in sessions]
    assert all(files), sessions
    r = requests.delete(relay.url + "/v1/sessions/purge9?purge_files=true", timeout=30)
    assert r.status_code == 200 and r.json()["files_removed"] == 3
    assert not any(f.exists() for f in files)


# -- 10. count_tokens bounded --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counting(relay_factory, tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("count") / "config.json",
                        [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}])
    return relay_factory({"RELAY_CONFIG": str(path), "RELAY_RATE_LIMIT__COUNT_TOKENS_PER_MINUTE": "3",
                          "RELAY_COUNT_TOKENS_MAX_BODY_MB": "1"})


def test_count_tokens_is_rate_limited_per_key(counting):
    alice, bob = anthropic_client(counting.url, ALICE), anthropic_client(counting.url, BOB)
    msgs = [{"role": "user", "content": "count10 hello"}]
    for _ in range(3):
        assert alice.messages.count_tokens(model="claude-sonnet-4-5", messages=msgs).input_tokens > 0
    with pytest.raises(anthropic.RateLimitError) as err:
        alice.with_options(max_retries=0).messages.count_tokens(model="claude-sonnet-4-5", messages=msgs)
    assert err.value.body["error"]["type"] == "rate_limit_error"
    assert "token counting" in err.value.body["error"]["message"]
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert bob.messages.count_tokens(model="claude-sonnet-4-5", messages=msgs).input_tokens > 0  # its own budget


def test_count_tokens_refuses_an_oversized_body_with_413(counting):
    big = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x " * (600 * 1024)}]}
    headers = {"x-api-key": BOB, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
    r = requests.post(counting.url + "/v1/messages/count_tokens", data=json.dumps(big), headers=headers, timeout=30)
    assert r.status_code == 413
    assert r.json() == {"type": "error", "error": {"type": "request_too_large", "message":
                                                   "The request body is larger than count_tokens_max_body_mb (1 MB)."}}

    def chunks():  # no Content-Length: counted as it arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]
    r = requests.post(counting.url + "/v1/messages/count_tokens", data=chunks(), headers=headers, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

"""The relay heals itself (issue 19): the gunicorn master restarts the private Redis and the pool server
when they die, clients see only 503 `redis_unavailable` with Retry-After while Redis is away (never a
500), a run the pool server took down with it is retried, and nothing of the relay outlives its master."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from harness import RelayServer, free_port, redis_server_binary, relay_env, wait_until

CHAT = "/v1/chat/completions"
POOL_ON = {"RELAY_POOL__ENABLED": "true"}


def _private(tmp: Path, mock_api: Any, cli_bin: str, extra: dict[str, str] | None = None) -> RelayServer:
    """A relay as `make run` starts it: the private Redis from gunicorn.conf.py (no REDIS_URL)."""
    env = relay_env("", cli_bin, mock_api.url, tmp, extra)
    env.pop("REDIS_URL")
    return RelayServer(tmp, env)


def _children(srv: RelayServer, name: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(srv.proc.pid).children() if p.name() == name]


def _post(url: str, text: str, path: str = CHAT, rid: str | None = None, sid: str | None = None) -> requests.Response:
    headers = {"x-request-id": rid} if rid else {}
    if sid:
        headers["X-Session-Id"] = sid
    if path == "/v1/messages":
        body: dict[str, Any] = {"model": "sonnet", "max_tokens": 100, "messages": [{"role": "user", "content": text}]}
    elif path == "/v1/responses":
        body = {"model": "sonnet", "input": text}
    else:
        body = {"model": "sonnet", "messages": [{"role": "user", "content": text}]}
    return requests.post(url + path, json=body, headers=headers, timeout=120)


class Traffic:
    """Clients sending requests one after another until stopped; every answer kept (time, status, response)."""

    def __init__(self, url: str, tag: str, clients: int = 3, text: str = "", probe: bool = False) -> None:
        self.url, self.tag, self.text = url, tag, text
        self.answers: list[tuple[float, int, requests.Response]] = []
        self.probes: list[tuple[float, int, requests.Response]] = []   # quick reads of /v1/usage/recent
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        if probe:  # a completion spends most of its time in the CLI; a read meets Redis at once
            self._threads.append(threading.Thread(target=self._probe, daemon=True))

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                r = _post(self.url, f"{self.tag} client {i} request {n} {self.text}", rid=f"{self.tag}-{i}-{n}")
            except requests.RequestException:
                continue  # counted as missing below
            self.answers.append((time.time(), r.status_code, r))
            if r.status_code != 200:
                time.sleep(0.05)

    def _probe(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                r = session.get(self.url + "/v1/usage/recent?limit=1", timeout=10)
                self.probes.append((time.time(), r.status_code, r))
                time.sleep(0.005)

    def statuses(self) -> list[int]:
        return [s for _, s, _ in self.answers]


def _check_outage_answers(answers: list[tuple[float, int, requests.Response]]) -> int:
    """Only 200 or 503 redis_unavailable with Retry-After; returns how many 503s."""
    refused = 0
    for _, status, r in answers:
        assert status in (200, 503), (status, r.text[:500])
        if status == 503:
            refused += 1
            assert r.json()["error"]["code"] == "redis_unavailable", r.text
            assert int(r.headers["Retry-After"]) >= 1
    return refused


def _usage(url: str) -> dict[str, Any]:
    return requests.get(url + "/v1/usage", timeout=10).json()["total"]


def _recent(url: str, n: int = 1000) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in requests.get(url + f"/v1/usage/recent?limit={n}", timeout=10).json()["data"]}


def _redis_up(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=5).json()["redis"]["ok"] is True
    except (requests.RequestException, ValueError, KeyError):
        return False


@pytest.mark.slow
def test_a_killed_private_redis_is_back_within_seconds_and_nothing_recorded_is_lost(tmp_path, mock_api, cli_bin):
    srv = _private(tmp_path, mock_api, cli_bin).start()
    try:
        before = [f"early-{i}" for i in range(4)]
        for rid in before:
            assert _post(srv.url, f"{rid} before the kill", rid=rid).status_code == 200
        assert wait_until(lambda: _usage(srv.url)["requests"] == 4, timeout=10)
        (redis,) = _children(srv, "redis-server")
        with Traffic(srv.url, "rk", probe=True) as traffic:
            time.sleep(1.0)
            killed = time.time()
            redis.kill()
            assert wait_until(lambda: any(t > killed and s == 200 for t, s, _ in traffic.answers), timeout=10)
            time.sleep(1.0)
        back = min(t for t, s, _ in traffic.answers if t > killed and s == 200)
        refused = _check_outage_answers(traffic.answers)
        probes_refused = _check_outage_answers(traffic.probes)
        gap = [t for t, s, _ in traffic.probes if s == 503]
        health = requests.get(srv.url + "/health", timeout=10).json()
        outage = health["helpers"]["redis"]["last_outage"]
        print(f"\nprivate Redis: restarted {outage['downtime_s']} s after its death was seen; first completion 200 "
              f"{back - killed:.2f} s after the kill; {refused} x 503 of {len(traffic.answers)} completions, "
              f"{probes_refused} x 503 of {len(traffic.probes)} reads, 503s for {max(gap) - killed if gap else 0:.2f} s")
        assert probes_refused >= 1 and max(gap) - killed < 5  # the gap was seen, and it was short
        assert health["status"] == "ok" and health["down"] == {} and outage["downtime_s"] < 5
        assert health["helpers"]["redis"]["pid"] != redis.pid and health["helpers"]["redis"]["restarts"] == 1
        # every request counts once: the earlier ones are intact, those the outage delayed are recorded now
        ok = sum(1 for s in traffic.statuses() if s == 200)
        assert wait_until(lambda: _usage(srv.url)["successful"] == 4 + ok, timeout=15), (_usage(srv.url), ok)
        assert _usage(srv.url)["requests"] <= 4 + len(traffic.answers)
        recent = _recent(srv.url)
        assert all(rid in recent and recent[rid]["status"] == 200 for rid in before)
        assert wait_until(lambda: "helper_restarted" in srv.log(), timeout=10)  # the alert (no webhook: logged)
    finally:
        srv.stop()


def _external_redis(port: int, data: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    assert wait_until(lambda: _pings(redis.Redis(port=port)), timeout=10)
    return proc


def _pings(r: Any) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


@pytest.mark.slow
def test_an_external_redis_outage_is_a_503_in_each_apis_shape_and_the_relay_recovers_by_itself(
        relay_factory, tmp_path, mock_api):
    port, data = free_port(), tmp_path / "redis-data"
    data.mkdir()
    proc = _external_redis(port, data)
    srv = relay_factory(redis_url=f"redis://127.0.0.1:{port}/0", tmp=tmp_path / "relay")
    try:
        for i in range(3):
            assert _post(srv.url, f"ext-{i} before", rid=f"ext-{i}").status_code == 200
        # a run that is under way when Redis goes away still answers, and is counted once Redis is back
        slow: dict[str, Any] = {}
        under_way = threading.Thread(target=lambda: slow.update(r=_post(
            srv.url, "ext slow MOCK:words=40 MOCK:slow=60", rid="ext-during")))
        under_way.start()
        time.sleep(1.0)
        proc.kill()
        proc.wait(10)
        for path in (CHAT, "/v1/responses"):
            r = _post(srv.url, "while Redis is down", path)
            assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable", r.text
            assert r.json()["error"]["type"] == "server_error" and int(r.headers["Retry-After"]) >= 1
        r = _post(srv.url, "while Redis is down", "/v1/messages")
        assert r.status_code == 503 and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == "api_error" and "Redis" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 1
        health = requests.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["down"]["redis"]["since"]
        under_way.join(60)
        assert slow["r"].status_code == 200, slow["r"].text
        assert slow["r"].json()["choices"][0]["message"]["content"].endswith("w39")  # the whole answer
        with Traffic(srv.url, "ext-t", clients=2) as traffic:
            time.sleep(0.5)
            restarted = time.time()
            proc = _external_redis(port, data)  # the same port, the same files
            assert wait_until(lambda: any(t > restarted and s == 200 for t, s, _ in traffic.answers), timeout=10)
        refused = _check_outage_answers(traffic.answers)
        print(f"\nexternal Redis: {refused} x 503 of {len(traffic.answers)} requests while it was away")
        assert wait_until(lambda: "ext-during" in _recent(srv.url), timeout=15)  # the delayed record
        recent = _recent(srv.url)
        assert all(f"ext-{i}" in recent for i in range(3)) and recent["ext-during"]["status"] == 200
        assert requests.get(srv.url + "/health", timeout=10).json()["down"] == {}
    finally:
        srv.stop()
        proc.kill()
        proc.wait(10)


def _pool(url: str) -> dict[str, Any]:
    return requests.get(url + "/stats", timeout=10).json()["pool"]


def _record(url: str, rid: str) -> dict[str, Any]:
    return _recent(url, 200)[rid]


@pytest.mark.slow
def test_a_killed_pool_server_is_restarted_and_no_request_that_had_not_started_fails(tmp_path, mock_api, cli_bin):
    srv = _private(tmp_path, mock_api, cli_bin, POOL_ON).start()
    try:
        assert wait_until(lambda: _pool(srv.url)["spares"]["ready"] >= 1, timeout=60)
        first = _post(srv.url, "pk warm turn 1", rid="pk-1", sid="pk-conv")
        assert first.status_code == 200 and _record(srv.url, "pk-1")["pool"] == "spare"
        old_pid = _pool(srv.url)["pid"]
        # a run in flight on the pool server (it has sent the client nothing: not a stream)
        slow: dict[str, Any] = {}
        in_flight = threading.Thread(target=lambda: slow.update(r=_post(
            srv.url, "pk in flight MOCK:words=40 MOCK:slow=50", rid="pk-flight", sid="pk-flight")))
        in_flight.start()
        assert wait_until(lambda: _pool(srv.url).get("busy", 0) >= 1, timeout=20)
        with Traffic(srv.url, "pk", clients=2) as traffic:
            time.sleep(0.5)
            killed = time.time()
            os.kill(old_pid, signal.SIGKILL)
            assert wait_until(lambda: _pool(srv.url).get("ok") and _pool(srv.url)["pid"] != old_pid, timeout=20)
            restarted = time.time()
            assert wait_until(lambda: _pool(srv.url)["spares"]["ready"] >= 1, timeout=60)
            refilled = time.time()
        in_flight.join(60)
        assert slow["r"].status_code == 200, slow["r"].text
        assert slow["r"].json()["choices"][0]["message"]["content"].endswith("w39")  # the whole answer
        assert _record(srv.url, "pk-flight")["pool"].startswith("local: retried"), _record(srv.url, "pk-flight")
        assert traffic.answers and set(traffic.statuses()) == {200}, [r.text[:300] for _, s, r in traffic.answers
                                                                      if s != 200]
        # the conversation's next turn finds a warm process of the new server again
        turns = [{"role": "user", "content": "pk warm turn 1"},
                 {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]}]
        body = {"model": "sonnet", "messages": turns + [{"role": "user", "content": "pk warm turn 2"}]}
        r = requests.post(srv.url + CHAT, json=body, headers={"X-Session-Id": "pk-conv", "x-request-id": "pk-2"},
                          timeout=60)
        assert r.status_code == 200
        turns += [{"role": "user", "content": "pk warm turn 2"}, r.json()["choices"][0]["message"]]
        body = {"model": "sonnet", "messages": turns + [{"role": "user", "content": "pk warm turn 3"}]}
        r = requests.post(srv.url + CHAT, json=body, headers={"X-Session-Id": "pk-conv", "x-request-id": "pk-3"},
                          timeout=60)
        assert r.status_code == 200 and _record(srv.url, "pk-3")["pool"] == "warm"
        warm_again = time.time()
        hits = sum(_pool(srv.url)["hits"].values())
        print(f"\npool server: back after {restarted - killed:.2f} s, a spare after {refilled - killed:.2f} s, "
              f"a warm hit {warm_again - killed:.2f} s after the kill; {len(traffic.answers)} requests, no 5xx")
        assert hits >= 1 and restarted - killed < 10
        health = requests.get(srv.url + "/health", timeout=10).json()
        assert health["helpers"]["pool"]["restarts"] == 1 and health["down"] == {}
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_killed_master_leaves_no_process_and_a_new_start_is_clean(tmp_path, mock_api, cli_bin):
    srv = _private(tmp_path, mock_api, cli_bin, POOL_ON).start()
    try:
        assert wait_until(lambda: _pool(srv.url)["spares"]["ready"] >= 1, timeout=60)
        for i in range(3):
            assert _post(srv.url, f"mk-{i} before the kill", rid=f"mk-{i}", sid=f"mk-{i}").status_code == 200
        assert wait_until(lambda: _usage(srv.url)["requests"] == 3, timeout=10)
        family = [psutil.Process(srv.proc.pid)] + psutil.Process(srv.proc.pid).children(recursive=True)
        assert any(p.name() == "redis-server" for p in family) and len(family) >= 5  # Redis, pool, 2 workers, CLIs
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        killed = time.time()

        def gone() -> bool:
            return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)
        assert wait_until(gone, timeout=20), [(p.pid, p.name()) for p in family if p.is_running()]
        print(f"\nmaster SIGKILLed: all {len(family) - 1} processes gone after {time.time() - killed:.2f} s")
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)
        srv._log.close()
    again = RelayServer(tmp_path, srv.env)
    t0 = time.time()
    again.start()
    try:
        assert time.time() - t0 < 20
        assert "left running" not in again.log()  # nothing was left: the Redis died with its master
        assert wait_until(lambda: _redis_up(again.url), timeout=10)
        assert _usage(again.url)["requests"] == 3
        recent = _recent(again.url)
        assert all(f"mk-{i}" in recent for i in range(3))
        assert _post(again.url, "mk after the restart").status_code == 200
    finally:
        again.stop()
    for p in psutil.process_iter(["cmdline"]):  # whatever a failure above may have left
        if str(tmp_path) in " ".join(p.info["cmdline"] or []):
            p.kill()


# -- the pieces on their own (fast) ----------------------------------------------------------------

class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def _add(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args if args else msg)

    info = warning = error = exception = _add


def test_the_supervisor_restarts_a_dead_helper_backs_off_when_it_crash_loops_and_stops_when_told(tmp_path):
    from relay import supervise

    started: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        started.append(subprocess.Popen(["sleep", "60"]))
        return started[-1]
    log = _Log()
    sup = supervise.Supervisor(tmp_path / "helpers.json", log, interval=0.02)
    sup.watch("pool", "the test helper", spawn(), spawn)
    sup.start()
    try:
        for n in range(1, supervise.BURST + 1):  # quick restarts up to the burst
            started[-1].kill()
            assert wait_until(lambda n=n: len(started) == n + 1, timeout=5), log.lines
        status = supervise.read_status(tmp_path)["helpers"]["pool"]
        assert status["state"] == "up" and status["restarts"] == supervise.BURST
        assert status["last_outage"]["exit"] == "killed by SIGKILL" and status["last_outage"]["downtime_s"] < 1
        started[-1].kill()  # one more within the minute: it waits now
        assert wait_until(lambda: supervise.read_status(tmp_path)["helpers"]["pool"]["state"] == "backoff", 5)
        time.sleep(0.5)
        assert len(started) == supervise.BURST + 1
        assert any("crash-looping" in line for line in log.lines), log.lines
        assert supervise.delay([time.time()] * supervise.BURST, time.time()) == supervise.FIRST_DELAY_S
        assert supervise.delay([time.time()] * 20, time.time()) == supervise.MAX_DELAY_S
        sup.stop()
        sup.helpers["pool"].next_try = 0  # due now, but the master is shutting down
        time.sleep(0.3)
        assert len(started) == supervise.BURST + 1 and supervise.read_status(tmp_path)["stopping"] is True
    finally:
        for p in started:
            p.kill()
            p.wait()


def test_a_status_file_of_another_master_is_ignored(tmp_path):
    from relay import supervise

    sup = supervise.Supervisor(tmp_path / supervise.STATUS_FILE, _Log())
    sup.publish()
    assert supervise.read_status(tmp_path, os.getpid())["helpers"] == {}
    assert supervise.read_status(tmp_path, os.getpid() + 1) == {}
    assert supervise.read_status(tmp_path / "nowhere") == {}


def test_writes_delayed_by_an_outage_are_replayed_in_order_once(tmp_path):
    from relay.errors import RedisUnavailable
    from relay.state.backlog import Backlog

    down, done = [True], []

    def write(n: int) -> Any:
        def go() -> None:
            if down[0]:
                raise RedisUnavailable("down")
            done.append(n)
        return go
    b = Backlog(limit=3)
    assert b.write("stats", write(1)) is False and b.write("stats", write(2)) is False
    assert b.flush() == 0 and len(b) == 2
    down[0] = False
    assert b.write("stats", write(3)) is True  # the earlier ones go first
    assert done == [1, 2, 3] and len(b) == 0 and b.flush() == 0
    down[0] = True
    for n in range(4, 9):
        b.write("stats", write(n))
    assert len(b) == 3 and b.dropped == 2  # bounded: the oldest go first
    down[0] = False
    b.stop()
    assert done == [1, 2, 3, 6, 7, 8]


def test_a_redis_outage_met_anywhere_becomes_the_relays_503(tmp_path):
    import redis

    from relay.errors import RedisUnavailable
    from relay.state.connection import as_relay_error, connect

    r = connect(f"unix://{tmp_path / 'nothing.sock'}")
    with pytest.raises(RedisUnavailable) as err:
        r.get("x")
    assert err.value.status == 503 and err.value.code == "redis_unavailable" and err.value.retry_after
    assert str(tmp_path) not in err.value.message  # the client is not told where Redis lives
    assert r.down_since is not None
    with pytest.raises(RedisUnavailable):
        pipe = r.pipeline()
        pipe.incr("x")
        pipe.execute()
    try:  # as flask-limiter meets it, on its own connection
        raise RuntimeError("storage") from redis.ConnectionError("refused")
    except RuntimeError as exc:
        found = as_relay_error(exc)
    assert isinstance(found, RedisUnavailable) and found.response_headers()["Retry-After"] == "2"
    assert as_relay_error(ValueError("other")) is None

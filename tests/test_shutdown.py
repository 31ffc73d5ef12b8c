"""Shutdown as `make run` starts the relay (issue 10 item 11): the private Redis from gunicorn.conf.py (no
REDIS_URL), a request, then each way the relay is stopped in practice. The request answered just before is
in log/stats.json afterwards, and no worker or Redis is left running."""

import json
import os
import signal

import psutil
import pytest
import requests
from harness import RelayServer, relay_env


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("how", ["sigterm-to-the-group", "ctrl-c-to-the-group", "sigterm-to-the-master"])
def test_stopping_keeps_the_last_snapshot_and_leaves_nothing_running(how, tmp_path, mock_api, cli_bin):
    env = relay_env("", cli_bin, mock_api.url, tmp_path, {"RELAY_STATS__SNAPSHOT_INTERVAL_S": "3600"})
    env.pop("REDIS_URL")  # like `make run`: gunicorn.conf.py starts the private Redis
    srv = RelayServer(tmp_path, env).start()
    try:
        family = psutil.Process(srv.proc.pid).children()
        redis = [p.pid for p in family if p.name() == "redis-server"]
        workers = [p.pid for p in family if p.name() != "redis-server"]
        assert len(redis) == 1 and len(workers) == 2
        rid = f"shutdown-{how}"
        r = requests.post(srv.url + "/v1/chat/completions", headers={"x-request-id": rid}, timeout=120,
                          json={"model": "sonnet", "messages": [{"role": "user", "content": "sd1 last words"}]})
        assert r.status_code == 200
        if how == "sigterm-to-the-master":
            srv.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(srv.proc.pid, signal.SIGINT if how.startswith("ctrl-c") else signal.SIGTERM)
        srv.proc.wait(60)  # bounded: a hanging worker would keep the master waiting until its kill
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)
        srv._log.close()
    assert not [pid for pid in redis + workers if _alive(pid)]
    log = srv.log()
    assert "final snapshot failed" not in log and "snapshot failed" not in log, log[-2000:]
    assert "Exception ignored in atexit" not in log and "last stats snapshot" not in log, log[-3000:]
    snap = json.loads((tmp_path / "log" / "stats.json").read_text())
    recorded = [req["request_id"] for m in snap["months"].values() for d in m["days"].values() for req in d["requests"]]
    assert rid in recorded
    assert not (tmp_path / "var" / "redis.sock").exists()


def test_a_worker_killed_outright_loses_no_recorded_request(tmp_path, mock_api, cli_bin):
    """Every worker is SIGKILLed after answering (no atexit, no last snapshot of its own): what Redis
    recorded still reaches log/stats.json at shutdown (by the replacements' or the master's snapshot)."""
    env = relay_env("", cli_bin, mock_api.url, tmp_path, {"RELAY_STATS__SNAPSHOT_INTERVAL_S": "3600"})
    env.pop("REDIS_URL")
    srv = RelayServer(tmp_path, env).start()
    try:
        workers = [p for p in psutil.Process(srv.proc.pid).children() if p.name() != "redis-server"]
        r = requests.post(srv.url + "/v1/chat/completions", headers={"x-request-id": "killed-worker"}, timeout=120,
                          json={"model": "sonnet", "messages": [{"role": "user", "content": "sd2 then killed"}]})
        assert r.status_code == 200
        for w in workers:
            w.kill()
        psutil.wait_procs(workers, timeout=10)
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(60)
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)
        srv._log.close()
    snap = json.loads((tmp_path / "log" / "stats.json").read_text())
    recorded = [req["request_id"] for m in snap["months"].values() for d in m["days"].values() for req in d["requests"]]
    assert "killed-worker" in recorded


def test_a_redis_left_by_a_killed_relay_is_stopped_before_a_new_one_starts(tmp_path, mock_api, cli_bin):
    env = relay_env("", cli_bin, mock_api.url, tmp_path, {})
    env.pop("REDIS_URL")
    first = RelayServer(tmp_path, env).start()
    (old_redis,) = [p.pid for p in psutil.Process(first.proc.pid).children() if p.name() == "redis-server"]
    os.kill(first.proc.pid, signal.SIGKILL)  # the master dies outright; its private Redis stays
    first.proc.wait(10)
    second = RelayServer(tmp_path, env).start()
    try:
        assert not _alive(old_redis)  # never two Redis servers on one append-only file
        assert requests.get(second.url + "/health").json()["redis"]["ok"] is True
    finally:
        second.stop()
        first._log.close()
    for p in psutil.process_iter(["cmdline"]):  # whatever a failure above may have left
        if str(tmp_path) in " ".join(p.info["cmdline"] or []):
            p.kill()

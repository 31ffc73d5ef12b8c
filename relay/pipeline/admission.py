"""Admission, the first stage: may this request run, and where. Also the state one request carries.

In order: the CLI usable, the key's token quota, the conversation's lock (then its plan, read under
the lock, and the runaway guard), the key's run slot, a host run slot (a fair queue), and the Claude
account's slot.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..cli.run import DisconnectWatcher, Run
from ..core.agent import Agent
from ..core.conversation import Plan, conversation_id
from ..core.events import Delta
from ..core.receipt import Receipt, Window
from ..core.request import ChatRequest
from ..core.routing import model_family
from ..errors import Conflict, RateLimited
from ..runtime import Relay
from ..state.apikeys import ApiKey
from ..state.leases import Heartbeat, new_token
from . import guard

log = logging.getLogger("relay.pipeline")


@dataclass
class Context:
    """Who asks and from where: what the HTTP layer knows that the pipeline needs."""
    request_id: str
    key_name: str = ""             # API key name ("" without auth)
    scope: str = "anon"            # conversations are private to this scope
    session_header: str | None = None
    api_key: ApiKey | None = None
    agent: Agent | None = None     # set when this caller may use the CLI's own tools
    client_socket: Any = None      # the client's socket, watched for a hang-up
    endpoint: str = ""
    conversation: str | None = None  # an already known conversation id (Responses' previous_response_id)


@dataclass
class Flight:
    """One request on its way through the stages; each stage reads and writes it."""
    relay: Relay
    req: ChatRequest
    ctx: Context
    cid: str
    created: int = field(default_factory=lambda: int(time.time()))
    t0: float = field(default_factory=time.monotonic)
    heartbeat: Heartbeat = field(init=False)
    run: Run | None = None
    plan: Plan | None = None
    watcher: DisconnectWatcher | None = None
    buffer: list[Delta] = field(default_factory=list)   # what arrived before the API accepted the request
    status: int = 0
    closed: bool = False
    settled: bool = False                # kept warm and committed before a stream's last event
    bytes_to_cli: int = 0
    token_budget: dict[str, Any] | None = None
    estimate: int = 0
    conv: str = ""
    pool_use: str = ""                   # how the pool served the run (RequestRecord.pool)
    member: str = ""
    account: str | None = None           # the Claude account this request runs on
    held_s: float = 0.0                  # time spent holding for an account's reset (pipeline/hold.py)
    pending: Plan | None = None          # the plan of a stream whose route holds it (pipeline/hold.py)
    moved_from: str | None = None        # the conversation's previous account, when it moved
    before: dict[str, Window] = field(default_factory=dict)   # the account's windows when it was chosen
    receipt: Receipt | None = None       # what the answer's headers and record say (pipeline/receipts.py)

    def __post_init__(self) -> None:
        self.heartbeat = Heartbeat(self.relay.leases, self.lease_lost)
        self.member = f"{os.getpid()}:{self.cid}"

    @property
    def cfg(self) -> Any:
        return self.relay.settings

    def lease_lost(self, key: str) -> None:
        """Another run may now hold this conversation or slot: never run two CLIs on one session."""
        if self.run and not self.run.turn.done:
            self.run.cancel()

    def client_gone(self) -> None:
        if self.run and not self.run.turn.done:
            log.info("%s: client disconnected; stopping the CLI", self.ctx.request_id)
            self.run.cancel()


def admit(f: Flight) -> Plan:
    """CLI and account usable, quota, conversation lock (then its state), key slot, host slot."""
    req, ctx, relay = f.req, f.ctx, f.relay
    relay.guard_spawning()
    f.estimate = req.prompt_estimate
    f.token_budget = relay.quotas.check(ctx.api_key, f.estimate)
    f.conv = ctx.conversation or conversation_id(ctx.session_header, req.user, req.system, req.messages)
    if relay.sessions.enabled:  # lock first, then read the conversation's state under the lock
        _lock_conversation(f)
    plan = relay.sessions.plan(ctx.scope, f.conv, req.system, req.messages, req.cli_model, req.system_may_change)
    guard.check(relay, ctx.scope, f.conv, plan, ctx.request_id)  # a runaway conversation takes no run slot
    f.member = relay.slots.member(f.member, ctx.scope)  # the queue's fairness reads the owner
    _take_run_slots(f)
    try:
        relay.slots.describe(f.member, {"id": f.cid, "key": ctx.key_name, "model": req.cli_model,
                                        "endpoint": ctx.endpoint, "stream": req.stream, "worker": os.getpid(),
                                        "started": time.time()})
    except Exception as exc:  # the dashboard's list of runs is a courtesy
        log.warning("could not describe run %s: %s", f.cid, exc)
    return plan


def _lock_conversation(f: Flight) -> None:
    relay, token = f.relay, new_token()
    lock = relay.sessions.lock_key(relay.sessions.key(f.ctx.scope, f.conv))
    if not relay.leases.wait_for(lambda: relay.leases.try_lock(lock, token), f.cfg["sessions.lock_wait_s"]):
        raise Conflict("Another request for this conversation is still running; retry when it is done.",
                       retry_after=2)
    f.heartbeat.add("lock", lock, token)


def _take_run_slots(f: Flight) -> None:
    """The key's own slot first (a busy key must not hold host slots), then the host's fair queue."""
    relay, key, member, wait_s = f.relay, f.ctx.api_key, f.member, f.cfg["queue_timeout_s"]
    if key is not None and key.max_concurrent:
        kslots = relay.slots.key_slots(key.name)
        if not relay.slots.wait(kslots, key.max_concurrent, member, wait_s):
            raise RateLimited(f"This API key may run {key.max_concurrent} requests at once; one must finish "
                              "first.", retry_after=max(1.0, wait_s / 2))
        f.heartbeat.add("slot", kslots, member)
    limit = f.cfg["max_concurrent_runs"]
    gone = lambda: f.watcher is not None and f.watcher.gone  # noqa: E731
    if not relay.slots.queue_for_host(limit, member, wait_s, gone):  # first come first served, fair between keys
        avg_s = relay.stats.latency()["latency"]["avg_ms"] / 1000
        raise RateLimited(f"All {limit} Claude runs on this host stayed busy for the {wait_s:g} s this "
                          "request waited in the queue; the relay is overloaded.",
                          retry_after=relay.slots.retry_after(limit, avg_s))
    f.heartbeat.add("slot", relay.slots.host_key, member)


def take_account(f: Flight, plan: Plan, tried: list[str]) -> Plan:
    """Choose the account (the conversation's own while it is usable) and take its slot; a
    conversation that must move gets a fresh session there with the full history. The model's
    family (opus, sonnet, haiku) skips accounts whose per-model bucket refuses it."""
    relay, req, ctx = f.relay, f.req, f.ctx
    sticky = plan.account if plan.account in relay.accounts.by_name else None
    name = relay.accounts.acquire(sticky, tried, f.member, f.cfg["queue_timeout_s"], relay.account_problems,
                                  f.cfg["sessions.ttl_hours"] * 3600, model_family(req.cli_model), f.estimate)
    f.account = name
    f.heartbeat.add("slot", relay.accounts.slot_key(name), f.member)
    if plan.account and plan.account != name and plan.conv_key:
        log.info("%s: conversation moves from account %s to %s with its full history", ctx.request_id,
                 plan.account, name)
        f.moved_from = plan.account
        if plan.resume:
            plan = relay.sessions.fresh(plan.conv_key, req.system, req.messages, req.cli_model, ctx.scope)
    plan.account = name
    return plan


def drop_account(f: Flight) -> None:
    if f.account:
        f.heartbeat.drop(f.relay.accounts.slot_key(f.account), f.member)


def fresh_plan(f: Flight, plan: Plan, account: str | None) -> Plan:
    """The conversation from its full history (a vanished session, or a move to another account)."""
    new = f.relay.sessions.fresh(plan.conv_key, f.req.system, f.req.messages, f.req.cli_model, f.ctx.scope)
    new.account = account
    return new

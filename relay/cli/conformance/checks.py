"""The named checks of the self-test: each runs the CLI the relay's way and says what changed if it fails.

A check returns a line saying what it saw, or raises `Changed` naming exactly what the relay relies on
that this CLI no longer does. Checks of one lane share a bench (a session made by one is resumed by the
next); lanes run side by side.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

from ...core.events import TOOL_PREFIX, Turn
from ...core.routing import windows_of
from ...core.run_description import SessionUse
from ...core.tools import parse_tools
from ...core.upstream import classify
from ..invocation import spare_argv, spare_controls
from ..pool.processes import Managed, control
from .lab import MODEL, Bench, Outcome, RecordedProcess
from .mock_api import USAGE, WINDOWS, all_text


class Changed(Exception):
    """The CLI no longer does something the relay relies on; the message says what."""


def expect(cond: Any, what: str) -> None:
    if not cond:
        raise Changed(what)


def seen(o: Outcome) -> str:
    """The event types a run printed, counted: what a failure message shows of the stream."""
    counts = Counter(t + (f"/{e.get('subtype')}" if t == "system" and e.get("subtype") else "")
                     for t, e in zip(o.types, o.events))
    text = ", ".join(f"{k}×{n}" if n > 1 else k for k, n in counts.items())
    return f"(the CLI printed: {text or 'nothing'}{'; stderr: ' + o.stderr[-200:] if o.stderr else ''})"


def answered(o: Outcome, what: str) -> None:
    """The run reached its `result` without a crash or an error."""
    expect(o.error is None, f"{what}: the run failed in the relay: {o.error} {seen(o)}")
    expect(o.of_type("result"), f"{what}: no `result` event ended the turn {seen(o)}")
    err = classify(o.turn, 0, 30)
    expect(err is None, f"{what}: the turn ended in an error: {err} {seen(o)}")


class Lane:
    """What the checks of one lane share: the bench and the turns already run."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.session = SessionUse(str(uuid.uuid4()))
        self.first: Outcome | None = None
        self.first_uuid = ""


def reply(text: str) -> str:
    return "Conformance reply to: " + text


# -- lane 1: one session -----------------------------------------------------------------------------
def stream_json(lane: Lane) -> str:
    """system/init, the API's stream events (message_start, text deltas), assistant, result with usage."""
    b = lane.bench
    o = lane.first = b.turn(b.describe("conformance ALPHA", lane.session))
    assistant = o.of_type("assistant")
    lane.first_uuid = str((assistant or [{}])[-1].get("uuid") or "")  # the later checks need it whatever fails here
    answered(o, "a plain turn")
    init = o.of_type("system", "init")
    expect(init, f"no `system` event with subtype `init` (the model and session id) {seen(o)}")
    expect(init[0].get("session_id") == lane.session.session_id,
           f"system/init names session {init[0].get('session_id')!r}, not the --session-id given")
    expect(init[0].get("model"), "system/init has no `model`")
    expect(o.of_type("stream_event"), "no `stream_event` events: --include-partial-messages no longer streams "
           f"the API's events, so nothing reaches a client before the end {seen(o)}")
    expect(o.stream("message_start"), f"no stream_event `message_start`: the relay cannot tell when the API accepted "
           f"the request {seen(o)}")
    deltas = [e.get("delta") or {} for e in o.stream("content_block_delta")]
    streamed = "".join(d.get("text", "") for d in deltas if d.get("type") == "text_delta")
    expect(streamed == reply("conformance ALPHA"), f"the text_delta deltas spell {streamed!r}, not the mock's answer")
    expect(o.stream("message_delta"), "no stream_event `message_delta` (each message's stop_reason)")
    relayed = "".join(d.text for d in o.deltas if d.kind == "text")
    expect(relayed == streamed and o.turn.text == streamed, f"the relay streamed {relayed!r} and folded the turn "
           f"into {o.turn.text!r}")
    expect(assistant, f"no `assistant` event (tool calls and full texts are read from it) {seen(o)}")
    expect(lane.first_uuid, "the `assistant` event has no `uuid` (what --resume-session-at names)")
    blocks = (assistant[-1].get("message") or {}).get("content") or []
    expect(any(bl.get("type") == "text" for bl in blocks), "the `assistant` event holds no text block")
    result = o.of_type("result")[-1]
    expect(result.get("is_error") is False, f"result.is_error is {result.get('is_error')!r}, not false")
    expect(result.get("session_id") == lane.session.session_id, "result.session_id is not the run's session")
    usage = o.turn.usage or {}
    want = dict(USAGE, output_tokens=len(streamed.split()))
    got = {k: usage.get(k) for k in want}
    expect(got == want, f"result.usage reads as {got}, the mock charged {want} (the relay bills from it)")
    expect(o.rc == 0, f"the CLI did not exit cleanly after its result (exit code {o.rc})")
    return f"{len(o.events)} events; {len(deltas)} text deltas; usage {got}"


def rate_limit_event(lane: Lane) -> str:
    """The subscription's windows as the relay's quota meter reads them (`core.routing.windows_of`)."""
    o = lane.first
    expect(o is not None, "cannot run: needs the plain turn of stream_json")
    assert o is not None
    events = o.of_type("rate_limit_event")
    expect(events, f"no `rate_limit_event` although the mock sent the unified rate-limit headers: the quota "
           f"meter and account routing go blind {seen(o)}")
    info = events[-1].get("rate_limit_info")
    expect(isinstance(info, dict), f"rate_limit_event has no `rate_limit_info` object (keys: {sorted(events[-1])})")
    assert isinstance(info, dict)
    expect(o.turn.rate_limit == info, "the relay's fold did not keep the rate_limit_info")
    reset = lane.bench.mock.reset_at
    expect(info.get("status") == "allowed", f"rate_limit_info.status is {info.get('status')!r}, the headers said 'allowed'")
    expect(info.get("resetsAt") == reset, f"rate_limit_info.resetsAt is {info.get('resetsAt')!r}, the headers said {reset}")
    wins = windows_of(info)
    got = {w: wins.get(w, {}).get("utilization") for w in WINDOWS}
    expect(got == WINDOWS, f"the windows read as {got}, the headers said {WINDOWS} (rate_limit_info keys: "
           f"{sorted(info)})")
    expect(wins["five_hour"].get("resets_at") == reset, "the 5-hour window has no reset time")
    expect("overageStatus" in info and "isUsingOverage" in info,
           f"rate_limit_info lacks overageStatus / isUsingOverage (keys: {sorted(info)})")
    return f"status {info['status']}, windows {got}, overage {info['overageStatus']}"


def resume(lane: Lane) -> str:
    """`--resume=<id>` continues the session: the API request holds the earlier turn."""
    b = lane.bench
    expect(lane.first is not None, "cannot run: needs the session of stream_json")
    o = b.turn(b.describe("conformance BETA", SessionUse(lane.session.session_id, resume=True)))
    answered(o, "a resumed turn")
    body = (b.mock.bodies("conformance BETA") or [{}])[-1]
    text = all_text(body)
    expect("conformance ALPHA" in text and reply("conformance ALPHA") in text,
           "the resumed turn's API request lacks the earlier turn: --resume no longer continues the session")
    expect(o.turn.session_id == lane.session.session_id, f"the resumed turn reports session {o.turn.session_id!r}")
    return f"the request carried {len(body.get('messages') or [])} messages, the earlier turn among them"


def resume_session_at(lane: Lane) -> str:
    """`--resume-session-at <uuid>` cuts the resumed session back to that message."""
    b = lane.bench
    expect(lane.first_uuid, "cannot run: the first turn of stream_json gave no assistant uuid")
    at = SessionUse(lane.session.session_id, resume=True, resume_at=lane.first_uuid)
    o = b.turn(b.describe("conformance GAMMA", at))
    answered(o, "a turn resumed at a message")
    text = all_text((b.mock.bodies("conformance GAMMA") or [{}])[-1])
    expect(reply("conformance ALPHA") in text, "the request lacks the message named by --resume-session-at")
    expect("conformance BETA" not in text, "the request still holds the turn after the message named by "
           "--resume-session-at: the session was not cut back")
    return "the request ended at the named message (the later turn was cut)"


# -- lane 2: client functions, a bad login -----------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def client_tool(lane: Lane) -> str:
    """A client function through the relay's MCP server: the `can_use_tool` request, the call handed over."""
    b = lane.bench
    tools = parse_tools({"tools": [WEATHER]}).tools
    o = b.turn(b.describe("conformance weather CONFORMANCE:tool=get_weather", client_tools=tools))
    offered = [t.get("name") for t in (b.mock.bodies("CONFORMANCE:tool=get_weather") or [{}])[0].get("tools") or []]
    expect(TOOL_PREFIX + "get_weather" in offered, f"the API request did not offer {TOOL_PREFIX}get_weather (the "
           f"relay's MCP server): offered {offered[:8]} {seen(o)}")
    asks = [e.get("request") or {} for e in o.of_type("control_request")]
    perm = [r for r in asks if r.get("subtype") == "can_use_tool"]
    expect(perm, f"no `control_request` with subtype `can_use_tool` on stdout (--permission-prompt-tool stdio): "
           f"the relay cannot take the call {seen(o)}")
    expect(perm[0].get("tool_name") == TOOL_PREFIX + "get_weather",
           f"can_use_tool names {perm[0].get('tool_name')!r}, not {TOOL_PREFIX}get_weather")
    expect(perm[0].get("input") == {"city": "Paris"}, f"can_use_tool carries input {perm[0].get('input')!r}")
    expect(perm[0].get("tool_use_id"), "can_use_tool has no tool_use_id")
    calls = o.turn.tool_calls
    expect(len(calls) == 1 and calls[0].name == "get_weather", f"the relay saw the calls {calls}")
    expect(json.loads(calls[0].arguments or "null") == {"city": "Paris"}, f"the call's arguments read as "
           f"{calls[0].arguments!r}")
    expect(o.turn.interrupted_for_tools and classify(o.turn, 0, 30) is None,
           f"the turn did not end at the call: {o.error or classify(o.turn, 0, 30)} {seen(o)}")
    return f"can_use_tool for {perm[0]['tool_name']} with {perm[0]['input']}; the call handed over"


def bad_login(lane: Lane) -> str:
    """The API answers 401: the CLI ends the turn with an error the relay reads as a broken login."""
    b = lane.bench
    o = b.turn(b.describe("conformance login CONFORMANCE:error=401"))
    expect(o.error is None, f"the run failed in the relay: {o.error} {seen(o)}")
    expect(o.turn.result.get("is_error") is True, f"the turn did not end in an error result {seen(o)}")
    err = classify(o.turn, 0, 30)
    expect(err is not None and err.code == "cli_login_required",
           f"the relay reads the 401 as {getattr(err, 'code', None)!r}, not cli_login_required (result: "
           f"api_error_status {o.turn.result.get('api_error_status')!r}, {str(o.turn.result.get('result'))[:120]!r})")
    expect(o.rc is not None and o.rc != 0, f"the CLI did not exit with an error code (exit code {o.rc})")
    return f"exit code {o.rc}; the relay answers 503 {err.code if err else ''}"


# -- lane 3: a spare as the pool configures it, the version refusal ----------------------------------
SPARE_SYSTEM = "Conformance system prompt, set by initialize."


def pool_controls(lane: Lane) -> str:
    """A spare configured by the pool's control requests (`spare_controls`): mcp_status, set_model,
    initialize with systemPrompt, apply_flag_settings; the API request then carries all three."""
    b = lane.bench
    sid = str(uuid.uuid4())
    proc = b.spawn(spare_argv(b.lab.claude_bin, MODEL, sid))
    try:
        m = Managed(proc, sid, MODEL, "spare")
        expect(control(m, {"subtype": "mcp_status"}, b.lab.timeout) is not None,
               f"a spare did not answer `mcp_status` (the pool's readiness probe) {seen(spare_outcome(proc))}")
        desc = b.describe("conformance DELTA", system=SPARE_SYSTEM, model="haiku", effort="low")
        for ctl in spare_controls(desc):
            expect(control(m, ctl, b.lab.timeout) is not None, f"the control request {ctl['subtype']} was refused "
                   f"or not answered: {json.dumps(ctl)[:160]}")
        proc.send(json.loads(desc.prompt.stdin_line()))
        turn = Turn()
        while not turn.done:
            ev = proc.next_event(b.lab.timeout)
            expect(isinstance(ev, dict), f"the spare's turn did not end {seen(spare_outcome(proc))}")
            turn.feed(ev)
        expect(turn.text == reply("conformance DELTA"), f"the spare answered {turn.text!r}")
    finally:
        proc.kill()
    body = (b.mock.bodies("conformance DELTA") or [{}])[-1]
    model = str(body.get("model") or "")
    system = all_text({"system": body.get("system")})
    effort = (body.get("output_config") or {}).get("effort")
    expect("haiku" in model, f"after set_model haiku the API request asked for model {model!r}")
    expect(SPARE_SYSTEM in system, "after initialize with systemPrompt the API request's system lacks it")
    expect(effort == "low", f"after apply_flag_settings effortLevel low the request's effort is {effort!r}")
    return f"model {model}, system prompt and effort {effort} arrived"


def spare_outcome(proc: RecordedProcess) -> Outcome:
    return Outcome(Turn(), proc.seen, None, proc.stderr_text)


def version_refusal(lane: Lane) -> str:
    """The API refuses the CLI's version: the relay reads it as `cli_too_old`, naming the version needed."""
    b = lane.bench
    o = b.turn(b.describe("conformance version CONFORMANCE:too_old=9.9.9"))
    err = o.error or classify(o.turn, 0, 30)
    expect(err is not None and err.code == "cli_too_old",
           f"the relay reads the refusal as {getattr(err, 'code', None)!r}, not cli_too_old (result: "
           f"{str(o.turn.result.get('result'))[:160]!r}) {seen(o)}")
    assert err is not None
    expect("9.9.9" in err.message, f"the error does not name the version needed: {err.message[:200]}")
    return "the relay answers 503 cli_too_old naming 9.9.9"


LANES = (("session", (stream_json, rate_limit_event, resume, resume_session_at)),
         ("tools", (client_tool, bad_login)),
         ("pool", (pool_controls, version_refusal)))

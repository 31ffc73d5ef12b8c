"""One description of a CLI run, built from the request and the conversation plan. Pure.

`cli/invocation.py` turns it into the command line, environment and input files: that module is the
only place the CLI's flags are spelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .agent import Agent
from .conversation import Plan
from .prompt import Prompt, build_prompt
from .request import ChatRequest


@dataclass(frozen=True)
class SessionUse:
    """How the run uses the CLI's session store."""
    session_id: str | None = None    # None: no persistence at all
    resume: bool = False             # resume `session_id` rather than create it
    resume_at: str | None = None     # cut the resumed session back to this message uuid
    persist: bool = True             # False: resume `session_id` but record nothing (sessions off)


@dataclass
class RunDescription:
    model: str
    prompt: Prompt
    session: SessionUse = field(default_factory=SessionUse)
    effort: str | None = None                    # the CLI's --effort level
    json_schema: dict[str, Any] | None = None
    client_tools: list[dict[str, Any]] = field(default_factory=list)   # served by the relay's MCP server
    agent: Agent | None = None                   # the CLI's own tools, for agent keys
    prompt_cache: str = "auto"                   # Anthropic prompt caching: "auto", "5m", "1h" or "off"
    system_may_change: bool = False              # the client rewrites its system prompt mid-task (Claude Code)

    @property
    def builtin_tools(self) -> tuple[str, ...]:
        return self.agent.allowed_tools if self.agent else ()

    @property
    def answers_permissions(self) -> bool:
        """The CLI asks for permissions on stdin (client functions): keep stdin open for the answers."""
        return bool(self.client_tools)


def effort_level(effort: str) -> str:
    """OpenAI reasoning_effort to the CLI's --effort levels."""
    return {"none": "low", "minimal": "low"}.get(effort, effort)


def prompt_cache(ttl: str, min_tokens: int, estimate: int, system_prompt_mode: str) -> str:
    """The original relay's `cache` settings: a prompt shorter than `min_tokens` is sent without
    prompt caching (so it pays no cache writes). Only the client's prompt is counted, so this
    applies in `replace` mode; `append` and `embed` keep the CLI's own long system prompt."""
    if ttl != "off" and system_prompt_mode == "replace" and estimate < min_tokens:
        return "off"
    return ttl


def system_of(req: ChatRequest) -> str:
    """The run's system text: the client's, plus what the CLI cannot enforce about its tools."""
    instruction = req.tools.instruction() if req.tools.active else ""
    if instruction:
        return f"{req.system}\n\n{instruction}" if req.system else instruction
    return req.system


def describe(req: ChatRequest, plan: Plan, system_prompt_mode: str, agent: Agent | None,
             cache: str = "auto") -> RunDescription:
    system = system_of(req)
    prompt = build_prompt(system, plan.send, system_prompt_mode, plan.first_turn,
                          plan.pending_calls if plan.resume else None)
    session = SessionUse(plan.cli_session, plan.resume, plan.resume_at if plan.resume else None, plan.persist)
    return RunDescription(model=req.cli_model, prompt=prompt, session=session,
                          effort=effort_level(req.reasoning_effort) if req.reasoning_effort else None,
                          json_schema=req.json_schema, client_tools=req.tools.tools if req.tools.active else [],
                          agent=agent, prompt_cache=cache, system_may_change=req.system_may_change)

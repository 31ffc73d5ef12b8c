"""Which runs the host's pool serves, and on what: a pure decision from the run, the conversation's plan
and the run's environment. No I/O: `source.py` acts on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.conversation import Plan
from ...core.run_description import RunDescription
from ..invocation import CACHE_ENV, MODEL_ALIASES
from .protocol import WarmMarker

# why a follow-up whose record names no warm process runs cold (the pool may know it evicted one)
NO_WARM, PENDING_TOOLS = "no warm process", "pending tool calls"
WRITTEN = "history written from the client's messages"  # a spare cannot load a transcript: it runs cold
UNMARKED = (NO_WARM, PENDING_TOOLS)


@dataclass(frozen=True)
class Route:
    pooled: bool                  # ask the pool at all; False: this worker spawns the CLI itself
    want: str | None = None       # "spare" | "warm" | None (the pool runs it cold and may keep it)
    why: str = ""                 # why not the preferred process
    warm: WarmMarker | None = None
    flavour: dict[str, str] = field(default_factory=dict)  # the prompt caching a spare must have


def route(desc: RunDescription, plan: Plan, env: dict[str, str], account: str | None, host: str,
          host_env: dict[str, str], default_model: str, hold_tools: bool = False) -> Route:
    """Spares hold the host's own login; a run on another account gets a process with its own
    environment (cold in the pool), and a warm process serves only the turn its marker names. With
    `hold_tools`, runs with the client's functions are pooled too: a step that calls them is held
    waiting for the results, and the request bringing them takes it ("held")."""
    local = ("agent mode" if desc.agent else "function calling" if desc.client_tools and not hold_tools
             else "sessions off" if not plan.conv_key or not plan.cli_session else "")
    if local:  # agent runs stay cold (own working directory, sandboxing)
        return Route(pooled=False, why=local)
    if plan.written:
        return Route(pooled=True, why=WRITTEN)
    new = plan.first_turn and not plan.resume
    if plan.resume_at and plan.warm and desc.client_tools:
        marker = WarmMarker.parse(plan.warm)
        if marker is not None and marker.host == host:
            return Route(pooled=True, want="held", warm=marker)
        return Route(pooled=True, why="held by another host")
    if new and desc.client_tools:
        return Route(pooled=True, why="function calling (spares declare no client functions)")
    # spares hold the host's own login and the CLI's default prompt caching; the run's own temp folder
    # (CLAUDE_CODE_TMPDIR) is the only per-run difference a spare may ignore (it has its own)
    flavour = {k: v for k, v in env.items() if k in CACHE_ENV}  # prompt caching: spares follow demand
    spare_env_ok = {k: v for k, v in env.items() if k != "CLAUDE_CODE_TMPDIR" and k not in CACHE_ENV} == host_env
    if new and not spare_env_ok:
        return Route(pooled=True, why=f"account {account} (spares hold the host's own login)")
    if new and not (desc.model in MODEL_ALIASES or desc.model == default_model):
        # measured: `set_model` with a full model id costs a 1-token API request to validate it
        # (spares are spawned with default_model, which needs no `set_model`)
        return Route(pooled=True, why="pinned model (a spare would validate it upstream)")
    if new:
        return Route(pooled=True, want="spare", flavour=flavour)
    if plan.warm:
        marker = WarmMarker.parse(plan.warm)
        if marker is not None and marker.host == host:
            return Route(pooled=True, want="warm", warm=marker)
        return Route(pooled=True, why="held by another host")
    return Route(pooled=True, why=PENDING_TOOLS if plan.resume_at else NO_WARM)

"""The CLI command line, environment and input files for one run (the relay's side of §0 of the
CLI protocol notes). Writes the run's temp files; spawns nothing."""

from __future__ import annotations

import json
import os
import pwd
import sys
import tempfile
from typing import Any

from .cli import RunSpec, base_argv
from .prompt import build_prompt
from .request import ChatRequest
from .sessions import Plan


def mcp_config(tmp: str, tools: list[dict[str, Any]]) -> str:
    """`--mcp-config` for this run: the relay's stdio MCP server declaring the client's functions."""
    path = os.path.join(tmp, "tools.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tools, f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = {"type": "stdio", "command": sys.executable, "args": ["-m", "relay.mcp_server", path],
              "env": {"PYTHONPATH": root}}
    return json.dumps({"mcpServers": {"client": server}})


def effort_flag(effort: str) -> str:
    """OpenAI reasoning_effort to the CLI's --effort levels."""
    return {"none": "low", "minimal": "low"}.get(effort, effort)


def build_spec(relay: Any, req: ChatRequest, agent: Any, plan: Plan, conv: str) -> RunSpec:
    system = req.system
    instruction = req.tools.instruction() if req.tools.active else ""
    if instruction:
        system = f"{system}\n\n{instruction}" if system else instruction
    prompt = build_prompt(system, plan.send, relay.settings["system_prompt_mode"], plan.first_turn,
                          plan.pending_calls if plan.resume else None)
    tmp = tempfile.mkdtemp(prefix="run-", dir=relay.tmp_dir)
    tools = ",".join(agent.allowed_tools) if agent else ""
    argv = base_argv(relay.cli_path(), req.cli_model, tools) + plan.cli_args()
    cwd = str(relay.cli_cwd)
    if agent:
        argv += agent.argv()
        cwd = str(agent.workdir(conv))  # conv is already scoped to the caller's key
    if prompt.system_flag and (prompt.system_text or prompt.system_flag == "--system-prompt-file"):
        path = os.path.join(tmp, "system.txt")  # never argv: a multi-megabyte prompt must work
        with open(path, "w", encoding="utf-8") as f:
            f.write(prompt.system_text)
        argv += [prompt.system_flag, path]
    if req.reasoning_effort:
        argv += ["--effort", effort_flag(req.reasoning_effort)]
    keep_open = False
    if req.tools.active:
        argv += ["--mcp-config", mcp_config(tmp, req.tools.tools), "--permission-prompt-tool", "stdio"]
        keep_open = True  # the CLI asks for permission on stdin; the relay answers there
    if req.json_schema is not None:
        argv += ["--json-schema", json.dumps(req.json_schema, separators=(",", ":"))]
    env = relay.cli_env
    user = agent.user if agent and agent.user else None
    if user:
        env = dict(env, HOME=pwd.getpwnam(user).pw_dir, USER=user, LOGNAME=user)
        os.chmod(tmp, 0o755)  # the system prompt and tool files must be readable by that user
    return RunSpec(argv=argv, env=env, cwd=cwd, stdin=prompt.stdin_line(), temp_dir=tmp, keep_stdin_open=keep_open,
                   user=user)

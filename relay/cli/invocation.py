"""The CLI's command line, environment and input files for one run: the only place its flags are spelled.

Built from a `RunDescription` (what the run is) plus where it runs on this host. Writes the run's
temp files (system prompt, client tool list); spawns nothing.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import tempfile
from pathlib import Path

from ..core.agent import Agent
from ..core.run_description import RunDescription, SessionUse
from .process import RunSpec

MCP_SERVER_MODULE = "relay.cli.mcp_server"
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding the `relay` package


def base_argv(claude_bin: str, model: str, tools: str = "") -> list[str]:
    """Flags every run gets: stream-json both ways, token deltas, no host customisation, and no
    built-in tools unless agent mode names them."""
    return [claude_bin, "-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages",
            "--input-format", "stream-json", "--model", model, "--tools", tools, "--setting-sources", "",
            "--strict-mcp-config", "--disable-slash-commands"]


def auth_status_argv(claude_bin: str) -> list[str]:
    """`claude auth status --json`: the login the CLI would use, read locally (no model call)."""
    return [claude_bin, "auth", "status", "--json"]


def session_args(session: SessionUse) -> list[str]:
    if not session.session_id:
        return ["--no-session-persistence"]
    if session.resume:
        args = ["--resume=" + session.session_id]
        return args + (["--resume-session-at", session.resume_at] if session.resume_at else [])
    return ["--session-id", session.session_id]


def agent_args(agent: Agent) -> list[str]:
    args = ["--allowedTools", ",".join(agent.allowed_tools), "--permission-mode", agent.permission_mode]
    if agent.max_turns:
        args += ["--max-turns", str(agent.max_turns)]
    if agent.max_budget_usd:
        args += ["--max-budget-usd", f"{agent.max_budget_usd:g}"]
    return args


def mcp_config(tmp: str, tools: list[dict[str, object]]) -> str:
    """`--mcp-config` for this run: the relay's stdio MCP server declaring the client's functions."""
    path = os.path.join(tmp, "tools.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tools, f)
    server = {"type": "stdio", "command": sys.executable, "args": ["-m", MCP_SERVER_MODULE, path],
              "env": {"PYTHONPATH": PACKAGE_PARENT}}
    return json.dumps({"mcpServers": {"client": server}})


def build_spec(desc: RunDescription, cli_path: str, env: dict[str, str], cwd: str, tmp_root: Path) -> RunSpec:
    """The whole invocation of one run; its temp folder is removed when the run ends."""
    tmp = tempfile.mkdtemp(prefix="run-", dir=tmp_root)
    argv = base_argv(cli_path, desc.model, ",".join(desc.builtin_tools)) + session_args(desc.session)
    if desc.agent:
        argv += agent_args(desc.agent)
    prompt = desc.prompt
    if prompt.system_flag and (prompt.system_text or prompt.system_flag == "--system-prompt-file"):
        path = os.path.join(tmp, "system.txt")  # never argv: a multi-megabyte prompt must work
        with open(path, "w", encoding="utf-8") as f:
            f.write(prompt.system_text)
        argv += [prompt.system_flag, path]
    if desc.effort:
        argv += ["--effort", desc.effort]
    if desc.client_tools:
        argv += ["--mcp-config", mcp_config(tmp, desc.client_tools), "--permission-prompt-tool", "stdio"]
    if desc.json_schema is not None:
        argv += ["--json-schema", json.dumps(desc.json_schema, separators=(",", ":"))]
    user = desc.agent.user if desc.agent and desc.agent.user else None
    if user:
        env = dict(env, HOME=pwd.getpwnam(user).pw_dir, USER=user, LOGNAME=user)
        os.chmod(tmp, 0o755)  # the system prompt and tool files must be readable by that user
    return RunSpec(argv=argv, env=env, cwd=cwd, stdin=prompt.stdin_line(), temp_dir=tmp,
                   keep_stdin_open=desc.answers_permissions, user=user)

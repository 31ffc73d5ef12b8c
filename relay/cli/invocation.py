"""The CLI's command line, environment and input files for one run: the only place its flags are spelled.

Built from a `RunDescription` (what the run is) plus where it runs on this host. Writes the run's
temp files (system prompt, client tool list); spawns nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import sys
import tempfile
from pathlib import Path

from ..core.agent import Agent
from ..core.run_description import RunDescription, SessionUse
from ..errors import Unavailable
from . import sandbox
from .credproxy import CredProxy, find_credential, unix_socket_ok
from .leftovers import folder_prefix
from .process import RunSpec
from .session_files import cli_slug

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
        args = ["--resume=" + session.session_id] + ([] if session.persist else ["--no-session-persistence"])
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


CACHE_ENV = ("CLAUDE_CODE_PROMPT_CACHE_TTL", "DISABLE_PROMPT_CACHING")  # what cache_env() may set


def cache_env(prompt_cache: str) -> dict[str, str]:
    """Prompt caching is set through the CLI's environment (measured with 2.1.330 at the mock):
    CLAUDE_CODE_PROMPT_CACHE_TTL=5m|1h marks blocks `{"type": "ephemeral"}` or `{..., "ttl": "1h"}` (without
    it the CLI picks 1h on a subscription, 5m on an API key); DISABLE_PROMPT_CACHING=1 sends no
    `cache_control` at all."""
    if prompt_cache in ("5m", "1h"):
        return {"CLAUDE_CODE_PROMPT_CACHE_TTL": prompt_cache}
    if prompt_cache == "off":
        return {"DISABLE_PROMPT_CACHING": "1"}
    return {}


def cli_tmpdir(tmp: str, user: str | None) -> str:
    """CLAUDE_CODE_TMPDIR for one run: a private folder inside the run's temp folder, so everything the
    CLI writes there (probes: `claude-<uid>/<cwd>/<session>/...`) goes when the run ends."""
    path = os.path.join(tmp, "cli")
    os.mkdir(path, 0o700)
    if user:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def withhold_image_store(cli_tmp: str, cwd: str, session_id: str) -> None:
    """Keep the CLI from telling the model where this host keeps the prompt's images. The CLI 2.1.330
    saves each image of a prompt as `<CLAUDE_CODE_TMPDIR>/claude-<uid>/<cwd>/<session>/images/N.png` and
    adds `[Image: source: <that path>]` to the prompt (the checkout, the run folder, the session id, the
    uid). A plain file where that folder would go makes the save fail; the CLI then sends the image alone
    (measured: the same image block, no text). Nothing else of a run without built-in tools lives there."""
    if not session_id:
        return  # sessions off: the CLI saves no images
    parent = cli_tmp
    for name in (f"claude-{os.getuid()}", cli_slug(os.path.realpath(cwd)), session_id):
        parent = os.path.join(parent, name)
        os.makedirs(parent, 0o700, exist_ok=True)  # private like the CLI's own (it checks the first)
    os.close(os.open(os.path.join(parent, IMAGE_STORE), os.O_CREAT | os.O_WRONLY, 0o400))


IMAGE_STORE = "images"


def build_spec(desc: RunDescription, cli_path: str, env: dict[str, str], cwd: str, tmp_root: Path,
               agent_state: str | None = None) -> RunSpec:
    """The whole invocation of one run; its temp folder is removed when the run ends. An agent run
    (`desc.agent`, with its conversation's folder `cwd` and CLI state folder `agent_state`) is
    wrapped in its sandbox and gets its own credential proxy."""
    tmp = tempfile.mkdtemp(prefix=folder_prefix("run"), dir=tmp_root)  # swept if this worker dies
    if desc.agent:
        cli_path = os.path.realpath(cli_path)  # bound into the sandbox at that path
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
    env = dict(env, CLAUDE_CODE_TMPDIR=cli_tmpdir(tmp, user), **cache_env(desc.prompt_cache))
    if not desc.agent:  # an agent run's CLI has its own /tmp inside its sandbox
        withhold_image_store(env["CLAUDE_CODE_TMPDIR"], cwd, desc.session.session_id or "")
    if user:
        os.chmod(tmp, 0o755)  # the system prompt and tool files must be readable by that user
    if not desc.agent:
        return RunSpec(argv=argv, env=env, cwd=cwd, stdin=prompt.stdin_line(), temp_dir=tmp,
                       keep_stdin_open=desc.answers_permissions, user=user)
    try:
        return _sandboxed(desc, desc.agent, argv, env, cwd, agent_state or "", tmp, user)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# settings of the run that the sandbox's fresh environment keeps (never credentials or paths)
PASSED_TO_SANDBOX = ("CLAUDE_CODE_PROMPT_CACHE_TTL", "DISABLE_PROMPT_CACHING")


def _sandboxed(desc: RunDescription, agent: Agent, argv: list[str], env: dict[str, str], cwd: str, state: str,
               tmp: str, user: str | None) -> RunSpec:
    """An agent run inside bubblewrap, talking to the API only through its own credential proxy."""
    config_dir = Path(env.get("CLAUDE_CONFIG_DIR") or "~/.claude").expanduser()
    credential = find_credential(env, config_dir)
    if credential is None:
        raise Unavailable("Agent runs need the relay's Anthropic credential outside their sandbox: give the relay "
                          "ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN (claude setup-token), or log its CLI in.",
                          code="agent_credential_missing")
    sock = os.path.join(tmp, "api.sock")
    if not unix_socket_ok(sock):
        raise Unavailable(f"var_dir is too deep for a unix socket path ({sock}); move it.", code="agent_sandbox")
    uid = gid = None
    if user:
        pw = pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    # the CLI's own requests per turn, plus some for retries and the tools' own calls
    max_requests = 4 * (agent.max_turns or 50) + 10
    models = agent.models + (desc.model,) if agent.models else ()  # the run's own model passed the key's check
    proxy = CredProxy(sock, credential, max_requests, uid, gid, agent.proxy, models)
    read_only = [tmp]
    if desc.client_tools:  # the relay's MCP server runs inside too: Python and the package, read-only
        read_only += sorted({os.path.realpath(sys.executable), sys.prefix, sys.base_prefix,
                             os.path.join(PACKAGE_PARENT, "relay")} - {"/usr"})
    box = sandbox.Sandbox(cli_path=argv[0], workdir=cwd, config_dir=state, api_socket=sock,
                          read_only=tuple(read_only), tool_shell=sandbox.write_tool_shell(tmp))
    inner_env = sandbox.env(state, credential.variable, proxy.placeholder, int(env.get("CLAUDE_CODE_MAX_RETRIES") or 0))
    inner_env.update({k: env[k] for k in PASSED_TO_SANDBOX if k in env})
    return RunSpec(argv=sandbox.argv(box) + argv, env=inner_env,
                   cwd=cwd, stdin=desc.prompt.stdin_line(), temp_dir=tmp,
                   keep_stdin_open=desc.answers_permissions, user=user, closers=[proxy.close],
                   socket_stdio=True, witness=proxy.witness)


# -- warm processes (cli/pool/) -----------------------------------------------------------------------
def spare_argv(claude_bin: str, model: str, session_id: str) -> list[str]:
    """A spare process: only what every plain run shares is fixed at spawn; the session id is fresh so
    its transcript persists and a later cold run can resume it."""
    return base_argv(claude_bin, model) + session_args(SessionUse(session_id))


MODEL_ALIASES = ("sonnet", "opus", "haiku")  # `set_model` takes these without an API round trip


def spare_controls(desc: RunDescription) -> list[dict[str, object]]:
    """Control requests that give a spare what `build_spec` puts on a cold command line: the model
    (`set_model`, sent by the pool only when it differs), the system prompt and JSON schema (the first
    `initialize` only) and the effort. Measured: the API request is then byte for byte a cold run's."""
    reqs: list[dict[str, object]] = [{"subtype": "set_model", "model": desc.model}]
    init: dict[str, object] = {"subtype": "initialize", "hooks": None}
    prompt = desc.prompt
    if prompt.system_flag == "--system-prompt-file":
        init["systemPrompt"] = prompt.system_text       # replace mode: even an empty prompt replaces
    elif prompt.system_flag and prompt.system_text:
        init["appendSystemPrompt"] = prompt.system_text
    if desc.json_schema is not None:
        init["jsonSchema"] = desc.json_schema
    if len(init) > 2:
        reqs.append(init)
    if desc.effort:
        reqs.append({"subtype": "apply_flag_settings", "settings": {"effortLevel": desc.effort}})
    return reqs


def settings_fingerprint(desc: RunDescription, held: bool = False) -> str:
    """What a process was configured with beyond its session: a warm process serves a later turn only
    with the same model, system prompt, effort, schema and client functions (its MCP server declares them
    at spawn; changing them mid-session pollutes it).

    `held`: what the rest of a held turn must share with the step that made the calls. The CLI reads its
    system prompt once a turn, so a client that rewrites it mid-task (Claude Code: its silent-turn reminder
    comes as a role "system" message, read as part of the system prompt) goes on in the held process; the
    new prompt applies from the next turn (the process keeps the fingerprint it was configured with)."""
    p = desc.prompt
    system = None if held and desc.system_may_change else p.system_text
    raw = json.dumps([desc.model, p.system_flag, system, desc.effort, desc.json_schema, desc.prompt_cache,
                      desc.client_tools], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]

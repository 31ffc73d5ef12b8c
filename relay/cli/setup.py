"""How this host runs the CLI: its environment (and each account's), the version probe and the folders.

One recipe (`CliSetup`) for the workers, the pool server and `python -m relay check`, so all three
see the same CLI with the same login.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from .pool.protocol import CREDENTIAL_ENV
from .session_files import cli_workdir

log = logging.getLogger("relay.cli")

MIN_VERSION = (2, 1, 248)  # first release honouring "client_composed" (CLI-PROTOCOL §14)
SCRUB_ENV = ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "CLAUDE_CODE_SSE_PORT", "CLAUDE_AGENT_SDK_VERSION",
             "CLAUDE_CODE_SESSION_ID", "API_KEYS", "REDIS_URL", "RELAY_AUTH__API_KEYS")


@dataclass
class CliSetup:
    claude_bin: str
    env: dict[str, str]   # the CLI's environment with the host's own login
    cwd: Path             # where every plain run starts: stable (sessions are scoped to it), empty, outside any repo
    tmp_dir: Path         # the runs' temp folders

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> CliSetup:
        env = child_env(dict(os.environ if environ is None else environ), settings["cli_max_retries"],
                        settings["claude_config_dir"])
        return cls(settings["claude_bin"], env, cli_workdir(settings), settings.path("var_dir") / "tmp")

    def make_folders(self) -> CliSetup:
        """Create the folders (a check reads the setup without them)."""
        self.cwd.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self

    def probe(self) -> dict[str, Any]:
        return probe_cli(self.claude_bin, self.env)


def child_env(base: dict[str, str], max_retries: int, config_dir: str = "") -> dict[str, str]:
    """The relay's environment for the CLI, minus nesting markers and the relay's own secrets."""
    env = {k: v for k, v in base.items() if k not in SCRUB_ENV and not k.startswith("RELAY_")}
    env["CLAUDE_CODE_MAX_RETRIES"] = str(max_retries)
    env.setdefault("DISABLE_AUTOUPDATER", "1")
    # the CLI's own "The user hasn't heard from you in a while" system message in a long turn (a held
    # tool loop is one turn): text no client sent; observed with 2.1.330, "0" turns it off
    env.setdefault("CLAUDE_CODE_SILENT_TURN_REMINDER", "0")
    if config_dir:
        env["CLAUDE_CONFIG_DIR"] = config_dir
    return env


def account_env(base: dict[str, str], config_dir: str, token_env: str, all_token_envs: list[str]) -> dict[str, str]:
    """The CLI environment of one configured account: its config directory and/or its OAuth token,
    with every other credential (the host's API key, the other accounts' tokens) removed."""
    env = {k: v for k, v in base.items() if k not in CREDENTIAL_ENV and k not in all_token_envs}
    if config_dir:
        env["CLAUDE_CONFIG_DIR"] = os.path.expanduser(config_dir)
    if token_env and base.get(token_env):
        env["CLAUDE_CODE_OAUTH_TOKEN"] = base[token_env]
    return env


def account_envs(specs: list[Any], cli_env: dict[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Each account's CLI environment, and the accounts whose login is known broken on this host
    (their token variable is not set and they have no config directory)."""
    envs: dict[str, dict[str, str]] = {}
    problems: dict[str, str] = {}
    token_envs = [s.oauth_token_env for s in specs if s.oauth_token_env]
    for spec in specs:
        if spec.implicit:
            envs[spec.name] = cli_env
            continue
        envs[spec.name] = account_env(cli_env, spec.config_dir, spec.oauth_token_env, token_envs)
        if spec.oauth_token_env and not cli_env.get(spec.oauth_token_env):
            problem = f"the environment variable {spec.oauth_token_env} (its OAuth token) is not set"
            if not spec.config_dir:
                problems[spec.name] = problem
            log.warning("account %s: %s", spec.name, problem)
    return envs, problems


def login_status(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """What `claude auth status --json` says about a login (never raises)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
        info = json.loads(out.stdout or "{}")
        return info if isinstance(info, dict) else {"loggedIn": False, "error": "unexpected output"}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"loggedIn": False, "error": str(exc)}


def parse_version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else None


def probe_cli(claude_bin: str, env: dict[str, str]) -> dict[str, Any]:
    """Path and version of the CLI, or why it cannot be used (never raises)."""
    path = shutil.which(claude_bin) if os.sep not in claude_bin else claude_bin
    if not path or not os.path.exists(path):
        return {"ok": False, "path": claude_bin, "version": None,
                "problem": f"Claude Code CLI not found ({claude_bin!r}). Install it "
                           "(npm install -g @anthropic-ai/claude-code) or set claude_bin / CLAUDE_BIN."}
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, env=env,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"ok": False, "path": path, "version": None, "problem": f"cannot run {path}: {exc}"}
    version = parse_version(out.stdout)
    if out.returncode != 0 or version is None:
        return {"ok": False, "path": path, "version": None,
                "problem": f"{path} --version failed: {(out.stderr or out.stdout).strip()[:200]}"}
    info = {"ok": True, "path": path, "version": ".".join(map(str, version)), "problem": None}
    if version < MIN_VERSION:
        info.update(ok=False, too_old=True,
                    problem=f"Claude Code CLI {info['version']} is too old: the relay needs "
                            f"{'.'.join(map(str, MIN_VERSION))} or newer for verbatim prompts "
                            "(client_composed). Update it: npm install -g @anthropic-ai/claude-code@latest")
    return info

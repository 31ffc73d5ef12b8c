"""Agent mode on this host: start-up checks and each conversation's private folders.

Every conversation of an agent key gets two folders, both named after a digest of (caller's scope,
conversation id): its working folder under `agent.workdir_root` and its own CLI state folder (the
CLI's transcripts) under `<var_dir>/agent-config`. Only those two are writable inside its sandbox.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
from pathlib import Path
from typing import Any

from ..config import ConfigError, Settings
from ..core.agent import FIELDS, Agent, ProxyLimits
from . import sandbox


def _name(conversation: str) -> str:
    return hashlib.sha256(conversation.encode()).hexdigest()[:24]


def conversation_dirs(agent: Agent, conversation: str, create: bool = True) -> tuple[Path, Path]:
    """(working folder, CLI state folder) of one conversation: stable, so its CLI session can resume."""
    name = _name(conversation)
    work, state = Path(agent.workdir_root) / name, Path(agent.config_root) / name
    if create:
        for d in (work, state):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if agent.user and os.geteuid() == 0:
                pw = pwd.getpwnam(agent.user)
                shutil.chown(d, pw.pw_uid, pw.pw_gid)
    return work, state


def workdir(agent: Agent, conversation: str) -> Path:
    """A private directory per conversation (stable, so its CLI session can be resumed)."""
    return conversation_dirs(agent, conversation)[0]


def remove_conversation_dirs(agents: list[Agent], conversation: str) -> int:
    """Delete a conversation's working and state folders under every given agent setup; returns how many."""
    removed = 0
    for d in {p for a in agents for p in conversation_dirs(a, conversation, create=False)}:
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def remove_all_dirs(agent: Agent) -> int:
    """Delete every conversation's folders of one agent setup; returns how many."""
    removed = 0
    for root in (Path(agent.workdir_root), Path(agent.config_root)):
        if root.is_dir():
            for d in root.iterdir():
                if d.is_dir() and len(d.name) == 24:  # only folders named by conversation_dirs
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
    return removed


def resolve(settings: Settings, key_agent: dict[str, Any] | None, models: tuple[str, ...] = ()) -> Agent | None:
    """The agent settings for a caller: global ones, overridden by the key's own; None when off.
    `models`: the key's allowed models, which its runs' credential proxy enforces (empty: any)."""
    merged = {f: settings[f"agent.{f}"] for f in FIELDS}
    merged.update({k: v for k, v in (key_agent or {}).items() if k in FIELDS})
    if not merged["enabled"]:
        return None
    root = Path(str(merged["workdir_root"])).expanduser()
    if not root.is_absolute():
        root = settings.path("var_dir").parent / root
    return Agent(tuple(merged["allowed_tools"]), str(merged["permission_mode"]), str(root), int(merged["max_turns"]),
                 float(merged["max_budget_usd"]), str(merged["intermediate"]), str(merged["user"] or ""),
                 str(settings.path("var_dir") / "agent-config"), models,
                 ProxyLimits(int(settings["agent.proxy_max_body_mb"] * 1024 * 1024),
                             int(settings["agent.proxy_max_connections"]), float(settings["agent.proxy_read_timeout_s"])))


def any_enabled(settings: Settings) -> bool:
    keys = settings["auth.api_keys"] if settings["auth.enabled"] else []
    return bool(settings["agent.enabled"]) or any(
        isinstance(k, dict) and isinstance(k.get("agent"), dict) and k["agent"].get("enabled") for k in keys)


def check(settings: Settings) -> None:
    """Start-up checks: a user that exists; no bypass mode as root (the CLI refuses it); a working
    bubblewrap whenever any caller may use agent mode (its runs are never started unsandboxed)."""
    user = settings["agent.user"]
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"config: agent.user {user!r} does not exist on this host") from None
        if os.geteuid() != 0:
            raise ConfigError("config: agent.user needs the relay to run as root (to switch users)")
    if settings["agent.enabled"] and settings["agent.permission_mode"] == "bypassPermissions" \
            and os.geteuid() == 0 and not user:
        raise ConfigError("config: agent.permission_mode bypassPermissions cannot run as root (the CLI refuses): "
                          "set agent.user to an unprivileged user")
    if any_enabled(settings):
        problem = sandbox.probe()
        if problem:
            raise ConfigError(f"config: agent mode is on but {problem}")

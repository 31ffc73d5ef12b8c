"""Agent mode on this host: start-up checks and each conversation's private working folder."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
from pathlib import Path
from typing import Any

from ..config import ConfigError, Settings
from ..core.agent import FIELDS, Agent


def workdir(agent: Agent, conversation: str) -> Path:
    """A private directory per conversation (stable, so its CLI session can be resumed)."""
    d = Path(agent.workdir_root) / hashlib.sha256(conversation.encode()).hexdigest()[:24]
    d.mkdir(parents=True, exist_ok=True)
    if agent.user and os.geteuid() == 0:
        pw = pwd.getpwnam(agent.user)
        shutil.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def resolve(settings: Settings, key_agent: dict[str, Any] | None) -> Agent | None:
    """The agent settings for a caller: global ones, overridden by the key's own; None when off."""
    merged = {f: settings[f"agent.{f}"] for f in FIELDS}
    merged.update({k: v for k, v in (key_agent or {}).items() if k in FIELDS})
    if not merged["enabled"]:
        return None
    root = Path(str(merged["workdir_root"])).expanduser()
    if not root.is_absolute():
        root = settings.path("var_dir").parent / root
    return Agent(tuple(merged["allowed_tools"]), str(merged["permission_mode"]), str(root), int(merged["max_turns"]),
                 float(merged["max_budget_usd"]), str(merged["intermediate"]), str(merged["user"] or ""))


def check(settings: Settings) -> None:
    """Start-up checks: a user that exists; no bypass mode as root (the CLI refuses it)."""
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

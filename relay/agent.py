"""Agent mode (opt-in): the CLI's own tools, per conversation working directories, smart streaming.

Off by default. An operator turns it on globally (`agent.enabled`) or for chosen keys
(`auth.api_keys[].agent`): those keys can run commands on this host.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, Settings
from .events import Delta, Turn

FIELDS = ("enabled", "allowed_tools", "permission_mode", "workdir_root", "max_turns", "max_budget_usd",
          "intermediate", "user")


@dataclass(frozen=True)
class Agent:
    allowed_tools: tuple[str, ...]
    permission_mode: str
    workdir_root: Path
    max_turns: int
    max_budget_usd: float
    intermediate: str
    user: str

    def argv(self) -> list[str]:
        args = ["--allowedTools", ",".join(self.allowed_tools), "--permission-mode", self.permission_mode]
        if self.max_turns:
            args += ["--max-turns", str(self.max_turns)]
        if self.max_budget_usd:
            args += ["--max-budget-usd", f"{self.max_budget_usd:g}"]
        return args

    def workdir(self, conversation: str) -> Path:
        """A private directory per conversation (stable, so its CLI session can be resumed)."""
        d = self.workdir_root / hashlib.sha256(conversation.encode()).hexdigest()[:24]
        d.mkdir(parents=True, exist_ok=True)
        if self.user and os.geteuid() == 0:
            pw = pwd.getpwnam(self.user)
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
    return Agent(tuple(merged["allowed_tools"]), str(merged["permission_mode"]), root, int(merged["max_turns"]),
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


def smart_deltas(turn: Turn, batches: Iterable[list[Delta] | None], shown: Callable[[Delta], bool],
                 as_reasoning: bool, keepalive_s: float) -> Iterator[Delta | None]:
    """Smart streaming: a message's text is held until its stop reason is known; only the final
    answer is content; the steps before tool calls are dropped or sent as reasoning."""
    held: list[Delta] = []
    last_out = time.monotonic()

    def flush(final: bool) -> Iterator[Delta]:
        keep = []
        for d in held:
            stop = turn.msg_stops.get(d.msg)
            if stop is None and not final:
                keep.append(d)
            elif d.kind == "text" and stop != "tool_use":
                yield d
            elif as_reasoning and d.kind in ("text", "activity"):
                yield Delta("reasoning", d.text)
        held[:] = keep
    for batch in batches:
        if batch is None:
            yield None
            continue
        for d in batch:
            if d.kind in ("text", "activity"):
                held.append(d)
            elif shown(d):
                yield d
        out = list(flush(False))
        yield from out
        if out:
            last_out = time.monotonic()
        elif time.monotonic() - last_out > keepalive_s:
            last_out = time.monotonic()
            yield None  # tokens are arriving but held back: keep the connection visibly alive
    yield from flush(True)

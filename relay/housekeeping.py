"""Housekeeping: expired CLI session files and what crashed runs left (a janitor thread, one worker at a
time), and forgetting conversations with their stored Responses, transcripts and agent folders."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from .cli.agent import remove_all_dirs, remove_conversation_dirs
from .cli.agent import resolve as resolve_agent
from .cli.leftovers import sweep_partial_transcripts, sweep_run_folders
from .cli.session_files import expire_session_files, remove_session_files, session_dir
from .core.conversation import client_ids
from .runtime import Relay

log = logging.getLogger("relay")


def session_folders(relay: Relay) -> list[Path]:
    """Where each account's CLI keeps this relay's sessions (one folder per distinct config dir)."""
    dirs = {Path((relay.account_envs.get(s.name) or relay.cli_env).get("CLAUDE_CONFIG_DIR") or "~/.claude")
            .expanduser() for s in relay.accounts.specs}
    return [session_dir(d, relay.cli_cwd.resolve()) for d in sorted(dirs)]


def expire_cli_sessions(relay: Relay) -> int:
    """Remove CLI session files idle for longer than the conversation TTL (one worker at a time)."""
    if not relay.leases.once_per(int(max(1, relay.settings["sessions.cleanup_interval_s"])), "janitor"):
        return 0
    keep = {c["cli_session_id"] for c in relay.sessions.list_all() if c.get("cli_session_id")}
    ttl = relay.settings["sessions.ttl_hours"] * 3600
    folders = session_folders(relay)
    # what crashed runs left: folders whose worker or pool server died, half-written transcripts
    leftovers = sweep_run_folders(relay.tmp_dir) + sweep_partial_transcripts(folders)
    if leftovers:
        log.info("removed %d files and folders left by crashed runs", leftovers)
    return sum(expire_session_files(folder, ttl, keep) for folder in folders)


def forget_conversations(relay: Relay, conv_id: str | None, scope: str | None, purge_files: bool,
                         own_scope: str | None = None) -> tuple[int, int]:
    """Forget one conversation of `scope` (or all, in `scope` or everywhere) with its stored Responses;
    with `purge_files` also its CLI transcripts and agent folders. Returns (deleted, files removed).

    `conv_id` is a listed id (`s:ticket-4711`) or, within the caller's `own_scope`, the id the client
    chose: its X-Session-Id value or its `user`."""
    victims = relay.sessions.delete(conv_id, scope)
    if not victims and conv_id and own_scope:
        for alias in client_ids(conv_id):
            victims += relay.sessions.delete(alias, own_scope)
    # the sessions a changed history or a failed turn left behind (all: of conversations already forgotten too)
    left = [sid for c in victims for sid in c.get("superseded") or []]
    if conv_id is None:
        left += relay.sessions.take_superseded(scope)
    for c in victims:
        relay.responses.delete_conversation(c["scope"], c["id"])
        relay.runaways.forget(c["scope"], c["id"])  # a stopped conversation may start afresh
    if conv_id is None:
        relay.responses.delete_scope(scope)
        relay.runaways.forget_all(scope)
    removed = 0
    if purge_files:
        ids = list(dict.fromkeys([c["cli_session_id"] for c in victims if c.get("cli_session_id")] + left))
        removed = sum(remove_session_files(folder, ids) for folder in session_folders(relay))
        agents = _agent_setups(relay)
        if conv_id is None and scope is None:  # everything: folders of expired conversations too
            removed += sum(remove_all_dirs(a) for a in agents)
        else:
            removed += sum(remove_conversation_dirs(agents, f"{c['scope']}\x00{c['id']}") for c in victims)
    return len(victims), removed


def _agent_setups(relay: Relay) -> list[Any]:
    """Every agent folder layout in use: the global one and any key's own workdir_root."""
    setups = [resolve_agent(relay.settings, dict(k.agent or {}, enabled=True)) for k in relay.keys.keys]
    setups.append(resolve_agent(relay.settings, {"enabled": True}))
    return list({(a.workdir_root, a.config_root): a for a in setups if a is not None}.values())


def start_janitor(relay: Relay) -> None:
    threading.Thread(target=_janitor, args=(relay,), daemon=True).start()


def _janitor(relay: Relay) -> None:
    interval = relay.settings["sessions.cleanup_interval_s"]
    while True:
        time.sleep(interval)
        try:
            removed = expire_cli_sessions(relay)
            if removed:
                log.info("removed %d expired CLI session files", removed)
        except Exception as exc:  # keep going: Redis or the disk may recover
            log.warning("session file cleanup failed: %s", exc)

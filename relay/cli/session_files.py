"""The CLI's session transcripts on disk: where they live and how expired ones are removed."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

from ..config import Settings

log = logging.getLogger("relay.cli")


def session_dir(config_dir: Path, cwd: Path) -> Path:
    """Where the CLI keeps session files for runs in `cwd` (CLI-PROTOCOL §5)."""
    return config_dir / "projects" / re.sub(r"[^A-Za-z0-9]", "-", str(cwd))


def expire_session_files(directory: Path, max_age_s: float, keep: set[str] | None = None) -> int:
    """Delete CLI session files idle for longer than the conversation TTL; returns how many."""
    if not directory.is_dir():
        return 0
    cutoff = time.time() - max_age_s
    removed = 0
    for f in directory.glob("*.jsonl"):
        try:
            if f.stem not in (keep or set()) and f.stat().st_mtime < cutoff:
                f.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def remove_session_files(directory: Path, session_ids: list[str]) -> int:
    """Delete the transcripts of these CLI sessions; returns how many existed."""
    removed = 0
    for sid in session_ids:
        f = directory / f"{sid}.jsonl"
        if f.exists():
            f.unlink()
            removed += 1
    return removed


def cli_workdir(settings: Settings) -> Path:
    """The CLI's working folder: under `state_dir` (default $XDG_STATE_HOME), one per relay (named after
    its var_dir), never inside the relay's git checkout, whose status the CLI would show the model."""
    if settings["state_dir"]:
        root = settings.path("state_dir")
    else:
        root = Path(os.environ.get("XDG_STATE_HOME") or "~/.local/state").expanduser() / "claude-max-relay"
    var = str(settings.path("var_dir").resolve())
    d = root / ("cwd-" + hashlib.sha256(var.encode()).hexdigest()[:12])
    repo = next((p for p in (d, *d.parents) if (p / ".git").exists()), None)
    if repo is not None:
        log.warning("the CLI's working folder %s is inside the git repository %s: the model may see its "
                    "status; set state_dir elsewhere", d, repo)
    return d

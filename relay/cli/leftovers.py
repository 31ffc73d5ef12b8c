"""What crashed runs leave behind, found and removed: run folders (a client's system prompt, its tool list,
the CLI's own temp files and pasted images) whose owning process is gone, and the relay's half-written
transcript files. Standard library only: the gunicorn master sweeps at start, the workers' janitor after."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger("relay")

# run-<pid>-…: a worker's run (cli/invocation.py); spare-<pid>-…: a pool server's spare (cli/pool/processes.py)
OWNED = re.compile(r"^(?:run|spare)-(\d+)-")
LEGACY = re.compile(r"^(?:run|spare)-")    # named before folders carried their owner: swept by age
LEGACY_AGE_S = 3600.0


def folder_prefix(kind: str) -> str:
    """The prefix of a temp folder this process owns: `kind`-<pid>-."""
    return f"{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process (a reused pid): not ours to judge, keep the folder
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def sweep_run_folders(tmp_root: Path, now: float | None = None) -> int:
    """Remove the run and spare folders under `tmp_root` whose owning process is gone; returns how many."""
    if not tmp_root.is_dir():
        return 0
    now = time.time() if now is None else now
    removed = 0
    for d in tmp_root.iterdir():
        m = OWNED.match(d.name)
        try:
            if m:
                orphan = not _alive(int(m.group(1)))
            elif LEGACY.match(d.name):
                orphan = now - d.stat().st_mtime > LEGACY_AGE_S
            else:
                continue
        except OSError:
            continue
        if orphan and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed += not d.exists()
    return removed


def sweep_partial_transcripts(session_dirs: list[Path], min_age_s: float = 60.0) -> int:
    """Remove `.jsonl.relay-tmp` files (an atomic transcript write cut short by a crash)."""
    cutoff, removed = time.time() - min_age_s, 0
    for folder in session_dirs:
        for f in folder.glob("*.jsonl.relay-tmp") if folder.is_dir() else ():
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed += 1
            except OSError:
                continue
    return removed

"""The CLI's session transcripts on disk: where they live, how expired ones are removed, how the
refusals the CLI records for an interrupted tool step are taken out before the step is resumed, and
how a transcript written from a client's history is put where the CLI resumes it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..config import Settings
from ..core.history import BLANK_ENVIRONMENT
from ..core.upstream import SessionMissing

log = logging.getLogger("relay.cli")


SLUG_MAX = 200  # the CLI 2.1.330 cuts a folder's name there and adds a hash of the whole path


def cli_slug(path: str) -> str:
    """The CLI's name for a folder inside its own folders (projects, temp): every UTF-16 unit that is not
    an ASCII letter or digit becomes '-'; a longer name is cut and ends with the path's Java-style hash."""
    raw = path.encode("utf-16-le")
    units = [int.from_bytes(raw[i:i + 2], "little") for i in range(0, len(raw), 2)]
    slug = "".join(chr(u) if chr(u).isascii() and chr(u).isalnum() else "-" for u in units)
    if len(slug) <= SLUG_MAX:
        return slug
    h = 0
    for u in units:
        h = (h * 31 + u) & 0xFFFFFFFF
    n, digits = abs(h - (1 << 32) if h >= 1 << 31 else h), ""
    while True:
        n, d = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
        if not n:
            break
    return f"{slug[:SLUG_MAX]}-{digits}"


def session_dir(config_dir: Path, cwd: Path) -> Path:
    """Where the CLI keeps session files for runs in `cwd` (CLI-PROTOCOL §5)."""
    return config_dir / "projects" / cli_slug(str(cwd))


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


INTERRUPTED = "[Request interrupted by user for tool use]"


def _text_of(record: dict[str, Any]) -> str:
    content = (record.get("message") or {}).get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def refusals_to_drop(records: list[dict[str, Any]]) -> set[int]:
    """Which records of a transcript are the CLI's own account of an interrupted tool step: the
    synthetic "the user doesn't want to proceed" result (`toolDenialKind: user-rejected`), the
    "[Request interrupted by user for tool use]" message, what hangs off them, and a `last-prompt`
    that points at them. The relay interrupts the CLI at each client tool call; on a resume the CLI
    prefers these dead-branch records over the client's real results for every earlier step."""
    dead: set[str] = set()
    drop: set[int] = set()
    for i, r in enumerate(records):
        rejected = r.get("type") == "user" and r.get("toolDenialKind") == "user-rejected"
        interrupted = r.get("type") == "user" and _text_of(r).strip() == INTERRUPTED
        orphan = r.get("type") == "attachment" and r.get("parentUuid") in dead
        if rejected or interrupted or orphan:
            drop.add(i)
            if r.get("uuid"):
                dead.add(str(r["uuid"]))
    drop |= {i for i, r in enumerate(records) if r.get("type") == "last-prompt" and r.get("leafUuid") in dead}
    return drop


def repair_transcript(path: Path, drop_refusals: bool, system_prompt: str | None = None,
                      resume_at: str | None = None, blank_environment: bool = False) -> int:
    """Before a resume: take out the refusal records (see `refusals_to_drop`), give the session the
    request's system prompt (a resumed CLI keeps the one in the transcript's `prompt_snapshot` records,
    whatever `--system-prompt-file` says: observed with 2.1.330), and with `blank_environment` blank the
    text of its environment records (the relay host's folders and OS: a resumed CLI replays the stored
    text). Atomic; returns how many records changed. Runs under the conversation's lock, so no CLI writes the file meanwhile. A `resume_at` record
    the file lacks (the CLI was killed before it wrote the tool-call message) is `SessionMissing`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    if resume_at and resume_at not in text:
        raise SessionMissing(f"the transcript lacks the tool-call message {resume_at}")
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = {}
        records.append(rec if isinstance(rec, dict) else {})
    drop = refusals_to_drop(records) if drop_refusals else set()
    changed = 0
    for i, rec in enumerate(records):
        snap = rec.get("attachment") if rec.get("type") == "attachment" else None
        if not isinstance(snap, dict) or i in drop:
            continue
        if system_prompt is not None and snap.get("type") == "prompt_snapshot" \
                and snap.get("systemPrompt") != [system_prompt]:
            snap["systemPrompt"] = [system_prompt]
        elif blank_environment and snap.get("type") == "environment" and rec.get("rendered") != BLANK_ENVIRONMENT:
            rec["rendered"] = BLANK_ENVIRONMENT
        else:
            continue
        lines[i] = json.dumps(rec, ensure_ascii=False)
        changed += 1
    if not drop and not changed:
        return 0
    tmp = path.with_suffix(".jsonl.relay-tmp")
    tmp.write_text("".join(line + "\n" for i, line in enumerate(lines) if i not in drop))
    os.replace(tmp, path)
    return len(drop) + changed


def transcript(env: dict[str, str], cwd: Path, session_id: str) -> Path:
    """The transcript file of one CLI session run in `cwd` with this environment's config dir."""
    config_dir = Path(env.get("CLAUDE_CONFIG_DIR") or "~/.claude").expanduser()
    return session_dir(config_dir, cwd.resolve()) / f"{session_id}.jsonl"


def write_transcript(path: Path, records: list[dict[str, Any]]) -> None:
    """Put a transcript written from a client's history (`core.history`) where the CLI resumes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.relay-tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def _recorded_environment(files: list[Path], accept: Any) -> dict[str, Any] | None:
    """The first environment snapshot in these CLI transcripts that `accept(snapshot)` takes."""
    for f in files:
        try:
            with f.open() as lines:
                for n, line in enumerate(lines):
                    if n > 20:
                        break
                    if '"environment"' not in line:
                        continue
                    rec = json.loads(line)
                    snap = (rec.get("attachment") or {}).get("snapshot")
                    if rec.get("type") == "attachment" and isinstance(snap, dict) and accept(snap):
                        return snap
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _newest(pattern: str, directory: Path, newest: int) -> list[Path]:
    try:
        return sorted(directory.glob(pattern), key=lambda f: f.stat().st_mtime, reverse=True)[:newest]
    except OSError:
        return []


def cli_shell() -> str:
    """The shell as the CLI 2.1.330 names it in its environment text: the first of zsh and bash on PATH,
    with the login shell ($SHELL) added when it is another one (observed: no $SHELL gives "bash", $SHELL
    /bin/sh gives "bash (login shell: sh)")."""
    login = os.environ.get("SHELL") or ""
    found = shutil.which("zsh") or shutil.which("bash")
    if found is None:
        return "zsh" if "zsh" in login else "bash" if "bash" in login else login or "unknown"
    name = Path(found).name
    if not login or Path(login).name == name:
        return name
    return f"{name} (login shell: {Path(login).name})"


def _in_git_repo(cwd: Path) -> bool:
    return any((d / ".git").exists() for d in (cwd, *cwd.parents))


def live_environment(directory: Path, cwd: Path, newest: int = 8) -> dict[str, Any]:
    """The environment snapshot the CLI records for runs in `cwd` (a written transcript must carry exactly
    the live one, or the CLI adds an "# Environment update" naming the host). Read from the CLI's own
    newest transcripts for `cwd`, else from those of a sibling folder (the relay's run folders share one
    parent, so they differ only in the folder), else worked out the way the CLI 2.1.330 does it (with
    sessions off the CLI records none)."""
    snap = _recorded_environment(_newest("*.jsonl", directory, newest),
                                 lambda s: s.get("workingDirectory") == str(cwd))
    if snap is not None:
        return snap
    sibling = _recorded_environment(_newest("*/*.jsonl", directory.parent, newest),
                                    lambda s: Path(str(s.get("workingDirectory"))).parent == cwd.parent)
    if sibling is not None:
        return {**sibling, "workingDirectory": str(cwd)}
    uname = os.uname()
    return {"workingDirectory": str(cwd), "isWorktree": False, "isGitRepo": _in_git_repo(cwd),
            "additionalWorkingDirectories": [], "platform": sys.platform, "shell": cli_shell(),
            "osVersion": f"{uname.sysname} {uname.release}"}

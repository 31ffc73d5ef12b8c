"""Agent runs inside bubblewrap: the sandbox's command line and environment, built from a description.

The whole CLI (and so every tool it runs: Bash, Read, Write...) sees a fresh root holding only
system files under /usr, a few files of /etc, the CLI binary, its conversation's own folder and its
own CLI state folder (both read-write, at their real paths: sessions are keyed by the folder), plus
a unix socket to the relay's credential proxy (`credproxy.py`). No network, no other conversation,
no checkout, no config.json, no var/ (Redis socket, logs), no /root or /home, and a fresh
environment holding a worthless placeholder instead of the relay's Anthropic credential.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

API_SOCKET = "/run/anthropic.sock"   # where the proxy's socket appears inside the sandbox
ETC_FILES = ("/etc/ssl", "/etc/ca-certificates", "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf",
             "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/host.conf", "/etc/gai.conf")
# Debian's merged /usr: the top-level names are links into it
USR_LINKS = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64"))


@dataclass(frozen=True)
class Sandbox:
    """What one agent run may see."""
    cli_path: str                     # the CLI binary (resolved), bound read-only
    workdir: str                      # the conversation's folder: read-write, the working directory
    config_dir: str                   # the conversation's own CLI state (transcripts): read-write
    api_socket: str                   # the run's credential proxy socket, outside
    read_only: tuple[str, ...] = ()   # the run's input files (system prompt, tool list...)


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def probe() -> str | None:
    """None if bubblewrap can build a sandbox on this host, else why not."""
    path = bwrap_path()
    if not path:
        return "agent mode runs each conversation in a bubblewrap sandbox: install it (apt-get install bubblewrap)"
    argv = [path, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", *_links(), "--", "/usr/bin/true"]
    try:
        out = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap cannot run: {exc}"
    if out.returncode != 0:
        return f"bubblewrap cannot create a sandbox here: {out.stderr.decode(errors='replace').strip()[:300]}"
    return None


def _links() -> list[str]:
    argv: list[str] = []
    for target, link in USR_LINKS:
        if os.path.exists("/" + target):
            argv += ["--symlink", target, link]
    return argv


def argv(sb: Sandbox) -> list[str]:
    """`bwrap ... --` to put in front of the CLI's own command line."""
    out = [bwrap_path() or "bwrap", "--unshare-all",   # user, pid, ipc, uts, cgroup and network namespaces
           "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--ro-bind", "/usr", "/usr", *_links(),
           "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run", "--dir", "/var/tmp"]
    for f in ETC_FILES:
        if os.path.exists(f):
            out += ["--ro-bind", f, f]
    out += ["--ro-bind", sb.cli_path, sb.cli_path]
    for f in sb.read_only:
        out += ["--ro-bind", f, f]
    out += ["--bind", sb.config_dir, sb.config_dir, "--bind", sb.workdir, sb.workdir,
            "--bind", sb.api_socket, API_SOCKET,
            "--remount-ro", "/",                  # the skeleton root itself is read-only
            "--chdir", sb.workdir, "--"]
    return out


def env(config_dir: str, credential_var: str, placeholder: str, max_retries: int) -> dict[str, str]:
    """A fresh environment (nothing of the relay's): the CLI reaches the API only through the proxy."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": config_dir, "CLAUDE_CONFIG_DIR": config_dir,
            "LANG": "C.UTF-8", "TMPDIR": "/tmp", "ANTHROPIC_UNIX_SOCKET": API_SOCKET,
            "ANTHROPIC_BASE_URL": "http://localhost", credential_var: placeholder,
            "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": str(max_retries), "CLAUDE_CODE_SILENT_TURN_REMINDER": "0"}

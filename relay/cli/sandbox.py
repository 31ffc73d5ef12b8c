"""Agent runs inside bubblewrap: the sandbox's command line and environment, built from a description.

The whole CLI (and so every tool it runs: Bash, Read, Write...) sees a fresh root holding only
system files under /usr, a few files of /etc, the CLI binary, its conversation's own folder and its
own CLI state folder (both read-write, at their real paths: sessions are keyed by the folder), plus
a unix socket to the relay's credential proxy (`credproxy.py`). No network, no other conversation,
no checkout, no config.json, no var/ (Redis socket, logs), no /root or /home, and a fresh
environment holding a worthless placeholder instead of the relay's Anthropic credential.

The tools do not share the CLI's view of processes: the CLI's shell (`CLAUDE_CODE_SHELL`, which runs
every Bash command, its snapshot and any login profile) is `TOOL_SHELL`, a wrapper that puts each
command in a PID namespace of its own with a fresh /proc and no capabilities left. Without it a tool
running as the CLI's user could ptrace the CLI or take its output socket with `pidfd_getfd` (measured),
and forge what the relay reads. The CLI itself keeps two capabilities (`CLI_CAPS`, which exist only in its
user namespace) because making the tools' namespace and /proc needs them: measured, a nested user namespace cannot
mount a proc under bubblewrap's, and without a new /proc the CLI's /proc/<pid>/mem stays in reach.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

API_SOCKET = "/run/anthropic.sock"   # where the proxy's socket appears inside the sandbox
TOOL_SHELL = "/run/relay-tools/bash"  # the tools' shell inside (the CLI takes a CLAUDE_CODE_SHELL naming bash)
HELPERS = ("unshare", "setpriv")       # util-linux, under /usr: what TOOL_SHELL runs
# The CLI's capabilities, in its own user namespace only (nothing on the host): what TOOL_SHELL needs to
# make each command's PID namespace and /proc (SYS_ADMIN) and then empty the command's bounding set
# (SETPCAP). Ambient, so they hold for a non-root agent user too; every tool command runs with none.
CLI_CAPS = ("--cap-drop", "ALL", "--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETPCAP")
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
    tool_shell: str = ""              # the wrapper written by `write_tool_shell`, outside


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _helper(name: str) -> str | None:
    """A util-linux program under /usr (the only system folder in the sandbox)."""
    found = shutil.which(name, path="/usr/bin:/usr/sbin:/bin:/sbin")
    real = os.path.realpath(found) if found else ""
    return real if real.startswith("/usr/") else None


def tool_shell_text() -> str:
    unshare, setpriv = (_helper(n) or n for n in HELPERS)
    bash = _helper("bash") or "/usr/bin/bash"
    return ("#!/bin/sh\n"
            "# The shell of an agent run's tools (relay/cli/sandbox.py): each command in a PID namespace of its\n"
            "# own, with its own /proc and no capabilities, so the CLI and its output socket are out of reach.\n"
            f"exec {unshare} --pid --fork --mount-proc --kill-child -- {setpriv} --bounding-set=-all "
            f"--inh-caps=-all --ambient-caps=-all --no-new-privs -- {bash} \"$@\"\n")


def write_tool_shell(folder: str) -> str:
    path = os.path.join(folder, "tool-shell")
    with open(path, "w", encoding="utf-8") as f:
        f.write(tool_shell_text())
    os.chmod(path, 0o755)
    return path


def probe() -> str | None:
    """None if bubblewrap can build a sandbox on this host whose tools' shell works, else why not."""
    path = bwrap_path()
    if not path:
        return "agent mode runs each conversation in a bubblewrap sandbox: install it (apt-get install bubblewrap)"
    missing = [n for n in (*HELPERS, "bash") if not _helper(n)]
    if missing:
        return f"agent mode needs {', '.join(missing)} under /usr (util-linux, bash) for its tools' shell"
    import tempfile

    with tempfile.TemporaryDirectory(prefix="relay-probe-") as d:
        shell = write_tool_shell(d)
        os.chmod(d, 0o755)
        argv = [path, "--unshare-all", "--die-with-parent", *CLI_CAPS, "--ro-bind", "/usr", "/usr",
                *_links(), "--proc", "/proc", "--dev", "/dev", "--ro-bind", shell, TOOL_SHELL,
                "--", TOOL_SHELL, "-c", "ls /proc"]
        try:
            out = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"bubblewrap cannot run: {exc}"
    if out.returncode != 0:
        return f"bubblewrap cannot create a sandbox here: {out.stderr.decode(errors='replace').strip()[:300]}"
    pids = [w for w in out.stdout.decode(errors="replace").split() if w.isdigit()]
    if pids != ["1"]:  # the tools' shell must see only itself
        return f"the sandbox's tools' shell does not get a PID namespace of its own here (it sees {pids[:5]})"
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
           "--die-with-parent", "--new-session", *CLI_CAPS,
           "--ro-bind", "/usr", "/usr", *_links(),
           "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run", "--dir", "/var/tmp"]
    for f in ETC_FILES:
        if os.path.exists(f):
            out += ["--ro-bind", f, f]
    out += ["--ro-bind", sb.cli_path, sb.cli_path]
    for f in sb.read_only:
        out += ["--ro-bind", f, f]
    if sb.tool_shell:
        out += ["--ro-bind", sb.tool_shell, TOOL_SHELL]
    out += ["--bind", sb.config_dir, sb.config_dir, "--bind", sb.workdir, sb.workdir,
            "--bind", sb.api_socket, API_SOCKET,
            "--remount-ro", "/",                  # the skeleton root itself is read-only
            "--chdir", sb.workdir, "--"]
    return out


def env(config_dir: str, credential_var: str, placeholder: str, max_retries: int) -> dict[str, str]:
    """A fresh environment (nothing of the relay's): the CLI reaches the API only through the proxy."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": config_dir, "CLAUDE_CONFIG_DIR": config_dir,
            "SHELL": TOOL_SHELL, "CLAUDE_CODE_SHELL": TOOL_SHELL,
            "LANG": "C.UTF-8", "TMPDIR": "/tmp", "ANTHROPIC_UNIX_SOCKET": API_SOCKET,
            "ANTHROPIC_BASE_URL": "http://localhost", credential_var: placeholder,
            "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": str(max_retries), "CLAUDE_CODE_SILENT_TURN_REMINDER": "0"}

"""`python -m relay check` validates the configuration and the CLI before the server starts."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_settings


def _check() -> int:
    from .cli import child_env, probe_cli

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    info = probe_cli(settings["claude_bin"], child_env(dict(os.environ), settings["cli_max_retries"]))
    if info.get("too_old"):
        print(f"relay: claude_bin: {info['problem']}", file=sys.stderr)
        return 2
    if not info.get("ok"):
        print(f"relay: warning: {info['problem']} (the relay will answer 503 until this is fixed)",
              file=sys.stderr)
    else:
        print(f"relay: config {settings.source} OK; Claude Code CLI {info['version']} at {info['path']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="validate config.json / environment and the Claude CLI")
    args = parser.parse_args(argv)
    if args.cmd == "check":
        return _check()
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

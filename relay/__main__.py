"""`python -m relay check` validates the configuration and the CLI before the server starts.

Also: `keys` (API keys), `accounts` (Claude accounts: list, check, clear), `stats snapshot` (write log/stats.json) and `config --markdown` (the configuration
reference, docs/configuration.md, generated from `relay.config.SCHEMA`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .config import ConfigError, load_settings


def _check(conformance: bool = False, claude_bin: str | None = None, as_json: bool = False) -> int:
    from .cli.agent import check as check_agent
    from .cli.setup import CliSetup

    try:
        settings = load_settings()
        check_agent(settings)  # agent mode: its user, and a working bubblewrap
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    if conformance:
        return _conformance(CliSetup.from_settings(settings), claude_bin, as_json)
    info = CliSetup.from_settings(settings).probe()  # the workers' own environment; no folders are made
    if info.get("too_old"):
        print(f"relay: claude_bin: {info['problem']}", file=sys.stderr)
        return 2
    if not info.get("ok"):
        print(f"relay: warning: {info['problem']} (the relay will answer 503 until this is fixed)",
              file=sys.stderr)
    else:
        print(f"relay: config {settings.source} OK; Claude Code CLI {info['version']} at {info['path']}")
    _check_redis(settings["redis_url"])
    return 0


def _check_redis(url: str) -> None:
    """An external Redis (REDIS_URL) whose policy could evict the limits' counters gets a warning (the
    private one runs with noeviction)."""
    from .state.connection import connect, eviction_risk

    if not url:
        return
    try:
        risk = eviction_risk(connect(url))
    except Exception as exc:  # unreachable now, or INFO refused: say so, the relay may still start
        print(f"relay: warning: could not read the Redis memory policy ({exc}); it must be "
              "`maxmemory-policy noeviction` (docs/operations.md, Redis memory)", file=sys.stderr)
        return
    if risk:
        print(f"relay: warning: REDIS_URL: {risk}", file=sys.stderr)


def _conformance(cli: object, claude_bin: str | None, as_json: bool) -> int:
    """`check --conformance`: the self-test of the CLI against a local mock API (no tokens spent)."""
    from .cli.conformance import run_conformance
    from .cli.setup import CliSetup

    assert isinstance(cli, CliSetup)
    report = run_conformance(claude_bin or cli.claude_bin, cli.env)
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        for c in report.checks:
            print(c.line())
        print(f"relay: {report.summary()}", file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _accounts(action: str) -> int:
    """`accounts list`: each account's shared state (the quota meter, from Redis).
    `accounts check`: whether each account's login is present, from `claude auth status` (no model call)."""
    from .cli.invocation import auth_status_argv
    from .cli.setup import CliSetup, account_envs, login_status

    loaded = _account_settings()
    if loaded is None:
        return 2
    settings, specs = loaded
    cli_setup = CliSetup.from_settings(settings)
    envs, problems = account_envs(specs, cli_setup.env)
    if action == "list":
        for a in _shared_accounts(settings, specs).snapshot(settings["sessions.ttl_hours"] * 3600, problems):
            print(json.dumps(a))
        return 0
    cli = cli_setup.probe()
    if not cli.get("ok"):
        print(f"relay: {cli['problem']}", file=sys.stderr)
        return 2
    bad = 0
    for spec in specs:
        if spec.name in problems:
            ok, detail = False, problems[spec.name]
        else:
            st = login_status(auth_status_argv(str(cli["path"])), envs[spec.name])
            ok = bool(st.get("loggedIn"))
            detail = (f"auth method {st.get('authMethod')}, config directory {st.get('configDirectory')}"
                      + (f", login expires {st['loginExpiresAt']}" if st.get("loginExpiresAt") else "")
                      if ok else str(st.get("error") or "not logged in"))
        bad += not ok
        print(json.dumps({"name": spec.name, "logged_in": ok, "detail": detail}))
    print("relay: `claude auth status` checks the login locally; it cannot tell whether Anthropic still accepts "
          "a token (that needs a model call): the relay finds out on the account's first request.",
          file=sys.stderr)
    return 1 if bad else 0


def _account_settings() -> tuple[Any, list[Any]] | None:
    """The settings and the configured accounts (the implicit `default` without any); None, with the
    problem printed, when the configuration does not load."""
    from .core.routing import AccountSpec

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return None
    return settings, [AccountSpec.from_config(a) for a in settings["accounts"]] or [AccountSpec("default", implicit=True)]


def _shared_accounts(settings: Any, specs: list[Any]) -> Any:
    """The accounts' shared state in Redis, as the workers see it (their alert claims included)."""
    from .state.accounts import Accounts
    from .state.alerts import Alerts
    from .state.connection import connect, host_id
    from .state.leases import Leases

    r = connect(settings["redis_url"])
    host = settings["host_id"] or host_id()
    alerts = Alerts(r, [], host)
    return Accounts(r, Leases(r), specs, host, settings["login_recheck_s"], settings["accounts_overage"],
                    settings["alerts.thresholds"], alerts.emit, settings["alerts.repeat_window_s"], alerts.forget)


def _accounts_clear(name: str | None) -> int:
    """`accounts clear NAME`: the admin's reset of an account's limit, overage and login state."""
    if not name:
        print("relay: accounts clear needs the account's name (see `python -m relay accounts list`)", file=sys.stderr)
        return 2
    loaded = _account_settings()
    if loaded is None:
        return 2
    settings, specs = loaded
    accounts = _shared_accounts(settings, specs)
    try:
        before = accounts.clear(name)
    except KeyError:
        print(f"relay: no account named {name!r} (configured: {', '.join(a.name for a in specs)})", file=sys.stderr)
        return 1
    after = next(a for a in accounts.snapshot() if a["name"] == name)
    print(json.dumps(after))
    print(f"relay: account {name!r} cleared (it was {before.get('cooldown_kind') or 'not limited'}"
          f"{'; login problem ' + repr(before['login_problem']) if before.get('login_problem') else ''})",
          file=sys.stderr)
    return 0


def _snapshot() -> int:
    from .state.connection import connect
    from .state.stats import Stats

    settings = load_settings()
    stats = Stats(connect(settings["redis_url"]), settings.path("log_dir") / "stats.json",
                  settings["max_requests_per_day"], settings["stats.log_first_message"], settings["prices"])
    deadline = time.monotonic() + 10
    while not stats.write_snapshot():  # a worker still writing its own: wait for it, boundedly
        if time.monotonic() > deadline:
            print("relay: stats snapshot skipped: another process held the lock for 10 s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def _markdown() -> int:
    from .config import markdown

    sys.stdout.write(markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate config.json / environment and the Claude CLI")
    check.add_argument("--conformance", action="store_true",
                       help="also run the CLI the relay's way against a local mock API (no tokens spent) and "
                            "check every behaviour the relay relies on; exit code 1 if one changed")
    check.add_argument("--claude-bin", metavar="PATH",
                       help="with --conformance: test this CLI instead of the configured claude_bin")
    check.add_argument("--json", action="store_true", help="with --conformance: the report as one JSON line")
    keys = sub.add_parser("keys", help="manage API keys (stored as SHA-256 in the config file and Redis)")
    ksub = keys.add_subparsers(dest="action", required=True)
    add = ksub.add_parser("add", help="create a key; it is printed once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true")
    add.add_argument("--rpm", type=int)
    add.add_argument("--tokens-per-day", type=int)
    add.add_argument("--max-concurrent", type=int)
    add.add_argument("--models", help="comma-separated model ids this key may use")
    ksub.add_parser("list", help="list key names and limits (never the keys)")
    rev = ksub.add_parser("revoke", help="revoke a key by name (effective on every worker within seconds)")
    rev.add_argument("name")
    acc = sub.add_parser("accounts", help="Claude accounts: list their state, check their logins, clear one's state")
    acc.add_argument("action", choices=["list", "check", "clear"])
    acc.add_argument("name", nargs="?", help="with clear: the account's name")
    stats = sub.add_parser("stats", help="the stats history in Redis")
    stats.add_argument("action", choices=["snapshot"], help="write log/stats.json now (the master runs this "
                       "after the workers exit, so a worker killed outright loses nothing recorded)")
    conf = sub.add_parser("config", help="print the configuration reference")
    conf.add_argument("--markdown", action="store_true", required=True,
                      help="as Markdown, generated from relay/config.py (this is docs/configuration.md)")
    args = parser.parse_args(argv)
    if args.cmd == "config":
        return _markdown()
    if args.cmd == "check":
        return _check(args.conformance, args.claude_bin, args.json)
    if args.cmd == "accounts":
        return _accounts_clear(args.name) if args.action == "clear" else _accounts(args.action)
    if args.cmd == "stats":
        return _snapshot()
    from .state import apikeys as auth

    if args.action == "add":
        key = auth.keys_add(args.name, admin=args.admin, rpm=args.rpm, tokens_per_day=args.tokens_per_day,
                            max_concurrent=args.max_concurrent,
                            models=[m.strip() for m in args.models.split(",")] if args.models else None)
        print(key)
        print(f"relay: key {args.name!r} added; it is shown only this once.", file=sys.stderr)
        return 0
    if args.action == "list":
        for k in auth.keys_list():
            print(json.dumps(k))
        return 0
    if auth.keys_revoke(args.name):
        print(f"relay: key {args.name!r} revoked", file=sys.stderr)
        return 0
    print(f"relay: no key named {args.name!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

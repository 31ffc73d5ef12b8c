"""What a failed CLI turn means for the client: upstream errors mapped onto relay errors. Pure.

The CLI reports API failures as a `result` with `is_error: true` (often `subtype: "success"`),
`api_error_status` and a human text; subscription limits also arrive as a `rate_limit_event`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    SubscriptionLimited,
    Unavailable,
    UpstreamError,
)
from .events import Turn

LOGIN_HINT = ("The Claude Code CLI on the relay host is not logged in or its login expired. "
              "Operator: run `claude` as the relay's user and log in (/login), or set "
              "CLAUDE_CODE_OAUTH_TOKEN from `claude setup-token`, then retry.")
LIMIT_TEXT = re.compile(r"(hit your .*limit|usage limit reached)", re.I)
RESETS = re.compile(r"resets\s+(?:at\s+)?(\d{1,2})(?::(\d{2}))?\s*(am|pm)?(?:\s*\(([^)]+)\))?", re.I)
LEGACY_RESET = re.compile(r"usage limit reached\|(\d{9,})", re.I)
# Anthropic's 400 for a subscription request it would bill as extra usage (CLI: "API Error: 400 Third-party
# apps now draw from your extra usage, not your plan limits. ...")
EXTRA_USAGE = re.compile(r"draw(?:s)? from (?:your )?extra usage", re.I)
# Anthropic's refusal of a CLI release it no longer accepts (the CLI: "API Error: 400 This version of Claude
# Code is no longer supported. Please update to version X or later.", with `api_error_type` in its result)
VERSION_TOO_OLD = "claude_code_version_too_old"
TOO_OLD_TEXT = re.compile(r"minimum (?:supported |required )?version|version of claude code is no longer supported|"
                          r"claude code (?:version )?\S* ?is too old", re.I)
NEEDED_VERSION = re.compile(r"(?:update to|upgrade to|at least|minimum (?:supported |required )?version(?: is)?:?)"
                            r"\s*(?:version\s*)?v?(\d+\.\d+\.\d+)", re.I)
TOO_OLD_HINT = ("Operator: update the Claude Code CLI on the relay host (npm install -g @anthropic-ai/claude-code@latest), "
                "check it with `python -m relay check --conformance`, then restart the relay.")
# errors that concern one account only: the run may move to another account before the first byte
ACCOUNT_ERRORS = ("cli_login_required", "extra_usage_required", "upstream_forbidden")


class SessionMissing(RelayError):
    """`--resume` named a session the CLI no longer has: retry with the full history."""
    status = 502
    code = "cli_session_missing"


def session_gone(text: str) -> bool:
    """The CLI could not resume: no such session, or (`--resume-session-at`) the tool-call message is not
    in the session's loaded chain, although the file may hold it on another branch (seen in 2.1.330)."""
    return "No conversation found" in text or "No message found with message.uuid" in text


def reset_seconds(turn: Turn, now: float) -> float | None:
    """Seconds until a subscription limit resets, from the rate-limit event or the CLI's text."""
    info = turn.rate_limit or {}
    resets_at = info.get("resetsAt")
    if isinstance(resets_at, (int, float)) and resets_at > 0:
        return max(1.0, float(resets_at) - now)
    text = str(turn.result.get("result") or "")
    legacy = LEGACY_RESET.search(text)
    if legacy:
        return max(1.0, float(legacy.group(1)) - now)
    m = RESETS.search(text)
    if not m:
        return None
    hour, minute, ampm, tzname = int(m.group(1)), int(m.group(2) or 0), (m.group(3) or "").lower(), m.group(4)
    if ampm == "pm" and hour < 12:
        hour += 12
    if ampm == "am" and hour == 12:
        hour = 0
    tz: Any = None
    try:
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(tzname) if tzname else None
    except Exception:  # unknown zone name: fall back to UTC
        tz = None

    base = datetime.fromtimestamp(now, tz or UTC)
    target = base.replace(hour=hour % 24, minute=minute, second=0, microsecond=0)
    if target <= base:
        target += timedelta(days=1)
    return max(1.0, (target - base).total_seconds())


def is_subscription_limit(turn: Turn) -> bool:
    """The subscription's own limit, not a rate limit or a text that mentions one. The structured signals
    decide: a refusal (HTTP 429, or the CLI's own `rate_limit` error) that the rate-limit event calls
    `rejected` or whose text is the CLI's limit message. The words alone never limit an account: a model's
    answer or another error's message may quote them."""
    res = turn.result
    status = res.get("api_error_status")
    refused = status == 429 or (status is None and turn.error_kind == "rate_limit")
    if not res.get("is_error") or not refused:
        return False
    rejected = (turn.rate_limit or {}).get("status") == "rejected"
    return rejected or bool(LIMIT_TEXT.search(str(res.get("result") or "")))


def is_refusal(turn: Turn) -> bool:
    """The model refused. The CLI (2.1.3xx) continues once after a refused message with a safety note,
    so a refusal anywhere in the turn counts, not only in its last message."""
    text = str(turn.result.get("result") or "")
    return turn.stop_reason == "refusal" or "refusal" in turn.stop_reasons or \
        "appears to violate our Usage Policy" in text


def needed_version(turn: Turn) -> tuple[bool, str | None]:
    """Whether the API refused the CLI's version, and the version it asks for when it says."""
    res = turn.result
    text = " ".join([str(res.get("result") or "")] + [str(e) for e in res.get("errors") or []])
    refused = VERSION_TOO_OLD in (res.get("api_error_type"), turn.error_kind) or VERSION_TOO_OLD in text \
        or bool(TOO_OLD_TEXT.search(text))
    m = NEEDED_VERSION.search(text) if refused else None
    return refused, m.group(1) if m else None


def classify(turn: Turn, now: float, default_retry_after: float) -> RelayError | None:
    """None when the turn succeeded (or ended in a way that is still an answer)."""
    res = turn.result
    if turn.interrupted_for_tools and turn.tool_calls:
        return None  # the relay stopped the turn to hand the calls to the client
    if not res.get("is_error"):
        return None
    status = res.get("api_error_status")
    text = str(res.get("result") or "; ".join(map(str, res.get("errors") or [])) or "unknown CLI error")
    if any(session_gone(str(e)) for e in res.get("errors") or []) or session_gone(text):
        return SessionMissing(text)
    if res.get("subtype") in ("error_max_turns", "error_max_budget_usd") or is_refusal(turn):
        return None  # an answer that stopped early: finish_reason says so
    too_old, needed = needed_version(turn)
    if too_old:
        wanted = f"version {needed} or newer" if needed else "a newer version"
        return Unavailable(f"Anthropic no longer accepts the relay's Claude Code CLI: it needs {wanted}. "
                           f"{TOO_OLD_HINT} (CLI said: {text})", code="cli_too_old")
    if status == 400 and EXTRA_USAGE.search(text):  # Anthropic's 400, not any text that quotes it
        return RateLimited(f"The Claude account would draw on extra usage (overage) for this request: {text}",
                           code="extra_usage_required", retry_after=default_retry_after)
    if status == 429 or (status is None and turn.error_kind == "rate_limit"):
        if is_subscription_limit(turn):
            wait = reset_seconds(turn, now) or default_retry_after
            return SubscriptionLimited(f"The Claude subscription behind this relay hit its usage limit: {text}",
                                       retry_after=wait, headers={"x-should-retry": "false"} if wait > 120 else None)
        return RateLimited(f"Anthropic is rate limiting requests: {text}", retry_after=default_retry_after)
    if status == 403:
        return Unavailable(f"Anthropic refused the relay's credentials: {text}", code="upstream_forbidden")
    if status == 401 or turn.error_kind == "authentication_failed" or "Not logged in" in text \
            or "OAuth token" in text:
        return Unavailable(f"{LOGIN_HINT} (CLI said: {text})", code="cli_login_required")
    if status == 404 or turn.error_kind == "model_not_found":
        return NotFound(text, code="model_not_found", param="model")
    if status == 413:
        return PayloadTooLarge(text, code="request_too_large")
    if status == 400 or turn.error_kind == "invalid_request":
        return BadRequest(text, code="upstream_invalid_request")
    if status == 529 or "Overloaded" in text or "overloaded" in text:
        return Unavailable(f"Anthropic is overloaded: {text}", code="overloaded", retry_after=5)
    if isinstance(status, int) and status >= 500:
        return UpstreamError(text, code="upstream_server_error")
    if status is None and ("timed out" in text.lower() or "connection" in text.lower()):
        return UpstreamError(f"Could not reach Anthropic: {text}", code="upstream_unreachable")
    return UpstreamError(text)


def is_account_error(err: RelayError) -> bool:
    """A failure of the account's quota or login, not of the request: another account may answer."""
    return isinstance(err, SubscriptionLimited) or err.code in ACCOUNT_ERRORS


def finish_reason(turn: Turn, legacy_functions: bool = False) -> str:
    if turn.tool_calls:
        return "function_call" if legacy_functions else "tool_calls"
    if is_refusal(turn):
        return "content_filter"
    if turn.result.get("subtype") in ("error_max_turns", "error_max_budget_usd"):
        return "length"
    reason = turn.stop_reason
    if "max_tokens" in turn.stop_reasons and reason != "tool_use":
        # the CLI continues after max_tokens by itself; only report length if it ended there
        reason = turn.stop_reasons[-1]
    return {"max_tokens": "length", "model_context_window_exceeded": "length", "refusal": "content_filter",
            "tool_use": "stop"}.get(reason or "", "stop")

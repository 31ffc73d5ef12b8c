"""Alert messages and the bodies webhooks get: generic JSON, Slack-compatible, Telegram-compatible. Pure."""

from __future__ import annotations

from typing import Any

EVENTS = ("account_limited", "account_recovered", "utilization_threshold", "overage_detected", "login_failing",
          "run_timeout", "runaway_conversation", "helper_down", "helper_restarted", "cli_too_old",
          "cli_selftest_failed")
FORMATS = ("json", "slack", "telegram")


def alert(event: str, account: str | None, text: str, alert_id: str, host: str, at: str,
          details: dict[str, Any] | None = None) -> dict[str, Any]:
    """One alert as the outbox keeps it (and as the `json` format posts it)."""
    return {"id": alert_id, "event": event, "account": account, "text": text, "host": host, "time": at,
            "details": details or {}}


def body(fmt: str, item: dict[str, Any], chat_id: Any = None) -> dict[str, Any]:
    """What one webhook receives for an alert, in its format."""
    line = f"[claude-relay] {item['text']}"
    if fmt == "slack":
        return {"text": line}
    if fmt == "telegram":
        return {"chat_id": chat_id, "text": line}
    return item


def wanted(hook: dict[str, Any], event: str) -> bool:
    events = hook.get("events")
    return not events or event in events

"""Alert messages and the bodies webhooks get: generic JSON, Slack-compatible, Telegram-compatible. Pure.

An alert's text quotes what the CLI, the model or Anthropic said (an error message, a reason), which the
relay does not control: `plain()` takes every markup and link out of it before it is queued, and each
format escapes what its chat would still read as markup, so an alert cannot ping a channel, hide a link
behind a harmless label or format itself as the relay's own words.
"""

from __future__ import annotations

import re
from typing import Any

EVENTS = ("account_limited", "account_recovered", "utilization_threshold", "overage_detected", "login_failing",
          "run_timeout", "runaway_conversation", "helper_down", "helper_restarted", "cli_too_old",
          "cli_selftest_failed", "model_mismatch")
FORMATS = ("json", "slack", "telegram")


MAX_TEXT = 1500
# Slack's control sequences (<!channel>, <@U123>, <#C1>, <https://x|label>) and HTML tags (<a href=...>, <b>)
ANGLED = re.compile(r"<([^<>\n]{0,2000})>")
MD_LINK = re.compile(r"!?\[([^\[\]\n]{0,500})\]\(([^()\s]{0,2000})\)")
SCHEME = re.compile(r"\b([a-z][a-z0-9+.-]{1,15}):(//)|\b(mailto|tel|tg|sms|javascript|data|slack):(?=\S)", re.I)
EMPHASIS = re.compile(r"[`*~]+|\|\|")        # Markdown emphasis, code and spoilers (underscores stay: identifiers)
# a host name Slack or Telegram would turn into a link by itself ("evil.example/login", "claude.ai")
HOSTLIKE = re.compile(r"\b((?:[a-z0-9-]{1,63}\.)+[a-z][a-z0-9-]{1,62})\b", re.I)
ENTITY = re.compile(r"&(#\d{1,7}|#x[0-9a-f]{1,6}|[a-z]{2,10});", re.I)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
MENTION = re.compile(r"(?<![\w@])@(?=[a-z0-9_]{2,}(?![\w/-]*/))", re.I)   # @name, not an npm @scope/package
SHOUT = re.compile(r"(?<![\w@])([@!])(channel|here|everyone|group)\b", re.I)
WJ = "\u2060"  # word joiner: invisible, and breaks a mention or a link without changing what one reads


def _angled(m: re.Match[str]) -> str:
    inner = m.group(1)
    if inner[:1] in "!@#":
        return ""                                   # a Slack mention or broadcast
    target, _, label = inner.partition("|")
    if SCHEME.match(target):
        return f"{label} ({target})" if label else target   # the target shown (defanged below), not hidden
    return ""                                       # an HTML tag


def defang(text: str) -> str:
    """Links as text that no chat turns into a link: `hxxps://evil[.]example/login`."""
    text = SCHEME.sub(lambda m: (m.group(1) or m.group(3)).lower().replace("http", "hxxp") + "[:]" + (m.group(2) or ""),
                      text)
    return HOSTLIKE.sub(lambda m: m.group(1).replace(".", "[.]"), text)


def plain(text: str) -> str:
    """Alert text with no markup left: Slack control sequences and HTML tags removed (a link's target kept
    as text), Markdown links as `label (target)`, every URL and host name defanged, Markdown emphasis, HTML
    entities and invisible or direction-changing characters dropped, whitespace collapsed."""
    text = CONTROL.sub("", str(text))
    text = ENTITY.sub("", text)
    text = ANGLED.sub(_angled, text)
    text = MD_LINK.sub(lambda m: f"{m.group(1)} ({m.group(2)})" if m.group(1) else m.group(2), text)
    text = EMPHASIS.sub("", defang(text)).replace("<", "‹").replace(">", "›")
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def _no_pings(text: str) -> str:
    return MENTION.sub("@" + WJ, SHOUT.sub(lambda m: m.group(1) + WJ + m.group(2), text))


def slack_text(text: str) -> str:
    """Slack reads `&`, `<` and `>` as markup: escaped as its documentation says; no @channel/@here."""
    return _no_pings(text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


def alert(event: str, account: str | None, text: str, alert_id: str, host: str, at: str,
          details: dict[str, Any] | None = None) -> dict[str, Any]:
    """One alert as the outbox keeps it (and as the `json` format posts it)."""
    return {"id": alert_id, "event": event, "account": account, "text": text, "host": host, "time": at,
            "details": details or {}}


def body(fmt: str, item: dict[str, Any], chat_id: Any = None) -> dict[str, Any]:
    """What one webhook receives for an alert, in its format."""
    line = f"[claude-relay] {item['text']}"
    if fmt == "slack":  # mrkdwn off: *bold*, _italic_ and ~strike~ in a quoted text stay characters
        return {"text": slack_text(line), "mrkdwn": False}
    if fmt == "telegram":  # no parse_mode (plain text: no HTML or Markdown entities), no link previews
        return {"chat_id": chat_id, "text": _no_pings(line), "link_preview_options": {"is_disabled": True}}
    return item


def wanted(hook: dict[str, Any], event: str) -> bool:
    events = hook.get("events")
    return not events or event in events

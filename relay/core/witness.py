"""What the relay itself saw of an agent run's API calls, at its credential proxy. Pure.

An agent run's tools share the sandbox with the CLI, so nothing the CLI writes is taken on trust for
accounts and billing: the proxy (`cli/credproxy.py`) feeds each upstream answer through a `CallMeter`,
which reads the real `anthropic-ratelimit-unified-*` headers, the usage of every message (the CLI's
own calls and any call a tool makes with the run's placeholder) and an error's status and text. The
`Witness` of the run (cli/witness.py) sums them; the pipeline charges that usage and notes that account state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .events import USAGE_KEYS
from .record import figure

UNIFIED = "anthropic-ratelimit-unified-"
# the CLI's own names for the windows and their header families (read from the pinned 2.1.330)
WINDOWS = (("five_hour", "5h"), ("seven_day", "7d"), ("seven_day_overage_included", "7d_oi"),
           ("overage", "overage"))
WINDOW_STATUSES = ("allowed", "allowed_warning", "rejected")
MAX_ERROR_BYTES = 64 * 1024
MAX_LINE_BYTES = 1 << 20   # an SSE line longer than this is not parsed (usage events are small)


def _number(v: str | None) -> float | None:
    if v is None or v == "":
        return None
    try:
        n = float(v)
    except ValueError:
        return None
    return n if n == n and n not in (float("inf"), float("-inf")) else None


def rate_limit_info(headers: Iterable[tuple[str, str]]) -> dict[str, Any] | None:
    """The unified rate-limit headers of one answer, in the shape of the CLI's `rate_limit_event`
    (`rate_limit_info`); None when the answer carried none (an API key, or not Anthropic)."""
    h = {k.lower(): v for k, v in headers if k.lower().startswith(UNIFIED)}
    if UNIFIED + "status" not in h:
        return None
    info: dict[str, Any] = {"status": h[UNIFIED + "status"][:40]}
    reset = _number(h.get(UNIFIED + "reset"))
    if reset is not None:
        info["resetsAt"] = round(reset)
    for field, header in (("rateLimitType", "representative-claim"), ("overageStatus", "overage-status"),
                          ("overageDisabledReason", "overage-disabled-reason")):
        if h.get(UNIFIED + header):
            info[field] = h[UNIFIED + header][:80]
    in_use = h.get(UNIFIED + "overage-in-use") == "true"
    info["isUsingOverage"] = in_use or (info["status"] == "rejected"
                                        and info.get("overageStatus") in ("allowed", "allowed_warning"))
    windows: dict[str, dict[str, Any]] = {}
    for name, short in WINDOWS:
        util, wreset = _number(h.get(f"{UNIFIED}{short}-utilization")), _number(h.get(f"{UNIFIED}{short}-reset"))
        surpassed = _number(h.get(f"{UNIFIED}{short}-surpassed-threshold"))
        status = h.get(f"{UNIFIED}{short}-status")
        w: dict[str, Any] = {}
        if util is not None:
            w["utilization"] = max(0.0, util)
        if wreset is not None:
            w["resetsAt"] = round(wreset)
        if surpassed is not None:
            w["surpassedThreshold"] = surpassed
        if status in WINDOW_STATUSES and name != "overage":
            w["status"] = status
        if w:
            windows[name] = w
    if windows:
        info["unifiedWindows"] = windows
    return info


class CallMeter:
    """One forwarded answer: fed the bytes as they pass, it keeps the usage of the message (an SSE
    stream's `message_start` and `message_delta`, or a JSON body's `usage`) and an error's text."""

    def __init__(self, path: str, status: int, headers: Iterable[tuple[str, str]]) -> None:
        headers = list(headers)
        self.billed = path.split("?", 1)[0] == "/v1/messages"   # count_tokens counts, it is not usage
        self.status = status
        self.info = rate_limit_info(headers)
        ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
        self.stream = "text/event-stream" in ctype
        self.usage: dict[str, int] = {}
        self._buf = b""
        self._body = b""
        self._skip = False

    def feed(self, chunk: bytes) -> None:
        if self.stream and self.status < 400:
            self._lines(chunk)
        elif len(self._body) < MAX_ERROR_BYTES * 16:
            self._body += chunk

    def _lines(self, chunk: bytes) -> None:
        self._buf += chunk
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE_BYTES:  # a huge text delta: not a usage line
                    self._buf, self._skip = b"", True
                return
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            if self._skip:
                self._skip = False
                continue
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        try:
            ev = json.loads(data)
        except ValueError:
            return
        if not isinstance(ev, dict):
            return
        if ev.get("type") == "message_start":
            self._count((ev.get("message") or {}).get("usage"))
        elif ev.get("type") == "message_delta":
            self._count(ev.get("usage"))

    def _count(self, usage: Any) -> None:
        """Each figure as last reported (message_delta's are cumulative), never below zero."""
        if isinstance(usage, dict):
            self.usage.update({k: figure(v) for k, v in usage.items() if k in USAGE_KEYS})

    def close(self) -> None:
        if self.stream and self.status < 400:
            if self._buf:
                self._lines(b"\n")
            return
        try:
            body = json.loads(self._body or b"null")
        except ValueError:
            body = None
        if isinstance(body, dict) and self.status < 400:
            self._count(body.get("usage"))
        self._body = self._body[:MAX_ERROR_BYTES]

    def error_text(self) -> str:
        try:
            body = json.loads(self._body)
            err = body.get("error") if isinstance(body, dict) else None
            msg = err.get("message") if isinstance(err, dict) else None
            if isinstance(msg, str):
                return msg[:2000]
        except ValueError:
            pass
        return self._body[:2000].decode("utf-8", "replace")

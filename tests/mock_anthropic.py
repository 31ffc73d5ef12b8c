"""A small mock of the Anthropic Messages API for driving the real Claude Code CLI in tests.

The reply is chosen by markers in the text of the last user message (so concurrent CLI runs from
several gunicorn workers each get their own behaviour), and every request body is recorded.

Markers (any number, anywhere in the last user message):
  MOCK:error=<status>[:<retry-after>]   answer with an HTTP error (401/403/404/429/500/529 ...)
  MOCK:too_old=<version>                the API's refusal of an old CLI: 400 `claude_code_version_too_old`
                                        asking for <version> or later
  MOCK:fail_first=<n>:<status>          the first n requests with this text get an HTTP error, then normal
  MOCK:subscription_limit               429 with the unified subscription headers (status rejected)
  MOCK:stall=<seconds>                  send headers + message_start, then go silent
  MOCK:delay=<seconds>                  wait before answering at all
  MOCK:slow=<ms>                        pause between text deltas
  MOCK:pause=<seconds>                  go silent after the first text delta
  MOCK:model_ms=<ms>                    in the first user message: every request of the conversation waits
                                        that long before answering (a model's time per step; make bench)
  MOCK:think=<seconds>                  after message_start, silent that long (a model thinking), then answer
  MOCK:break_stream                     break the SSE stream after one delta; the non-stream retry fails
  MOCK:words=<n>                        answer with n words, one delta each
  MOCK:wide=<chars>                     with words=: each word that many characters (a long answer in few deltas)
  MOCK:thinking                         a thinking block before the answer
  MOCK:max_tokens                       stop with stop_reason max_tokens
  MOCK:refusal                          stop with stop_reason refusal
  MOCK:tool=<name>                      answer with a tool_use block for tool <name> (suffix match)
  MOCK:tools=<n1>,<n2>                  parallel tool_use blocks
  MOCK:loop=<n>                         in the first user message with tool= or tools=: an agent loop that
                                        calls those tools again after each result until n steps were made
  MOCK:bash=<cmd_with_underscores>      the command of a Bash tool_use (underscores become spaces); in a loop
                                        (from the first user message) `{step}` becomes the step number
  MOCK:bash_steps=<n>                   in the first user message: an agent loop of n Bash calls, one a step,
                                        `echo step0` ... `echo step<n-1>`, then a text answer (Claude Code's
                                        own Bash, or the relay's mcp__client__Bash)
  MOCK:write=<path>                     the file_path of a Write tool_use (content "written-by-agent")
  MOCK:read=<absolute path>             the file_path of a Read tool_use
  MOCK:structured                       call the StructuredOutput tool with MOCK_STRUCTURED_INPUT
  MOCK:served_model=<id>                answer as model <id> (a fallback or downgrade), not the one asked for
  MOCK:usage=<in>,<cache_create>,<cache_read>,<out>
Without markers the answer is "Hello from mock. You said: <last text>".

Subscription windows per account: a request whose `Authorization: Bearer <token>` names a token set up
with `mock.set_account(token, ...)` (or `POST /_mock/accounts/<token>` with the same fields as JSON) is
answered with that account's `anthropic-ratelimit-unified-*` headers (5-hour and weekly utilization,
resets, overage), a 429 (status rejected) once its 5-hour window is exhausted (unless overage is
allowed: then it answers and says overage is in use), a 401 for a broken login, or the 400
"Third-party apps now draw from your extra usage" refusal. A request for an opus model on an account
whose per-model weekly bucket (`seven_day_oi`) is exhausted gets a 429 whose representative claim is
`seven_day_overage_included`; other models are still answered. A window whose reset time has passed starts
over, empty, as the API's do. `mock.by_token(token)` lists its requests.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_USAGE = (100, 200, 300)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, dict):
            if block.get("type") == "text":
                parts.append(block.get("text", ""))
            elif block.get("type") == "tool_result":
                parts.append(_text_of(block.get("content")))
    return "\n".join(parts)


def last_user_text(body: dict) -> str:
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user":
            return _text_of(msg.get("content"))
    return ""


def all_text(body: dict) -> str:
    """Every text the model received: system blocks and all messages."""
    parts = [_text_of(body.get("system"))]
    for msg in body.get("messages") or []:
        parts.append(_text_of(msg.get("content")))
    return "\n".join(parts)


EXTRA_USAGE_TEXT = ("Third-party apps now draw from your extra usage, not your plan limits. We've added a $100 "
                    "credit to get you started. Claim it at claude.ai/settings/usage and keep going.")


@dataclass
class Window:
    """One subscription's quota at the mock: what the unified rate-limit headers report."""

    five_hour: float = 0.0            # utilization of the 5-hour window, 0..1 (1 = exhausted)
    seven_day: float = 0.0            # utilization of the weekly window
    five_hour_reset: int = field(default_factory=lambda: int(time.time()) + 5 * 3600)
    seven_day_reset: int = field(default_factory=lambda: int(time.time()) + 7 * 86400)
    per_request: float = 0.0          # utilization each answered request adds to both windows
    per_request_7d: float | None = None  # what it adds to the weekly window instead, when set
    overage: str = "rejected"         # overage status: allowed | allowed_warning | rejected
    overage_disabled_reason: str = "out_of_credits"
    login_ok: bool = True             # False: 401 (a revoked or expired token)
    extra_usage_refusal: bool = False  # answer the 400 "Third-party apps now draw from your extra usage"
    seven_day_oi: float | None = None   # the per-model weekly bucket (`7d_oi`), sent when set
    seven_day_oi_reset: int = field(default_factory=lambda: int(time.time()) + 6 * 86400)
    warn_threshold: float | None = None  # a window at or past it is `allowed_warning`, with `surpassed-threshold`

    def roll(self, now: float) -> None:
        """As the API does: a window whose reset time has passed starts over, empty."""
        if self.five_hour_reset <= now:
            self.five_hour, self.five_hour_reset = 0.0, int(now) + 5 * 3600
        if self.seven_day_reset <= now:
            self.seven_day, self.seven_day_reset = 0.0, int(now) + 7 * 86400

    def exhausted(self) -> bool:
        return self.five_hour >= 1.0 or self.seven_day >= 1.0

    def model_rejected(self, model: str) -> bool:
        """The per-model weekly bucket (`7d_oi`, opus models) is exhausted for this model."""
        return self.seven_day_oi is not None and self.seven_day_oi >= 1.0 and "opus" in model.lower()

    def model_headers(self) -> dict[str, str]:
        """As the API answers a request the per-model bucket refuses: rejected, claimed by `7d_oi`."""
        h = self.headers()
        h.update({"anthropic-ratelimit-unified-status": "rejected",
                  "anthropic-ratelimit-unified-reset": str(self.seven_day_oi_reset),
                  "anthropic-ratelimit-unified-representative-claim": "seven_day_overage_included",
                  "retry-after": str(max(1, self.seven_day_oi_reset - int(time.time())))})
        return h

    def using_overage(self) -> bool:
        return self.exhausted() and self.overage in ("allowed", "allowed_warning")

    def headers(self) -> dict[str, str]:
        # as the API does: an exhausted window is "rejected"; with overage allowed the request is
        # still served (200) and billed as extra usage (the CLI's isUsingOverage)
        claim = "five_hour" if self.five_hour >= self.seven_day else "seven_day"
        reset = self.five_hour_reset if claim == "five_hour" else self.seven_day_reset
        status = "rejected" if self.exhausted() else ("allowed_warning" if max(self.five_hour, self.seven_day) >= 0.9
                                                      else "allowed")
        h = {"anthropic-ratelimit-unified-status": status,
             "anthropic-ratelimit-unified-reset": str(reset),
             "anthropic-ratelimit-unified-representative-claim": claim,
             "anthropic-ratelimit-unified-5h-utilization": f"{min(self.five_hour, 1.0):.4f}",
             "anthropic-ratelimit-unified-5h-reset": str(self.five_hour_reset),
             "anthropic-ratelimit-unified-5h-status": "rejected" if self.five_hour >= 1.0 else "allowed",
             "anthropic-ratelimit-unified-7d-utilization": f"{min(self.seven_day, 1.0):.4f}",
             "anthropic-ratelimit-unified-7d-reset": str(self.seven_day_reset),
             "anthropic-ratelimit-unified-7d-status": "rejected" if self.seven_day >= 1.0 else "allowed",
             "anthropic-ratelimit-unified-overage-status": self.overage}
        if self.seven_day_oi is not None:
            h["anthropic-ratelimit-unified-7d_oi-utilization"] = f"{min(self.seven_day_oi, 1.0):.4f}"
            h["anthropic-ratelimit-unified-7d_oi-reset"] = str(self.seven_day_oi_reset)
            h["anthropic-ratelimit-unified-7d_oi-status"] = "rejected" if self.seven_day_oi >= 1.0 else "allowed"
        if self.warn_threshold is not None:
            for short, util in (("5h", self.five_hour), ("7d", self.seven_day), ("7d_oi", self.seven_day_oi)):
                if util is not None and self.warn_threshold <= util < 1.0:
                    h[f"anthropic-ratelimit-unified-{short}-status"] = "allowed_warning"
                    h[f"anthropic-ratelimit-unified-{short}-surpassed-threshold"] = f"{self.warn_threshold}"
        if self.overage == "rejected":
            h["anthropic-ratelimit-unified-overage-disabled-reason"] = self.overage_disabled_reason
        if self.using_overage():
            h["anthropic-ratelimit-unified-overage-in-use"] = "true"
        if self.exhausted() and not self.using_overage():
            h["retry-after"] = str(max(1, reset - int(time.time())))
        return h


def bearer(headers: Any) -> str:
    auth = str(headers.get("Authorization") or headers.get("authorization") or "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


class MockAnthropic:
    """Threaded HTTP server speaking enough of /v1/messages for the CLI."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.structured_input: dict = {"name": "Alice", "age": 30}
        self.failures: dict[str, int] = {}  # last user text -> errors already sent (MOCK:fail_first)
        self.accounts: dict[str, Window] = {}
        self.active_by_token: dict[str, int] = {}
        self.max_active_by_token: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> MockAnthropic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def set_account(self, token: str, **fields: Any) -> Window:
        """Create or change the quota window of the account whose OAuth token is `token`."""
        with self.lock:
            win = self.accounts.get(token) or Window()
            for k, v in fields.items():
                if not hasattr(win, k):
                    raise AttributeError(f"Window has no field {k}")
                setattr(win, k, v)
            self.accounts[token] = win
            return win

    def by_token(self, token: str, marker: str | None = None) -> list[dict]:
        """Recorded /v1/messages requests sent with `Authorization: Bearer <token>`."""
        with self.lock:
            found = [r for r in self.requests if r["path"].startswith("/v1/messages")
                     and bearer(r["headers"]) == token]
        return [r for r in found if marker is None or marker in all_text(r["body"])]

    def records(self, marker: str) -> list[dict]:
        """Recorded /v1/messages requests (with start `t` and `end` times) whose text holds `marker`."""
        with self.lock:
            found = [r for r in self.requests if r["path"].startswith("/v1/messages")]
        return [r for r in found if marker in all_text(r["body"])]

    def bodies(self, marker: str | None = None) -> list[dict]:
        """Recorded /v1/messages bodies, optionally those whose text contains `marker`."""
        with self.lock:
            found = [r["body"] for r in self.requests if r["path"].startswith("/v1/messages")]
        if marker is None:
            return found
        return [b for b in found if marker in all_text(b)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body are separate writes: with Nagle's algorithm on, a keep-alive client's
            # delayed ACK holds the body back ~40 ms on every request after a connection's first
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no"}})

            def do_HEAD(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # noqa: N802
                self.window_headers: dict[str, str] = {}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                record = {"path": self.path, "headers": dict(self.headers), "body": body, "t": time.time(),
                          "end": None}
                with mock.lock:
                    mock.requests.append(record)
                if self.path.startswith("/_mock/accounts/"):
                    token = self.path.rsplit("/", 1)[1]
                    win = mock.set_account(token, **{k: v for k, v in body.items() if not k.startswith("_")})
                    self._json(200, asdict(win))
                    return
                if "count_tokens" in self.path:
                    self._json(200, {"input_tokens": 10})
                    return
                if not self.path.startswith("/v1/messages"):
                    self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no"}})
                    return
                token = bearer(self.headers)
                with mock.lock:
                    mock.active += 1
                    mock.max_active = max(mock.max_active, mock.active)
                    mock.active_by_token[token] = mock.active_by_token.get(token, 0) + 1
                    mock.max_active_by_token[token] = max(mock.max_active_by_token.get(token, 0),
                                                          mock.active_by_token[token])
                try:
                    self._messages(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    record["end"] = time.time()
                    with mock.lock:
                        mock.active -= 1
                        mock.active_by_token[token] -= 1

            # -- helpers -------------------------------------------------------------------------
            def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("request-id", "req_mock_" + uuid.uuid4().hex[:12])
                if status == 200:
                    headers = {**getattr(self, "window_headers", {}), **(headers or {})}
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def _event(self, kind: str, data: dict) -> None:
                self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            def _window(self) -> tuple[Window | None, dict[str, str]]:
                """The account behind this request's bearer token, and its rate-limit headers."""
                with mock.lock:
                    win = mock.accounts.get(bearer(self.headers))
                    if win is not None:
                        win.roll(time.time())
                    return win, (win.headers() if win else {})

            def _messages(self, body: dict) -> None:
                win, window_headers = self._window()
                if win is not None and not win.login_ok:
                    return self._json(401, {"type": "error", "error": {"type": "authentication_error",
                                                                       "message": "Invalid bearer token"}})
                if win is not None and win.extra_usage_refusal:
                    return self._json(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                                       "message": EXTRA_USAGE_TEXT}})
                if win is not None and win.exhausted() and not win.using_overage():
                    return self._json(429, {"type": "error", "error": {"type": "rate_limit_error",
                                                                       "message": "limit"}}, window_headers)
                if win is not None and win.model_rejected(str(body.get("model") or "")):
                    with mock.lock:
                        refusal = win.model_headers()
                    return self._json(429, {"type": "error", "error": {"type": "rate_limit_error",
                                                                       "message": "limit"}}, refusal)
                if win is not None:
                    with mock.lock:
                        win.five_hour = round(win.five_hour + win.per_request, 6)
                        weekly = win.per_request if win.per_request_7d is None else win.per_request_7d
                        win.seven_day = round(win.seven_day + weekly, 6)
                self.window_headers = window_headers
                text = last_user_text(body)
                markers = dict(
                    (m.group(1), m.group(2) or "")
                    for m in re.finditer(r"MOCK:([a-z_]+)(?:=([^\s\]]+))?", text)
                )
                if "delay" in markers:
                    time.sleep(float(markers["delay"]))
                opening = next((m for m in body.get("messages") or [] if m.get("role") == "user"), {})
                model_ms = re.search(r"MOCK:model_ms=(\d+)", _text_of(opening.get("content")))
                if model_ms:
                    time.sleep(int(model_ms.group(1)) / 1000)
                if "error" in markers:
                    return self._error(markers["error"])
                if "too_old" in markers:
                    return self._json(400, {"type": "error", "error": {
                        "type": "claude_code_version_too_old", "message": "This version of Claude Code is no longer "
                        f"supported. Please update to version {markers['too_old'] or '9.9.9'} or later."}})
                if "fail_first" in markers:
                    count, _, status = markers["fail_first"].partition(":")
                    with mock.lock:
                        sent = mock.failures.get(text, 0)
                        mock.failures[text] = sent + 1
                    if sent < int(count):
                        return self._error(status or "500")
                if "break_stream" in markers and not body.get("stream"):
                    return self._error("500")
                if "subscription_limit" in markers:
                    reset = int(time.time()) + 3600
                    return self._json(
                        429,
                        {"type": "error", "error": {"type": "rate_limit_error", "message": "limit"}},
                        {
                            "anthropic-ratelimit-unified-status": "rejected",
                            "anthropic-ratelimit-unified-reset": str(reset),
                            "anthropic-ratelimit-unified-representative-claim": "five_hour",
                            "retry-after": "3600",
                        },
                    )
                blocks = self._plan(body, text, markers)
                usage = DEFAULT_USAGE
                out_tokens = None
                if "usage" in markers:
                    nums = [int(x) for x in markers["usage"].split(",")]
                    usage, out_tokens = tuple(nums[:3]), nums[3]
                stop = "end_turn"
                if any(b["type"] == "tool_use" for b in blocks):
                    stop = "tool_use"
                if "max_tokens" in markers:
                    stop = "max_tokens"
                if "refusal" in markers:
                    stop = "refusal"
                model = markers.get("served_model") or body.get("model", "claude-mock")
                msg_id = "msg_mock_" + uuid.uuid4().hex[:16]
                n_out = out_tokens if out_tokens is not None else max(1, len(_words(blocks)))
                usage_obj = {
                    "input_tokens": usage[0],
                    "cache_creation_input_tokens": usage[1],
                    "cache_read_input_tokens": usage[2],
                    "output_tokens": n_out,
                }
                if not body.get("stream"):
                    return self._json(
                        200,
                        {
                            "id": msg_id, "type": "message", "role": "assistant", "model": model,
                            "content": blocks, "stop_reason": stop, "stop_sequence": None,
                            "usage": usage_obj,
                        },
                    )
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("request-id", "req_mock_" + uuid.uuid4().hex[:12])
                self.send_header("Connection", "close")
                for k, v in self.window_headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.close_connection = True
                start_usage = dict(usage_obj, output_tokens=1)
                self._event("message_start", {"type": "message_start", "message": {
                    "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
                if "stall" in markers:
                    time.sleep(float(markers["stall"]))
                    return
                slow = float(markers.get("slow") or 0) / 1000.0
                self._event("ping", {"type": "ping"})
                if "think" in markers:
                    time.sleep(float(markers["think"]))
                if "break_stream" in markers or "pause" in markers:
                    self._event("content_block_start", {"type": "content_block_start", "index": 0,
                                                        "content_block": {"type": "text", "text": ""}})
                    self._event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "text_delta", "text": "partial te"}})
                    if "pause" in markers:
                        time.sleep(float(markers["pause"]))
                        return
                    self._event("error", {"type": "error", "error": {"type": "api_error", "message": "broken"}})
                    return
                for i, block in enumerate(blocks):
                    self._stream_block(i, block, slow)
                self._event("message_delta", {"type": "message_delta",
                                              "delta": {"stop_reason": stop, "stop_sequence": None},
                                              "usage": {"output_tokens": n_out}})
                self._event("message_stop", {"type": "message_stop"})

            def _stream_block(self, i: int, block: dict, slow: float) -> None:
                kind = block["type"]
                if kind == "text":
                    self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                        "content_block": {"type": "text", "text": ""}})
                    for piece in _pieces(block["text"]):
                        if slow:
                            time.sleep(slow)
                        self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                            "delta": {"type": "text_delta", "text": piece}})
                elif kind == "thinking":
                    self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                        "content_block": {"type": "thinking", "thinking": "",
                                                                          "signature": ""}})
                    for piece in _pieces(block["thinking"]):
                        self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                            "delta": {"type": "thinking_delta",
                                                                      "thinking": piece}})
                    self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                        "delta": {"type": "signature_delta",
                                                                  "signature": block["signature"]}})
                elif kind == "tool_use":
                    self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                        "content_block": {"type": "tool_use", "id": block["id"],
                                                                          "name": block["name"], "input": {}}})
                    raw = json.dumps(block["input"])
                    for piece in ["", raw[: len(raw) // 2], raw[len(raw) // 2:]]:
                        self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                            "delta": {"type": "input_json_delta",
                                                                      "partial_json": piece}})
                self._event("content_block_stop", {"type": "content_block_stop", "index": i})

            def _plan(self, body: dict, text: str, markers: dict) -> list[dict]:
                blocks: list[dict] = []
                if "thinking" in markers:
                    blocks.append({"type": "thinking", "thinking": "Let me think step by step about this.",
                                   "signature": "sig_mock_" + uuid.uuid4().hex[:8]})
                # the CLI may end with a role "system" message (its model line and date, after a resume)
                last = next((m for m in reversed(body.get("messages") or []) if m.get("role") != "system"), {})
                answered_tool = (isinstance(last.get("content"), list) and any(
                    isinstance(b, dict) and b.get("type") == "tool_result" for b in last["content"])) \
                    or "<tool_result" in text  # a relay without sessions replays results as text
                offered = [t.get("name", "") for t in body.get("tools") or []]
                wanted: list[str] = []
                first = next((m for m in body.get("messages") or [] if m.get("role") == "user"), {})
                looping = dict((m.group(1), m.group(2) or "") for m in
                               re.finditer(r"MOCK:([a-z_]+)(?:=([^\s\]]+))?", _text_of(first.get("content"))))
                steps = sum(1 for m in body.get("messages") or [] if m.get("role") == "assistant" and
                            isinstance(m.get("content"), list) and any(b.get("type") == "tool_use" for b in m["content"]))
                bash_cmd = None
                if "bash_steps" in looping:
                    if steps < int(looping["bash_steps"]):
                        wanted, bash_cmd = ["Bash"], f"echo step{steps}"
                elif "loop" in looping and steps < int(looping["loop"]):
                    wanted = [looping["tool"]] if "tool" in looping else looping.get("tools", "").split(",")
                    wanted = [w for w in wanted if w]
                elif "structured" in markers and not answered_tool:
                    wanted = ["StructuredOutput"]
                elif "tool" in markers and not answered_tool:
                    wanted = [markers["tool"]]
                elif "tools" in markers and not answered_tool:
                    wanted = markers["tools"].split(",")
                for j, name in enumerate(wanted):
                    real = next((o for o in offered if o == name or o.endswith("__" + name)), name)
                    args: dict = {"city": f"City{j}"} if name != "StructuredOutput" else mock.structured_input
                    if name == "Write" and "write" in markers:
                        args = {"file_path": markers["write"], "content": "written-by-agent\n"}
                    if name == "Bash":  # MOCK:bash=sleep_30 runs "sleep 30"; a loop's: MOCK:bash=echo_step{step}
                        cmd = bash_cmd or (markers.get("bash") or looping.get("bash") or "echo_hi-from-bash").replace("_", " ")
                        cmd = cmd.replace("{step}", str(steps))
                        args = {"command": cmd, "description": "run a command"}
                    if name == "Read":  # MOCK:tool=Read MOCK:read=/abs/path
                        args = {"file_path": markers.get("read", "/dev/null")}
                    blocks.append({"type": "tool_use", "id": "toolu_mock_" + uuid.uuid4().hex[:12],
                                   "name": real, "input": args})
                if wanted:
                    return blocks
                if answered_tool:
                    reply = "Tool said: " + _text_of(last["content"])
                elif "words" in markers:
                    width = int(markers.get("wide") or 0)
                    reply = " ".join(f"w{k}".ljust(width, "x") for k in range(int(markers["words"])))
                else:
                    reply = "Hello from mock. You said: " + text.strip().splitlines()[-1] if text.strip() \
                        else "Hello from mock."
                blocks.append({"type": "text", "text": reply})
                return blocks

            def _error(self, spec: str) -> None:
                status_s, _, retry = spec.partition(":")
                status = int(status_s)
                kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 529: "overloaded_error"}
                headers = {"retry-after": retry} if retry else {}
                self._json(status, {"type": "error", "error": {"type": kinds.get(status, "api_error"),
                                                               "message": f"mock error {status}"}}, headers)

        return Handler


def _pieces(text: str) -> list[str]:
    """Split text into word-sized deltas (keeping spaces) so streaming is visible."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def _words(blocks: list[dict]) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if b["type"] == "text":
            out += b["text"].split()
    return out


if __name__ == "__main__":  # manual use: python tests/mock_anthropic.py
    m = MockAnthropic().start()
    print(m.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        m.stop()

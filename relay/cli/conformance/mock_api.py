"""A loopback Anthropic Messages API for the conformance self-test: no tokens are spent.

Standard library only (`http.server`). It streams SSE the way the real API does (message_start, ping,
content blocks with text or tool-input deltas, message_delta with the stop reason and usage,
message_stop), sends the unified subscription rate-limit headers a subscription login gets, and records
every request body so a check can see what the CLI sent. What to answer is chosen by markers in the
last user message:

  CONFORMANCE:tool=<name>        call the tool whose name ends in <name> (once: a tool result gets text)
  CONFORMANCE:error=<status>     an HTTP error with the API's error type for that status (401, 500, ...)
  CONFORMANCE:too_old=<version>  the API's refusal of an old client: 400 `claude_code_version_too_old`
Without markers the answer is "Conformance reply to: <last line of the user's text>".
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {"input_tokens": 11, "cache_creation_input_tokens": 22, "cache_read_input_tokens": 33}
WINDOWS = {"five_hour": 0.25, "seven_day": 0.5}     # what the rate-limit headers report
MARKER = re.compile(r"CONFORMANCE:([a-z_]+)(?:=([^\s\]]+))?")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
VERSION_TOO_OLD = "claude_code_version_too_old"


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") == "tool_result":
            parts.append(text_of(block.get("content")))
    return "\n".join(parts)


def last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user":
            return text_of(msg.get("content"))
    return ""


def all_text(body: dict[str, Any]) -> str:
    return "\n".join([text_of(body.get("system"))] + [text_of(m.get("content")) for m in body.get("messages") or []])


def too_old_message(needed: str) -> str:
    return f"This version of Claude Code is no longer supported. Please update to version {needed} or later."


class MockApi:
    """A threaded HTTP server answering /v1/messages; `start()`, then point ANTHROPIC_BASE_URL at `url`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.reset_at = int(time.time()) + 3600
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> MockApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> MockApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bodies(self, marker: str) -> list[dict[str, Any]]:
        """The /v1/messages bodies whose text holds `marker`, in order."""
        with self.lock:
            found = [r["body"] for r in self.requests if r["path"].startswith("/v1/messages")]
        return [b for b in found if marker in all_text(b)]

    def rate_limit_headers(self) -> dict[str, str]:
        """The unified subscription headers (as `tests/mock_anthropic.py` sends them for a window)."""
        h = {"anthropic-ratelimit-unified-status": "allowed",
             "anthropic-ratelimit-unified-reset": str(self.reset_at),
             "anthropic-ratelimit-unified-representative-claim": "five_hour",
             "anthropic-ratelimit-unified-overage-status": "rejected",
             "anthropic-ratelimit-unified-overage-disabled-reason": "out_of_credits"}
        for short, name in (("5h", "five_hour"), ("7d", "seven_day")):
            h[f"anthropic-ratelimit-unified-{short}-utilization"] = f"{WINDOWS[name]:.4f}"
            h[f"anthropic-ratelimit-unified-{short}-reset"] = str(self.reset_at + (0 if short == "5h" else 86400))
            h[f"anthropic-ratelimit-unified-{short}-status"] = "allowed"
        return h

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_Handler,), {"mock": self})


class _Handler(BaseHTTPRequestHandler):
    """The mock's HTTP side; `mock` (the MockApi it serves) is set on a subclass per server."""
    mock: MockApi
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "not mocked"}})

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        with self.mock.lock:
            self.mock.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
        try:
            if "count_tokens" in self.path:
                self._json(200, {"input_tokens": 10})
            elif self.path.startswith("/v1/messages"):
                self._messages(body)
            else:
                self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no"}})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_conf_" + uuid.uuid4().hex[:12])
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def _messages(self, body: dict[str, Any]) -> None:
        text = last_user_text(body)
        markers = {m.group(1): m.group(2) or "" for m in MARKER.finditer(text)}
        if "error" in markers:
            status = int(markers["error"] or 500)
            return self._json(status, {"type": "error", "error": {
                "type": ERROR_TYPES.get(status, "api_error"), "message": f"conformance error {status}"}})
        if "too_old" in markers:
            return self._json(400, {"type": "error", "error": {
                "type": VERSION_TOO_OLD, "message": too_old_message(markers["too_old"] or "9.9.9")}})
        blocks = self._plan(body, text, markers)
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        model = body.get("model") or "claude-conformance"
        msg_id = "msg_conf_" + uuid.uuid4().hex[:16]
        n_out = max(1, sum(len(str(b.get("text", "")).split()) for b in blocks))
        usage = dict(USAGE, output_tokens=n_out)
        headers = self.mock.rate_limit_headers()
        if not body.get("stream"):
            return self._json(200, {"id": msg_id, "type": "message", "role": "assistant", "model": model,
                                    "content": blocks, "stop_reason": stop, "stop_sequence": None,
                                    "usage": usage}, headers)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("request-id", "req_conf_" + uuid.uuid4().hex[:12])
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        self._event("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": dict(usage, output_tokens=1)}})
        self._event("ping", {"type": "ping"})
        for i, block in enumerate(blocks):
            self._block(i, block)
        self._event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop,
                                                                         "stop_sequence": None},
                                      "usage": {"output_tokens": n_out}})
        self._event("message_stop", {"type": "message_stop"})

    def _block(self, i: int, block: dict[str, Any]) -> None:
        if block["type"] == "text":
            self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                "content_block": {"type": "text", "text": ""}})
            for piece in re.findall(r"\S+\s*|\s+", block["text"]) or [""]:
                self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                    "delta": {"type": "text_delta", "text": piece}})
        else:
            self._event("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
            raw = json.dumps(block["input"])
            for piece in (raw[: len(raw) // 2], raw[len(raw) // 2:]):
                self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                    "delta": {"type": "input_json_delta", "partial_json": piece}})
        self._event("content_block_stop", {"type": "content_block_stop", "index": i})

    def _plan(self, body: dict[str, Any], text: str, markers: dict[str, str]) -> list[dict[str, Any]]:
        last: dict[str, Any] = next((m for m in reversed(body.get("messages") or []) if m.get("role") == "user"), {})
        answered = isinstance(last.get("content"), list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in last["content"])
        if "tool" in markers and not answered:
            offered = [str(t.get("name", "")) for t in body.get("tools") or []]
            want = markers["tool"]
            name = next((o for o in offered if o == want or o.endswith("__" + want)), want)
            return [{"type": "tool_use", "id": "toolu_conf_" + uuid.uuid4().hex[:12], "name": name,
                     "input": {"city": "Paris"}}]
        line = text.strip().splitlines()[-1] if text.strip() else ""
        return [{"type": "text", "text": ("Tool said: " if answered else "Conformance reply to: ") + line}]

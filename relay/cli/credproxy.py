"""The credential proxy of one sandboxed agent run: the relay's Anthropic credential stays outside.

The CLI inside the sandbox holds only a random placeholder and sends its API requests over a unix
socket (`ANTHROPIC_UNIX_SOCKET`) bound into the sandbox. This proxy, in the relay's worker, accepts
only `POST /v1/messages*` carrying that run's placeholder, replaces the auth headers with the real
credential, forwards to the upstream API and streams the answer back. It serves a bounded number of
requests and is closed with the run. Tools of the run can reach it too (they can read the
placeholder): their calls are capped by `max_requests` and end with the run.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import socketserver
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

log = logging.getLogger("relay.credproxy")
AUTH_HEADERS = ("x-api-key", "authorization")
HOP_HEADERS = ("connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection",
               "te", "upgrade")
OAUTH_BETA = "oauth-2025-04-20"


@dataclass(frozen=True)
class Credential:
    variable: str                 # the CLI's variable for this kind (it gets a placeholder of the same kind)
    headers: dict[str, str]       # what the upstream API must receive
    upstream: str                 # base URL of the API


def find_credential(env: dict[str, str], config_dir: Path) -> Credential | None:
    """The credential the relay's own CLI would use: an API key or token in its environment, else
    the OAuth access token of `claude login` in its config folder."""
    upstream = env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
    if env.get("ANTHROPIC_API_KEY"):
        return Credential("ANTHROPIC_API_KEY", {"x-api-key": env["ANTHROPIC_API_KEY"]}, upstream)
    if env.get("CLAUDE_CODE_OAUTH_TOKEN"):
        return Credential("CLAUDE_CODE_OAUTH_TOKEN", {"authorization": "Bearer " + env["CLAUDE_CODE_OAUTH_TOKEN"]},
                          upstream)
    if env.get("ANTHROPIC_AUTH_TOKEN"):
        return Credential("ANTHROPIC_AUTH_TOKEN", {"authorization": "Bearer " + env["ANTHROPIC_AUTH_TOKEN"]}, upstream)
    try:
        data = json.loads((config_dir / ".credentials.json").read_text(encoding="utf-8"))
        token = data["claudeAiOauth"]["accessToken"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Credential("CLAUDE_CODE_OAUTH_TOKEN", {"authorization": f"Bearer {token}"}, upstream) \
        if isinstance(token, str) and token else None


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that hung up is not news
        log.debug("credproxy: a request failed", exc_info=True)

    def get_request(self) -> tuple[Any, Any]:
        sock, _ = self.socket.accept()
        return sock, ("sandbox", 0)  # BaseHTTPRequestHandler wants a (host, port) pair


class CredProxy:
    """One run's proxy on a unix socket at `path` (mode 0600, or owned by `uid` for an agent user)."""

    def __init__(self, path: str, credential: Credential, max_requests: int, uid: int | None = None,
                 gid: int | None = None) -> None:
        self.path = path
        self.credential = credential
        self.placeholder = "sk-ant-sandbox-" + secrets.token_urlsafe(24)
        self.max_requests = max_requests
        self.served = 0
        self.refused = 0
        self._lock = threading.Lock()
        self.server = _Server(path, self._handler())
        os.chmod(path, 0o600)
        if uid is not None:
            os.chown(path, uid, gid if gid is not None else -1)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        try:
            self.server.shutdown()
        finally:
            self.server.server_close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _admit(self, path: str, presented: str) -> str | None:
        """None if this request may go upstream, else why not."""
        if not path.startswith("/v1/messages"):
            return "only /v1/messages is forwarded"
        if not secrets.compare_digest(presented.encode(), self.placeholder.encode()):
            return "wrong credential"
        with self._lock:
            if self.served >= self.max_requests:
                return "this run has used up its API requests"
            self.served += 1
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _refuse(self, status: int, why: str) -> None:
                proxy.refused += 1
                body = json.dumps({"type": "error", "error": {"type": "permission_error",
                                                              "message": f"relay proxy: {why}"}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def do_POST(self) -> None:  # noqa: N802
                auth = self.headers.get("authorization") or ""
                presented = self.headers.get("x-api-key") or (auth[7:] if auth[:7].lower() == "bearer " else "")
                why = proxy._admit(self.path, presented.strip())
                if why:
                    self._refuse(403, why)
                    return
                body = self._body()
                out = {k: v for k, v in self.headers.items() if k.lower() not in AUTH_HEADERS + HOP_HEADERS}
                out.update(proxy.credential.headers)
                if proxy.credential.variable == "CLAUDE_CODE_OAUTH_TOKEN":
                    betas = [b.strip() for b in (out.pop("anthropic-beta", "") or "").split(",") if b.strip()]
                    out = {k: v for k, v in out.items() if k.lower() != "anthropic-beta"}
                    out["anthropic-beta"] = ",".join(betas if OAUTH_BETA in betas else betas + [OAUTH_BETA])
                out["Content-Length"] = str(len(body))
                self._forward(body, out)

            def _forward(self, body: bytes, headers: dict[str, str]) -> None:
                u = urllib.parse.urlsplit(proxy.credential.upstream)
                base = u.path.rstrip("/")
                cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
                conn = cls(u.hostname or "localhost", u.port, timeout=600)
                try:
                    conn.request("POST", base + self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_HEADERS:
                            self.send_header(k, v)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    while True:
                        chunk = resp.read1(65536)
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (OSError, http.client.HTTPException) as exc:
                    log.warning("credproxy: upstream request failed: %s", exc)
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815 - refused there too

        return Handler


def unix_socket_ok(path: str) -> bool:
    """Unix socket paths are limited to about 107 bytes."""
    return len(os.fsencode(path)) < 104


"""The credential proxy of one sandboxed agent run: the relay's Anthropic credential stays outside.

The CLI inside the sandbox holds only a random placeholder and sends its API requests over a unix
socket (`ANTHROPIC_UNIX_SOCKET`) bound into the sandbox. This proxy, in the relay's worker, accepts
only what `credproxy_guard.py` admits (`POST /v1/messages` or `/v1/messages/count_tokens` exactly,
carrying that run's placeholder, a capped body read in time, a model the key may use, a capped number
of connections), replaces the auth headers with the real credential, forwards to the upstream API and
streams the answer back. It serves a bounded number of requests and is closed with the run. Tools of
the run can reach it too (they can read the placeholder): their calls are capped by `max_requests` and
end with the run. Every answer passes a `CallMeter` on its way back: the run's `witness` is what the
relay bills and believes about the account (`core/witness.py`), never the CLI's own report.
"""

from __future__ import annotations

import http.client
import io
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

from ..core.agent import ProxyLimits
from ..core.witness import CallMeter
from ..errors import Forbidden, RateLimited, RelayError
from . import credproxy_guard as guard
from .witness import Witness

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
    gate: guard.Gate

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.gate.enter(request) is None:  # far over the cap: not even an answer
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.gate.leave(request)

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that hung up is not news
        log.debug("credproxy: a request failed", exc_info=True)

    def get_request(self) -> tuple[Any, Any]:
        sock, _ = self.socket.accept()
        return sock, ("sandbox", 0)  # BaseHTTPRequestHandler wants a (host, port) pair


class CredProxy:
    """One run's proxy on a unix socket at `path` (mode 0600, or owned by `uid` for an agent user)."""

    def __init__(self, path: str, credential: Credential, max_requests: int, uid: int | None = None,
                 gid: int | None = None, limits: ProxyLimits = ProxyLimits(), models: tuple[str, ...] = ()) -> None:
        self.path = path
        self.credential = credential
        self.placeholder = "sk-ant-sandbox-" + secrets.token_urlsafe(24)
        self.max_requests = max_requests
        self.served = 0
        self.refused = 0
        self._lock = threading.Lock()
        self.limits, self.models = limits, models  # models: the key's allowed ones and the run's own (empty: any)
        self.gate = guard.Gate(limits)
        self.witness = Witness()
        self.server = _Server(path, self._handler())
        self.server.gate = self.gate
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
            self.gate.close_all()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _admit(self, h: BaseHTTPRequestHandler) -> bytes:
        """The body of a request that may go upstream (its `path` set to the one to forward); else a
        refusal raised, before reading any body unless the request is allowed so far."""
        if h.connection in self.gate.refusing:
            raise self.gate.over_cap()
        path = guard.forward_path(h.command, h.path)
        auth = h.headers.get("authorization") or ""
        presented = (h.headers.get("x-api-key") or (auth[7:] if auth[:7].lower() == "bearer " else "")).strip()
        if not secrets.compare_digest(presented.encode(), self.placeholder.encode()):
            raise guard.refusal("wrong credential", Forbidden)
        body = guard.read_body(h.rfile, h.headers, self.limits.max_body_bytes)
        h.connection.settimeout(600)  # read in time; the answer's writes get the upstream's patience
        guard.check_model(body, self.models)
        with self._lock:
            if self.served >= self.max_requests:
                raise guard.refusal("this run has used up its API requests", RateLimited,
                                    headers={"x-should-retry": "false"})
            self.served += 1
        h.path = path
        return body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:  # every read of this connection within one deadline
                super().setup()
                self.rfile.close()
                self.rfile = io.BufferedReader(guard.DeadlineReader(self.connection, proxy.limits.read_timeout_s))

            def handle(self) -> None:
                try:
                    super().handle()
                except RelayError as exc:  # refused, or not read in time
                    proxy.refused += 1
                    self.close_connection = True
                    try:
                        self.connection.settimeout(5)
                        self.wfile.write(guard.error_bytes(exc))
                    except OSError:
                        pass

            def handle_expect_100(self) -> bool:  # no "100 Continue": the body is read only if admitted
                return True

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                exc = guard.refusal(message or "a malformed request", RelayError)  # a bad request line or header
                exc.status = code
                raise exc

            def __getattr__(self, name: str) -> Any:  # do_GET, do_PUT, do_BREW...: refused
                if name.startswith("do_"):
                    return self.do_POST
                raise AttributeError(name)

            def do_POST(self) -> None:  # noqa: N802
                body = proxy._admit(self)
                out = {k: v for k, v in self.headers.items() if k.lower() not in AUTH_HEADERS + HOP_HEADERS}
                out.update(proxy.credential.headers)
                if proxy.credential.variable == "CLAUDE_CODE_OAUTH_TOKEN":
                    betas = [b.strip() for b in (out.pop("anthropic-beta", "") or "").split(",") if b.strip()]
                    out = {k: v for k, v in out.items() if k.lower() != "anthropic-beta"}
                    out["anthropic-beta"] = ",".join(betas if OAUTH_BETA in betas else betas + [OAUTH_BETA])
                out["Content-Length"] = str(len(body))
                forward(proxy, self, body, out)

        return Handler


def forward(proxy: CredProxy, h: BaseHTTPRequestHandler, body: bytes, headers: dict[str, str]) -> None:
    """Send an admitted request upstream with the real credential and stream the answer back through
    a `CallMeter`, recorded in the run's witness."""
    u = urllib.parse.urlsplit(proxy.credential.upstream)
    base = u.path.rstrip("/")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = cls(u.hostname or "localhost", u.port, timeout=600)
    meter: CallMeter | None = None
    try:
        conn.request("POST", base + h.path, body=body, headers=headers)
        resp = conn.getresponse()
        meter = CallMeter(h.path, resp.status, resp.getheaders())
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_HEADERS:
                h.send_header(k, v)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            meter.feed(chunk)
            h.wfile.write(chunk)
            h.wfile.flush()
    except (OSError, http.client.HTTPException) as exc:
        log.warning("credproxy: upstream request failed: %s", exc)
        h.close_connection = True
    finally:
        conn.close()
        if meter is not None:  # what the API answered counts, whether or not the CLI read it all
            meter.close()
            proxy.witness.record(meter)


def unix_socket_ok(path: str) -> bool:
    """Unix socket paths are limited to about 107 bytes."""
    return len(os.fsencode(path)) < 104


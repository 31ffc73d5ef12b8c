"""What an agent run's credential proxy admits: the request side of `credproxy.py`.

Only `POST /v1/messages` and `POST /v1/messages/count_tokens`, matched exactly on the raw path (so no
batches, no `/v1/messages_anything`, no `..` and no percent-encoding get through; the query is dropped
except the SDK's `beta=true`), with a body of at most `max_body_bytes`, read within `read_timeout_s` of
the connection, naming a model the caller's key may use; at most `max_connections` open at once.
Refusals are Anthropic-shaped errors from `relay/errors.py`, their messages start with "relay proxy:".
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from typing import Any

from ..core.agent import ProxyLimits
from ..core.models import FAMILIES, strip_prefix
from ..errors import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, RateLimited, RelayError, RequestTimeout

PATHS = ("/v1/messages", "/v1/messages/count_tokens")
KEPT_QUERY = "beta=true"          # what the Anthropic SDK (the CLI) adds; any other query is dropped


def refusal(message: str, kind: type[RelayError], **kw: Any) -> RelayError:
    return kind("relay proxy: " + message, **kw)


def forward_path(method: str, raw: str) -> str:
    """The path to forward for a request line's method and target, or a refusal raised."""
    if method != "POST":
        raise refusal(f"only POST is forwarded, not {method[:16]}", MethodNotAllowed, headers={"Allow": "POST"})
    path, _, query = raw.partition("?")
    if path not in PATHS:
        raise refusal("only POST /v1/messages and /v1/messages/count_tokens are forwarded", NotFound,
                      code="unknown_url")
    return path + ("?" + KEPT_QUERY if query == KEPT_QUERY else "")


def body_length(headers: Any, max_bytes: int) -> int | None:
    """The declared Content-Length (None: chunked), refused when it is malformed or over the cap."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        return None
    values = headers.get_all("Content-Length") or ["0"]
    if len(set(values)) != 1 or not values[0].strip().isdigit():
        raise refusal("a malformed Content-Length", BadRequest)
    length = int(values[0])
    if length > max_bytes:
        raise too_large(max_bytes)
    return length


def too_large(max_bytes: int) -> RelayError:
    return refusal(f"the request body is larger than {max_bytes:,} bytes (agent.proxy_max_body_mb)", PayloadTooLarge)


def read_body(rfile: Any, headers: Any, max_bytes: int) -> bytes:
    """The whole body (Content-Length or chunked), never more than `max_bytes` of it read."""
    length = body_length(headers, max_bytes)
    if length is not None:
        data = rfile.read(length) if length else b""
        if len(data) < length:
            raise refusal("the request body ended early", BadRequest)
        return data
    parts: list[bytes] = []
    total = 0
    while True:
        line = rfile.readline(1024).split(b";")[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            raise refusal("a malformed chunked body", BadRequest) from None
        if size == 0:
            rfile.readline(1024)
            return b"".join(parts)
        total += size
        if size < 0 or total > max_bytes:
            raise too_large(max_bytes)
        parts.append(rfile.read(size))
        rfile.readline(1024)


def check_model(body: bytes, allowed: tuple[str, ...]) -> None:
    """With an allow-list, the body's one top-level `model` must be on it (a family alias allows the family)."""
    if not allowed:
        return
    seen: list[int] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.append(sum(k == "model" for k, _ in items))  # the top-level object is decoded last
        return dict(items)
    try:
        doc = json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        raise refusal("the request body is not JSON", BadRequest) from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or seen[-1] != 1:
        raise refusal("the request must name one model", BadRequest, param="model")
    if not model_allowed(model, allowed):
        # 400, not 403: the relay reads a 403 from the API as the account's credential being refused
        raise refusal(f"this API key may not use the model {model[:100]!r}", BadRequest, param="model",
                      code="model_not_allowed")


def _norm(name: str) -> str:
    return strip_prefix(name).lower().removesuffix("[1m]")


def model_allowed(model: str, allowed: tuple[str, ...]) -> bool:
    """`model` (as the CLI sends it: `claude-sonnet-5-5`) is on `allowed`, or of a family named there."""
    names = {_norm(a) for a in allowed}
    want = _norm(model)
    return want in names or any(f in names for f in FAMILIES if f in want.split("-"))


def error_bytes(exc: RelayError) -> bytes:
    """A whole HTTP response for a refusal, closing the connection."""
    body = json.dumps(exc.anthropic_body()).encode()
    head = [f"HTTP/1.1 {exc.status} {type(exc).__name__}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in exc.response_headers().items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class DeadlineReader(io.RawIOBase):
    """A socket's reads, each bounded by what is left of one deadline (a trickle cannot stretch it)."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__()
        self.sock, self.seconds = sock, seconds
        self.deadline = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired()
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            raise self.expired() from None

    def expired(self) -> RelayError:
        """A RelayError, not a TimeoutError (http.server would close the connection without a word)."""
        return refusal(f"the request did not arrive within {self.seconds:g} s (agent.proxy_read_timeout_s)",
                       RequestTimeout)


class Gate:
    """The run's open connections: up to `max_connections` served, as many more refused, the rest closed."""

    def __init__(self, limits: ProxyLimits) -> None:
        self.limits = limits
        self.served: set[Any] = set()
        self.refusing: set[Any] = set()
        self.turned_away = 0
        self._lock = threading.Lock()

    def enter(self, sock: Any) -> str | None:
        """'serve', 'refuse' (answer 429) or None (close it at once)."""
        with self._lock:
            if len(self.served) < self.limits.max_connections:
                self.served.add(sock)
                return "serve"
            self.turned_away += 1
            if len(self.refusing) < self.limits.max_connections:
                self.refusing.add(sock)
                return "refuse"
            return None

    def leave(self, sock: Any) -> None:
        with self._lock:
            self.served.discard(sock)
            self.refusing.discard(sock)

    def over_cap(self) -> RelayError:
        return refusal(f"this run already has {self.limits.max_connections} connections open "
                       "(agent.proxy_max_connections)", RateLimited, code="too_many_connections", retry_after=1)

    def close_all(self) -> None:
        """The run ended: end whatever connection is still open."""
        with self._lock:
            socks = list(self.served | self.refusing)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

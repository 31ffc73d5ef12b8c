"""gunicorn's gevent worker with deadlines on reading each request, so slow clients cannot hold it.

A gevent worker serves at most `worker_connections` sockets; a client that trickles its headers
(one line every few seconds) or its body keeps a slot for as long as it likes. Here every
connection's socket reads carry a deadline: the headers must be complete within
`client_header_timeout_s` of the connection's start or of a keep-alive request's first byte, and
the body within `client_body_timeout_s` of its headers (this also bounds the draining of a body the
app refused without reading). Past it, the read raises `NoMoreData` (an `OSError`): gunicorn closes
the connection quietly, and the app answers 408 if it was reading the body.

Imports only gunicorn, gevent and `relay.config`: gunicorn loads this class in its master.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import gevent
from gunicorn.http.errors import NoMoreData
from gunicorn.workers.ggevent import GeventWorker

from .config import load_settings


class SlowClient(NoMoreData):
    """The client did not send its request in time."""

    def __str__(self) -> str:
        return "request not received in time; connection closed"


class DeadlineSocket:
    """A client socket whose reads fail once the current deadline has passed."""

    def __init__(self, sock: Any, header_s: float, body_s: float) -> None:
        self._sock = sock
        self.header_s, self.body_s = header_s, body_s
        self.deadline: float | None = time.monotonic() + header_s  # the first request's headers
        self.arm_on_data = False

    def reading_body(self) -> None:
        self.deadline, self.arm_on_data = time.monotonic() + self.body_s, False

    def between_requests(self) -> None:
        """Idle keep-alive (bounded by gunicorn's own keepalive); the next request's first byte starts
        its header deadline."""
        self.deadline, self.arm_on_data = None, True

    def recv(self, size: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK or (self.deadline is None and not self.arm_on_data):
            return self._sock.recv(size, flags)
        if self.deadline is None:
            data = self._sock.recv(size, flags)
            if data:
                self.deadline, self.arm_on_data = time.monotonic() + self.header_s, False
            return data
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SlowClient(b"")
        try:
            with gevent.Timeout(left):
                return self._sock.recv(size, flags)
        except gevent.Timeout:
            raise SlowClient(b"") from None

    def recv_into(self, buf: Any, nbytes: int = 0, flags: int = 0) -> int:
        data = self.recv(nbytes or len(buf), flags)
        buf[:len(data)] = data
        return len(data)

    def __getattr__(self, name: str) -> Any:  # send, sendall, close, fileno, setblocking...
        return getattr(self._sock, name)


class DeadlineGeventWorker(GeventWorker):
    """`worker_class` of the relay: gevent, plus the read deadlines above."""

    def init_process(self) -> None:
        settings = load_settings()
        self.header_s = settings["client_header_timeout_s"]
        self.body_s = settings["client_body_timeout_s"]
        super().init_process()

    def handle_quit(self, sig: Any, frame: Any) -> None:
        """Ctrl-C reaches a worker twice (SIGINT from the terminal's process group, then SIGQUIT from the
        master): the second `sys.exit` would be thrown into the first exit's atexit work (the last stats
        snapshot, mid Redis call). Once quitting, later quit signals are ignored."""
        if getattr(self, "_quitting", False):
            return
        self._quitting = True
        super().handle_quit(sig, frame)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.setblocking(1)
        super().handle(listener, DeadlineSocket(client, self.header_s, self.body_s), addr)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        if isinstance(sock, DeadlineSocket):
            sock.reading_body()
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if isinstance(sock, DeadlineSocket):
                sock.between_requests()

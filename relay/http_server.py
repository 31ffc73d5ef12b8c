"""gunicorn's gevent worker with deadlines on reading each request and on writing each answer, so slow
clients cannot hold it.

A gevent worker serves at most `worker_connections` sockets; a client that trickles its headers
(one line every few seconds) or its body keeps a slot for as long as it likes. Here every
connection's socket reads carry a deadline: the headers must be complete within
`client_header_timeout_s` of the connection's start or of a keep-alive request's first byte, and
the body within `client_body_timeout_s` of its headers (this also bounds the draining of a body the
app refused without reading). Past it, the read raises `NoMoreData` (an `OSError`): gunicorn closes
the connection quietly, and the app answers 408 if it was reading the body. An idle keep-alive
connection is closed after `client_header_timeout_s` too.

A client that stops reading the answer blocks its writes: each write must be taken within
`client_send_timeout_s`, and none past the answer's own deadline (`respond_by`, set by the app: a run's
`total_timeout_s`). Past either, the write raises `StalledWrite` (EPIPE): gunicorn closes the
connection and the app's stream is closed, which stops its run and releases its slots and lock.

Imports only gunicorn, gevent and `relay.config`: gunicorn loads this class in its master.
"""

from __future__ import annotations

import errno
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


class StalledWrite(OSError):
    """The client stopped reading the answer; gunicorn drops the connection quietly (EPIPE)."""

    def __init__(self) -> None:
        super().__init__(errno.EPIPE, "the client stopped reading the answer; connection closed")


class DeadlineSocket:
    """A client socket whose reads fail once the current deadline has passed, and whose writes fail
    when the client does not take them in time."""

    def __init__(self, sock: Any, header_s: float, body_s: float, send_s: float = 30.0) -> None:
        self._sock = sock
        self.header_s, self.body_s, self.send_s = header_s, body_s, send_s
        self.deadline: float | None = time.monotonic() + header_s  # the first request's headers
        self.arm_on_data = False
        self.answer_by: float | None = None  # the current answer's deadline (monotonic), set by the app
        self.stalled = False                 # a write missed its deadline

    def reading_body(self) -> None:
        self.deadline, self.arm_on_data, self.answer_by = time.monotonic() + self.body_s, False, None

    def between_requests(self) -> None:
        """Idle keep-alive, for at most `client_header_timeout_s`; the next request's first byte starts
        its header deadline."""
        self.deadline, self.arm_on_data, self.answer_by = time.monotonic() + self.header_s, True, None

    def respond_by(self, deadline: float) -> None:
        """No write of the current answer may wait past `deadline` (time.monotonic())."""
        self.answer_by = deadline

    def _send_left(self) -> float:
        left = self.send_s
        if self.answer_by is not None:
            left = min(left, self.answer_by - time.monotonic())
        return max(left, 0.001)  # past the deadline a write still goes out if the socket takes it at once

    def sendall(self, data: Any, flags: int = 0) -> None:
        try:
            with gevent.Timeout(self._send_left()):
                self._sock.sendall(data, flags)
        except gevent.Timeout:
            self.stalled = True
            raise StalledWrite() from None

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            with gevent.Timeout(self._send_left()):
                return int(self._sock.send(data, flags))
        except gevent.Timeout:
            self.stalled = True
            raise StalledWrite() from None

    def recv(self, size: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK or self.deadline is None:
            return self._sock.recv(size, flags)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SlowClient(b"")
        try:
            with gevent.Timeout(left):
                data = self._sock.recv(size, flags)
        except gevent.Timeout:
            raise SlowClient(b"") from None
        if data and self.arm_on_data:  # a keep-alive request's first byte: its headers' deadline starts
            self.deadline, self.arm_on_data = time.monotonic() + self.header_s, False
        return data

    def recv_into(self, buf: Any, nbytes: int = 0, flags: int = 0) -> int:
        data = self.recv(nbytes or len(buf), flags)
        buf[:len(data)] = data
        return len(data)

    def __getattr__(self, name: str) -> Any:  # close, fileno, setblocking, shutdown...
        return getattr(self._sock, name)


class DeadlineGeventWorker(GeventWorker):
    """`worker_class` of the relay: gevent, plus the read and write deadlines above."""

    def init_process(self) -> None:
        settings = load_settings()
        self.header_s = settings["client_header_timeout_s"]
        self.body_s = settings["client_body_timeout_s"]
        self.send_s = settings["client_send_timeout_s"]
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
        super().handle(listener, DeadlineSocket(client, self.header_s, self.body_s, self.send_s), addr)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        if isinstance(sock, DeadlineSocket):
            sock.reading_body()
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if isinstance(sock, DeadlineSocket):
                sock.between_requests()

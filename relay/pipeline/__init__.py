"""One request from admission to record, shared by every client API.

    HTTP route (api/completions.py, through a core/formats Format)
      │
      ▼  Exchange.open()
    admission ─ CLI usable · token quota · conversation lock → plan → runaway guard · key slot · host queue
      │          · account slot
      │
    runner ──── describe → spec → a process (pool: spare / warm / cold, or spawned here)
      │          · fail over to another account · replay a vanished session   (until the API accepts)
      ▼  Exchange.deltas() / Exchange.complete()
    answer ──── the deltas a stream shows · one TurnView of the finished turn for every format
      │
      ▼  Exchange.settle() (before a stream's last event), Exchange.close(exc) (exactly once)
    finish ──── keep warm · commit the conversation │ status · CLI exit · runaway guard counts the turn ·
                release leases · record · alerts

Anything that fails in `open()` is an ordinary HTTP error: nothing has reached the client yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..core.events import Delta
from ..core.formats.base import StreamHead, TurnView
from ..core.receipt import Receipt
from ..core.request import ChatRequest
from ..runtime import Relay
from . import answer, finish, receipts, runner
from .admission import Context, Flight
from .hold import AccountsHold

__all__ = ["AccountsHold", "Context", "Exchange"]


class Exchange:
    """The façade the HTTP layer drives: open, then deltas or complete, then close."""

    def __init__(self, relay: Relay, req: ChatRequest, ctx: Context, cid: str) -> None:
        self.flight = Flight(relay, req, ctx, cid)

    @property
    def token_budget(self) -> dict[str, Any] | None:
        return self.flight.token_budget

    @property
    def estimate(self) -> int:
        return self.flight.estimate

    @property
    def account(self) -> str | None:
        return self.flight.account

    @property
    def conv(self) -> str:
        return self.flight.conv

    @property
    def created(self) -> int:
        return self.flight.created

    @property
    def receipt(self) -> Receipt | None:
        """The finished turn's receipt (None before the end, or when it could not be made)."""
        return self.flight.receipt

    def head_receipt(self) -> Receipt:
        """What a stream's head can carry: the figures from before the turn."""
        return receipts.head(self.flight)

    def open(self) -> None:
        """Raises `AccountsHold` for a stream that must wait for an account's reset: the route then sends
        keep-alives until `hold.until` and calls `resume()`."""
        self._start(runner.open_run)

    def resume(self) -> None:
        """A held stream, after its wait; may raise `AccountsHold` again (within its hold budget)."""
        self._start(runner.resume_run)

    def _start(self, step: Callable[[Flight], None]) -> None:
        """Anything but a hold that fails before the run answers closes the exchange."""
        try:
            step(self.flight)
        except AccountsHold:
            raise
        except BaseException as exc:
            self.close(exc)
            raise

    def hold_head(self) -> StreamHead:
        """The head of a stream that holds before its run exists (its model as asked)."""
        return answer.head_before_run(self.flight)

    def head(self) -> StreamHead:
        return answer.head(self.flight)

    def deltas(self) -> Iterator[Delta | None]:
        return answer.deltas(self.flight)

    def view(self) -> TurnView:
        return answer.view(self.flight)

    def complete(self) -> TurnView:
        """The whole turn (the exchange is closed when this returns or raises)."""
        try:
            view = answer.complete(self.flight)
        except BaseException as exc:
            self.close(exc)
            raise
        self.close(None)
        return view

    def settle(self) -> None:
        """Commit a turn that ended well, before the stream's last event."""
        finish.settle(self.flight)

    def close(self, exc: BaseException | None) -> None:
        finish.close(self.flight, exc)

"""The record of one request, declared once: what the stats, usage views and logs keep. Pure.

Its figures come from the CLI's events, which the relay does not control: `figure()` makes each one a
whole number from 0 to `MAX_FIGURE`, so no forged or broken report can lower a total, a counter or a quota.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# one request's tokens of one kind (or milliseconds, bytes) above this are not a real report: a million-token
# context answered thousands of times over in an agent loop stays far below it
MAX_FIGURE = 10**10
FIGURES = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "response_time_ms",
           "bytes_to_cli", "tokens_saved")


def figure(value: Any, cap: int = MAX_FIGURE) -> int:
    """A count as the relay records it: an int from 0 to `cap`. Negative, fractional-looking strings, NaN,
    booleans and anything else that is not a number count as 0; whole floats and digit strings are read."""
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isascii() and text.isdigit() else 0
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return 0
        value = int(value)
    if not isinstance(value, int):
        return 0
    return min(max(value, 0), cap)


@dataclass
class RequestRecord:
    id: str                              # the answer's id (or the request id for a refusal)
    request_id: str
    key: str = ""                        # API key name ("" without auth)
    key_id: str = ""                     # the key's digest prefix: its own usage view follows the key, not the name
    model: str = "none"                  # the model that answered ("none" when refused before a run)
    requested_model: str | None = None
    stream: bool = False
    status: int = 0
    error: str | None = None             # the error code, for anything but 200
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    estimated: bool = False              # tokens counted with tiktoken, not reported by the CLI
    response_time_ms: int = 0
    ttft_ms: int | None = None
    first_message: str | None = None
    resumed: bool = False
    moved: bool = False                  # its conversation moved to another account for this turn
    bytes_to_cli: int = 0
    worker: int = 0
    endpoint: str = ""
    pool: str = ""                       # spare | warm | cold (pool run) | local (spawned by the worker), + why
    account: str = ""                    # the Claude account whose CLI ran it ("" when refused before a run)
    response_cache_hit: bool = False
    tokens_saved: int = 0
    receipt: dict[str, Any] | None = None  # core/receipt.Receipt.record(): windows, overage, key share, served model
    timestamp: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for name in FIGURES:
            setattr(self, name, figure(getattr(self, name)))
        if self.ttft_ms is not None:
            self.ttft_ms = figure(self.ttft_ms)

    @property
    def tokens_spent(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_creation_tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

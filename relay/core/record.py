"""The record of one request, declared once: what the stats, usage views and logs keep. Pure."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


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
    bytes_to_cli: int = 0
    worker: int = 0
    endpoint: str = ""
    pool: str = ""                       # spare | warm | cold (pool run) | local (spawned by the worker), + why
    account: str = ""                    # the Claude account whose CLI ran it ("" when refused before a run)
    response_cache_hit: bool = False
    tokens_saved: int = 0
    timestamp: float = field(default_factory=time.time)

    @property
    def tokens_spent(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_creation_tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

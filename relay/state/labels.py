"""The model names the metrics and stats count under: a listed model, or one of at most MAX_MODELS others
that answered a request; anything else is "other". So the number of Redis hashes and fields (and the size
of /metrics) stays bounded whatever model ids clients send: a made-up pinned id never answers upstream.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .connection import PREFIX

MODELS = PREFIX + "metrics:model_labels"   # the admitted unlisted models (a set, at most MAX_MODELS)
MAX_MODELS = 100
OTHER = "other"

# admit ARGV[1] if it answered (ARGV[2] == 1) and there is room (fewer than ARGV[3]); 1 if it is a label
_ADMIT = """
if redis.call('sismember', KEYS[1], ARGV[1]) == 1 then return 1 end
if ARGV[2] == '1' and redis.call('scard', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('sadd', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class ModelLabels:
    def __init__(self, r: Any, listed: Iterable[str], cap: int = MAX_MODELS) -> None:
        self.listed = frozenset(listed) | {"none", "unknown"}
        self.cap = cap
        self._known: set[str] = set()   # admitted ones this worker has seen (never more than `cap`)
        self._admit = r.register_script(_ADMIT)

    def label(self, model: str, answered: bool, vouched: bool = False) -> str:
        """`model` itself if it is listed or admitted (admitting it now if it `answered` and there is
        room), else "other". A `vouched` model is the one the CLI reported for a listed request (the full
        id "sonnet" resolved to, even if the client hung up): bounded by the catalog, so it is admitted
        past the cap. A Redis outage
        raises (the record waits in the backlog with the rest)."""
        if model in self.listed or model in self._known:
            return model
        room = self.cap + (len(self.listed) if vouched else 0)
        ok = self._admit(keys=[MODELS], args=[model, "1" if answered or vouched else "0", room])
        if not ok:
            return OTHER
        self._known.add(model)
        return model

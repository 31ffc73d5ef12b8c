"""How many warm processes a host keeps when `pool.max_warm` is "auto": a third of the memory available
at start over what one warm CLI costs privately. Pure arithmetic; the pool server reads the figures
(`memory.py`) and gives them here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

SHARE = 3                  # the pool may take a third of MemAvailable
ASSUMED_PROCESS_MB = 135   # private MB of one warm CLI before one is measured (the high end measured)
AUTO_CAP = 64              # never more than this many, whatever the memory
UNKNOWN_MEMORY_MAX_WARM = 4  # "auto" where MemAvailable cannot be read (not Linux)


def auto_max_warm(mem_available_mb: float, per_process_mb: float, cap: int = AUTO_CAP) -> int:
    """A third of the available memory over the private memory per warm process, from 1 to `cap`."""
    if per_process_mb <= 0:
        per_process_mb = ASSUMED_PROCESS_MB
    return max(1, min(cap, int(mem_available_mb / SHARE // per_process_mb)))


@dataclass(frozen=True)
class WarmCap:
    """The cap in effect and how it was chosen: "config" (an integer in the settings) or "auto"."""
    max_warm: int
    basis: str                              # "config" | "auto"
    mem_available_mb: float | None = None   # auto: MemAvailable when the pool server started
    per_process_mb: float = ASSUMED_PROCESS_MB
    measured: bool = False                  # auto: per_process_mb is a spare's measured private memory

    @classmethod
    def from_setting(cls, value: int | str, mem_available_mb: float | None) -> WarmCap:
        if value != "auto":
            return cls(max_warm=int(value), basis="config")
        if mem_available_mb is None:
            return cls(max_warm=UNKNOWN_MEMORY_MAX_WARM, basis="auto")
        return cls(max_warm=auto_max_warm(mem_available_mb, ASSUMED_PROCESS_MB), basis="auto",
                   mem_available_mb=mem_available_mb)

    @property
    def wants_measure(self) -> bool:
        return self.basis == "auto" and not self.measured and self.mem_available_mb is not None

    def measure(self, per_process_mb: float) -> WarmCap:
        """Recomputed with the measured private memory of a ready process (an auto cap only, once)."""
        if not self.wants_measure or per_process_mb <= 0 or self.mem_available_mb is None:
            return self
        return replace(self, max_warm=auto_max_warm(self.mem_available_mb, per_process_mb),
                       per_process_mb=round(per_process_mb, 1), measured=True)

    def stats(self) -> dict[str, Any]:
        if self.basis == "config":
            return {"basis": "config"}
        return {"basis": "auto", "mem_available_mb": self.mem_available_mb, "per_process_mb": self.per_process_mb,
                "measured": self.measured, "share": f"1/{SHARE}", "cap": AUTO_CAP}

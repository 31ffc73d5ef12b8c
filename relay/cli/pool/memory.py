"""What the pool reads of the host's memory: MemAvailable, and the private memory of one CLI process."""

from __future__ import annotations

import psutil


def mem_available_mb(meminfo: str = "/proc/meminfo") -> float | None:
    """MemAvailable in MB (10^6 bytes), or None where the kernel does not say (not Linux)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return round(int(line.split()[1]) * 1024 / 1e6, 1)   # the kernel's "kB" is KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def private_mb(pid: int | None) -> float:
    """A process's private memory (USS) in MB, its resident size where USS cannot be read; 0 if gone."""
    if not pid:
        return 0.0
    try:
        proc = psutil.Process(pid)
        try:
            return proc.memory_full_info().uss / 1e6
        except (psutil.AccessDenied, AttributeError):
            return proc.memory_info().rss / 1e6
    except psutil.Error:
        return 0.0

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
    """What one more CLI process costs, in MB: its private memory (USS), but no more than its resident
    memory that is not file-backed. Measured with 2.1.330: a lone CLI has a USS of ~175 MB because the
    binary's ~70 MB of pages are mapped by it alone; beside two others, ~95-105 MB, which is what
    rss - shared says in either case. Its resident size where neither can be read; 0 if it is gone."""
    if not pid:
        return 0.0
    try:
        proc = psutil.Process(pid)
        mem = proc.memory_info()
        try:
            uss = proc.memory_full_info().uss
        except (psutil.AccessDenied, AttributeError):
            uss = mem.rss
        anon = mem.rss - getattr(mem, "shared", 0)   # `shared` (Linux): file-backed and shm pages
        return min(uss, anon) / 1e6 if anon > 0 else uss / 1e6
    except psutil.Error:
        return 0.0

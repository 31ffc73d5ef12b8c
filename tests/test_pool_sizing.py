"""`pool.max_warm: auto`: the cap from the host's memory (relay/cli/pool/sizing.py), the figures read for it
(memory.py), the setting itself, and the memory of why each conversation's process was evicted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.cli.pool.evictions import Evictions
from relay.cli.pool.memory import mem_available_mb, private_mb
from relay.cli.pool.sizing import ASSUMED_PROCESS_MB, AUTO_CAP, UNKNOWN_MEMORY_MAX_WARM, WarmCap, auto_max_warm
from relay.config import ConfigError, load_settings


@pytest.mark.parametrize(("available", "per_process", "cap", "expected"), [
    (8000, 135, 64, 19),        # 8 GB free: a third is 2.67 GB, 19 processes of 135 MB
    (8000, 100, 64, 26),
    (3000, 135, 64, 7),
    (300, 135, 64, 1),          # a tiny host still keeps one
    (0, 135, 64, 1),
    (500_000, 100, 64, 64),     # a big host stops at the cap
    (500_000, 100, 10, 10),
    (8000, 0, 64, 19),          # an unreadable measurement falls back to the assumed figure
])
def test_auto_max_warm_is_a_third_of_available_memory_per_process_within_bounds(
        available: float, per_process: float, cap: int, expected: int) -> None:
    assert auto_max_warm(available, per_process, cap) == expected


def test_an_integer_setting_wins_and_says_so() -> None:
    cap = WarmCap.from_setting(3, 8000)
    assert (cap.max_warm, cap.basis, cap.stats()) == (3, "config", {"basis": "config"})
    assert cap.measure(90) is cap  # a measurement never changes a configured cap


def test_auto_starts_conservative_then_uses_the_measured_process() -> None:
    cap = WarmCap.from_setting("auto", 8000)
    assert (cap.max_warm, cap.per_process_mb, cap.measured) == (19, ASSUMED_PROCESS_MB, False)
    assert cap.wants_measure
    measured = cap.measure(95.04)
    assert (measured.max_warm, measured.per_process_mb, measured.measured) == (28, 95.0, True)
    assert not measured.wants_measure and measured.measure(50) is measured  # once
    assert measured.stats() == {"basis": "auto", "mem_available_mb": 8000, "per_process_mb": 95.0,
                                "measured": True, "share": "1/3", "cap": AUTO_CAP}
    assert cap.measure(0) is cap  # a process that vanished before it was measured


def test_auto_without_meminfo_keeps_a_small_fixed_cap() -> None:
    cap = WarmCap.from_setting("auto", None)
    assert cap.max_warm == UNKNOWN_MEMORY_MAX_WARM and cap.basis == "auto" and not cap.wants_measure


def test_mem_available_is_read_from_meminfo_in_mb(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    7812500 kB\n")
    assert mem_available_mb(str(info)) == 8000.0
    info.write_text("MemTotal:       16000000 kB\n")
    assert mem_available_mb(str(info)) is None
    assert mem_available_mb(str(tmp_path / "missing")) is None
    if os.path.exists("/proc/meminfo"):
        assert (mem_available_mb() or 0) > 0


def test_private_memory_of_a_live_process_and_of_none() -> None:
    assert 0 < private_mb(os.getpid()) < 10_000
    assert private_mb(None) == 0.0
    assert private_mb(2**22 + 12345) == 0.0  # no such process


def test_max_warm_defaults_to_auto_and_an_integer_still_wins(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert load_settings(tmp_path / "config.json", env={})["pool.max_warm"] == "auto"
    assert load_settings(env={})["pool.max_warm"] == "auto"   # the shipped config.json
    (tmp_path / "config.json").write_text('{"pool": {"max_warm": 6}}')
    assert load_settings(tmp_path / "config.json", env={})["pool.max_warm"] == 6
    assert load_settings(env={"RELAY_POOL__MAX_WARM": "auto"})["pool.max_warm"] == "auto"
    assert load_settings(env={"RELAY_POOL__MAX_WARM": "2"})["pool.max_warm"] == 2
    for bad in ("lots", "-1", "1001", "2.5", "true"):
        with pytest.raises(ConfigError, match="pool.max_warm"):
            load_settings(env={"RELAY_POOL__MAX_WARM": bad})


def test_an_evicted_conversations_next_miss_names_the_eviction_once() -> None:
    ev = Evictions()
    ev.note("conv-a", "lru")
    ev.note("conv-b", "idle_ttl")
    ev.note("conv-c", "replaced")   # it got another process: not an eviction
    assert ev.explain("conv-a", "not held on this host") == "evicted: lru"
    assert ev.explain("conv-a", "not held on this host") == "not held on this host"  # counted once
    assert ev.explain("conv-c", "no warm process") == "no warm process"
    ev.forget("conv-b")             # kept again
    assert ev.explain("conv-b", "no warm process") == "no warm process"


def test_evictions_remember_a_bounded_number_of_conversations() -> None:
    ev = Evictions(limit=2)
    for conv in ("a", "b", "c"):
        ev.note(conv, "lru")
    assert [ev.explain(c, "-") for c in ("a", "b", "c")] == ["-", "evicted: lru", "evicted: lru"]

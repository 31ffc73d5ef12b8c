"""Anthropic API list prices (USD per million tokens), to show what subscription usage would cost. Pure."""

from __future__ import annotations

from typing import Any

# input, output, cache write (5 min), cache read — per million tokens; override with config `prices`.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "opus": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.50},
    "sonnet": {"input": 3.0, "output": 15.0, "cache_write": 3.75, "cache_read": 0.30},
    "haiku": {"input": 1.0, "output": 5.0, "cache_write": 1.25, "cache_read": 0.10},
}


def family(model: str | None) -> str:
    low = (model or "").lower()
    for fam in ("opus", "haiku", "sonnet"):
        if fam in low:
            return fam
    return "sonnet"


def cost_usd(s: dict[str, Any], model: str | None, overrides: dict[str, Any] | None = None) -> float:
    fam = family(model)
    price = dict(DEFAULT_PRICES[fam])
    price.update((overrides or {}).get(fam) or {})
    total = (s.get("input_tokens", 0) * price["input"] + s.get("output_tokens", 0) * price["output"]
             + s.get("cache_creation_tokens", 0) * price["cache_write"]
             + s.get("cache_read_tokens", 0) * price["cache_read"])
    return round(total / 1_000_000, 6)

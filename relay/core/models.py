"""Model ids: what `/v1/models` lists and how a client's model name becomes a CLI `--model`. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FAMILIES = ("opus", "sonnet", "haiku")
PREFIXES = ("anthropic/", "claude-max/", "claude-code-cli/", "claude-code/", "claude/")
CREATED = 1735689600  # 2025-01-01: a fixed, honest-enough "created" for alias entries
CREATED_AT = "2025-01-01T00:00:00Z"

# OpenAI names clients hard-code, mapped to the Claude family closest in cost and speed.
OPENAI_MAP = (
    (re.compile(r"^(gpt-4o-mini|gpt-4\.1-(mini|nano)|gpt-5(\.\d+)?-(mini|nano)|gpt-3\.5.*|o\d-mini.*)$"), "haiku"),
    (re.compile(r"^(o1|o3|o4|o1-pro|o3-pro|gpt-5(\.\d+)?-pro)(-.*)?$"), "opus"),
    (re.compile(r"^(gpt-4.*|gpt-5.*|chatgpt-.*)$"), "sonnet"),
)
PINNED = re.compile(r"^claude-[a-z0-9.-]{1,80}-\d{8}$")


@dataclass(frozen=True)
class ModelEntry:
    id: str
    cli_model: str

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": CREATED, "owned_by": "anthropic"}

    def as_anthropic(self) -> dict[str, Any]:
        name = " ".join(w.capitalize() for w in self.id.replace("-", " ").split())
        return {"type": "model", "id": self.id, "display_name": name if name.startswith("Claude") else f"Claude {name}",
                "created_at": CREATED_AT, "lifecycle": "active", "deprecated_at": None, "retires_at": None}


def strip_prefix(name: str) -> str:
    low = name.strip()
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if low.lower().startswith(p):
                low = low[len(p):]
                changed = True
    return low


class ModelCatalog:
    """The listed models (family aliases, `claude-<family>-4` ids, extra_models) and resolution."""

    def __init__(self, default_model: str, extra_models: Iterable[Any] = ()) -> None:
        self.default_model = default_model
        entries = [ModelEntry(f, f) for f in FAMILIES]
        entries += [ModelEntry(f"claude-{f}-4", f) for f in FAMILIES]
        for item in extra_models:
            if isinstance(item, str):
                entries.append(ModelEntry(item, item))
            else:
                entries.append(ModelEntry(item["id"], item.get("cli_model") or item["id"]))
        self.entries = {e.id: e for e in entries}

    def list(self) -> list[dict[str, Any]]:
        return [e.as_openai() for e in self.entries.values()]

    def list_anthropic(self) -> dict[str, Any]:
        data = [e.as_anthropic() for e in self.entries.values()]
        return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    def label_names(self) -> set[str]:
        """Every listed id and CLI model (the metrics and stats may always use these as labels)."""
        return {e.id for e in self.entries.values()} | {e.cli_model.removesuffix("[1m]") for e in self.entries.values()}

    def get(self, model_id: str) -> ModelEntry | None:
        return self.entries.get(model_id) or self.entries.get(strip_prefix(model_id))

    def resolve(self, requested: Any) -> str:
        """The `--model` value for a client's model name (never fails: unknown → default_model)."""
        if not isinstance(requested, str) or not requested.strip():
            return self.default_model
        listed = self.get(requested)
        if listed:
            return listed.cli_model
        name = strip_prefix(requested).lower()
        base = name.removesuffix("[1m]")
        if PINNED.match(base):
            return name
        for family in FAMILIES:
            if family in base:
                return family + ("[1m]" if name.endswith("[1m]") else "")
        for pattern, family in OPENAI_MAP:
            if pattern.match(base):
                return family
        return self.default_model


def display_model(cli_model: str | None, fallback: str) -> str:
    """The model name to report: what the CLI used, without its `[1m]` context marker."""
    if not cli_model or cli_model == "<synthetic>":
        return fallback
    return cli_model.removesuffix("[1m]")

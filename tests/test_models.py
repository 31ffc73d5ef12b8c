"""Model names: aliases, prefixes, pinned ids, OpenAI names, defaults."""

from hypothesis import given
from hypothesis import strategies as st

from relay.core.models import ModelCatalog, display_model

CAT = ModelCatalog("sonnet", ["my-custom", {"id": "team/fast", "cli_model": "haiku"}])


def test_family_aliases_and_names_containing_a_family():
    for name, want in [("opus", "opus"), ("sonnet", "sonnet"), ("haiku", "haiku"), ("claude-opus-4", "opus"),
                       ("claude-sonnet-4", "sonnet"), ("claude-3-5-haiku-latest", "haiku"),
                       ("Claude-Opus-4.5", "opus"), ("sonnet[1m]", "sonnet[1m]")]:
        assert CAT.resolve(name) == want, name


def test_pinned_ids_pass_through_and_prefixes_are_stripped():
    assert CAT.resolve("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5-20250929"
    assert CAT.resolve("anthropic/claude-sonnet-4-5-20250929") == "claude-sonnet-4-5-20250929"
    assert CAT.resolve("claude-max/opus") == "opus"
    assert CAT.resolve("claude-code-cli/claude-haiku-4") == "haiku"


def test_openai_names_map_to_a_family_and_unknown_to_default():
    assert CAT.resolve("gpt-4o") == "sonnet"
    assert CAT.resolve("gpt-4") == "sonnet"
    assert CAT.resolve("gpt-4o-mini") == "haiku"
    assert CAT.resolve("o1") == "opus"
    assert CAT.resolve("o3-mini") == "haiku"
    assert CAT.resolve("llama-3") == "sonnet"
    assert CAT.resolve(None) == "sonnet" and CAT.resolve("") == "sonnet"


def test_extra_models_are_listed_and_resolved():
    ids = [m["id"] for m in CAT.list()]
    assert {"opus", "sonnet", "haiku", "claude-opus-4", "claude-sonnet-4", "claude-haiku-4", "my-custom",
            "team/fast"} <= set(ids)
    assert CAT.resolve("team/fast") == "haiku" and CAT.resolve("my-custom") == "my-custom"
    assert CAT.get("anthropic/sonnet") is not None and CAT.get("nope") is None


def test_reported_model_drops_the_context_marker():
    assert display_model("claude-opus-4-8[1m]", "opus") == "claude-opus-4-8"
    assert display_model("<synthetic>", "opus") == "opus"


@given(st.text(max_size=60))
def test_resolution_never_fails_and_never_returns_empty(name):
    out = CAT.resolve(name)
    assert isinstance(out, str) and out

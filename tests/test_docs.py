"""The README is the user's guide: every setting and every route must be in it."""

from pathlib import Path

from relay.config import SCHEMA

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_config_key_is_documented():
    missing = [k for k in SCHEMA if f"`{k}`" not in README]
    assert not missing


def test_every_route_is_documented():
    for path in ("/health", "/v1/models", "/v1/chat/completions", "/v1/responses", "/v1/messages",
                 "/v1/messages/count_tokens", "/v1/usage", "/v1/usage/recent",
                 "/stats", "/v1/sessions", "/metrics", "/dashboard", "/dashboard/data", "/me", "/me/data"):
        assert f"`GET {path}" in README or f"`POST {path}" in README or f"`DELETE {path}" in README, path

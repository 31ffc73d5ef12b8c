"""The README is the user's guide: every setting and every route must be in it."""

from pathlib import Path

from relay.config import SCHEMA

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_config_key_is_documented():
    missing = [k for k in SCHEMA if f"`{k}`" not in README]
    assert not missing


def test_every_route_is_documented():
    from relay import create_app  # noqa: F401 - imported for the routes below
    from relay.routes_chat import bp as chat
    from relay.routes_meta import bp as meta
    from relay.routes_responses import bp as responses
    rules = []
    for bp in (chat, meta, responses):
        for deferred in bp.deferred_functions:
            rules.append(deferred)
    for path in ("/health", "/v1/models", "/v1/chat/completions", "/v1/responses", "/v1/usage", "/v1/usage/recent",
                 "/stats", "/v1/sessions"):
        assert f"`GET {path}" in README or f"`POST {path}" in README or f"`DELETE {path}" in README, path


def test_pure_core_imports_no_io():
    import ast
    root = Path(__file__).resolve().parent.parent / "relay"
    for name in ("request.py", "prompt.py", "events.py", "completion.py", "sse.py", "models.py", "upstream.py",
                 "images.py", "tools.py", "responses.py", "pricing.py"):
        tree = ast.parse((root / name).read_text())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert not mods & {"flask", "redis", "subprocess", "socket", "gevent", "requests", "psutil"}, name

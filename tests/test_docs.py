"""The README is the user's first hour; docs/ holds the rest. These checks keep both true to the code:
every route is in docs/api.md, every setting in the generated docs/configuration.md, every Redis key
family in docs/architecture.md, and every link points at a file that exists."""

import re
import subprocess
import sys
from pathlib import Path

from relay.config import SCHEMA, markdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
PAGES = ("clients.md", "api.md", "configuration.md", "operations.md", "architecture.md", "warm-pool.md",
         "benchmarks.md", "cli-protocol.md", "limits.md")
REGENERATE = ".venv/bin/python -m relay config --markdown > docs/configuration.md"


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def test_readme_is_short():
    assert len(README.splitlines()) <= 300


def test_readme_links_every_docs_page():
    for page in PAGES:
        assert f"](docs/{page}" in README, page


def _links(text: str) -> list[str]:
    return [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
            if not t.startswith(("http://", "https://", "mailto:", "#"))]


def test_every_linked_file_exists():
    files = [(ROOT / "README.md", README)] + [(DOCS / p, doc(p)) for p in PAGES]
    missing = [f"{f.name} -> {t}" for f, text in files for t in _links(text) if t and not (f.parent / t).exists()]
    assert not missing


def test_screenshots_are_kept_and_shown():
    ops = doc("operations.md")
    for shot in ("dashboard.png", "usage-page.png"):
        assert (DOCS / shot).exists() and f"]({shot})" in ops, shot


def routes() -> list[tuple[str, str]]:
    """Every (METHOD, path) declared with a blueprint decorator under relay/api/."""
    found = []
    for f in sorted((ROOT / "relay" / "api").glob("*.py")):
        for method, path in re.findall(r'@\w*bp\.(get|post|delete|put|patch)\(\s*"([^"]+)"', f.read_text()):
            found.append((method.upper(), path))
    return found


def test_the_route_list_is_found():
    found = set(routes())
    for expected in (("GET", "/health"), ("POST", "/v1/chat/completions"), ("POST", "/v1/messages/count_tokens"),
                     ("GET", "/v1/responses/<rid>"), ("DELETE", "/v1/sessions/<path:conv_id>"), ("GET", "/me/data")):
        assert expected in found, expected


def test_every_route_is_documented_in_api_md():
    api = doc("api.md")
    missing = []
    for method, path in routes():
        # a Flask placeholder (<rid>, <path:model_id>) is written {id} or <id> in the docs
        pattern = "".join(r"[{<][^}>]+[}>]" if part.startswith("<") else re.escape(part)
                          for part in re.split(r"(<[^>]+>)", path))
        if not re.search(rf"`{method} {pattern}[`?\s]", api):
            missing.append(f"{method} {path}")
    assert not missing, f"routes missing from docs/api.md: {missing}"


def test_every_config_key_is_in_configuration_md():
    conf = doc("configuration.md")
    assert not [k for k in SCHEMA if f"`{k}`" not in conf]


def test_configuration_md_is_generated_from_the_schema():
    assert doc("configuration.md") == markdown(), \
        f"docs/configuration.md is out of date with relay/config.py; regenerate it: {REGENERATE}"


def test_python_m_relay_config_markdown_prints_it():
    out = subprocess.run([sys.executable, "-m", "relay", "config", "--markdown"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out == doc("configuration.md"), f"regenerate: {REGENERATE}"


def redis_families() -> set[str]:
    """The key families the stores spell: `relay:<family>` from f"{PREFIX}family..." or PREFIX + "family...",
    and flask-limiter's own prefix."""
    families = set()
    for f in sorted((ROOT / "relay" / "state").glob("*.py")):
        src = f.read_text()
        families |= set(re.findall(r"\{PREFIX\}([a-z][a-z_-]*)", src))
        families |= set(re.findall(r"\bPREFIX \+ \"([a-z][a-z_-]*)", src))
        families |= {"=" + v for v in re.findall(r"LIMITER_PREFIX = \"([^\"]+)\"", src)}
    return families


def test_architecture_lists_every_redis_key_family():
    families = redis_families()
    assert {"conv", "lock", "slots", "stats", "acct"} <= families and len(families) >= 15, families
    arch = doc("architecture.md")
    missing = [f for f in sorted(families)
               if not (f[1:] in arch if f.startswith("=") else re.search(rf"relay:{re.escape(f)}(?![a-z_-])", arch))]
    assert not missing, f"Redis key families missing from docs/architecture.md: {missing}"


def test_every_path_in_architecture_exists():
    arch = doc("architecture.md")
    named = {p.rstrip(".,;:") for p in re.findall(r"\brelay/[A-Za-z0-9_./]*", arch)}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"

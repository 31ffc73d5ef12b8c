"""The package's layout is its design: each folder may import only the layers below it, with no circle.

Reads the sources (relative, lazy and TYPE_CHECKING imports included) rather than importing them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "relay"
OPEN = {"config", "errors"}  # open to every layer
# layer -> the layers it may import (itself included)
ALLOWED = {
    "config": set(), "errors": set(),
    "core": {"core"},
    "cli": {"core", "cli"},
    "state": {"core", "state"},
    "runtime": {"core", "cli", "state"},
    "pipeline": {"core", "cli", "state", "runtime", "pipeline"},
    "housekeeping": {"core", "cli", "state", "runtime"},
    "health": {"core", "state", "runtime", "supervise"},
    "supervise": set(),                  # the gunicorn master's: standard library only
    "api": {"core", "cli", "state", "runtime", "pipeline", "housekeeping", "health", "api"},
    "app": {"core", "cli", "state", "runtime", "pipeline", "housekeeping", "health", "api"},
    "__init__": {"app"},
    "__main__": {"core", "cli", "state"},
}
CORE_FORBIDDEN = {"flask", "werkzeug", "flask_limiter", "redis", "subprocess", "socket", "select", "gevent",
                  "requests", "psutil", "os", "pathlib", "shutil", "tempfile", "threading", "pwd"}
API_FORBIDDEN = {"redis", "os", "pathlib", "shutil", "tempfile", "subprocess", "psutil"}


def sources() -> dict[str, str]:
    """Module name ('relay.core.events') -> source, for every module of the package."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1 and parts[-2] != "relay":
            parts = parts[:-1]
        out[".".join(parts)] = f.read_text()
    return out


def is_package(name: str, mods: dict[str, str]) -> bool:
    return any(m.startswith(name + ".") for m in mods)


def imports(name: str, src: str, mods: dict[str, str]) -> set[str]:
    """Every module of the package and every outside top-level name that `name` imports, anywhere in it."""
    found: set[str] = set()
    package = name if is_package(name, mods) else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & set(mods)  # `from . import sse`
            found |= subs
            if len(subs) < len(node.names):
                found.add(target)
    return found


def layer(mod: str) -> str:
    parts = mod.split(".")
    if mod == "relay":
        return "__init__"
    return parts[1]


def violations(mods: dict[str, str]) -> list[str]:
    bad = []
    graph: dict[str, set[str]] = {}
    for name, src in mods.items():
        deps = imports(name, src, mods)
        inner = {d for d in deps if d == "relay" or d.startswith("relay.")}
        graph[name] = {d for d in inner if d in mods}
        mine = layer(name)
        for d in inner:
            theirs = layer(d)
            if theirs in OPEN or theirs == mine and mine not in ("app", "runtime"):
                continue
            if theirs not in ALLOWED.get(mine, set()):
                bad.append(f"{name} -> {d} ({mine} may not import {theirs})")
        outside = {d.split(".")[0] for d in deps - inner}
        if mine == "core" and outside & CORE_FORBIDDEN:
            bad.append(f"{name} imports I/O: {sorted(outside & CORE_FORBIDDEN)}")
        if mine == "api" and outside & API_FORBIDDEN:
            bad.append(f"{name} reaches past the stores: {sorted(outside & API_FORBIDDEN)}")
        if mine == "core" and any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "open"
                                  for n in ast.walk(ast.parse(src))):
            bad.append(f"{name} opens files")
    bad += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_every_import_points_down_and_there_is_no_circle():
    assert violations(sources()) == []


def test_the_check_catches_a_wrong_arrow_a_lazy_circle_and_io_in_the_core():
    mods = sources()
    wrong = dict(mods)
    wrong["relay.core.events"] += "\n\ndef f():\n    from ..runtime import Relay\n"
    assert any("relay.core.events -> relay.runtime" in v for v in violations(wrong))
    circle = dict(mods)
    circle["relay.runtime"] += "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .api.chat import bp\n"
    found = violations(circle)
    assert any("runtime may not import api" in v for v in found)
    assert any(v.startswith("import circle") for v in found)
    io = dict(mods)
    io["relay.core.sse"] += "\nimport subprocess\n"
    assert any("relay.core.sse imports I/O" in v for v in violations(io))
    upward = dict(mods)  # the pipeline sits below the routes
    upward["relay.pipeline.finish"] += "\n\ndef g():\n    from ..api.common import current_relay\n"
    assert any("pipeline may not import api" in v for v in violations(upward))
    into = dict(mods)  # and above runtime: nothing below may reach into it
    into["relay.runtime"] += "\nfrom .pipeline.admission import Flight\n"
    assert any("runtime may not import pipeline" in v for v in violations(into))
    formats = dict(mods)  # the client formats are pure core: no pipeline, no Flask
    formats["relay.core.formats.openai_chat"] += "\nfrom ...pipeline import Exchange\nimport flask\n"
    found = violations(formats)
    assert any("core may not import pipeline" in v for v in found)
    assert any("relay.core.formats.openai_chat imports I/O" in v for v in found)
    routes = dict(mods)
    routes["relay.api.meta"] += "\nimport redis\n"
    assert any("relay.api.meta reaches past the stores" in v for v in violations(routes))


def test_redis_key_names_are_spelled_only_in_the_state_layer():
    for name, src in sources().items():
        if layer(name) == "state":
            continue
        assert not re.search(r"relay:[a-z_{]", src) and not re.search(r"\bPREFIX\b", src) and "relay-limits" not in src, name


def test_routes_never_touch_redis_or_files_directly():
    for name, src in sources().items():
        if layer(name) == "api":
            tree = ast.parse(src)
            attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            assert not attrs & {"_redis", "r"} and "open" not in calls, name

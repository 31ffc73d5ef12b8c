"""Client functions (OpenAI `tools` / legacy `functions`) and `response_format`, validated. Pure.

Functions become MCP tool declarations for `relay.mcp_server`; `tool_choice` that the CLI cannot
enforce becomes an instruction (see README); `response_format` becomes a `--json-schema`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_SCHEMA_BYTES = 100_000  # --json-schema travels in argv (Linux caps one argument at 128 KiB)


@dataclass
class ToolSpec:
    tools: list[dict[str, Any]] = field(default_factory=list)  # MCP declarations
    choice: str = "auto"           # auto | none | required | function
    forced: str | None = None      # the function named by tool_choice
    parallel: bool = True
    legacy: bool = False           # answered as message.function_call

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def instruction(self) -> str:
        """What the CLI cannot enforce as an API parameter, said to the model instead."""
        notes = []
        if self.choice == "required":
            notes.append("You must answer by calling one of the available tools.")
        elif self.choice == "function" and self.forced:
            notes.append(f"You must answer by calling the tool `{self.forced}`.")
        if not self.parallel:
            notes.append("Call at most one tool per reply.")
        return " ".join(notes)


def _schema(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {"type": "object", "properties": {}}
    if not isinstance(value, dict):
        raise BadRequest(f"{param} must be a JSON schema object", param=param)
    schema = dict(value)
    schema.setdefault("type", "object")
    return schema


def parse_tools(body: dict[str, Any]) -> ToolSpec:
    spec = ToolSpec()
    raw_tools = body.get("tools")
    functions = body.get("functions")
    if raw_tools is not None and not isinstance(raw_tools, list):
        raise BadRequest("'tools' must be an array", param="tools")
    if functions is not None and not isinstance(functions, list):
        raise BadRequest("'functions' must be an array", param="functions")
    declared: list[tuple[Any, str]] = []
    for i, t in enumerate(raw_tools or []):
        p = f"tools[{i}]"
        if not isinstance(t, dict):
            raise BadRequest(f"{p} must be an object", param=p)
        if t.get("type", "function") != "function":
            raise BadRequest(f"{p}.type {t.get('type')!r} is not supported; only function tools are.", param=f"{p}.type",
                             code="unsupported_tool_type")
        fn = t.get("function") if isinstance(t.get("function"), dict) else t  # Responses-style flat tools too
        declared.append((fn, p))
    for i, fn in enumerate(functions or []):
        declared.append((fn, f"functions[{i}]"))
        spec.legacy = True
    seen = set()
    for fn, p in declared:
        if not isinstance(fn, dict):
            raise BadRequest(f"{p} must be an object", param=p)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise BadRequest(f"{p}.name must be 1-64 letters, digits, _ or -", param=f"{p}.name")
        if name in seen:
            raise BadRequest(f"Duplicate function name {name!r}", param=f"{p}.name")
        seen.add(name)
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise BadRequest(f"{p}.description must be a string", param=f"{p}.description")
        # readOnlyHint: the CLI then asks for every parallel call of a message at once (without it, one
        # at a time, each after the previous one's result), so a held step hands them all to the client
        spec.tools.append({"name": name, "description": desc, "annotations": {"readOnlyHint": True},
                           "inputSchema": _schema(fn.get("parameters"), f"{p}.parameters")})
    choice = body.get("tool_choice", body.get("function_call"))
    param = "tool_choice" if "tool_choice" in body else "function_call"
    if choice is None or choice == "auto":
        spec.choice = "auto"
    elif choice in ("none", "required"):
        spec.choice = choice
    elif isinstance(choice, dict):
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") == "allowed_tools":
            spec.choice = "required" if choice.get("mode") == "required" else "auto"
        elif not isinstance(name, str) or name not in seen:
            raise BadRequest(f"{param} names a function that is not in tools", param=param)
        else:
            spec.choice, spec.forced = "function", name
    else:
        raise BadRequest(f"'{param}' must be none, auto, required or a function", param=param)
    ptc = body.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        raise BadRequest("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    spec.parallel = ptc is not False
    return spec


def parse_response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema the answer must match, or None for plain text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("'response_format' must be an object", param="response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = value.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise BadRequest("response_format.json_schema.schema must be an object", param="response_format")
        schema = js["schema"]
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise BadRequest(f"The JSON schema is larger than {MAX_SCHEMA_BYTES} bytes.", param="response_format")
        return schema
    raise BadRequest("response_format.type must be text, json_object or json_schema", param="response_format")

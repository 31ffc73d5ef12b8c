"""The Anthropic Messages API (`POST /v1/messages`) on top of the relay's chat pipeline. Pure translation.

A Messages body becomes the relay's internal chat body, so validation, images, client tools (MCP),
sessions and JSON output are shared with chat completions. The answer side (the `message` object and
the stream events) is in `formats/anthropic_messages.py`.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import BadRequest
from .conversation import digest
from .models import ModelCatalog
from .request import ChatRequest, parse_chat_request
from .tokens import count_text

# Accepted and ignored: the CLI cannot apply them (listed in the README).
IGNORED = ("temperature", "top_p", "top_k", "stop_sequences", "service_tier", "context_management", "container",
           "mcp_servers", "inference_geo", "speed", "diagnostics")
BILLING_HEADER = "x-anthropic-billing-header:"  # Claude Code's attribution line for Anthropic, not an instruction


def _expect(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise BadRequest(f"{param}: {message}", param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _system_text(value: Any) -> str:
    """`system` as a string or text blocks; Claude Code's billing-attribution block is dropped."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    _expect(isinstance(value, list), "must be a string or an array of text blocks", "system")
    texts = []
    for i, block in enumerate(value):
        p = f"system.{i}"
        _expect(isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str),
                "must be a text block", p)
        if not block["text"].startswith(BILLING_HEADER):
            texts.append(block["text"])
    return "\n\n".join(t for t in texts if t)


def _tool_result(block: dict[str, Any], p: str) -> dict[str, Any]:
    """A `tool_result` block as a chat `tool` message (text and image content kept)."""
    _expect(isinstance(block.get("tool_use_id"), str), "tool_use_id must be a string", f"{p}.tool_use_id")
    content = block.get("content")
    parts: Any
    if content is None or isinstance(content, str):
        parts = content or ""
    else:
        _expect(isinstance(content, list), "content must be a string or an array of blocks", f"{p}.content")
        parts = []
        for j, inner in enumerate(content):
            ip = f"{p}.content.{j}"
            _expect(isinstance(inner, dict), "must be an object", ip)
            if inner.get("type") == "text":
                _expect(isinstance(inner.get("text"), str), "text must be a string", f"{ip}.text")
                parts.append({"type": "text", "text": inner["text"]})
            elif inner.get("type") in ("image", "document"):
                parts.append(_media(inner))
            else:
                raise BadRequest(f"{ip}.type: {inner.get('type')!r} is not supported in a tool_result", param=ip)
    msg: dict[str, Any] = {"role": "tool", "tool_call_id": block["tool_use_id"], "content": parts}
    if block.get("is_error"):
        msg["is_error"] = True
    return msg


def _media(block: dict[str, Any]) -> dict[str, Any]:
    """Image and document blocks go on as Anthropic blocks (checked later by images.py)."""
    return {k: block[k] for k in ("type", "source", "title") if k in block}


def _message(msg: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become `tool` messages, tool uses `tool_calls`."""
    p = f"messages.{i}"
    _expect(isinstance(msg, dict), "must be an object", p)
    role = msg.get("role")
    _expect(role in ("user", "assistant", "system"), "role must be user or assistant", f"{p}.role")
    content = msg.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    _expect(isinstance(content, list), "content must be a string or an array of content blocks", f"{p}.content")
    parts: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        bp = f"{p}.content.{j}"
        _expect(isinstance(block, dict), "must be an object", bp)
        kind = block.get("type")
        if kind == "text":
            _expect(isinstance(block.get("text"), str), "text must be a string", f"{bp}.text")
            parts.append({"type": "text", "text": block["text"]})
        elif kind in ("image", "document") and role == "user":
            parts.append(_media(block))
        elif kind == "tool_result" and role == "user":
            tools.append(_tool_result(block, bp))
        elif kind == "tool_use" and role == "assistant":
            _expect(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                    "tool_use needs a string id and name", bp)
            _expect(isinstance(block.get("input", {}), dict), "input must be an object", f"{bp}.input")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the CLI's own session holds the model's reasoning; a replay cannot use it
        else:
            raise BadRequest(f"{bp}.type: {kind!r} is not supported in a {role} message", param=f"{bp}.type")
    if role == "system":
        _expect(all(x["type"] == "text" for x in parts), "a system message may only hold text", f"{p}.content")
        return [{"role": "system", "content": parts}]
    out: list[dict[str, Any]] = list(tools)  # results answer the previous turn's calls, so they come first
    if role == "assistant":
        out.append({"role": "assistant", "content": parts, **({"tool_calls": calls} if calls else {})})
    elif parts or not tools:
        out.append({"role": "user", "content": parts})
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    _expect(isinstance(value, list), "must be an array", "tools")
    out = []
    for i, tool in enumerate(value):
        p = f"tools.{i}"
        _expect(isinstance(tool, dict), "must be an object", p)
        if tool.get("type") not in (None, "custom"):
            raise BadRequest(f"{p}.type: server tool {tool.get('type')!r} is not supported by this relay; only "
                             "client tools with an input_schema are.", param=f"{p}.type", code="unsupported_tool_type")
        _expect(isinstance(tool.get("input_schema"), dict), "input_schema must be an object", f"{p}.input_schema")
        out.append({"type": "function", "function": {"name": tool.get("name"), "description": tool.get("description"),
                                                     "parameters": tool["input_schema"]}})
    return out


def _tool_choice(value: Any) -> tuple[Any, bool | None]:
    """Anthropic `tool_choice` as chat `tool_choice` and `parallel_tool_calls`."""
    _expect(isinstance(value, dict), "must be an object", "tool_choice")
    kind = value.get("type")
    parallel = False if value.get("disable_parallel_tool_use") else None
    if kind == "tool":
        _expect(isinstance(value.get("name"), str), "name must be a string", "tool_choice.name")
        return {"type": "function", "function": {"name": value["name"]}}, parallel
    choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind or "")
    _expect(choice is not None, "type must be auto, any, tool or none", "tool_choice.type")
    return choice, parallel


def _effort_of(thinking: dict[str, Any]) -> str | None:
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        return None
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def to_chat_body(body: Any, count_only: bool = False) -> dict[str, Any]:
    """A Messages (or count_tokens) body as the relay's chat body. Anthropic's own validation rules
    where they matter (max_tokens required, roles, block types); unknown fields are ignored."""
    _expect(isinstance(body, dict), "The request body must be a JSON object.", "body")
    _expect(isinstance(body.get("model"), str), "Field required (a string)", "model")
    _expect(isinstance(body.get("messages"), list), "Field required (an array of messages)", "messages")
    max_tokens = body.get("max_tokens")
    if not count_only:
        _expect(_is_int(max_tokens) and max_tokens > 0, "Field required (a positive integer)", "max_tokens")
    stream = body.get("stream", False)
    _expect(isinstance(stream, bool), "must be a boolean", "stream")
    for key in ("temperature", "top_p", "top_k"):
        value = body.get(key)
        _expect(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                "must be a number", key)
    stops = body.get("stop_sequences")
    _expect(stops is None or (isinstance(stops, list) and all(isinstance(s, str) for s in stops)),
            "must be an array of strings", "stop_sequences")
    chat: dict[str, Any] = {"model": body["model"], "stream": stream and not count_only}
    if _is_int(max_tokens):
        chat["max_tokens"] = max_tokens
    system = _system_text(body.get("system"))
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, msg in enumerate(body["messages"]):
        messages += _message(msg, i)
    chat["messages"] = messages
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"], parallel = _tool_choice(body["tool_choice"])
        if parallel is not None:
            chat["parallel_tool_calls"] = parallel
    thinking = body.get("thinking")
    if thinking is not None:
        _expect(isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive", "disabled"),
                "must be an object with type enabled, adaptive or disabled", "thinking")
        # thinking blocks come back only when asked for, and not when the client asked to omit their text
        chat["expose_reasoning"] = thinking["type"] != "disabled" and thinking.get("display") != "omitted"
        if _effort_of(thinking):
            chat["reasoning_effort"] = _effort_of(thinking)
    else:
        chat["expose_reasoning"] = False
    config = body.get("output_config")
    _expect(config is None or isinstance(config, dict), "must be an object", "output_config")
    if (config or {}).get("effort") is not None:
        chat["reasoning_effort"] = config["effort"]  # type: ignore[index]
    fmt = (config or {}).get("format") or body.get("output_format")
    if fmt is not None:
        _expect(isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict),
                "must be {type: json_schema, schema: {...}}", "output_format")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    metadata = body.get("metadata")
    _expect(metadata is None or isinstance(metadata, dict), "must be an object", "metadata")
    user_id = (metadata or {}).get("user_id")
    _expect(user_id is None or isinstance(user_id, str), "must be a string", "metadata.user_id")
    if user_id:
        chat["user"] = user_id
    return chat


def claude_code_session(user_id: str) -> str | None:
    """The session id in Claude Code's `metadata.user_id`, a JSON string such as
    `{"device_id": "…", "account_uuid": "", "session_id": "<uuid>"}` (observed with 2.1.330)."""
    if not user_id.startswith("{"):
        return None
    try:
        value = json.loads(user_id)
    except ValueError:
        return None
    session = value.get("session_id") if isinstance(value, dict) else None
    return session if isinstance(session, str) and 0 < len(session) <= 128 else None


def parse_messages_request(body: Any, catalog: ModelCatalog, count_only: bool = False) -> ChatRequest:
    """A Messages body as the relay's `ChatRequest`. `metadata.user_id` (Claude Code puts its session id
    there) names the conversation together with its opening, so side requests of the same client
    session (titles, summaries) do not take over the main conversation."""
    try:
        req = parse_chat_request(to_chat_body(body, count_only), catalog)
    except BadRequest as exc:  # chat's names for fields ('messages[0].content') in Anthropic's dotted style
        if exc.param and "[" in exc.param:
            exc.message = exc.message.replace("[", ".").replace("]", "")
            exc.param = exc.param.replace("[", ".").replace("]", "")
        raise
    req.extras = {k: body[k] for k in IGNORED if k in body}
    if req.user:
        session = claude_code_session(req.user)
        if session:
            return in_claude_code_session(req, session)
        first = next((m for m in req.messages if m["role"] == "user"), req.messages[0])
        req.user = f"{req.user}\x00{digest(req.system, [first])}"
    return req


def in_claude_code_session(req: ChatRequest, session: str) -> ChatRequest:
    """Claude Code's session names the conversation (with its opening, so side requests stay apart),
    and its system prompt may change within it. From `metadata.user_id` or `X-Claude-Code-Session-Id`."""
    first = next((m for m in req.messages if m["role"] == "user"), req.messages[0])
    req.user = f"cc:{session}\x00{digest('', [first])}"
    req.system_may_change = True
    return req




def count_body(req: ChatRequest) -> dict[str, int]:
    """`/v1/messages/count_tokens`: the relay's tiktoken estimate of the prompt and the tools."""
    tools = req.tools.tools
    return {"input_tokens": req.prompt_estimate + (count_text(json.dumps(tools, ensure_ascii=False)) if tools else 0)}

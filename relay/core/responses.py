"""A Responses API body (`POST /v1/responses`) as a chat-completions body, so validation, tools and JSON
output are shared. Pure. Its answers are built in `core/formats/openai_responses.py`.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import BadRequest

CHAT_FIELDS = ("model", "temperature", "top_p", "user", "metadata", "store", "parallel_tool_calls", "stream")


def _content_parts(content: Any, param: str) -> Any:
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{param} must be a string or an array", param=param)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequest(f"{param}[{j}] must be an object", param=f"{param}[{j}]")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text")})
        elif kind == "input_image":
            url = part.get("image_url") or part.get("url")
            if part.get("file_id"):
                raise BadRequest("input_image.file_id is not supported; send image_url.", param=f"{param}[{j}]")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "input_file":
            parts.append({"type": "file", "file": {"file_data": part.get("file_data"), "filename": part.get("filename")}})
        elif kind == "refusal":
            parts.append({"type": "text", "text": part.get("refusal") or ""})
        else:
            raise BadRequest(f"{param}[{j}].type {kind!r} is not supported", param=f"{param}[{j}].type")
    return parts


def input_messages(value: Any) -> list[dict[str, Any]]:
    """Responses `input` (a string or items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise BadRequest("'input' must be a string or an array of items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{p} must be an object", param=p)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"{p}.role must be user, assistant, system or developer", param=f"{p}.role")
            out.append({"role": role, "content": _content_parts(item.get("content"), f"{p}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant":
                # the model's text and its calls are one assistant message, as chat completions has it
                # (so the digest of a full history matches what the CLI session holds)
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):  # content parts: images and files reach the model as blocks
                content: Any = _content_parts(output, f"{p}.output")
            else:
                content = output if isinstance(output, str) else json.dumps(output)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind in ("reasoning", "item_reference"):
            continue  # nothing the CLI can use: its own session holds the reasoning
        else:
            raise BadRequest(f"{p}.type {kind!r} is not supported", param=f"{p}.type")
    return out


def to_chat_body(body: Any, prior: list[dict[str, Any]] | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", param="body")
    if "input" not in body:
        raise BadRequest("Missing required parameter: 'input'.", param="input")
    chat: dict[str, Any] = {k: body[k] for k in CHAT_FIELDS if k in body}
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages += [m for m in (prior or []) if m["role"] not in ("system", "developer")]
    messages += input_messages(body["input"])
    chat["messages"] = messages
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be an array", param="tools")
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise BadRequest("'reasoning' must be an object", param="reasoning")
    if reasoning and reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]
    for name in ("text", "metadata"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise BadRequest(f"'{name}' must be an object", param=name)
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    return chat

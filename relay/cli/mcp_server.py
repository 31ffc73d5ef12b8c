"""A tiny stdio MCP server that declares an API client's functions as tools for one CLI run.

`python -m relay.mcp_server TOOLS.json` where the file holds `[{"name", "description", "inputSchema"}]`.
The model sees them as real tools (name, description, JSON schema). They never run here: the relay
takes each call from the CLI's `can_use_tool` permission request and hands it to the API client.
When the client's result comes back to a process still waiting (a held tool step), the relay allows
the call with the result added to its input under `RESULT_KEY` (the CLI passes `updatedInput` to
`tools/call`; the model's own call keeps its input), and `tools/call` answers with it. Anything else
that reaches `tools/call` gets an error result, never a fake one.
Standard library only; JSON-RPC 2.0, one message per line.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PROTOCOL = "2025-06-18"
RESULT_KEY = "__relay_client_result"   # the client's result (an MCP CallToolResult), set by the relay only


def _reply(msg_id: Any, result: Any = None, error: dict[str, Any] | None = None) -> None:
    out: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id}
    if error is not None:
        out["error"] = error
    else:
        out["result"] = result
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def _given(msg: dict[str, Any]) -> dict[str, Any] | None:
    result = ((msg.get("params") or {}).get("arguments") or {}).get(RESULT_KEY)
    return result if isinstance(result, dict) and isinstance(result.get("content"), list) else None


def serve(tools: list[dict[str, Any]]) -> None:
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        method, msg_id = msg.get("method"), msg.get("id")
        if msg_id is None:
            continue  # a notification (initialized, cancelled, ...): nothing to answer
        if method == "initialize":
            version = (msg.get("params") or {}).get("protocolVersion") or PROTOCOL
            _reply(msg_id, {"protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                            "serverInfo": {"name": "client", "version": "1.0"}})
        elif method == "tools/list":
            _reply(msg_id, {"tools": tools})
        elif method == "tools/call" and _given(msg):
            _reply(msg_id, _given(msg))
        elif method == "tools/call":
            _reply(msg_id, {"isError": True, "content": [{"type": "text", "text":
                            "This function is executed by the API client, not here; its result comes back "
                            "in the client's next request."}]})
        elif method == "ping":
            _reply(msg_id, {})
        else:
            _reply(msg_id, error={"code": -32601, "message": f"Method not found: {method}"})


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        tools = json.load(f)
    serve(tools)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

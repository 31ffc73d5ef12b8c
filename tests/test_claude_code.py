"""Claude Code as a client: its session names the conversation, and a changed system prompt continues it.

Claude Code sends `metadata.user_id` as a JSON string holding its `session_id` (observed with 2.1.330), and
rewrites its system prompt mid-task (a reminder appended, the date at midnight). The relay keeps one CLI
session for the task: the model's next request carries the structured history, never a flattened replay.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import requests
from harness import anthropic_client

from relay.core.prompt import HISTORY_INTRO

BASE = "You are an agent working with the user toward their goals. (test prompt)"


def _user_id(session: str) -> str:
    return json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})


def test_a_changed_system_prompt_keeps_the_cli_session(relay: Any, mock_api: Any) -> None:
    session, tag = str(uuid.uuid4()), f"cc-{uuid.uuid4().hex[:8]}"
    systems = [BASE, BASE, BASE + "\n\nThe user hasn't heard from you in a while. (reminder)"]
    msgs: list[dict[str, Any]] = []
    cli_sessions = []
    with anthropic_client(relay.url) as c:
        for k, system in enumerate(systems):
            msgs.append({"role": "user", "content": f"{tag} step {k}"})
            m = c.messages.create(model="sonnet", max_tokens=256, system=system, messages=msgs,
                                  metadata={"user_id": _user_id(session)})
            msgs.append({"role": "assistant", "content": m.content[0].text})
            convs = [x for x in requests.get(relay.url + "/v1/sessions", timeout=10).json()["data"]
                     if x["id"].startswith("u:")]
            cli_sessions.append({x["cli_session_id"] for x in convs})
    last = mock_api.bodies(f"{tag} step 2")[-1]
    text = json.dumps(last)
    assert HISTORY_INTRO.strip() not in text  # resumed, not replayed as one text
    turns = [m for m in last["messages"] if m["role"] in ("user", "assistant")]
    users = [json.dumps(m["content"]) for m in turns if m["role"] == "user"]
    assert [f"{tag} step {k}" in u for k, u in enumerate(users)] == [True, True, True]
    assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert "(reminder)" in json.dumps(last["system"])  # the new system prompt applies to this turn
    assert cli_sessions[1] & cli_sessions[2]  # the same CLI session held turns 2 and 3


def test_side_requests_of_the_same_session_do_not_take_over(relay: Any, mock_api: Any) -> None:
    session = str(uuid.uuid4())
    with anthropic_client(relay.url) as c:
        main = [{"role": "user", "content": "cc-main task"}]
        a = c.messages.create(model="sonnet", max_tokens=64, system=BASE, messages=main,
                              metadata={"user_id": _user_id(session)})
        c.messages.create(model="sonnet", max_tokens=64, system="Write a title.",
                          messages=[{"role": "user", "content": "cc-title for the task"}],
                          metadata={"user_id": _user_id(session)})
        main += [{"role": "assistant", "content": a.content[0].text}, {"role": "user", "content": "cc-main next"}]
        c.messages.create(model="sonnet", max_tokens=64, system=BASE, messages=main,
                          metadata={"user_id": _user_id(session)})
    last = mock_api.bodies("cc-main next")[-1]
    assert HISTORY_INTRO.strip() not in json.dumps(last) and "cc-title" not in json.dumps(last)


def test_the_session_header_alone_names_the_conversation(relay: Any, mock_api: Any) -> None:
    session = str(uuid.uuid4())
    headers = {"X-Claude-Code-Session-Id": session}
    with anthropic_client(relay.url) as c:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": "cc-header first"}]
        a = c.messages.create(model="sonnet", max_tokens=64, system=BASE, messages=msgs, extra_headers=headers)
        msgs += [{"role": "assistant", "content": a.content[0].text}, {"role": "user", "content": "cc-header next"}]
        c.messages.create(model="sonnet", max_tokens=64, system=BASE + " (changed)", messages=msgs,
                          extra_headers=headers)
    last = mock_api.bodies("cc-header next")[-1]
    assert HISTORY_INTRO.strip() not in json.dumps(last) and "(changed)" in json.dumps(last["system"])
    assert [m["role"] for m in last["messages"] if m["role"] != "system"] == ["user", "assistant", "user"]

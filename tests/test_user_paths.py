"""What new users tripped over (issue 10, items 2, 4, 5, 6): sessions by the client's own id, Responses
tool outputs as content parts, Responses full-history clients resuming, system-only requests."""

import hashlib
import json

import requests
from harness import ROOT, openai_client
from mock_anthropic import all_text, last_user_text
from test_surface import PNG

from relay.core.prompt import HISTORY_INTRO
from relay.core.request import SYSTEM_ONLY_TURN
from relay.state.apikeys import digest

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPS, ALICE = "sk-ops-admin-0123456789", "sk-alice-0123456789"


def chat(srv, text, key=None, **headers_and_fields):
    headers = dict(headers_and_fields.pop("headers", {}))
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(srv.url + "/v1/chat/completions", headers=headers, timeout=120,
                         json={"model": "sonnet", "messages": [{"role": "user", "content": text}],
                               **headers_and_fields})


def listed(srv, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return {(c["scope"], c["id"]) for c in requests.get(srv.url + "/v1/sessions", headers=headers).json()["data"]}


def test_sessions_are_deleted_by_the_id_the_client_chose(relay):
    assert chat(relay, "up1 hello", headers={"X-Session-Id": "ticket-4711"}).status_code == 200
    assert chat(relay, "up1 hi", user="alice@example.com").status_code == 200
    assert ("anon", "s:ticket-4711") in listed(relay)
    r = requests.delete(relay.url + "/v1/sessions/ticket-4711")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert ("anon", "s:ticket-4711") not in listed(relay)
    assert requests.delete(relay.url + "/v1/sessions/alice@example.com").status_code == 200
    alice = "u:" + hashlib.sha256(b"alice@example.com").hexdigest()[:24]
    assert ("anon", alice) not in listed(relay)  # (other tests' conversations share this relay)
    # the listed id still works, and an unknown one is a 404 in the API's shape
    assert chat(relay, "up1 again", headers={"X-Session-Id": "ticket-4712"}).status_code == 200
    assert requests.delete(relay.url + "/v1/sessions/s:ticket-4712").status_code == 200
    r = requests.delete(relay.url + "/v1/sessions/ticket-4711")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_a_client_id_reaches_only_the_callers_own_conversation(relay_factory, tmp_path):
    cfg = json.loads((ROOT / "config.json").read_text())
    cfg["auth"] = {"enabled": True, "api_keys": [{"name": "ops", "key_sha256": digest(OPS), "admin": True},
                                                 {"name": "alice", "key_sha256": digest(ALICE)}]}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    srv = relay_factory({"RELAY_CONFIG": str(tmp_path / "c.json")})
    for key in (OPS, ALICE):
        assert chat(srv, "up2 hello", key=key, headers={"X-Session-Id": "shared-name"}).status_code == 200
    ops, alice = "ops~" + digest(OPS)[:12], "alice~" + digest(ALICE)[:12]  # scopes: a key's name and digest prefix
    assert {(ops, "s:shared-name"), (alice, "s:shared-name")} <= listed(srv, OPS)
    r = requests.delete(srv.url + "/v1/sessions/shared-name", headers={"Authorization": f"Bearer {OPS}"})
    assert r.status_code == 200
    remaining = listed(srv, OPS)
    assert (ops, "s:shared-name") not in remaining and (alice, "s:shared-name") in remaining


def test_a_function_call_output_with_content_parts_reaches_the_model_as_blocks(client, mock_api):
    first = client.responses.create(model="sonnet", tools=[WEATHER], input="up3 weather? MOCK:tool=get_weather")
    (call,) = [o for o in first.output if o.type == "function_call"]
    output = [{"type": "input_text", "text": "up3 radar image attached"},
              {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}]
    follow = client.responses.create(model="sonnet", tools=[WEATHER], previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": output}])
    assert follow.status == "completed"
    last = mock_api.bodies("up3 radar image attached")[-1]["messages"][-1]
    (result,) = [b for b in last["content"] if b["type"] == "tool_result"]
    assert result["tool_use_id"] == call.call_id
    kinds = [b["type"] for b in result["content"]]
    assert kinds == ["text", "image"] and result["content"][1]["source"]["data"] == PNG
    assert "input_image" not in json.dumps(last)  # not flattened into JSON text


def test_a_stateless_function_call_output_with_parts_keeps_the_image(client, mock_api):
    client.responses.create(model="sonnet", tools=[WEATHER], store=False, input=[
        {"type": "message", "role": "user", "content": "up4 weather?"},
        {"type": "function_call", "call_id": "call_up4", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_up4",
         "output": [{"type": "input_text", "text": "up4 see image"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}]}])
    body = mock_api.bodies("up4 see image")[-1]
    said = [m for m in body["messages"] if m["role"] != "system"]
    assert [b["type"] for b in said[1]["content"]] == ["tool_use"] and said[1]["content"][0]["id"] == "call_up4"
    (result,) = said[2]["content"]  # the output, with its image, is the call's own tool_result
    assert result["type"] == "tool_result" and result["tool_use_id"] == "call_up4"
    assert [b["type"] for b in result["content"]] == ["text", "image"] and result["content"][1]["source"]["data"] == PNG


def test_responses_clients_sending_the_full_history_resume_the_cli_session(relay, client, mock_api):
    history = [{"role": "user", "content": "up5 my name is ZED"}]
    first = client.responses.create(model="sonnet", instructions="Be brief.", input=history)
    history += [{"role": "assistant", "content": first.output_text}, {"role": "user", "content": "up5 who am I?"}]
    second = client.responses.create(model="sonnet", instructions="Be brief.", input=history)
    assert second.output_text.endswith("up5 who am I?")
    rec = requests.get(relay.url + "/v1/usage/recent?limit=1").json()["data"][0]
    assert rec["resumed"] is True
    body = mock_api.bodies("up5 who am I?")[-1]
    assert HISTORY_INTRO.strip() not in all_text(body)  # not replayed as a transcript
    assert last_user_text(body).strip() == "up5 who am I?" and len(body["messages"]) >= 3


def test_responses_full_history_with_function_calls_resumes(relay, client, mock_api):
    items = [{"type": "message", "role": "user", "content": "up6 weather? MOCK:tool=get_weather"}]
    first = client.responses.create(model="sonnet", tools=[WEATHER], input=items)
    (call,) = [o for o in first.output if o.type == "function_call"]
    items += [{"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "up6 sunny"}]
    second = client.responses.create(model="sonnet", tools=[WEATHER], input=items)
    assert second.output_text == "Tool said: up6 sunny"
    assert requests.get(relay.url + "/v1/usage/recent?limit=1").json()["data"][0]["resumed"] is True
    last = mock_api.bodies("up6 sunny")[-1]["messages"][-1]
    assert last["content"][0]["type"] == "tool_result" and last["content"][0]["tool_use_id"] == call.call_id


def test_a_request_with_only_a_system_message_is_answered(client, mock_api):
    r = client.chat.completions.create(model="sonnet", messages=[{"role": "system", "content": "up7 Say hello."}])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content
    body = mock_api.bodies("up7 Say hello.")[-1]
    assert any("up7 Say hello." in b["text"] for b in body["system"])
    assert last_user_text(body).strip() == SYSTEM_ONLY_TURN
    r = client.chat.completions.create(model="sonnet", messages=[{"role": "developer", "content": "up7 dev only"}])
    assert r.choices[0].message.content
    resp = client.responses.create(model="sonnet", instructions="up7 instructions only", input=[])
    assert resp.status == "completed"


def test_a_system_only_stream_is_answered(relay):
    with openai_client(relay.url) as c:
        chunks = list(c.chat.completions.create(model="sonnet", stream=True,
                                                messages=[{"role": "system", "content": "up8 stream it"}]))
    assert chunks[-1].choices[0].finish_reason == "stop"

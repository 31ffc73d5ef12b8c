"""The Responses API through the relay, parsed strictly by the openai SDK."""

import json

import openai
import pytest
import requests
from mock_anthropic import all_text

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_create_with_string_input_and_instructions(client, mock_api):
    r = client.responses.create(model="sonnet", instructions="Answer like RESP-INSTR.", input="rs1 hello")
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "Hello from mock. You said: rs1 hello"
    assert r.usage.input_tokens == 600 and r.usage.input_tokens_details.cached_tokens == 300
    assert r.usage.output_tokens == 7 and r.usage.total_tokens == 607
    body = mock_api.bodies("rs1 hello")[-1]
    assert any(b["text"] == "Answer like RESP-INSTR." for b in body["system"])


def test_items_input_and_previous_response_id_resume(relay, client, mock_api):
    first = client.responses.create(model="sonnet", input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "rs2 my name is ZED"}]}])
    second = client.responses.create(model="sonnet", previous_response_id=first.id, input="rs2 who am I?")
    assert second.output_text.endswith("rs2 who am I?")
    rec = requests.get(relay.url + "/v1/usage/recent?limit=1").json()["data"][0]
    assert rec["resumed"] is True  # mapped onto the same conversation: the CLI session was resumed
    body = mock_api.bodies("rs2 who am I?")[-1]
    assert "rs2 my name is ZED" in all_text(body)
    assert client.responses.retrieve(second.id).id == second.id
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="sonnet", previous_response_id="resp_nope", input="x")


def test_function_calls_round_trip(client, mock_api):
    r = client.responses.create(model="sonnet", tools=[WEATHER], input="rs3 weather? MOCK:tool=get_weather")
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "City0"}
    follow = client.responses.create(model="sonnet", tools=[WEATHER], previous_response_id=r.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "rs3 sunny"}])
    assert follow.output_text == "Tool said: rs3 sunny"
    last = mock_api.bodies("rs3 sunny")[-1]["messages"][-1]
    assert last["content"][0]["type"] == "tool_result" and last["content"][0]["tool_use_id"] == call.call_id


def test_stateless_function_call_items(client, mock_api):
    r = client.responses.create(model="sonnet", tools=[WEATHER], store=False, input=[
        {"type": "message", "role": "user", "content": "rs4 weather?"},
        {"type": "function_call", "call_id": "call_abc", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_abc", "output": "rs4 cold"}])
    assert r.output_text.startswith("Tool said:")
    said = [m for m in mock_api.bodies("rs4 cold")[-1]["messages"] if m["role"] != "system"]
    assert said[1]["content"] == [{"type": "tool_use", "id": "call_abc", "name": "mcp__client__get_weather",
                                   "input": {"city": "Oslo"}}]  # the items as real tool blocks, not text
    assert [(b["tool_use_id"], b["content"][0]["text"]) for b in said[2]["content"]] == [("call_abc", "rs4 cold")]


def test_streaming_events_parse_strictly(client):
    with client.responses.stream(model="sonnet", input="rs5 MOCK:words=6") as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds[0] == "response.created" and kinds[1] == "response.in_progress"
    assert kinds[-1] == "response.completed" and kinds.count("response.output_text.delta") == 6
    assert final.output_text == "w0 w1 w2 w3 w4 w5" and final.usage.output_tokens == 6
    events = list(client.responses.create(model="sonnet", input="rs6 MOCK:words=2", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_streamed_function_calls(client):
    with client.responses.stream(model="sonnet", tools=[WEATHER], input="rs7 MOCK:tools=get_weather,get_weather") as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    calls = [o for o in final.output if o.type == "function_call"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "City0"}, {"city": "City1"}]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds


def test_raw_sse_framing_and_errors(relay):
    with requests.post(relay.url + "/v1/responses", json={"model": "sonnet", "input": "rs8", "stream": True},
                       stream=True) as r:
        raw = r.raw.read().decode()
    frames = [f for f in raw.split("\n\n") if f and not f.startswith(":")]
    assert all(f.startswith("event: response.") and "\ndata: {" in f for f in frames)
    assert "[DONE]" not in raw
    r = requests.post(relay.url + "/v1/responses", json={"model": "sonnet"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    with requests.post(relay.url + "/v1/responses", stream=True,
                       json={"model": "sonnet", "input": "rs9 MOCK:break_stream", "stream": True}) as r:
        raw = r.raw.read().decode()
    assert "event: response.failed" in raw and "response.completed" not in raw


def test_json_schema_text_format(client):
    r = client.responses.create(model="sonnet", input="rs10 MOCK:structured", text={"format": {
        "type": "json_schema", "name": "person", "schema": {"type": "object", "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}}})
    assert json.loads(r.output_text) == {"name": "Alice", "age": 30}

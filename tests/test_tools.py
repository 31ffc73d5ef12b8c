"""Function calling: the client's functions reach the model as real tools (through the relay's MCP
server), the model's calls come back as OpenAI tool_calls, and results round-trip."""

import json

import openai
import pytest
from harness import openai_client
from mock_anthropic import all_text

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


def client_tools(body):
    return {t["name"]: t for t in body.get("tools", []) if t["name"].startswith("mcp__client__")}


def test_functions_reach_the_model_as_real_tools_and_calls_come_back(client, mock_api):
    r = client.chat.completions.create(model="sonnet", tools=[WEATHER, TIME],
                                       messages=[{"role": "user", "content": "tc1 weather? MOCK:tool=get_weather"}])
    body = mock_api.bodies("tc1 weather?")[-1]
    offered = client_tools(body)
    assert set(offered) == {"mcp__client__get_weather", "mcp__client__get_time"}
    assert offered["mcp__client__get_weather"]["description"] == "Current weather for a city"
    assert offered["mcp__client__get_weather"]["input_schema"]["required"] == ["city"]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "City0"}


def test_parallel_calls_stream_as_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(
        model="sonnet", tools=[WEATHER], stream=True,
        messages=[{"role": "user", "content": "tc2 MOCK:tools=get_weather,get_weather"}]))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    firsts = [tc for tc in calls if tc.id]
    assert [tc.index for tc in firsts] == [0, 1] and all(tc.function.name == "get_weather" for tc in firsts)
    assert all(tc.id is None and tc.function.name is None for tc in calls if tc not in firsts)
    args = {0: "", 1: ""}
    for tc in calls:
        args[tc.index] += tc.function.arguments or ""
    assert [json.loads(a) for a in args.values()] == [{"city": "City0"}, {"city": "City1"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(model="sonnet", tools=[WEATHER], messages=[
            {"role": "user", "content": "tc2b MOCK:tools=get_weather,get_weather"}]) as s:
        final = s.get_final_completion()
    assert len(final.choices[0].message.tool_calls) == 2


@pytest.mark.parametrize("sessions", ["on", "off"])
def test_tool_results_round_trip_tied_to_their_calls(relay, relay_factory, mock_api, sessions):
    srv = relay if sessions == "on" else relay_factory({"RELAY_SESSIONS__ENABLED": "false"})
    with openai_client(srv.url) as c:
        msgs = [{"role": "user", "content": f"tc3-{sessions} weather in two cities MOCK:tools=get_weather,get_weather"}]
        first = c.chat.completions.create(model="sonnet", tools=[WEATHER], messages=msgs,
                                          extra_headers={"X-Session-Id": f"tools-{sessions}"})
        calls = first.choices[0].message.tool_calls
        msgs.append({"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in calls]})
        msgs += [{"role": "tool", "tool_call_id": calls[0].id, "content": "sunny in City0"},
                 {"role": "tool", "tool_call_id": calls[1].id, "content": "rain in City1"}]
        second = c.chat.completions.create(model="sonnet", tools=[WEATHER], messages=msgs,
                                           extra_headers={"X-Session-Id": f"tools-{sessions}"})
    assert second.choices[0].finish_reason == "stop"
    body = mock_api.bodies("rain in City1")[-1]
    # resumed (sessions on), or written from the client's history (off): real tool_result blocks after
    # the model's own tool_use message, either way
    said = [m for m in body["messages"] if m["role"] != "system"]
    last, prev = said[-1], said[-2]
    results = {b["tool_use_id"]: b for b in last["content"] if b["type"] == "tool_result"}
    uses = {b["id"] for b in prev["content"] if b["type"] == "tool_use"}
    assert set(results) == uses == {calls[0].id, calls[1].id}
    assert "sunny in City0" in json.dumps(results[calls[0].id]) and "rain in City1" in json.dumps(results[calls[1].id])
    assert "doesn't want to proceed" not in json.dumps(body)  # the interrupted attempt is cut away
    assert "<tool_result" not in all_text(body)  # nothing flattened
    assert second.choices[0].message.content.startswith("Tool said:")


def test_empty_tools_none_choice_and_bad_tools(client, mock_api):
    r = client.chat.completions.create(model="sonnet", tools=[], messages=[{"role": "user", "content": "tc4 hi"}])
    assert r.choices[0].finish_reason == "stop"
    client.chat.completions.create(model="sonnet", tools=[WEATHER], tool_choice="none",
                                   messages=[{"role": "user", "content": "tc5 no tools"}])
    assert client_tools(mock_api.bodies("tc5 no tools")[-1]) == {}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sonnet", tools=[{"type": "function", "function": {"name": "bad name!"}}],
                                       messages=[{"role": "user", "content": "x"}])
    assert e.value.param == "tools[0].name"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sonnet", tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "nope"}}, messages=[{"role": "user", "content": "x"}])


def test_required_and_named_tool_choice_are_told_to_the_model(client, mock_api):
    client.chat.completions.create(model="sonnet", tools=[WEATHER, TIME],
                                   tool_choice={"type": "function", "function": {"name": "get_time"}},
                                   parallel_tool_calls=False, messages=[{"role": "user", "content": "tc6 go"}])
    system = all_text(mock_api.bodies("tc6 go")[-1])
    assert "You must answer by calling the tool `get_time`." in system and "at most one tool" in system


def test_legacy_functions_answer_with_function_call(client, mock_api):
    r = client.chat.completions.create(model="sonnet", functions=[WEATHER["function"]], function_call="auto",
                                       messages=[{"role": "user", "content": "tc7 MOCK:tool=get_weather"}])
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "City0"}

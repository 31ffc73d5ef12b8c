"""Pure translation: OpenAI request -> validated ChatRequest -> the CLI's stdin line and system prompt."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.models import ModelCatalog
from relay.core.prompt import build_prompt
from relay.core.request import parse_chat_request
from relay.errors import BadRequest

CAT = ModelCatalog("sonnet")
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="


def parse(**body):
    body.setdefault("model", "sonnet")
    return parse_chat_request(body, CAT)


def line_of(req, mode="replace", first=True):
    p = build_prompt(req.system, req.messages, mode, first)
    return p, json.loads(p.stdin_line())


def test_system_and_developer_become_the_system_prompt():
    req = parse(messages=[{"role": "system", "content": "Be brief."},
                          {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                          {"role": "user", "content": "hi"}])
    assert req.system == "Be brief.\n\nUse French."
    p, line = line_of(req)
    assert p.system_flag == "--system-prompt-file" and p.system_text == req.system
    assert line["type"] == "user" and line["client_composed"] is True
    assert line["message"]["content"] == [{"type": "text", "text": "hi"}]


def test_modes_append_and_embed():
    req = parse(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    p, _ = line_of(req, "append")
    assert p.system_flag == "--append-system-prompt-file"
    p, line = line_of(req, "embed")
    assert p.system_flag is None
    text = line["message"]["content"][0]["text"]
    assert text.startswith("<system_instructions>\nS\n</system_instructions>") and text.endswith("U")
    _, line = line_of(req, "embed", first=False)  # resumed turns do not repeat it
    assert "system_instructions" not in json.dumps(line)


def test_history_becomes_a_tagged_transcript_in_one_user_message():
    req = parse(messages=[{"role": "user", "content": "My name is Bob"},
                          {"role": "assistant", "content": "Hi Bob."},
                          {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": " my name?"}]}])
    _, line = line_of(req)
    text = "".join(b["text"] for b in line["message"]["content"])
    assert text.index("<user>\nMy name is Bob\n</user>") < text.index("<assistant>\nHi Bob.\n</assistant>")
    assert text.index("Hi Bob.") < text.index("What is my name?")


def test_tool_history_is_kept_with_its_call_id():
    req = parse(messages=[{"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": "{}"}}]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    _, line = line_of(req)
    text = "".join(b["text"] for b in line["message"]["content"])
    assert '<tool_call id="call_1" name="get">{}</tool_call>' in text
    assert '<tool_result tool_call_id="call_1">\nsunny\n</tool_result>' in text


def test_images_become_image_blocks():
    req = parse(messages=[{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    _, line = line_of(req)
    blocks = line["message"]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    assert blocks[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}


@pytest.mark.parametrize("body, param", [
    ({"model": "x"}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "model": 7}, "model"),
])
def test_bad_requests_name_their_param(body, param):
    with pytest.raises(BadRequest) as e:
        parse_chat_request(body, CAT)
    assert e.value.param == param and e.value.status == 400


def test_sampling_parameters_are_accepted_and_ignored():
    req = parse(messages=[{"role": "user", "content": "x"}], temperature=1.5, top_p=0.5, seed=3, stop=["a"],
                frequency_penalty=0.1, presence_penalty=0.2, logit_bias={"1": 2}, metadata={"a": "b"}, store=False)
    assert set(req.extras) >= {"temperature", "top_p", "seed", "stop"}


text_parts = st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=6)


@settings(max_examples=200)
@given(text_parts, st.sampled_from(["replace", "append", "embed"]))
def test_array_content_is_joined_text_never_garbage(parts, mode):
    req = parse(messages=[{"role": "user", "content": [{"type": "text", "text": t} for t in parts]}])
    p = build_prompt(req.system, req.messages, mode, True)
    raw = p.stdin_line()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1  # exactly one stream-json line
    line = json.loads(raw)
    joined = "".join(b["text"] for b in line["message"]["content"] if b["type"] == "text")
    for t in parts:
        assert t in joined
    assert "[object Object]" not in joined and "{'type'" not in joined


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(min_size=1, max_size=20)),
                min_size=1, max_size=8))
def test_every_history_message_reaches_the_prompt_in_order(turns):
    msgs = [{"role": r, "content": t} for r, t in turns]
    req = parse(messages=msgs)
    _, line = line_of(req)
    joined = "".join(b["text"] for b in line["message"]["content"])
    pos = 0
    for _, t in turns:
        found = joined.find(t, pos)
        assert found >= 0
        pos = found

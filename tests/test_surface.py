"""Images, JSON output and reasoning, end to end: what the model received and what the SDK parses."""

import base64
import json

import openai
import pytest
import requests
from harness import openai_client
from mock_anthropic import all_text
from pydantic import BaseModel

PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000" "1f15c4890000000d49444154789c6364f8cfc000000301010018dd8db40000000049454e44ae426082")).decode()


def image_blocks(body):
    return [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"] if b.get("type") == "image"]


def test_images_reach_the_model_as_image_blocks(client, mock_api):
    client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": [
        {"type": "text", "text": "img1 what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}])
    body = mock_api.bodies("img1 what is this?")[-1]
    blocks = image_blocks(body)
    assert len(blocks) == 2
    assert all(b["source"] == {"type": "base64", "media_type": "image/png", "data": PNG} for b in blocks)
    assert "Read" not in json.dumps(body["tools"])  # no temp file for the model to read


def test_remote_image_urls_are_passed_as_url_sources_not_fetched(client, mock_api):
    client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": [
        {"type": "text", "text": "img2 remote"},
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data.png"}}]}])
    blocks = image_blocks(mock_api.bodies("img2 remote")[-1])
    assert blocks == [{"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/latest/meta-data.png"}}]


def test_images_in_earlier_turns_stay_in_the_conversation(client, mock_api):
    sid = {"X-Session-Id": "img-conv-1"}
    first = [{"role": "user", "content": [{"type": "text", "text": "img3 look"},
                                          {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]
    a = client.chat.completions.create(model="sonnet", messages=first, extra_headers=sid).choices[0].message.content
    client.chat.completions.create(model="sonnet", extra_headers=sid, messages=first + [
        {"role": "assistant", "content": a}, {"role": "user", "content": "img3 and now?"}])
    assert len(image_blocks(mock_api.bodies("img3 and now?")[-1])) == 1  # resumed session keeps it
    client.chat.completions.create(model="sonnet", messages=first + [  # new conversation: replayed with the image
        {"role": "assistant", "content": "edited"}, {"role": "user", "content": "img3 replay"}])
    assert len(image_blocks(mock_api.bodies("img3 replay")[-1])) == 1


@pytest.mark.parametrize("part, code", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"}}, "invalid_image"),
    ({"type": "image_url", "image_url": {"url": "data:image/bmp;base64," + PNG}}, "invalid_image_format"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"GIF89a-not-png").decode()}},
     None),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}},
     "invalid_image_format"),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "invalid_image_url"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (8 * 1024 * 1024)}}, "image_too_large"),
])
def test_bad_images_are_clear_400s(relay, part, code):
    r = requests.post(relay.url + "/v1/chat/completions", json={"model": "s", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x"}, part]}]})
    if code is None:  # a GIF labelled PNG: the bytes decide, the request goes through
        assert r.status_code == 200
        return
    assert r.status_code == 400 and r.json()["error"]["code"] == code and r.json()["error"]["param"]


def test_too_many_images(relay_factory):
    srv = relay_factory({"RELAY_IMAGES__MAX_COUNT": "2"})
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}] * 3
    r = requests.post(srv.url + "/v1/chat/completions", json={"model": "s", "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"


class Person(BaseModel):
    name: str
    age: int


def test_json_schema_uses_structured_output_and_parse_works(client, mock_api):
    r = client.chat.completions.parse(model="sonnet", response_format=Person,
                                      messages=[{"role": "user", "content": "js1 who? MOCK:structured"}])
    assert r.choices[0].message.parsed == Person(name="Alice", age=30)
    assert json.loads(r.choices[0].message.content) == {"name": "Alice", "age": 30}
    tools = {t["name"]: t for t in mock_api.bodies("js1 who?")[-1]["tools"]}
    assert tools["StructuredOutput"]["input_schema"]["properties"]["age"]["type"] == "integer"


def test_json_object_and_streaming_json(client, mock_api):
    r = client.chat.completions.create(model="sonnet", response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "js2 MOCK:structured"}])
    assert json.loads(r.choices[0].message.content) == {"name": "Alice", "age": 30}
    chunks = list(client.chat.completions.create(model="sonnet", response_format={"type": "json_object"}, stream=True,
                                                 messages=[{"role": "user", "content": "js3 MOCK:structured"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"name": "Alice", "age": 30}


def test_no_structured_output_is_an_error_not_invalid_json(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="sonnet", response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "js4 just chat"}])
    assert e.value.status_code == 502 and e.value.code == "structured_output_missing"


@pytest.mark.parametrize("effort, flag", [("low", "low"), ("high", "high"), ("minimal", "low"), ("xhigh", "xhigh"),
                                          ("max", "max")])
def test_reasoning_effort_reaches_output_config(client, mock_api, effort, flag):
    client.chat.completions.create(model="sonnet", reasoning_effort=effort,
                                   messages=[{"role": "user", "content": f"eff-{effort}"}])
    assert mock_api.bodies(f"eff-{effort}")[-1]["output_config"]["effort"] == flag


def test_thinking_is_hidden_by_default_and_exposed_on_request(client):
    r = client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "th1 MOCK:thinking"}])
    assert "step by step" not in r.choices[0].message.content
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    r = client.chat.completions.create(model="sonnet", extra_body={"expose_reasoning": True},
                                       messages=[{"role": "user", "content": "th2 MOCK:thinking"}])
    assert "step by step" in r.choices[0].message.reasoning_content
    assert "step by step" not in r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="sonnet", stream=True, extra_body={"expose_reasoning": True},
                                                 messages=[{"role": "user", "content": "th3 MOCK:thinking"}]))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "step by step" in reasoning and "step by step" not in content


def test_expose_reasoning_from_config_and_reasoning_tokens(relay_factory):
    srv = relay_factory({"RELAY_RELAY__EXPOSE_REASONING": "true"})
    with openai_client(srv.url) as c:
        r = c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "th4 MOCK:thinking"}])
    assert "step by step" in r.choices[0].message.reasoning_content
    assert r.usage.completion_tokens_details.reasoning_tokens >= 0
    assert "reasoning" not in all_text({"messages": [{"role": "user", "content": r.choices[0].message.content}]})

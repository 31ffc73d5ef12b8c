"""Responses and chunks validated against the official OpenAI OpenAPI spec (../shared/openai-openapi.yaml)."""

import json
from pathlib import Path

import pytest
import requests

from relay.cli.setup import child_env

SPEC = Path(__file__).resolve().parent.parent.parent / "shared" / "openai-openapi.yaml"


@pytest.fixture(scope="module")
def schemas():
    if not SPEC.exists():
        pytest.skip(f"the OpenAI spec is not beside the checkout ({SPEC})")
    import yaml

    spec = yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))

    def fix(node):  # OAS 3.0 `nullable: true` -> JSON Schema 2020-12
        if isinstance(node, dict):
            node = {k: fix(v) for k, v in node.items()}
            if node.pop("nullable", False):
                node = {"anyOf": [node, {"type": "null"}]}
            return node
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node
    return fix(spec)


def validate(schemas, name, instance):
    import jsonschema

    root = dict(schemas)
    root["$ref"] = f"#/components/schemas/{name}"
    jsonschema.Draft202012Validator(root).validate(instance)


def test_completion_and_chunks_match_the_spec(relay, schemas):
    body = {"model": "sonnet", "messages": [{"role": "user", "content": "spec-1 MOCK:words=3"}]}
    r = requests.post(relay.url + "/v1/chat/completions", json=body)
    validate(schemas, "CreateChatCompletionResponse", r.json())
    with requests.post(relay.url + "/v1/chat/completions", json=dict(body, stream=True, stream_options={
            "include_usage": True}), stream=True) as s:
        frames = [f[6:] for f in s.raw.read().decode().split("\n\n") if f.startswith("data: {")]
    for f in frames:
        validate(schemas, "CreateChatCompletionStreamResponse", json.loads(f))
    validate(schemas, "ListModelsResponse", requests.get(relay.url + "/v1/models").json())
    validate(schemas, "Model", requests.get(relay.url + "/v1/models/sonnet").json())
    err = requests.get(relay.url + "/v1/models/nope").json()
    validate(schemas, "ErrorResponse", err)


def test_cli_environment_is_scrubbed():
    env = child_env({"CLAUDECODE": "1", "CLAUDE_CODE_ENTRYPOINT": "cli", "API_KEYS": "secret", "RELAY_AUTH__API_KEYS": "x",
                     "REDIS_URL": "redis://:pw@h", "ANTHROPIC_BASE_URL": "http://m", "CLAUDE_CONFIG_DIR": "/c",
                     "HOME": "/root", "CLAUDE_CODE_MAX_RETRIES": "10"}, max_retries=1)
    assert "CLAUDECODE" not in env and "CLAUDE_CODE_ENTRYPOINT" not in env
    assert "API_KEYS" not in env and "REDIS_URL" not in env and "RELAY_AUTH__API_KEYS" not in env
    assert env["ANTHROPIC_BASE_URL"] == "http://m" and env["CLAUDE_CONFIG_DIR"] == "/c" and env["HOME"] == "/root"
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "1" and env["DISABLE_AUTOUPDATER"] == "1"

"""What the CLI leaves on disk (issue 10 items 7, 8): no temp files outlive a run, and one config directory
(with its `.claude.json`) survives concurrent runs, new and resumed (16 at once
here, to fit CI on 2 cores; 32 at once measured by hand)."""

import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from harness import cli_cwd
from test_surface import PNG

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def leftovers(srv):
    """Everything the relay's CLI runs left: in the system temp dir (the CLI's default place,
    `claude-<uid>/<cwd>/<session>/`) and in the relay's own temp folder."""
    slug = re.sub(r"[^A-Za-z0-9]", "-", str(cli_cwd(srv)))
    cli_tmp = Path(tempfile.gettempdir()) / f"claude-{os.getuid()}" / slug
    found = [str(p) for p in cli_tmp.rglob("*")] if cli_tmp.exists() else []
    return found + [str(p) for p in (srv.tmp / "var" / "tmp").rglob("*")]


def post(srv, content, session=None, **kw):
    headers = {"X-Session-Id": session} if session else {}
    return requests.post(srv.url + "/v1/chat/completions", headers=headers, timeout=120,
                         json={"model": "sonnet", "messages": [{"role": "user", "content": content}], **kw})


def test_no_run_leaves_temp_files_behind_with_or_without_images(relay_factory, mock_api):
    srv = relay_factory()
    image = [{"type": "text", "text": "tf1 look"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    assert post(srv, "tf1 plain").status_code == 200
    assert post(srv, "tf1 streamed", stream=True).status_code == 200
    first = post(srv, image, session="tf1-img")
    assert first.status_code == 200
    assert post(srv, image).status_code == 200
    assert post(srv, "tf1 tools MOCK:tool=get_weather", tools=[WEATHER]).status_code == 200
    assert leftovers(srv) == []
    # a resumed conversation still has its earlier image: the CLI keeps it in the session transcript
    history = [{"role": "user", "content": image}, first.json()["choices"][0]["message"],
               {"role": "user", "content": "tf1 again"}]
    r = requests.post(srv.url + "/v1/chat/completions", headers={"X-Session-Id": "tf1-img"}, timeout=120,
                      json={"model": "sonnet", "messages": history})
    assert r.status_code == 200
    assert requests.get(srv.url + "/v1/usage/recent?limit=1").json()["data"][0]["resumed"] is True
    body = mock_api.bodies("tf1 again")[-1]
    assert any(b.get("type") == "image" for m in body["messages"] if isinstance(m["content"], list)
               for b in m["content"])
    assert leftovers(srv) == []


N = 16


@pytest.mark.slow
def test_one_config_dir_survives_16_concurrent_runs_new_and_resumed(relay_factory):
    # 16 CLIs starting at once on 2 cores (beside the rest of the suite) can stall a worker past the
    # default 15 s lease, which then (rightly) cancels its runs; this test is about the config file
    srv = relay_factory({"RELAY_MAX_CONCURRENT_RUNS": "16", "RELAY_WORKER_CONNECTIONS": "100",
                         "RELAY_LEASE_TTL_S": "90"})
    config = srv.tmp / "claude-config" / ".claude.json"
    before = json.loads(config.read_text()) if config.exists() else {}

    def turn(i, history):
        return requests.post(srv.url + "/v1/chat/completions", headers={"X-Session-Id": f"cf-{i}"}, timeout=300,
                             json={"model": "sonnet", "messages": history})
    firsts = [[{"role": "user", "content": f"cf{i} first"}] for i in range(N)]
    with ThreadPoolExecutor(N) as pool:
        answers = list(pool.map(lambda i: turn(i, firsts[i]), range(N)))
    assert [a.status_code for a in answers] == [200] * N, [a.text for a in answers if a.status_code != 200][:3] + [srv.log()[-6000:]]
    seconds = [firsts[i] + [{"role": "assistant", "content": answers[i].json()["choices"][0]["message"]["content"]},
                            {"role": "user", "content": f"cf{i} second"}] for i in range(N)]
    with ThreadPoolExecutor(N) as pool:
        assert list(pool.map(lambda i: turn(i, seconds[i]).status_code, range(N))) == [200] * N
    recent = requests.get(srv.url + "/v1/usage/recent?limit=16").json()["data"]
    assert all(r["resumed"] for r in recent)
    after = json.loads(config.read_text())  # still parses
    assert set(before) <= set(after)
    assert post(srv, "cf next run").status_code == 200


def test_transcript_repair_drops_the_refusals_and_sets_the_system_prompt(tmp_path):
    from relay.cli.session_files import INTERRUPTED, repair_transcript

    recs = [
        {"type": "user", "uuid": "u1", "parentUuid": None, "message": {"role": "user", "content": "task"}},
        {"type": "attachment", "uuid": "p1", "parentUuid": "u1",
         "attachment": {"type": "prompt_snapshot", "systemPrompt": ["old"]}},
        {"type": "assistant", "uuid": "a1", "parentUuid": "p1", "message": {"role": "assistant", "content": []}},
        {"type": "user", "uuid": "r1", "parentUuid": "a1", "toolDenialKind": "user-rejected",
         "message": {"role": "user", "content": [{"type": "tool_result", "is_error": True}]}},
        {"type": "attachment", "uuid": "s1", "parentUuid": "r1", "attachment": {"type": "prompt_snapshot"}},
        {"type": "user", "uuid": "i1", "parentUuid": "s1",
         "message": {"role": "user", "content": [{"type": "text", "text": INTERRUPTED}]}},
        {"type": "last-prompt", "leafUuid": "i1"},
        {"type": "user", "uuid": "t1", "parentUuid": "a1", "message": {"role": "user", "content": "real result"}},
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "not json\n")
    assert repair_transcript(path, drop_refusals=True, system_prompt="new") == 5
    kept = path.read_text().splitlines()
    assert kept[-1] == "not json"  # what it does not understand it leaves alone
    left = [json.loads(line) for line in kept[:-1]]
    assert [r.get("uuid") for r in left] == ["u1", "p1", "a1", "t1"]
    assert left[1]["attachment"]["systemPrompt"] == ["new"]
    assert repair_transcript(path, drop_refusals=True, system_prompt="new") == 0  # nothing more to do
    assert repair_transcript(tmp_path / "missing.jsonl", True) == 0

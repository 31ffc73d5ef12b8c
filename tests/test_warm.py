"""Warm CLI processes (the host's pool server): spares for new conversations, warm processes for
follow-ups, and every rule that decides when a process may be reused, with the real CLI."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import requests
from harness import openai_client, wait_until
from mock_anthropic import all_text

from relay.cli.pool.client import PoolClient
from relay.cli.pool.policy import WRITTEN
from relay.cli.pool.protocol import SERVER_MODULE, ColdSpec, RunRequest, socket_path
from relay.cli.pool.sizing import auto_max_warm

KEY_A, KEY_B = "sk-warm-key-a", "sk-warm-key-b"
POOL_ON = {"RELAY_POOL__ENABLED": "true"}  # the config default; the rest of the suite runs without


def chat(c: Any, messages: list[dict[str, Any]], sid: str | None = None, model: str = "sonnet", **kw: Any) -> Any:
    headers = {"X-Session-Id": sid} if sid else None
    return c.chat.completions.create(model=model, messages=messages, extra_headers=headers, **kw)


def record(srv: Any, key: str = KEY_A) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}  # ignored where auth is off
    return requests.get(srv.url + "/v1/usage/recent?limit=1", headers=headers, timeout=10).json()["data"][0]


def pool(srv: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {KEY_A}"}  # an admin key where auth is on; ignored elsewhere
    return requests.get(srv.url + "/stats", headers=headers, timeout=10).json()["pool"]


def pool_clis(srv: Any) -> list[int]:
    """The CLI processes the pool server holds (spares, warm and running)."""
    try:
        return [c.pid for c in psutil.Process(pool(srv)["pid"]).children()]
    except psutil.Error:
        return []


def spare_ready(srv: Any) -> bool:
    return wait_until(lambda: pool(srv)["spares"]["ready"] >= 1, timeout=60, interval=0.2)


def converse(c: Any, srv: Any, sid: str, texts: list[str], **kw: Any) -> list[dict[str, Any]]:
    """Run the turns one after another; returns each turn's request record."""
    msgs: list[dict[str, Any]] = []
    out = []
    for text in texts:
        msgs.append({"role": "user", "content": text})
        answer = chat(c, msgs, sid, **kw).choices[0].message.content
        out.append(record(srv))
        msgs.append({"role": "assistant", "content": answer})
    return out


@pytest.fixture(scope="module")
def warm(relay_factory: Any) -> Any:
    """A relay with the pool at its defaults: 2 workers, 1 spare, max_warm "auto"."""
    keys = f'[{{"name": "a", "key": "{KEY_A}", "admin": true}}, {{"name": "b", "key": "{KEY_B}"}}]'
    return relay_factory({"RELAY_AUTH__ENABLED": "true", "RELAY_AUTH__API_KEYS": keys, **POOL_ON})


@pytest.fixture()
def ca(warm: Any) -> Any:
    c = openai_client(warm.url, api_key=KEY_A)
    yield c
    c.close()


def test_new_conversation_runs_on_a_spare_given_the_requests_settings(warm: Any, ca: Any, mock_api: Any) -> None:
    assert spare_ready(warm)
    r = chat(ca, [{"role": "system", "content": "WS-SYSTEM be brief"}, {"role": "user", "content": "WS1 hello"}],
             "warm-spare-1", model="claude-opus-4-1", reasoning_effort="low")
    assert "WS1 hello" in r.choices[0].message.content
    assert record(warm, KEY_A)["pool"] == "spare"
    body = mock_api.bodies("WS1 hello")[-1]
    assert "opus" in body["model"]
    assert "WS-SYSTEM be brief" in all_text({"system": body["system"], "messages": []})
    assert body["output_config"]["effort"] == "low"
    # the spare's own session id became the conversation's, and its transcript is on disk for a cold resume
    conv = next(c for c in requests.get(warm.url + "/v1/sessions", headers={"Authorization": f"Bearer {KEY_A}"},
                                        timeout=10).json()["data"]
                if c["id"] == "s:warm-spare-1")
    config_dir = Path(warm.env["CLAUDE_CONFIG_DIR"])
    assert list(config_dir.glob(f"projects/*/{conv['cli_session_id']}.jsonl"))
    assert wait_until(lambda: pool(warm)["spares"]["ready"] >= 1, timeout=60)  # a new spare replaces it


def test_structured_output_on_a_spare(warm: Any, ca: Any) -> None:
    assert spare_ready(warm)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = chat(ca, [{"role": "user", "content": "WJ1 MOCK:structured"}], "warm-json-1",
             response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(r.choices[0].message.content) == {"name": "Alice", "age": 30}
    assert record(warm, KEY_A)["pool"] == "spare"


def test_follow_ups_reuse_the_warm_process_from_any_worker(warm: Any, mock_api: Any) -> None:
    assert spare_ready(warm)
    msgs: list[dict[str, Any]] = []
    pools, workers = [], set()
    for i in range(6):
        msgs.append({"role": "user", "content": f"WF{i} question"})
        with openai_client(warm.url, api_key=KEY_A) as c:  # a new connection: any worker may take it
            answer = chat(c, msgs, "warm-follow-1").choices[0].message.content
        rec = record(warm, KEY_A)
        pools.append(rec["pool"])
        workers.add(rec["worker"])
        msgs.append({"role": "assistant", "content": answer})
    assert pools == ["spare"] + ["warm"] * 5, pools
    body = mock_api.bodies("WF5 question")[-1]
    text = all_text(body)
    assert all(f"WF{i} question" in text for i in range(6))
    assert [m["role"] for m in body["messages"] if m["role"] != "system"] == ["user", "assistant"] * 5 + ["user"]
    assert "Here is the conversation so far" not in text


def test_changed_model_or_edited_history_never_reuses_the_process(warm: Any, ca: Any, mock_api: Any) -> None:
    assert spare_ready(warm)
    sid = "warm-change-1"
    a = chat(ca, [{"role": "user", "content": "WC1 start"}], sid).choices[0].message.content
    msgs = [{"role": "user", "content": "WC1 start"}, {"role": "assistant", "content": a},
            {"role": "user", "content": "WC2 with opus"}]
    chat(ca, msgs, sid, model="claude-opus-4-1")
    assert record(warm, KEY_A)["pool"].startswith("cold")  # resumed cold: a model change pollutes a live session
    assert "WC1 start" in all_text(mock_api.bodies("WC2 with opus")[-1])
    assert spare_ready(warm)
    chat(ca, [{"role": "user", "content": "WC1 EDITED"}, {"role": "assistant", "content": a},
              {"role": "user", "content": "WC3 after edit"}], sid)
    # a fresh session, written from the client's history (which a spare cannot load): the old process goes
    assert record(warm, KEY_A)["pool"] == f"cold: {WRITTEN}"
    assert "WC2 with opus" not in all_text(mock_api.bodies("WC3 after edit")[-1])
    assert pool(warm)["killed"].get("replaced", 0) >= 1


def test_processes_are_never_shared_between_keys(warm: Any, mock_api: Any) -> None:
    assert spare_ready(warm)
    with openai_client(warm.url, api_key=KEY_A) as a, openai_client(warm.url, api_key=KEY_B) as b:
        ans = chat(a, [{"role": "user", "content": "WK1 secret of key A"}], "warm-shared-id").choices[0].message.content
        assert spare_ready(warm)
        # the same session header and history under another key: another conversation, another process
        chat(b, [{"role": "user", "content": "WK1 secret of key A"}, {"role": "assistant", "content": ans},
                 {"role": "user", "content": "WK2 from key B"}], "warm-shared-id")
        assert record(warm, KEY_B)["pool"] == f"cold: {WRITTEN}"
        roles = [m["role"] for m in mock_api.bodies("WK2 from key B")[-1]["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant", "user"]  # B's own history, written for a fresh session
        # and another conversation of key A does not get A's first process either
        chat(a, [{"role": "user", "content": "WK3 other conversation"}], "warm-other-conv")
        assert record(warm, KEY_A)["pool"] in ("spare", "cold: no spare ready")
        assert "WK1" not in all_text(mock_api.bodies("WK3 other conversation")[-1])


def test_turn_on_another_host_is_not_lost(relay_factory: Any, redis_server: Any, mock_api: Any) -> None:
    url = redis_server.fresh_db()
    host_a = relay_factory({"RELAY_HOST_ID": "host-a", **POOL_ON}, redis_url=url)
    host_b = relay_factory({"RELAY_HOST_ID": "host-b", **POOL_ON}, redis_url=url)
    assert spare_ready(host_a) and spare_ready(host_b)
    sid, msgs = "warm-hosts-1", [{"role": "user", "content": "WH1 on host A"}]
    with openai_client(host_a.url) as a, openai_client(host_b.url) as b:
        msgs.append({"role": "assistant", "content": chat(a, msgs, sid).choices[0].message.content})
        assert record(host_a)["pool"] == "spare"
        msgs.append({"role": "user", "content": "WH2 on host B"})
        msgs.append({"role": "assistant", "content": chat(b, msgs, sid).choices[0].message.content})
        assert record(host_b)["pool"] != "warm"
        msgs.append({"role": "user", "content": "WH3 back on host A"})
        chat(a, msgs, sid)
        rec = record(host_a)
    assert rec["pool"] != "warm"  # host A's process missed turn 2: it must not answer turn 3
    text = all_text(mock_api.bodies("WH3 back on host A")[-1])
    assert "WH1 on host A" in text and "WH2 on host B" in text
    assert pool(host_a)["killed"].get("replaced", 0) >= 1


def test_disconnect_kills_the_run_and_the_next_turn_starts_clean(warm: Any, ca: Any) -> None:
    assert spare_ready(warm)
    sid = "warm-disconnect-1"
    a = chat(ca, [{"role": "user", "content": "WD1 first"}], sid).choices[0].message.content
    before = pool(warm)["killed"].get("disconnect", 0)
    msgs = [{"role": "user", "content": "WD1 first"}, {"role": "assistant", "content": a},
            {"role": "user", "content": "WD2 MOCK:words=200 MOCK:slow=100"}]
    stream = ca.chat.completions.create(model="sonnet", messages=msgs, stream=True,
                                        extra_headers={"X-Session-Id": sid})
    next(iter(stream))
    stream.close()
    # the conversation's process ran that turn; it is killed, not kept
    assert wait_until(lambda: pool(warm)["killed"].get("disconnect", 0) > before and pool(warm)["busy"] == 0,
                      timeout=20)
    assert spare_ready(warm)
    chat(ca, msgs[:2] + [{"role": "user", "content": "WD3 after the hang-up"}], sid)
    assert record(warm, KEY_A)["pool"] != "warm"


def test_an_error_turn_is_not_kept(warm: Any, ca: Any) -> None:
    assert spare_ready(warm)
    sid = "warm-error-1"
    a = chat(ca, [{"role": "user", "content": "WE1 first"}], sid).choices[0].message.content
    before = pool(warm)["killed"].get("error", 0)
    with pytest.raises(openai.APIStatusError):
        chat(ca, [{"role": "user", "content": "WE1 first"}, {"role": "assistant", "content": a},
                  {"role": "user", "content": "WE2 MOCK:error=400"}], sid)
    assert record(warm, KEY_A)["pool"] == "warm"
    assert wait_until(lambda: pool(warm)["killed"].get("error", 0) > before, timeout=10)
    assert spare_ready(warm)
    chat(ca, [{"role": "user", "content": "WE1 first"}, {"role": "assistant", "content": a},
              {"role": "user", "content": "WE3 again"}], sid)
    assert record(warm, KEY_A)["pool"] == f"cold: {WRITTEN}"  # the failed turn forgot the session: a fresh start


def test_usage_is_exact_per_turn_over_ten_turns_on_one_process(warm: Any, ca: Any) -> None:
    assert spare_ready(warm)
    texts = [f"WU{i} MOCK:usage={10 + i},{20 + i},{30 + i},{5 + i}" for i in range(10)]
    recs = converse(ca, warm, "warm-usage-1", texts)
    assert [r["pool"] for r in recs] == ["spare"] + ["warm"] * 9
    for i, r in enumerate(recs):
        assert (r["input_tokens"], r["cache_creation_tokens"], r["cache_read_tokens"], r["output_tokens"]) == \
            (10 + i, 20 + i, 30 + i, 5 + i), (i, r)
        assert not r["estimated"]


def test_function_calling_runs_cold_in_the_pool_and_says_so(warm: Any, ca: Any) -> None:
    """A spare declares no client functions: a new conversation with tools starts cold in the pool (which
    can then hold its tool steps, tests/test_tool_loops.py) and says why."""
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    chat(ca, [{"role": "user", "content": "WT1 no call needed"}], "warm-tools-1", tools=tools)
    why = "function calling (spares declare no client functions)"
    assert record(warm, KEY_A)["pool"] == f"cold: {why}"
    assert pool(warm)["misses"].get(why, 0) >= 1


@pytest.fixture(scope="module")
def strict(relay_factory: Any) -> Any:
    """Tight limits: 2 turns per process, 1 warm process, 3 s idle timeout."""
    return relay_factory({"RELAY_POOL__MAX_TURNS": "2", "RELAY_POOL__MAX_WARM": "1", "RELAY_IDLE_TIMEOUT_S": "3", **POOL_ON})


def test_recycling_after_max_turns_and_lru_cap(strict: Any) -> None:
    with openai_client(strict.url) as c:
        assert spare_ready(strict)
        recs = converse(c, strict, "strict-turns", ["ST1", "ST2", "ST3", "ST4"])
        # turns 1-2 on one process, recycled; 3 cold (kept again), 4 on that one
        assert [r["pool"].split(":")[0] for r in recs] == ["spare", "warm", "cold", "warm"], recs
        assert pool(strict)["killed"].get("max_turns", 0) >= 1
        assert spare_ready(strict)
        converse(c, strict, "strict-lru-1", ["SL1"])
        assert spare_ready(strict)
        converse(c, strict, "strict-lru-2", ["SL2"])
        st = pool(strict)
        assert len(st["warm"]) == 1 and st["killed"].get("lru", 0) >= 1


def test_the_auto_cap_is_sized_from_memory_and_shown_with_its_basis(warm: Any) -> None:
    assert spare_ready(warm)  # the first ready spare is measured, and the cap recomputed with it
    st = pool(warm)
    basis = st["max_warm_basis"]
    assert basis["basis"] == "auto" and basis["measured"] is True, basis
    assert basis["mem_available_mb"] > 0 and 20 < basis["per_process_mb"] < 600, basis
    assert st["max_warm"] == auto_max_warm(basis["mem_available_mb"], basis["per_process_mb"]) >= 1
    health = requests.get(warm.url + "/health", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=10).json()
    assert health["pool"]["max_warm"] == st["max_warm"] and health["pool"]["max_warm_basis"] == basis


def test_a_follow_up_whose_process_was_evicted_says_why(strict: Any) -> None:
    """max_warm 1: a second conversation's process evicts the first's (LRU); the first's next turn is a
    miss counted as the eviction, not as "not held on this host"."""
    with openai_client(strict.url) as c:
        assert spare_ready(strict)
        a1 = [{"role": "user", "content": "EV1 first conversation"}]
        answer = chat(c, a1, "evict-a").choices[0].message.content
        assert spare_ready(strict)
        converse(c, strict, "evict-b", ["EV2 second conversation"])
        chat(c, a1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "EV3 again"}], "evict-a")
        assert record(strict)["pool"] == "cold: evicted: lru"
    st = pool(strict)
    assert st["misses"].get("evicted: lru", 0) >= 1 and st["killed"].get("lru", 0) >= 1
    assert st["max_warm"] == 1 and st["max_warm_basis"] == {"basis": "config"}
    health = requests.get(strict.url + "/health", timeout=10).json()["pool"]
    assert health["max_warm_basis"] == {"basis": "config"} and health["misses"].get("evicted: lru", 0) >= 1


def test_watchdog_kills_a_run_that_stops_printing(strict: Any) -> None:
    with openai_client(strict.url) as c:
        assert spare_ready(strict)
        a = chat(c, [{"role": "user", "content": "SW1 first"}], "strict-watchdog").choices[0].message.content
        with pytest.raises(openai.APIStatusError) as err:
            chat(c, [{"role": "user", "content": "SW1 first"}, {"role": "assistant", "content": a},
                     {"role": "user", "content": "SW2 MOCK:pause=30"}], "strict-watchdog")
        assert err.value.status_code == 504 or "idle" in str(err.value)
        assert record(strict)["pool"] == "warm"
        assert wait_until(lambda: pool(strict)["busy"] == 0 and not pool(strict)["warm"], timeout=15)


def test_idle_ttl_and_a_new_login_replace_processes(relay_factory: Any) -> None:
    srv = relay_factory({"RELAY_POOL__IDLE_TTL_S": "2", **POOL_ON})
    assert spare_ready(srv)
    with openai_client(srv.url) as c:
        converse(c, srv, "ttl-1", ["TT1"])
    assert wait_until(lambda: pool(srv)["killed"].get("idle_ttl", 0) >= 1 and not pool(srv)["warm"], timeout=20)
    assert spare_ready(srv)
    old = set(pool_clis(srv))
    creds = Path(srv.env["CLAUDE_CONFIG_DIR"]) / ".credentials.json"
    creds.write_text("{}")  # a renewed login: spares spawned before it must go
    assert wait_until(lambda: pool(srv)["killed"].get("cli_changed", 0) >= 1, timeout=20)
    assert wait_until(lambda: pool(srv)["spares"]["ready"] >= 1 and not (old & set(pool_clis(srv))), timeout=60)


def test_no_orphans_after_sigkill_of_a_worker_or_the_master(relay_factory: Any) -> None:
    srv = relay_factory(POOL_ON)
    assert spare_ready(srv)
    with openai_client(srv.url) as c:
        converse(c, srv, "kill-1", ["K1 first"])
        stream = c.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "K2 MOCK:words=300 MOCK:slow=100"}],
                                           stream=True, extra_headers={"X-Session-Id": "kill-2"})
        next(iter(stream))
        before = pool(srv)
        assert before["busy"] == 1, before
        running = set(pool_clis(srv))
        for w in srv.worker_pids():
            os.kill(w, signal.SIGKILL)
        # the run's CLI dies with its worker's connection; the warm one of kill-1 and the spare stay
        direct = PoolClient(socket_path(Path(srv.env["RELAY_VAR_DIR"])), True)  # the workers are rebooting
        pool_pid = direct.stats()["pid"]

        def survivors() -> set[int]:
            return running & {c.pid for c in psutil.Process(pool_pid).children() if c.status() != psutil.STATUS_ZOMBIE}
        assert wait_until(lambda: len(survivors()) == len(running) - 1, timeout=20), (running, survivors())
        assert direct.stats()["busy"] == 0
        stream.close()
    everything = [psutil.Process(srv.proc.pid)] + psutil.Process(srv.proc.pid).children(recursive=True)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)

    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everything)
    assert wait_until(all_gone, timeout=20), [p.pid for p in everything if p.is_running()]


def test_graceful_shutdown_ends_every_pooled_cli(relay_factory: Any) -> None:
    srv = relay_factory(POOL_ON)
    assert spare_ready(srv)
    with openai_client(srv.url) as c:
        converse(c, srv, "stop-1", ["GS1"])
    family = psutil.Process(srv.proc.pid).children(recursive=True)
    assert len(pool_clis(srv)) >= 1
    srv.stop()
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family),
                      timeout=20)


def test_pool_off_gives_todays_behaviour(relay_factory: Any, mock_api: Any) -> None:
    srv = relay_factory({"RELAY_POOL__ENABLED": "false"})
    assert requests.get(srv.url + "/health", timeout=10).json()["pool"] == {"enabled": False}
    assert not socket_path(Path(srv.env["RELAY_VAR_DIR"])).exists()
    with openai_client(srv.url) as c:
        recs = converse(c, srv, "off-1", ["OFF1", "OFF2"])
    assert [r["pool"] for r in recs] == ["", ""] and recs[1]["resumed"] is True
    assert "OFF1" in all_text(mock_api.bodies("OFF2")[-1])
    assert wait_until(lambda: not srv.cli_pids(), timeout=10)  # nothing stays alive between turns


@pytest.fixture()
def pool_server(tmp_path: Path, mock_api: Any, cli_bin: str) -> Any:
    """The pool server on its own (no relay): the protocol a worker speaks, with the real CLI."""
    import subprocess
    import sys

    from harness import ROOT, relay_env

    env = relay_env("redis://127.0.0.1:1/0", cli_bin, mock_api.url, tmp_path, {"RELAY_POOL__ENABLED": "true"})
    proc = subprocess.Popen([sys.executable, "-m", SERVER_MODULE], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = PoolClient(socket_path(tmp_path / "var"), True)
    assert wait_until(lambda: (client.stats().get("spares") or {}).get("ready", 0) >= 1, timeout=60)
    yield client
    proc.send_signal(signal.SIGUSR1)  # its stop signal (SIGTERM is ignored: see gunicorn.conf.py)
    proc.wait(20)


def _turn(client: Any, want: str | None, text: str, **extra: Any) -> Any:
    from relay.core.prompt import build_prompt

    line = build_prompt("", [{"role": "user", "content": [{"type": "text", "text": text}]}], "replace", True)
    extra.setdefault("flavour", client.stats()["spares"]["prompt_cache_env"])  # the spares' prompt caching
    req = RunRequest(want=extra.pop("want_override", want), why="", conv="pool-test-conv", fingerprint="fp",
                     model="sonnet", line=line.stdin_line().decode(),
                     cold=extra.pop("cold", ColdSpec(argv=[], cwd="/", env={})), **extra)
    proc, why = client.run(req)
    assert proc is not None and proc.how == (want or "cold"), (proc and proc.how, proc and proc.reason, why)
    proc.start()
    return proc


def _until_result(proc: Any, on_event: Any = None) -> dict[str, Any]:
    from relay.cli.process import EOF

    while True:
        ev = proc.next_event(60)
        assert ev is not None and ev is not EOF, proc.stderr_text
        if on_event:
            on_event(ev)
        if ev.get("type") == "result":
            return ev


def test_cost_fields_are_per_turn_and_an_interrupted_turn_is_not_kept(pool_server: Any) -> None:
    proc = _turn(pool_server, "spare", "PI1 MOCK:usage=10,0,0,5")
    results = [_until_result(proc)]
    held = proc.keep()
    proc.kill()
    assert held is not None
    for i in range(2):
        proc = _turn(pool_server, "warm", f"PI{i + 2} MOCK:usage=10,0,0,5", proc=held[0], turns=held[1])
        results.append(_until_result(proc))
        held = proc.keep()
        proc.kill()
        assert held is not None
    # the CLI reports cost, API time and per-model usage summed over its life; the pool makes them per turn
    assert len({round(r["total_cost_usd"], 9) for r in results}) == 1
    assert all(next(iter(r["modelUsage"].values()))["inputTokens"] == r["usage"]["input_tokens"] for r in results)
    # an interrupted turn leaves the partial answer in the process's history: it must not be kept
    proc = _turn(pool_server, "warm", "PI4 MOCK:words=200 MOCK:slow=50", proc=held[0], turns=held[1])
    sent = []

    def interrupt(ev: dict[str, Any]) -> None:
        if ev.get("type") == "stream_event" and not sent:
            sent.append(1)
            proc.send({"type": "control_request", "request_id": "int-1", "request": {"subtype": "interrupt"}})
    result = _until_result(proc, interrupt)
    assert result.get("is_error") or result.get("subtype") != "success"
    assert proc.keep() is None
    proc.kill()
    assert wait_until(lambda: pool_server.stats()["killed"].get("error", 0) == 1 and not pool_server.stats()["warm"])


def test_a_spare_that_refuses_a_control_request_is_killed_and_the_run_goes_cold(pool_server: Any,
                                                                                  cli_bin: str) -> None:
    from relay.cli.invocation import base_argv

    cwd = str(Path(pool_server.path).parent / "cli-cwd")
    Path(cwd).mkdir(exist_ok=True)  # the pool's own folder is under state_dir now
    cold = ColdSpec(argv=base_argv(cli_bin, "sonnet") + ["--no-session-persistence"], cwd=cwd, env={})
    # the real CLI ends a turn-less session with an error result for a schema that is not an object
    proc = _turn(pool_server, None, "PC1 answered cold", cold=cold, want_override="spare",
                 controls=[{"subtype": "initialize", "hooks": None, "jsonSchema": "not a schema"}])
    assert proc.reason == "a control request failed"
    assert "PC1 answered cold" in json.dumps(_until_result(proc))
    proc.kill()
    st = pool_server.stats()
    assert st["killed"].get("control_failed") == 1 and st["misses"].get("a control request failed") == 1


def test_a_pinned_model_skips_the_spare(warm: Any, ca: Any, mock_api: Any) -> None:
    assert spare_ready(warm)

    def probes() -> int:  # `set_model` validates a full model id with a 1-token request
        return sum(1 for r in list(mock_api.requests) if (r.get("body") or {}).get("max_tokens") == 1)
    before = probes()
    chat(ca, [{"role": "user", "content": "WP1 pinned"}], "warm-pinned-1", model="claude-sonnet-4-5-20250929")
    assert record(warm, KEY_A)["pool"].startswith("cold: pinned model")
    assert probes() == before


def test_rss_and_age_limits_recycle_processes(relay_factory: Any) -> None:
    srv = relay_factory({"RELAY_POOL__MAX_RSS_MB": "1", "RELAY_POOL__MAX_AGE_S": "8", **POOL_ON})
    with openai_client(srv.url) as c:
        recs = converse(c, srv, "limits-1", ["LIM1", "LIM2"])
    assert recs[1]["pool"] == "cold: evicted: max_rss"  # above max_rss_mb after turn 1: not kept, and said so
    assert pool(srv)["killed"].get("max_rss", 0) >= 1
    assert wait_until(lambda: pool(srv)["killed"].get("max_age", 0) >= 1, timeout=60)  # spares age out too

"""Conversations as CLI sessions across gunicorn workers: resume, edits, locking, recovery, admin."""

import os
import signal
import threading
import time

import openai
import psutil
import pytest
import requests
from harness import cli_cwd, openai_client, wait_until
from mock_anthropic import all_text

from relay.cli.session_files import expire_session_files, session_dir


def chat(c, messages, sid=None, **kw):
    headers = {"X-Session-Id": sid} if sid else None
    return c.chat.completions.create(model="sonnet", messages=messages, extra_headers=headers, **kw)


def last_record(srv):
    return requests.get(srv.url + "/v1/usage/recent?limit=1").json()["data"][0]


def user_text(msg):
    c = msg["content"]
    return c if isinstance(c, str) else "".join(b.get("text", "") for b in c if b.get("type") == "text")


def test_resume_sends_only_the_new_message_and_the_model_sees_all(relay, client, mock_api):
    sid = "conv-resume-1"
    msgs = [{"role": "user", "content": "R1 first question"}]
    for turn in range(2, 5):
        a = chat(client, msgs, sid).choices[0].message.content
        first = last_record(relay)
        msgs += [{"role": "assistant", "content": a}, {"role": "user", "content": f"R{turn} next question"}]
    chat(client, msgs, sid)
    rec = last_record(relay)
    assert rec["resumed"] is True and first["resumed"] is True
    assert rec["bytes_to_cli"] < 400  # one short user line, not the history
    body = mock_api.bodies("R4 next question")[-1]
    roles = [m["role"] for m in body["messages"] if m["role"] != "system"]
    assert roles == ["user", "assistant"] * 3 + ["user"]  # real turns, from the CLI's own session
    text = all_text(body)
    assert text.index("R1 first question") < text.index("R2 next question") < text.index("R4 next question")
    assert user_text(body["messages"][-1]).strip() == "R4 next question"
    assert "Here is the conversation so far" not in text


def test_edited_history_starts_a_fresh_context(relay, client, mock_api):
    sid = "conv-edit-1"
    a = chat(client, [{"role": "user", "content": "E1 original"}], sid).choices[0].message.content
    chat(client, [{"role": "user", "content": "E1 original"}, {"role": "assistant", "content": a},
                  {"role": "user", "content": "E2 follow"}], sid)
    assert last_record(relay)["resumed"] is True
    # the client edits its first message: must not be answered from the old context
    chat(client, [{"role": "user", "content": "E1 EDITED"}, {"role": "assistant", "content": a},
                  {"role": "user", "content": "E3 after edit"}], sid)
    assert last_record(relay)["resumed"] is False
    text = all_text(mock_api.bodies("E3 after edit")[-1])
    assert "E1 EDITED" in text and "<user>\nE1 original" not in text and "E2 follow" not in text


def test_implicit_conversations_resume_without_a_header(relay, client, mock_api):
    msgs = [{"role": "system", "content": "implicit-sys-77"}, {"role": "user", "content": "I1 hello"}]
    a = chat(client, msgs).choices[0].message.content
    chat(client, msgs + [{"role": "assistant", "content": a}, {"role": "user", "content": "I2 again"}])
    assert last_record(relay)["resumed"] is True


def test_one_turn_at_a_time_per_conversation(relay, mock_api):
    sid = "conv-lock-1"
    results = []

    def go(i):
        with openai_client(relay.url) as c:
            results.append(chat(c, [{"role": "user", "content": f"L{i} lockprobe MOCK:slow=60 MOCK:words=8"}], sid))
    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 3
    spans = sorted((r["t"], r["end"]) for r in mock_api.records("lockprobe"))
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end  # never two CLI runs on one session at once


def test_a_busy_conversation_answers_409_after_the_wait(relay_factory):
    srv = relay_factory({"RELAY_SESSIONS__LOCK_WAIT_S": "0.3"})
    sid = "conv-busy-1"
    t = threading.Thread(target=lambda: requests.post(
        srv.url + "/v1/chat/completions", headers={"X-Session-Id": sid}, timeout=60,
        json={"model": "s", "messages": [{"role": "user", "content": "busy MOCK:slow=100 MOCK:words=30"}]}))
    t.start()
    time.sleep(1.5)
    with openai_client(srv.url) as c, pytest.raises(openai.ConflictError) as e:
        chat(c, [{"role": "user", "content": "second"}], sid)
    assert e.value.code == "conversation_busy" and int(e.value.response.headers["retry-after"]) >= 1
    t.join(60)


def test_resume_after_the_cli_session_file_vanished(relay, client, mock_api):
    sid = "conv-vanish-1"
    a = chat(client, [{"role": "user", "content": "V1 remember KIWI"}], sid).choices[0].message.content
    folder = session_dir(relay.tmp / "claude-config", cli_cwd(relay))
    files = list(folder.glob("*.jsonl"))
    conv = next(c for c in requests.get(relay.url + "/v1/sessions").json()["data"] if c["id"] == "s:" + sid)
    target = folder / f"{conv['cli_session_id']}.jsonl"
    assert target in files
    target.unlink()
    r = chat(client, [{"role": "user", "content": "V1 remember KIWI"}, {"role": "assistant", "content": a},
                      {"role": "user", "content": "V2 what fruit?"}], sid)
    assert r.choices[0].message.content.endswith("V2 what fruit?")  # no error reached the client
    text = all_text(mock_api.bodies("V2 what fruit?")[-1])
    assert "V1 remember KIWI" in text  # replayed as full history


def test_a_failed_turn_leaves_a_consistent_conversation(relay, client, mock_api):
    sid = "conv-fail-1"
    a = chat(client, [{"role": "user", "content": "F1 start"}], sid).choices[0].message.content
    base = [{"role": "user", "content": "F1 start"}, {"role": "assistant", "content": a}]
    with pytest.raises(openai.InternalServerError):
        chat(client, base + [{"role": "user", "content": "F2 broken MOCK:error=500"}], sid)
    r = chat(client, base + [{"role": "user", "content": "F3 retry"}], sid)
    assert r.choices[0].message.content.endswith("F3 retry")
    text = all_text(mock_api.bodies("F3 retry")[-1])
    assert "F1 start" in text and "F2 broken" not in text and "No response requested" not in text


def test_session_admin_list_and_delete(relay, client):
    sid = "conv-admin-1"
    chat(client, [{"role": "user", "content": "A1"}], sid)
    listed = {c["id"]: c for c in requests.get(relay.url + "/v1/sessions").json()["data"]}
    conv = listed["s:" + sid]
    assert conv["messages"] == 2 and conv["cli_session_id"] and conv["expires_in"] > 0
    folder = session_dir(relay.tmp / "claude-config", cli_cwd(relay))
    f = folder / f"{conv['cli_session_id']}.jsonl"
    assert f.exists()
    r = requests.delete(relay.url + f"/v1/sessions/s:{sid}?purge_files=true")
    assert r.status_code == 200 and r.json()["files_removed"] == 1 and not f.exists()
    assert requests.delete(relay.url + f"/v1/sessions/s:{sid}").status_code == 404
    assert "s:" + sid not in {c["id"] for c in requests.get(relay.url + "/v1/sessions").json()["data"]}


def test_delete_all_sessions(relay_factory):
    srv = relay_factory()
    with openai_client(srv.url) as c:
        for i in range(3):
            chat(c, [{"role": "user", "content": f"D{i}"}], f"conv-del-{i}")
    assert requests.delete(srv.url + "/v1/sessions").json()["deleted"] == 3
    assert requests.get(srv.url + "/v1/sessions").json()["data"] == []


def test_bad_session_ids_are_400(relay):
    for bad in ("../../etc/passwd", "a" * 10000, "x y", "é"):
        r = requests.post(relay.url + "/v1/chat/completions", headers={"X-Session-Id": bad.encode("utf-8")},
                          json={"model": "s", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code in (400, 431) and "error" in r.json()


def test_old_cli_session_files_expire(tmp_path):
    old, new, kept = (tmp_path / f"{n}.jsonl" for n in ("old", "new", "kept"))
    for f in (old, new, kept):
        f.write_text("{}")
    past = time.time() - 3 * 3600
    os.utime(old, (past, past))
    os.utime(kept, (past, past))
    assert expire_session_files(tmp_path, 3600, keep={"kept"}) == 1
    assert not old.exists() and new.exists() and kept.exists()


def test_the_relay_expires_session_files_with_the_ttl(relay_factory):
    srv = relay_factory({"RELAY_SESSIONS__CLEANUP_INTERVAL_S": "1", "RELAY_SESSIONS__TTL_HOURS": "1"})
    folder = session_dir(srv.tmp / "claude-config", cli_cwd(srv))
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / "00000000-0000-4000-8000-000000000000.jsonl"
    stale.write_text("{}")
    past = time.time() - 2 * 3600
    os.utime(stale, (past, past))
    assert wait_until(lambda: not stale.exists(), 10)


def test_a_sigkilled_worker_leaves_no_stuck_lock_or_slot(relay_factory):
    srv = relay_factory({"RELAY_LEASE_TTL_S": "3", "RELAY_MAX_CONCURRENT_RUNS": "1", "RELAY_QUEUE_TIMEOUT_S": "0"})
    sid = "conv-kill-1"
    def doomed():
        try:
            requests.post(srv.url + "/v1/chat/completions", headers={"X-Session-Id": sid}, timeout=60,
                          json={"model": "s", "messages": [{"role": "user", "content": "K MOCK:slow=200 MOCK:words=60"}]})
        except requests.ConnectionError:
            pass  # its worker is about to die
    threading.Thread(target=doomed, daemon=True).start()

    def busy_worker():
        for w in srv.worker_pids():  # the worker whose CLI runs the turn (not a `--version` probe)
            kids = [c for c in psutil.Process(w).children() if c.status() != psutil.STATUS_ZOMBIE
                    and "--input-format" in c.cmdline()]
            if kids:
                return w, kids
        return None
    found = []
    assert wait_until(lambda: found.append(busy_worker()) or found[-1], 15)
    worker, kids = found[-1]
    os.kill(worker, signal.SIGKILL)
    assert wait_until(lambda: not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids), 3)
    # the dead worker's slot and lock lapse after the lease TTL: the conversation works again
    assert wait_until(lambda: requests.get(srv.url + "/health").json().get("active_runs") == 0, 8)
    with openai_client(srv.url) as c:
        r = chat(c, [{"role": "user", "content": "after kill"}], sid)
    assert r.choices[0].message.content.endswith("after kill")

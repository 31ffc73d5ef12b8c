"""Conversations mapped onto CLI sessions, kept in Redis so every worker (and host) agrees.

A request whose messages extend what the CLI session already holds (same digest of the stored
prefix) resumes it and sends only the new messages; anything else starts a fresh session with the
full history. One turn at a time per conversation: a Redis lock with an expiry, renewed by the run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadRequest
from .store import PREFIX

SESSION_ID = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")


def _norm(msg: dict[str, Any]) -> Any:
    """What identifies a message for the digest: role, text, images and tool calls, not formatting."""
    parts = []
    for p in msg.get("content") or []:
        if p.get("type") == "text":
            parts.append(p["text"])
        else:
            parts.append(hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:16])
    text = "\n".join(parts).strip()
    calls = []
    for c in msg.get("tool_calls") or []:
        fn = c.get("function") if isinstance(c, dict) else None
        fn = fn if isinstance(fn, dict) else {}
        args = fn.get("arguments")
        try:
            args = json.dumps(json.loads(args), sort_keys=True) if isinstance(args, str) else args
        except ValueError:
            pass
        calls.append([c.get("id") if isinstance(c, dict) else None, fn.get("name"), args])
    return [msg["role"], text, calls, msg.get("tool_call_id")]


def digest(system: str, messages: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(["system", system.strip()]).encode())
    for m in messages:
        h.update(json.dumps(_norm(m), ensure_ascii=False).encode())
    return h.hexdigest()


def conversation_id(header: str | None, user: str | None, system: str, messages: list[dict[str, Any]]) -> str:
    if header is not None:
        if not SESSION_ID.match(header):
            raise BadRequest("X-Session-Id must be 1-128 characters of letters, digits and . _ : @ + = -",
                             param="X-Session-Id", code="invalid_session_id")
        return "s:" + header
    if user:
        return "u:" + hashlib.sha256(user.encode()).hexdigest()[:24]
    first = next((m for m in messages if m["role"] == "user"), messages[0])
    return "h:" + digest(system, [first])[:24]


@dataclass
class Plan:
    """What one turn sends to the CLI and how it uses the CLI's session store."""
    conv_key: str | None
    cli_session: str | None
    resume: bool
    send: list[dict[str, Any]]          # the messages the CLI has not seen
    first_turn: bool
    all_messages: list[dict[str, Any]] = field(default_factory=list)
    system: str = ""
    model: str = ""
    scope: str = ""
    resume_at: str | None = None        # cut the CLI session back to the model's tool-call message
    pending_calls: list[str] = field(default_factory=list)  # tool_use ids that await the client's results

    def cli_args(self) -> list[str]:
        if not self.cli_session:
            return ["--no-session-persistence"]
        if self.resume:
            args = ["--resume=" + self.cli_session]
            return args + (["--resume-session-at", self.resume_at] if self.resume_at else [])
        return ["--session-id", self.cli_session]


class Sessions:
    def __init__(self, r: Any, ttl_hours: float, enabled: bool) -> None:
        self.r = r
        self.ttl = int(ttl_hours * 3600)
        self.enabled = enabled

    def key(self, scope: str, conv_id: str) -> str:
        return f"{PREFIX}conv:{scope}:{conv_id}"

    def lock_key(self, conv_key: str) -> str:
        return conv_key.replace(f"{PREFIX}conv:", f"{PREFIX}lock:", 1)

    def plan(self, scope: str, conv_id: str, system: str, messages: list[dict[str, Any]], model: str) -> Plan:
        if not self.enabled:
            return Plan(None, None, False, messages, True, messages, system, model, scope)
        key = self.key(scope, conv_id)
        rec = self.r.hgetall(key)
        count = int(rec.get("count") or 0)
        if rec.get("cli_session") and 0 < count < len(messages) \
                and digest(system, messages[:count]) == rec.get("digest"):
            plan = Plan(key, rec["cli_session"], True, messages[count:], False, messages, system, model, scope)
            if rec.get("resume_at"):
                plan.resume_at = rec["resume_at"]
                plan.pending_calls = json.loads(rec.get("pending_calls") or "[]")
            return plan
        return self.fresh(key, system, messages, model, scope)

    def fresh(self, key: str | None, system: str, messages: list[dict[str, Any]], model: str,
              scope: str = "") -> Plan:
        if not self.enabled or key is None:
            return Plan(None, None, False, messages, True, messages, system, model, scope)
        return Plan(key, str(uuid.uuid4()), False, messages, True, messages, system, model, scope)

    def commit(self, plan: Plan, answer: dict[str, Any], host: str, resume_at: str | None = None) -> None:
        """Record that the CLI session now holds every message plus `answer`.

        `resume_at` marks an answer that called the client's tools: the next turn resumes the
        session cut back to that message and gives the results as real tool_result blocks."""
        if not plan.conv_key or not plan.cli_session:
            return
        held = plan.all_messages + [answer]
        now = time.time()
        pipe = self.r.pipeline()
        pipe.hsetnx(plan.conv_key, "created", now)
        pipe.hset(plan.conv_key, mapping={"cli_session": plan.cli_session, "model": plan.model,
                                          "count": len(held), "digest": digest(plan.system, held),
                                          "last_used": now, "host": host, "scope": plan.scope})
        calls = [c["id"] for c in answer.get("tool_calls") or []]
        if resume_at and calls:
            pipe.hset(plan.conv_key, mapping={"resume_at": resume_at, "pending_calls": json.dumps(calls)})
        else:
            pipe.hdel(plan.conv_key, "resume_at", "pending_calls")
        pipe.hincrby(plan.conv_key, "turns", 1)
        pipe.expire(plan.conv_key, self.ttl)
        pipe.execute()

    def forget(self, plan: Plan) -> None:
        """After a failed or cancelled turn: the next request starts a clean session."""
        if plan.conv_key:
            self.r.delete(plan.conv_key)

    # -- admin -----------------------------------------------------------------------------------
    def list_all(self, scope: str | None = None) -> list[dict[str, Any]]:
        out = []
        pattern = f"{PREFIX}conv:{scope}:*" if scope else f"{PREFIX}conv:*"
        for key in self.r.scan_iter(match=pattern, count=500):
            rec = self.r.hgetall(key)
            if not rec:
                continue
            _, _, rest = key.partition(f"{PREFIX}conv:")
            rec_scope, _, conv_id = rest.partition(":")
            out.append({"id": conv_id, "object": "conversation", "scope": rec_scope,
                        "cli_session_id": rec.get("cli_session"), "model": rec.get("model"),
                        "messages": int(rec.get("count") or 0), "turns": int(rec.get("turns") or 0),
                        "created": int(float(rec.get("created") or 0)),
                        "last_used": int(float(rec.get("last_used") or 0)), "host": rec.get("host"),
                        "expires_in": self.r.ttl(key)})
        out.sort(key=lambda c: c["last_used"], reverse=True)
        return out

    def delete(self, conv_id: str | None, scope: str | None = None) -> list[dict[str, Any]]:
        """Delete one conversation (by id) or all of them; returns what was deleted."""
        victims = [c for c in self.list_all(scope) if conv_id is None or c["id"] == conv_id]
        for c in victims:
            self.r.delete(self.key(c["scope"], c["id"]))
        return victims


def session_dir(config_dir: Path, cwd: Path) -> Path:
    """Where the CLI keeps session files for runs in `cwd` (CLI-PROTOCOL §5)."""
    return config_dir / "projects" / re.sub(r"[^A-Za-z0-9]", "-", str(cwd))


def expire_session_files(directory: Path, max_age_s: float, keep: set[str] | None = None) -> int:
    """Delete CLI session files idle for longer than the conversation TTL; returns how many."""
    if not directory.is_dir():
        return 0
    cutoff = time.time() - max_age_s
    removed = 0
    for f in directory.glob("*.jsonl"):
        try:
            if f.stem not in (keep or set()) and f.stat().st_mtime < cutoff:
                f.unlink()
                removed += 1
        except OSError:
            continue
    return removed

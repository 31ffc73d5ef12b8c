"""Conversations mapped onto CLI sessions, kept in Redis so every worker (and host) agrees.

A request whose messages extend what the CLI session already holds (same digest of the stored
prefix) resumes it and sends only the new messages; anything else starts a fresh session with the
full history. One turn at a time per conversation: a Redis lock with an expiry, renewed by the run.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..core.conversation import Plan, digest
from .connection import PREFIX

MAX_SUPERSEDED = 1000  # sessions remembered per conversation; older ones are left to the janitor's expiry


class Sessions:
    def __init__(self, r: Any, ttl_hours: float, enabled: bool) -> None:
        self.r = r
        self.ttl = int(ttl_hours * 3600)
        self.enabled = enabled

    def key(self, scope: str, conv_id: str) -> str:
        return f"{PREFIX}conv:{scope}:{conv_id}"

    def lock_key(self, conv_key: str) -> str:
        return conv_key.replace(f"{PREFIX}conv:", f"{PREFIX}lock:", 1)

    def past_key(self, conv_key: str) -> str:
        """The CLI sessions this conversation left behind (a changed history or a failed turn starts a new
        one): their transcripts go too when the conversation is forgotten with purge_files."""
        return conv_key.replace(f"{PREFIX}conv:", f"{PREFIX}superseded:", 1)

    def _supersede(self, pipe: Any, conv_key: str, old: str | None, new: str | None) -> None:
        if old and old != new:
            past = self.past_key(conv_key)
            pipe.rpush(past, old)
            pipe.ltrim(past, -MAX_SUPERSEDED, -1)
            pipe.expire(past, self.ttl)

    def plan(self, scope: str, conv_id: str, system: str, messages: list[dict[str, Any]], model: str,
             system_may_change: bool = False) -> Plan:
        """Resume the conversation's CLI session when the request extends what it holds. A client whose
        system prompt changes mid-conversation (Claude Code) extends it when the messages alone match:
        the resumed turn then runs with the new system prompt."""
        if not self.enabled:
            return Plan(None, None, False, messages, True, messages, system, model, scope)
        key = self.key(scope, conv_id)
        rec = self.r.hgetall(key)
        count = int(rec.get("count") or 0)
        same = 0 < count < len(messages) and (digest(system, messages[:count]) == rec.get("digest") or (
            system_may_change and rec.get("messages_digest") == digest("", messages[:count])))
        if rec.get("cli_session") and same:
            plan = Plan(key, rec["cli_session"], True, messages[count:], False, messages, system, model, scope)
            plan.account = rec.get("account") or None
            if rec.get("resume_at"):
                plan.resume_at = rec["resume_at"]
                plan.pending_calls = json.loads(rec.get("pending_calls") or "[]")
            if rec.get("warm") and rec.get("model") == model:  # a warm process, or one held at the tool calls
                plan.warm = rec["warm"]
            return plan
        plan = self.fresh(key, system, messages, model, scope)
        plan.account = rec.get("account") or None  # stay on the account even when the history changed
        return plan

    def fresh(self, key: str | None, system: str, messages: list[dict[str, Any]], model: str,
              scope: str = "") -> Plan:
        if not self.enabled or key is None:
            return Plan(None, None, False, messages, True, messages, system, model, scope)
        return Plan(key, str(uuid.uuid4()), False, messages, True, messages, system, model, scope)

    def commit(self, plan: Plan, answer: dict[str, Any], host: str, resume_at: str | None = None,
               warm: str | None = None) -> None:
        """Record that the CLI session now holds every message plus `answer`.

        `resume_at` marks an answer that called the client's tools: the next turn resumes the
        session cut back to that message and gives the results as real tool_result blocks.
        `warm` names the pool process that holds exactly this state ("host|process|turns"); a commit
        without it (a turn taken anywhere else) withdraws any earlier one."""
        if not plan.conv_key or not plan.cli_session:
            return
        held = plan.all_messages + [answer]
        now = time.time()
        old = self.r.hget(plan.conv_key, "cli_session")
        pipe = self.r.pipeline()
        self._supersede(pipe, plan.conv_key, old, plan.cli_session)
        pipe.hsetnx(plan.conv_key, "created", now)
        pipe.hset(plan.conv_key, mapping={"cli_session": plan.cli_session, "model": plan.model,
                                          "count": len(held), "digest": digest(plan.system, held),
                                          "messages_digest": digest("", held),
                                          "last_used": now, "host": host, "scope": plan.scope,
                                          "account": plan.account or ""})
        calls = [c["id"] for c in answer.get("tool_calls") or []]
        if resume_at and calls:
            pipe.hset(plan.conv_key, mapping={"resume_at": resume_at, "pending_calls": json.dumps(calls)})
        else:
            pipe.hdel(plan.conv_key, "resume_at", "pending_calls")
        if warm:
            pipe.hset(plan.conv_key, "warm", warm)
        else:
            pipe.hdel(plan.conv_key, "warm")
        pipe.hincrby(plan.conv_key, "turns", 1)
        pipe.expire(plan.conv_key, self.ttl)
        pipe.execute()

    def forget(self, plan: Plan) -> None:
        """After a failed or cancelled turn: the next request starts a clean session."""
        if plan.conv_key:
            old = self.r.hget(plan.conv_key, "cli_session")
            pipe = self.r.pipeline()
            for sid in dict.fromkeys([old, plan.cli_session]):  # the stored session and this turn's own
                self._supersede(pipe, plan.conv_key, sid, None)
            pipe.delete(plan.conv_key)
            pipe.execute()

    def count(self) -> int:
        return sum(1 for _ in self.r.scan_iter(match=f"{PREFIX}conv:*", count=500))

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
                        "account": rec.get("account") or None,
                        "expires_in": self.r.ttl(key)})
        out.sort(key=lambda c: c["last_used"], reverse=True)
        return out

    def delete(self, conv_id: str | None, scope: str | None = None) -> list[dict[str, Any]]:
        """Delete one conversation (by id) or all of them; returns what was deleted, each with the CLI
        sessions it left behind (`superseded`)."""
        victims = [c for c in self.list_all(scope) if conv_id is None or c["id"] == conv_id]
        for c in victims:
            key = self.key(c["scope"], c["id"])
            c["superseded"] = self.r.lrange(self.past_key(key), 0, -1)
            self.r.delete(key, self.past_key(key))
        return victims

    def take_superseded(self, scope: str | None) -> list[str]:
        """The sessions left behind by every conversation in `scope` (or everywhere), those already forgotten
        after a failed turn included; their lists are removed."""
        out: list[str] = []
        for key in list(self.r.scan_iter(match=f"{PREFIX}superseded:{scope + ':' if scope else ''}*", count=500)):
            out += self.r.lrange(key, 0, -1)
            self.r.delete(key)
        return out



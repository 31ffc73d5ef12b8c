"""Operator alerts: deduplicated across workers and hosts, delivered by a background sender.

`emit()` never blocks a request: it claims the alert's id with SET NX (so a threshold crossed on
five workers is announced once) and puts one delivery per webhook into a Redis sorted set scored by
when it is due. Every worker runs `run()`: it claims a due delivery (ZREM decides the one winner),
POSTs it and, on failure, puts it back with exponential backoff until `max_attempts`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from ..core.alerts import alert, body, plain, wanted
from .connection import PREFIX

log = logging.getLogger("relay.alerts")
OUTBOX = PREFIX + "alerts:outbox"
SEEN = PREFIX + "alerts:seen:"
SENT = PREFIX + "alerts:sent"
Post = Callable[[str, bytes, float], int]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A webhook's answer is its status: a redirect is not followed (it could lead the alert, and the
    secret in the URL's path, anywhere), it is reported as the 3xx it is."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def http_post(url: str, data: bytes, timeout: float) -> int:
    """POST JSON; the HTTP status (an exception for network errors). Redirects are never followed."""
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "claude-max-relay"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:  # operator-configured URL
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _where(url: str) -> str:
    """A webhook's URL without its path (Telegram and Slack URLs carry secrets there)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/…"


class Alerts:
    def __init__(self, r: Any, webhooks: list[dict[str, Any]], host: str, max_attempts: int = 10,
                 retry_base_s: float = 2.0, post: Post = http_post) -> None:
        self.r, self.webhooks, self.host = r, webhooks, host
        self.max_attempts, self.retry_base_s, self.post = max_attempts, retry_base_s, post
        self._stop = threading.Event()

    def emit(self, event: str, account: str | None, text: str, alert_id: str, ttl: int = 8 * 86400,
             details: dict[str, Any] | None = None) -> bool:
        """Queue an alert once per `alert_id` (across workers and hosts); True if this call queued it."""
        try:
            return self.offer(event, account, text, alert_id, ttl, details)
        except Exception as exc:  # an alert must never break the request that noticed it
            log.error("could not queue alert %s: %s", alert_id, exc)
            return False

    def offer(self, event: str, account: str | None, text: str, alert_id: str, ttl: int = 8 * 86400,
              details: dict[str, Any] | None = None) -> bool:
        """`emit`, raising when Redis cannot take it (the caller may offer it again later)."""
        if not self.r.set(SEEN + alert_id, self.host, nx=True, ex=max(1, ttl)):
            return False
        text = plain(text)  # it quotes the CLI, the model or Anthropic: no markup or link gets through
        details = {k: plain(v) if isinstance(v, str) else v for k, v in (details or {}).items()}
        log.warning("alert %s: %s", event, text)
        item = alert(event, account, text, alert_id, self.host, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     details)
        now = time.time()
        for i, hook in enumerate(self.webhooks):
            if wanted(hook, event):
                job = {"hook": i, "attempt": 0, "item": item}
                self.r.zadd(OUTBOX, {json.dumps(job, sort_keys=True): now})
        return True

    def deliver_due(self) -> int:
        """Deliver every due item this worker can claim; returns how many were delivered."""
        done = 0
        while True:
            due = self.r.zrangebyscore(OUTBOX, "-inf", time.time(), start=0, num=1)
            if not due:
                return done
            raw = due[0]
            if not self.r.zrem(OUTBOX, raw):
                continue  # another worker claimed it
            job = json.loads(raw)
            hook = self.webhooks[job["hook"]] if job["hook"] < len(self.webhooks) else None
            if hook is None:
                continue
            data = json.dumps(body(hook.get("format") or "json", job["item"], hook.get("chat_id"))).encode()
            status = 0
            try:
                status = self.post(hook["url"], data, float(hook.get("timeout_s") or 5))
                ok, why = 200 <= status < 300, f"HTTP {status}"
            except Exception as exc:  # network trouble: retried
                ok, why = False, type(exc).__name__
            if 300 <= status < 400:  # a misconfigured URL: retrying would not change the answer
                log.error("alert %s to %s dropped: the webhook answered %s, a redirect, which is not followed; "
                          "configure the URL it redirects to", job["item"]["id"], _where(hook["url"]), why)
                continue
            if ok:
                done += 1
                self.r.lpush(SENT, json.dumps({"id": job["item"]["id"], "hook": job["hook"], "at": time.time()}))
                self.r.ltrim(SENT, 0, 999)
                continue
            job["attempt"] += 1
            if job["attempt"] >= self.max_attempts:
                log.error("alert %s to %s dropped after %d attempts (%s)", job["item"]["id"], _where(hook["url"]),
                          job["attempt"], why)
                continue
            wait = min(self.retry_base_s * 2 ** (job["attempt"] - 1), 600.0)
            log.info("alert %s to %s failed (%s); retry in %.1f s", job["item"]["id"], _where(hook["url"]), why, wait)
            self.r.zadd(OUTBOX, {json.dumps(job, sort_keys=True): time.time() + wait})

    def forget(self, *alert_ids: str) -> None:
        """The next alert with one of these ids goes out again (its state changed back, e.g. an admin cleared it)."""
        if alert_ids:
            self.r.delete(*(SEEN + a for a in alert_ids))

    def pending(self) -> int:
        return int(self.r.zcard(OUTBOX))

    def run(self, tick: Callable[[], None] | None = None, interval: float = 0.5) -> None:
        """The background sender of this worker (`tick` runs first each round, e.g. recovery checks)."""
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    if tick:
                        tick()
                    if self.webhooks:
                        self.deliver_due()
                except Exception as exc:  # keep sending whatever Redis or the network do
                    log.warning("alert sender: %s", exc)
        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

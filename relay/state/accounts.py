"""The state of this host's Claude login, shared by its workers: subscription cooldown and broken login."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..core.metrics import AccountStatus
from ..errors import SubscriptionLimited
from .connection import PREFIX

log = logging.getLogger("relay.accounts")


class AccountState:
    def __init__(self, r: Any, host: str, login_recheck_s: float) -> None:
        self.r = r
        self.key = f"{PREFIX}account:{host}"
        self.login_recheck_s = login_recheck_s

    def get(self) -> dict[str, Any]:
        """`cooldown_until`/`cooldown_reason` while limited, `login_problem` while the login is broken."""
        raw = self.r.hgetall(self.key)
        now = time.time()
        out: dict[str, Any] = {}
        until = float(raw.get("cooldown_until") or 0)
        if until > now:
            out.update(cooldown_until=until, cooldown_reason=raw.get("cooldown_reason", ""))
        if float(raw.get("login_until") or 0) > now:
            out["login_problem"] = raw.get("login_problem", "")
        return out

    def status(self, name: str) -> AccountStatus:
        """This login as the metrics and the dashboard see it. Only a cooldown is known today: the
        window's utilization below the limit is not reported by the CLI, so it stays None."""
        st = self.get()
        until = st.get("cooldown_until")
        return AccountStatus(name=name, limited=bool(until or st.get("login_problem")), resets_at=until,
                             reason=str(st.get("cooldown_reason") or st.get("login_problem") or ""))

    def note_error(self, err: Exception) -> None:
        """Remember a subscription limit (cooldown until the reset) or a broken login, for every worker."""
        code = getattr(err, "code", None)
        now = time.time()
        if isinstance(err, SubscriptionLimited) and err.retry_after:
            self.r.hset(self.key, mapping={"cooldown_until": now + err.retry_after, "cooldown_reason": err.message})
            self.r.expire(self.key, int(err.retry_after) + 60)
            log.warning("subscription limit reached: no CLI runs for %.0f s", err.retry_after)
        elif code == "cli_login_required":
            self.r.hset(self.key, mapping={"login_until": now + self.login_recheck_s,
                                           "login_problem": getattr(err, "message", str(err))})
            self.r.expire(self.key, int(self.login_recheck_s) + 60)
            log.error("CLI login failed: refusing runs for %.0f s", self.login_recheck_s)

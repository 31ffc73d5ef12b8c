"""API keys: who is calling, what they may do. Keys are stored and compared as SHA-256 digests.

Sources: `auth.api_keys` in the config file (re-read when the file changes), `API_KEYS` in the
environment, and the `relay:keys` hash in Redis (shared by several hosts). A digest in the Redis set
`relay:keys:revoked` is refused everywhere within about a second, whatever the files say.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ..config import ConfigError, load_settings
from ..errors import Forbidden, Unauthorized
from .connection import PREFIX, TROUBLE

log = logging.getLogger("relay.auth")
KEYS_HASH = PREFIX + "keys"
REVOKED = PREFIX + "keys:revoked"
REFRESH_S = 1.0


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    return "sk-relay-" + secrets.token_urlsafe(32)


def _share(value: Any) -> float | None:
    """`window_share` as checked in relay/config.py; a bad one in Redis is a ValueError (the old keys stay)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"window_share must be a number above 0 and at most 1, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    rpm: int | None = None
    tokens_per_day: int | None = None
    max_concurrent: int | None = None
    models: tuple[str, ...] | None = None
    admin: bool = False
    window_share: float | None = None   # the most of any subscription window this key may use (0 < x <= 1)
    agent: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    @classmethod
    def parse(cls, item: Any) -> ApiKey:
        if isinstance(item, str):
            sha = digest(item)
            return cls(name="key-" + sha[:8], sha256=sha)
        sha = str(item.get("key_sha256") or digest(str(item["key"]))).lower()
        models = item.get("models")
        return cls(name=str(item["name"]), sha256=sha, rpm=item.get("rpm"), tokens_per_day=item.get("tokens_per_day"),
                   max_concurrent=item.get("max_concurrent"), models=tuple(models) if models else None,
                   admin=bool(item.get("admin")), agent=item.get("agent"),
                   window_share=_share(item.get("window_share")))

    @property
    def id(self) -> str:
        """A short public id of this key (a digest prefix): stable for the key, new for a re-issued name."""
        return self.sha256[:12]

    @property
    def scope(self) -> str:
        """Whose conversations, stored responses and agent folders these are."""
        return f"{self.name}~{self.id}"

    def allows_model(self, requested: str, cli_model: str) -> bool:
        if not self.models:
            return True
        wanted = {requested.lower(), cli_model.lower(), cli_model.lower().removesuffix("[1m]")}
        return any(m.lower() in wanted for m in self.models)


class KeyRing:
    """The current set of keys for this worker, refreshed from the file and Redis every second."""

    def __init__(self, settings_source: str, initial: list[Any], r: Any) -> None:
        self.source = Path(settings_source)
        self.r = r
        self._file_keys = [ApiKey.parse(k) for k in initial]
        self._mtime = self._stat()
        self._redis_keys: list[ApiKey] = []
        self._revoked: set[str] = set()
        self._checked = 0.0

    def _stat(self) -> float:
        try:
            return self.source.stat().st_mtime
        except OSError:
            return 0.0

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < REFRESH_S:
            return
        self._checked = now
        mtime = self._stat()
        if mtime != self._mtime:
            try:
                self._file_keys = [ApiKey.parse(k) for k in load_settings()["auth.api_keys"]]
                self._mtime = mtime
                log.info("auth: reloaded %d keys from %s", len(self._file_keys), self.source)
            except ConfigError as exc:  # keep the old keys; say why
                log.error("auth: %s (keeping the previous keys)", exc)
        if self.r is not None:
            try:
                raw = self.r.hgetall(KEYS_HASH)
                self._redis_keys = [ApiKey.parse(json.loads(v)) for v in raw.values()]
                self._revoked = set(self.r.smembers(REVOKED))
            except (*TROUBLE, ValueError, KeyError) as exc:
                log.warning("auth: cannot refresh keys from Redis: %s", exc)

    @property
    def keys(self) -> list[ApiKey]:
        self.refresh()
        return [k for k in self._file_keys + self._redis_keys if k.sha256 not in self._revoked]

    def identify(self, presented: str | None) -> ApiKey | None:
        """The key matching `presented`, compared in constant time against every known digest."""
        if not presented:
            return None
        want = digest(presented)
        found = None
        for k in self.keys:
            if hmac.compare_digest(want, k.sha256):
                found = found or k
        return found


def presented_key(headers: Any) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def require(ring: KeyRing, headers: Any, admin: bool = False) -> ApiKey:
    key = ring.identify(presented_key(headers))
    if key is None:
        missing = presented_key(headers) is None
        raise Unauthorized("You didn't provide an API key: send `Authorization: Bearer <key>`." if missing
                           else "Incorrect API key provided.", code=None if missing else "invalid_api_key")
    if admin and not key.admin:
        raise Forbidden("This route needs an admin API key.", code="admin_required")
    return key


# -- `python -m relay keys ...` ------------------------------------------------------------------------
def _config_path() -> Path:
    from ..config import ROOT

    return Path(os.environ.get("RELAY_CONFIG") or ROOT / "config.json")


def _redis() -> Any:
    url = os.environ.get("REDIS_URL") or load_settings()["redis_url"]
    if not url:
        sock = load_settings().path("var_dir") / "redis.sock"
        url = f"unix://{sock}" if sock.exists() else ""
    if not url:
        return None
    try:
        r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        r.ping()
        return r
    except redis.RedisError:
        return None


def _rewrite(mutate: Any) -> None:
    path = _config_path()
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    auth = data.setdefault("auth", {})
    auth["api_keys"] = mutate(list(auth.get("api_keys") or []))
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600  # it holds key digests: stay private
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def keys_add(name: str, admin: bool = False, rpm: int | None = None, tokens_per_day: int | None = None,
             max_concurrent: int | None = None, models: list[str] | None = None) -> str:
    key = new_key()
    entry: dict[str, Any] = {"name": name, "key_sha256": digest(key)}
    for k, v in (("rpm", rpm), ("tokens_per_day", tokens_per_day), ("max_concurrent", max_concurrent),
                 ("models", models)):
        if v:
            entry[k] = v
    if admin:
        entry["admin"] = True

    def add(keys: list[Any]) -> list[Any]:
        if any(isinstance(k, dict) and k.get("name") == name for k in keys):
            raise SystemExit(f"relay: a key named {name!r} exists already; revoke it first")
        return keys + [entry]
    _rewrite(add)
    r = _redis()
    if r is not None:
        r.hset(KEYS_HASH, name, json.dumps(entry))
        r.srem(REVOKED, entry["key_sha256"])
    return key


def keys_list() -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in load_settings()["auth.api_keys"]:
        k = ApiKey.parse(item)
        out[k.name] = {"name": k.name, "admin": k.admin, "rpm": k.rpm, "tokens_per_day": k.tokens_per_day,
                       "max_concurrent": k.max_concurrent, "models": k.models, "window_share": k.window_share,
                       "source": "config"}
    r = _redis()
    if r is not None:
        for v in r.hgetall(KEYS_HASH).values():
            k = ApiKey.parse(json.loads(v))
            out.setdefault(k.name, {"name": k.name, "admin": k.admin, "source": "redis"})
    return list(out.values())


def keys_revoke(name: str) -> bool:
    gone: list[str] = []

    def drop(keys: list[Any]) -> list[Any]:
        kept = []
        for k in keys:
            parsed = ApiKey.parse(k)
            if parsed.name == name:
                gone.append(parsed.sha256)
            else:
                kept.append(k)
        return kept
    _rewrite(drop)
    r = _redis()
    if r is not None:
        raw = r.hget(KEYS_HASH, name)
        if raw:
            gone.append(ApiKey.parse(json.loads(raw)).sha256)
            r.hdel(KEYS_HASH, name)
        if gone:
            r.sadd(REVOKED, *gone)
    return bool(gone)

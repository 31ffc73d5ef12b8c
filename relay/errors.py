"""The relay's error tree and the bodies it becomes at the HTTP boundary: OpenAI's shape by default,
Anthropic's (`{"type": "error", "error": {"type", "message"}}`) on the Messages API routes.

    RelayError (500 server_error)
    ├── BadRequest (400 invalid_request_error)          malformed body, bad field, n>1, ...
    │   ├── PayloadTooLarge (413)
    │   ├── UnsupportedMediaType (415)                   a body that is not JSON (no drive-by form posts)
    │   ├── MethodNotAllowed (405)                       agent credential proxy: anything but POST
    │   └── RequestTimeout (408)                         a body slower than client_body_timeout_s
    ├── Unauthorized (401) / Forbidden (403)
    ├── NotFound (404)                                   unknown route or model
    ├── Conflict (409)                                   conversation busy
    ├── RateLimited (429 requests/rate_limit_exceeded)   relay limits, upstream 429
    │   ├── SubscriptionLimited                         the subscription's own limit (cooldown)
    │   ├── QuotaExceeded (429 insufficient_quota)       tokens per day
    │   ├── RunawayStopped (429 runaway_conversation)    a conversation replaying or burning far too much
    │   └── WindowShareExceeded (429 window_share_exceeded)  a key past its window_share of a window
    ├── UpstreamError (502)                              upstream 5xx, CLI crash, garbage output
    │   └── PoolLost                                     the pool server died under the run (retried if it can be)
    ├── Unavailable (503)                                CLI missing, login expired, overloaded
    │   └── RedisUnavailable (503 redis_unavailable)     Redis unreachable (state/connection.py translates it)
    │       └── RedisFull (503 redis_full)               Redis at its maxmemory, refusing writes (noeviction)
    └── Timeout (504)                                    first-token / idle / total timeout
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def anthropic_status(self) -> int:
        """Anthropic's status for this error: the same, except Anthropic being overloaded is 529."""
        return 529 if self.code == "overloaded" else self.status

    def anthropic_body(self) -> dict[str, Any]:
        status = self.anthropic_status()
        kind = ANTHROPIC_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            secs = max(1, int(self.retry_after + 0.999))
            headers["Retry-After"] = str(secs)
            headers["retry-after-ms"] = str(max(1000, int(self.retry_after * 1000)))
        return headers


class BadRequest(RelayError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(BadRequest):
    status = 415
    code = "unsupported_media_type"


class MethodNotAllowed(BadRequest):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(BadRequest):
    status = 408
    code = "request_timeout"


class ClientStalled(RequestTimeout):
    """The client stopped reading a streamed answer; recorded (as a 499), never sent."""
    code = "client_stalled"


class Unauthorized(RelayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(RelayError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(RelayError):
    status = 404
    type = "invalid_request_error"


class Conflict(RelayError):
    status = 409
    type = "invalid_request_error"
    code = "conversation_busy"


class RateLimited(RelayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class SubscriptionLimited(RateLimited):
    """The Claude subscription itself is at its limit: every worker cools down until the reset."""


class QuotaExceeded(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


class RunawayStopped(RateLimited):
    """The runaway guard refuses this conversation until its cooldown ends; retrying sooner cannot help."""
    code = "runaway_conversation"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after, headers={"x-should-retry": "false"})


class WindowShareExceeded(RateLimited):
    """The API key used its `window_share` of a subscription window on every account; the window's reset frees it."""
    code = "window_share_exceeded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after, headers={"x-should-retry": "false"})


class UpstreamError(RelayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class PoolLost(UpstreamError):
    """The host's pool server died while it ran this CLI: nothing is wrong with the request itself."""
    code = "pool_server_lost"


class Unavailable(RelayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class RedisUnavailable(Unavailable):
    """Redis is unreachable (down, restarting, loading its file): a short outage, worth retrying."""
    code = "redis_unavailable"


class RedisFull(RedisUnavailable):
    """Redis is at its `maxmemory` and refuses writes (policy noeviction keeps the limits' counters, so
    it refuses instead of dropping them); the relay's own records wait like during an outage."""
    code = "redis_full"


class Timeout(RelayError):
    status = 504
    type = "server_error"
    code = "timeout"


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); other 4xx are
# invalid_request_error and other 5xx api_error.
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}


def not_found_route(path: str) -> NotFound:
    return NotFound(f"Unknown route: {path}", code="unknown_url")

"""The HTTP boundary (Flask only): request hooks, error handlers, rate limits and one module per route family.

Routes are thin: they parse, call the exchange or a store through the typed `Relay`, and format.
They never touch Redis or the file system themselves.
"""

from __future__ import annotations

from flask import Flask

from ..runtime import Relay
from . import hooks
from .chat import bp as chat_bp
from .messages import bp as messages_bp
from .messages import count_bp as messages_count_bp
from .meta import bp as meta_bp
from .ops import bp as ops_bp
from .ratelimit import setup_limiter
from .responses import bp as responses_bp

BLUEPRINTS = (meta_bp, chat_bp, responses_bp, messages_bp, messages_count_bp, ops_bp)
COMPLETION_BLUEPRINTS = (chat_bp, responses_bp, messages_bp)
COUNT_BLUEPRINTS = (messages_count_bp,)  # their own per-key limit: they never reach the CLI


def init_app(app: Flask, relay: Relay) -> None:
    """Attach the relay to the app: hooks first (they identify the caller), then routes and the limiter."""
    app.extensions["relay"] = relay
    hooks.install(app, relay)
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    relay.limiter = setup_limiter(app, relay, list(COMPLETION_BLUEPRINTS), list(COUNT_BLUEPRINTS))

"""Claude Max Relay: an OpenAI-compatible HTTP API answered by the Claude Code CLI.

Importing the package is cheap (no Flask, Redis or subprocess), so `gunicorn.conf.py` can read the
settings in the master process; `create_app()` builds the app in each worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["create_app"]
__version__ = "0.1.0"


def create_app(settings: Any = None) -> Flask:
    from .app import create_app as _create

    return _create(settings)

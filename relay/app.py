"""The app factory: builds the per-worker runtime, wires the HTTP layer onto it, starts background loops."""

from __future__ import annotations

import atexit
import logging

from flask import Flask

from .api import init_app
from .config import Settings, load_settings
from .health import OutageAlerts
from .housekeeping import start_janitor
from .runtime import Relay

log = logging.getLogger("relay")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    logging.basicConfig(level=settings["log_level"].upper(),
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    app = Flask("relay")
    app.config["MAX_CONTENT_LENGTH"] = int(settings["max_body_mb"] * 1024 * 1024)
    relay = Relay(settings)
    relay.start_background()
    start_janitor(relay)
    OutageAlerts(relay).run()
    atexit.register(relay.shutdown)
    init_app(app, relay)
    return app

"""The operators' routes: `/metrics` (Prometheus), the admin dashboard and the self-service usage page.

The two pages are static shells with no data in them; a same-origin script asks for a key, keeps it in
the tab's sessionStorage at most, and fetches `/dashboard/data` or `/me/data` with `Authorization:
Bearer`, so a key never appears in a URL or a log. Who may read what is decided in `hooks.guard_ops`.
Everything here is GET only and sent with a strict Content-Security-Policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from .. import health
from ..core.metrics import families
from ..errors import NotFound
from ..runtime import Relay
from . import views
from .common import current_relay

bp = Blueprint("ops", __name__, static_folder="static", static_url_path="/ops/static")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class RelayCollector(Collector):
    """Reads the shared counters from Redis and the live gauges at each scrape (nothing in worker memory)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        yield from families(self.relay.metrics.counters(), health.live(self.relay))


@bp.get("/metrics")
def metrics() -> Any:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(current_relay()))
    # the classic text format (0.0.4): every Prometheus version reads it
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


@bp.get("/dashboard")
def dashboard_page() -> Any:
    return bp.send_static_file("dashboard.html")


@bp.get("/dashboard/data")
def dashboard_data() -> Any:
    return jsonify(views.dashboard(current_relay()))


@bp.get("/me")
def own_page() -> Any:
    return bp.send_static_file("me.html")


@bp.get("/me/data")
def own_data() -> Any:
    key = getattr(g, "api_key", None)
    if key is None:
        raise NotFound("API keys are not enabled on this relay (auth.enabled is false), so there is no per-key "
                       "usage to show; the admin dashboard is at /dashboard.", code="auth_disabled")
    return jsonify(views.own_usage(current_relay(), key))


@bp.after_request
def _page_headers(resp: Response) -> Response:
    if request.path != "/metrics":
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-store"
    return resp

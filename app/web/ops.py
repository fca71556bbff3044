"""For operators and load balancers: /readyz and /metrics (Prometheus text format).

/metrics is for the monitoring system only: with ``PASSERELLE_METRICS_TOKEN`` set
it wants ``Authorization: Bearer <token>``; without, it answers loopback clients
only (a Prometheus agent on the same host) and 404 to everyone else.
"""

from __future__ import annotations

import hmac
import ipaddress
import time

from flask import Blueprint, Flask, Response, abort, g, jsonify, request
from flask.typing import ResponseReturnValue

from app.infra import instruments
from app.ops import metrics
from app.ops.readiness import Readiness
from app.web import services
from app.web.errors import problem

bp = Blueprint("ops", __name__)


def init(app: Flask) -> None:
    app.extensions["passerelle.readiness"] = Readiness(app.extensions["passerelle"])
    app.register_blueprint(bp)

    @app.after_request
    def _count(response: Response) -> Response:
        started = g.get("request_started")  # set by app.infra.logs for every request
        if started is not None:
            instruments.observe_request(request.blueprint, request.method, response.status_code,
                                    time.perf_counter() - started)
        return response


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    from flask import current_app

    checks = current_app.extensions["passerelle.readiness"].checks()
    body = {c.name: ("ok" if c.ok else c.detail or "failing") for c in checks}
    if all(c.ok for c in checks if c.required):
        return jsonify(status="ready" if all(c.ok for c in checks) else "degraded",
                       checks=body)
    response = problem(503, "Service Unavailable", "not ready: " + ", ".join(
        c.name for c in checks if not c.ok and c.required))
    payload = response.get_json()
    payload["checks"] = body
    response.set_data(jsonify(payload).get_data())
    response.headers["Retry-After"] = "5"
    return response


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    token = services().settings.metrics_token
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            abort(401)
    elif not _loopback(request.remote_addr):
        abort(404)
    body, content_type = metrics.exposition(services())
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


def _loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False

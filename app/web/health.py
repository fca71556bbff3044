"""Liveness for load balancers (200 when the database answers), push health for
monitoring (APNs reachable with every certificate), and the site icon."""

from __future__ import annotations

import io
from functools import cache

from flask import Blueprint, Response, jsonify
from flask.typing import ResponseReturnValue
from PIL import Image
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from app.infra.models import AppleIdentity
from app.web import services
from app.web.errors import problem

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    try:
        with services().db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return problem(503, "Service Unavailable", "database unreachable")
    return jsonify(status="ok", database="ok")


@bp.get("/healthz/pushes")
def pushes_health() -> ResponseReturnValue:
    """For monitoring, not load balancers: 503 while the push workers cannot connect to
    APNs with some certificate (refused, or APNs unreachable: see `passerelle certs
    check`), 200 otherwise. Counts only: pass types are not for the public."""
    try:
        with services().db.engine.connect() as conn:
            failing = conn.execute(select(func.count(AppleIdentity.id)).where(
                AppleIdentity.apns_failing_since.is_not(None))).scalar_one()
    except SQLAlchemyError:
        return problem(503, "Service Unavailable", "database unreachable")
    if failing:
        return problem(503, "Service Unavailable",
                       f"APNs connections fail for {failing} certificate(s); pushes are "
                       f"paused and retried (passerelle certs check)")
    return jsonify(status="ok", apns="ok")


@cache
def _icon() -> bytes:
    """A plain 32x32 square in Passerelle's ink colour, made once."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (58, 28, 64)).save(out, format="PNG")
    return out.getvalue()


@bp.get("/favicon.ico")
def favicon() -> Response:
    # Every browser asks for it; a 404 here is noise in logs and consoles.
    return Response(_icon(), mimetype="image/png",
                    headers={"Cache-Control": "public, max-age=604800"})

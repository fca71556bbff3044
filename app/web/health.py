"""Liveness for load balancers (200 when the database answers), and the site icon."""

from __future__ import annotations

import io
from functools import cache

from flask import Blueprint, Response, jsonify
from PIL import Image
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.web import services
from app.web.errors import problem

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    try:
        with services().db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return problem(503, "Service Unavailable", "database unreachable")
    return jsonify(status="ok", database="ok")


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

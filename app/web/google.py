"""Google Wallet endpoints: public images for classes, save/delete callbacks, robots.txt."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, abort, request, send_file
from flask.typing import ResponseReturnValue

from app.infra.models import utcnow
from app.tracking.google_callbacks import CallbackError, verify_callback
from app.updates.google_wallet import apply_callback, issuer_configured
from app.wallet.images import ROLES
from app.wallet.template import TemplateError
from app.web import services
from app.web.errors import problem

bp = Blueprint("google", __name__)
log = logging.getLogger(__name__)

ROBOTS = """User-agent: Googlebot
Allow: /google/
Disallow: /

User-agent: *
Disallow: /
"""


@bp.get("/robots.txt")
def robots() -> Response:
    # Google fetches callbacks and images as Googlebot; nothing else is for crawlers.
    return Response(ROBOTS, mimetype="text/plain")


@bp.get("/google/images/<template>/<role>.png")
def image(template: str, role: str) -> ResponseReturnValue:
    """Template artwork Google fetches for classes and objects (no personal data)."""
    if role not in ROLES:
        abort(404)
    try:
        folder = services().templates.get(template).path
    except TemplateError:
        abort(404)
    path = folder / "images" / f"{role}.png"
    if not path.is_file():
        abort(404)
    response = send_file(path, mimetype="image/png", max_age=86400)
    return response


@bp.post("/google/callback/<issuer_id>")
def callback(issuer_id: str) -> ResponseReturnValue:

    received_at = utcnow()  # the events' time (Google's expTimeMillis is ~1 h ahead)
    if not issuer_id.isdigit() or len(issuer_id) > 20:
        return problem(404, "Not Found", "unknown issuer")
    body = request.get_data(cache=False)
    if len(body) > 64 * 1024:
        return problem(413, "Payload Too Large", "callback body too large")
    svc = services()
    with svc.db.session() as session:
        known = issuer_configured(session, issuer_id)
    if not known:
        # Nothing is verified or stored for an issuer no tenant has (any more).
        log.warning("refused a Google callback for unconfigured issuer %s", issuer_id)
        return problem(404, "Not Found", "unknown issuer")
    try:
        root_keys = svc.google_root_keys.keys()
    except CallbackError as exc:
        # Not the sender's fault: answer 503 so that Google delivers it again later.
        log.error("cannot verify Google callbacks: %s", exc)
        return problem(503, "Service Unavailable", "callback keys unavailable, retry later")
    try:
        message = verify_callback(body, issuer_id, root_keys)
    except CallbackError as exc:
        log.warning("refused a Google callback for issuer %s: %s", issuer_id, exc)
        return problem(400, "Bad Request", str(exc))
    if message.event_type not in ("save", "del"):
        log.info("Google callback %r for %s acknowledged, not acted on",
                 message.event_type[:40], message.object_id)
    with svc.db.transaction() as session:
        apply_callback(session, message, received_at)  # durable before we answer
    return Response(status=200)

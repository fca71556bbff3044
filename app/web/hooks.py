"""Inbound webhook endpoint: ``POST /hooks/<tenant>/<hook>`` (app/webhooks_in.py does the work).

Answers, all JSON:

- 200 ``{"status": "applied" | "ignored" | "duplicate", "event_id"}``: stored;
  the sender must not send it again (a duplicate is a success too, so a
  sender that retries after a lost answer stops);
- 422 problem, with ``event_status: "failed"`` and ``event_id``: stored, but it could
  not be applied (malformed, unknown customer...). Senders do not retry a 4xx,
  which is right: the same bytes would fail again. Operators see it with
  ``passerelle hooks events --status failed``;
- 401 problem: wrong or missing secret or signature (not stored);
- 404 problem: no such tenant or hook; 413: body over 256 KiB; 429: rate limit.
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, g, jsonify, request
from sqlalchemy import select

from app.infra.models import InboundHook, Tenant
from app.web import services
from app.web.errors import problem
from app.web.limits import limiter
from app.webhooks import inbound as webhooks_in

bp = Blueprint("hooks", __name__)
log = logging.getLogger(__name__)

#: Generous for a loyalty engine's nightly batch (e.g. expiring-points notices),
#: counted per hook and client address so that strangers cannot use up the sender's budget.
HOOK_LIMIT = "1200 per minute"

try:  # machine endpoint: authenticated by its secret, never by a browser session
    from app.web.csrf import csrf
except ImportError:  # CSRF protection not installed in this build
    pass
else:
    csrf.exempt(bp)


def _limit_key() -> str:
    args = request.view_args or {}
    return f"hook:{args.get('tenant_slug')}/{args.get('hook_slug')}:{request.remote_addr}"


@bp.errorhandler(429)
def _too_many(_exc: Exception) -> Response:
    return problem(429, "Too Many Requests", "rate limit exceeded for this hook; retry later")


@bp.post("/hooks/<tenant_slug>/<hook_slug>")
@limiter.limit(lambda: HOOK_LIMIT, key_func=_limit_key)
def receive(tenant_slug: str, hook_slug: str) -> Response:
    if (request.content_length or 0) > webhooks_in.MAX_BODY:
        return problem(413, "Content Too Large", "webhook bodies are limited to 256 KiB")
    body = request.stream.read(webhooks_in.MAX_BODY + 1)
    if len(body) > webhooks_in.MAX_BODY:
        return problem(413, "Content Too Large", "webhook bodies are limited to 256 KiB")
    svc = services()
    with svc.db.session() as session:
        found = session.execute(
            select(InboundHook.id, InboundHook.tenant_id).join(
                Tenant, Tenant.id == InboundHook.tenant_id)
            .where(Tenant.slug == tenant_slug, InboundHook.slug == hook_slug)).first()
    if found is None:
        return problem(404, "Not Found", "no such webhook endpoint")
    g.hook_id = found.id
    try:
        with svc.db.transaction(found.tenant_id) as session:
            hook = session.get(InboundHook, found.id)
            assert hook is not None
            received = webhooks_in.receive(session, svc, hook, request.headers, body)
            status, event_id = received.status, received.event.event_id
            error = received.event.error
    except webhooks_in.InboundAuthError as exc:
        log.warning("inbound hook %s: refused a request (%s)", found.id, exc)
        return problem(401, "Unauthorized", "missing or wrong secret or signature")
    if status == "failed":
        # Problem JSON's own "status" is the HTTP code, hence "event_status".
        response = problem(422, "Unprocessable Event", error or "the event could not be applied")
        response.set_data(json.dumps({**json.loads(response.get_data()),
                                      "event_status": "failed", "event_id": event_id}))
        return response
    return jsonify({"status": status, "event_id": event_id})

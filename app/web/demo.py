"""The demo page (demo mode only): demo customers with a download button per card.

Tokenized personal links replace it for real customers; here the card's
serial number (random, no personal data) identifies the download.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, abort, redirect, render_template
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from app.cards import cards
from app.infra.models import Card, Customer, Program, Tenant
from app.tenants.demo import DEMO_TENANT
from app.tracking import install_state
from app.updates.google_client import GoogleApiError
from app.updates.google_wallet import GoogleNotConfigured, GoogleUnavailable, save_url
from app.web import services

bp = Blueprint("demo", __name__, url_prefix="/demo")
log = logging.getLogger(__name__)

PKPASS_MIMETYPE = "application/vnd.apple.pkpass"


@bp.before_request
def _demo_only() -> None:
    if not services().settings.demo:
        abort(404)


def _demo_tenant_id() -> int:
    with services().db.session() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.slug == DEMO_TENANT))
    if tenant_id is None:
        abort(404, "The demo has not been seeded: run `passerelle demo`.")
    return tenant_id


@bp.get("/")
def index() -> ResponseReturnValue:
    tenant_id = _demo_tenant_id()
    with services().db.tenant_session(tenant_id) as session:
        programs = session.scalars(select(Program).order_by(Program.id)).all()
        customers = session.scalars(select(Customer).order_by(Customer.external_id)).all()
        card_rows = session.scalars(select(Card)).all()
        by_key = {(c.program_id, c.customer_id): c.serial_number for c in card_rows}
        tenant = session.get(Tenant, tenant_id)
        google = bool(tenant and tenant.google_issuer_id and tenant.google_service_account_file)
        return render_template("demo.html", tenant=tenant, programs=programs,
                               customers=customers, serials=by_key, google=google)


@bp.get("/cards/<serial>/google")
def google_save(serial: str) -> ResponseReturnValue:
    """Upsert the Google Wallet object, then send the browser to Google's save page."""

    tenant_id = _demo_tenant_id()
    svc = services()
    # No transaction waits on Google's API: committed before each call (app.infra.db.before_outbound).
    with svc.db.tenant_session(tenant_id, commit_before_calls=True) as session:
        card = session.scalar(select(Card).where(Card.serial_number == serial))
        if card is None:
            abort(404, "No such card.")
        try:
            url = save_url(session, svc, card)
        except GoogleNotConfigured:
            abort(404, "Google Wallet is not set up for this brand yet.")
        except GoogleUnavailable:
            abort(503, "Google Wallet cannot be reached right now. Please try again in a minute.")
        except GoogleApiError as exc:  # our setup is wrong (403, 400): operators see why
            log.error("Google Wallet refused card %s: %s", serial, exc)
            abort(502, "Google Wallet refused this card. The brand has been told.")
        install_state.record(session, card, "google", "downloaded")
        session.commit()
    return redirect(url, code=303)


@bp.get("/cards/<serial>.pkpass")
def download(serial: str) -> Response:
    tenant_id = _demo_tenant_id()
    svc = services()
    with svc.db.tenant_session(tenant_id) as session:
        card = session.scalar(select(Card).where(Card.serial_number == serial))
        if card is None:
            abort(404, "No such card.")
        data = cards.build_pkpass(session, card, svc)
        install_state.record(session, card, "apple", "downloaded")
        last_modified = card.last_modified
        session.commit()
    response = Response(data, mimetype=PKPASS_MIMETYPE)
    response.headers["Content-Disposition"] = f'attachment; filename="{serial}.pkpass"'
    response.headers["Cache-Control"] = "no-store"
    response.last_modified = last_modified
    return response

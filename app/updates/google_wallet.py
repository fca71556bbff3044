"""Google Wallet for a card: class and object upserts, save links, updates, callbacks.

Domain code over app/google/objects.py (rendering) and app/google/client.py
(REST). REST first, then a skinny save JWT: the object exists before the
customer saves it, so later PATCHes reach it, and links stay short.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.cards import cards
from app.infra.db import before_outbound
from app.infra.models import (
    Card,
    GoogleCallbackNonce,
    GoogleClass,
    GoogleNotification,
    GoogleObject,
    InstallEvent,
    Program,
    Tenant,
    utcnow,
)
from app.tracking import install_state
from app.updates.google_client import GoogleApiError
from app.wallet import google_objects as objects

if TYPE_CHECKING:
    from app.services import Services
    from app.tracking.google_callbacks import CallbackMessage
    from app.updates.google_client import GoogleApiError, GoogleWalletClient

log = logging.getLogger(__name__)

SAVE_URL = "https://pay.google.com/gp/v/save/"
MAX_SAFE_JWT = 1800  # Google's "maximum safe length" for a save JWT
NOTIFY_BUDGET = 3  # TEXT_AND_NOTIFY messages per object per 24 hours
NOTIFY_WINDOW = dt.timedelta(hours=24)


class GoogleNotConfigured(LookupError):
    """The tenant has no Google issuer or service account (message says which)."""


class GoogleUnavailable(RuntimeError):
    """Google's API cannot be reached and no fallback link fits: ask to retry later."""


def service_account_info(services: Services, tenant: Tenant) -> dict[str, Any]:
    if not tenant.google_issuer_id or not tenant.google_service_account_file:
        raise GoogleNotConfigured(f"tenant {tenant.slug!r} has no Google Wallet issuer id or "
                                  f"service account (see certs.example/README.md)")
    path = Path(tenant.google_service_account_file)
    if not path.is_absolute():
        path = services.settings.certs_path / path
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise GoogleNotConfigured(f"{path}: cannot read the service-account JSON ({exc})") from None


def _context(services: Services, program: Program) -> objects.ClassContext:
    tenant = program.tenant
    return objects.ClassContext(str(tenant.google_issuer_id), tenant.slug, tenant.name,
                                program.slug, program.name, services.settings.public_url)


def ensure_class(session: Session, services: Services, client: GoogleWalletClient,
                 program: Program) -> str:
    """Create the program's class once; patch it only when its rendering changed."""
    template = services.templates.get(program.template)
    body = objects.render_class(template, _context(services, program))
    digest = objects.content_hash(body)
    row = session.scalar(select(GoogleClass).where(GoogleClass.program_id == program.id))
    if row is not None and row.content_hash == digest:
        return row.class_id
    resource = objects.resources(template)[0]
    _, created = client.ensure(resource, body)
    if not created:
        client.patch(resource, body["id"], body)  # carries reviewStatus UNDER_REVIEW
    if row is None:
        row = GoogleClass(tenant_id=program.tenant_id, program_id=program.id, class_id=body["id"],
                          content_hash=digest)
        session.add(row)
    row.content_hash, row.synced_at = digest, utcnow()
    session.flush()
    return row.class_id


def render_object(services: Services, card: Card) -> tuple[dict[str, Any], str]:
    template = services.templates.get(card.program.template)
    tenant = card.program.tenant
    card_input = cards.card_input(card, services)
    expired = card.expires_at is not None and card.expires_at < utcnow()
    class_ref = objects.class_id(str(tenant.google_issuer_id), tenant.slug, card.program.slug)
    body = objects.render_object(template, card_input, issuer_id=str(tenant.google_issuer_id),
                                 class_ref=class_ref, public_url=services.settings.public_url,
                                 expired=expired)
    return body, objects.resources(template)[1]


def sync_object(session: Session, services: Services, client: GoogleWalletClient,
                card: Card) -> GoogleObject:
    """Insert or patch the card's object if its rendering changed; notify within budget.

    The update and the lock-screen message are two steps, each recorded as soon as it
    lands (the caller commits, also when a later step raises): the content hash right
    after the PATCH, the notified values after the message. So a job retried because
    the message failed (Google unreachable) sends the message, not the PATCH again.
    """
    body, resource = render_object(services, card)
    digest = objects.content_hash(body)
    row = session.scalar(select(GoogleObject).where(GoogleObject.card_id == card.id))
    if row is None:
        row = GoogleObject(tenant_id=card.tenant_id, card_id=card.id, object_id=body["id"],
                           notified_values={})
        session.add(row)
        session.flush()
    values = _notify_values(services, card)
    if row.content_hash != digest:
        first_sync = row.synced_at is None
        if not (first_sync and _inserted(session, client, card, resource, body)):
            client.patch(resource, body["id"], objects.patch_body(body))
        row.content_hash, row.synced_at = digest, utcnow()
        if first_sync:  # a new object, or one we lost track of, is brought in silently
            row.notified_values = values
        session.flush()
    if values != (row.notified_values or {}):
        _notify_if_due(session, services, client, card, row, resource)
        row.notified_values = values
        session.flush()
    return row


def _inserted(session: Session, client: GoogleWalletClient, card: Card, resource: str,
              body: dict[str, Any]) -> bool:
    """Insert the object unless Google already has it (e.g. our database was restored).

    An existing object saying ``hasUsers`` proves an install we may have no
    callback for, so it goes into the install log.
    """

    existing = client.get(resource, body["id"])
    if existing is not None:
        if existing.get("hasUsers"):
            install_state.record(session, card, "google", "has_users")
        return False
    try:
        client.insert(resource, body)
    except GoogleApiError as exc:
        if exc.status != 409:  # 409: a concurrent click inserted it first
            raise
        return False
    return True


def _notify_values(services: Services, card: Card) -> dict[str, Any]:
    template = services.templates.get(card.program.template)
    values = cards.card_input(card, services).values
    return {name: str(values.get(name)) for name in template.google.get("notify", [])}


def _notify_if_due(session: Session, services: Services, client: GoogleWalletClient,
                   card: Card, row: GoogleObject, resource: str) -> bool:
    """Add a TEXT_AND_NOTIFY message when the holder's notify values changed and the
    object has had fewer than NOTIFY_BUDGET in NOTIFY_WINDOW; True if one was sent.

    Over the budget the data still updates, silently. Google keeps its own count: when
    it refuses although ours said there was budget left (a restored database, a reply
    lost after Google counted the message), the message is dropped -- the object is
    already updated, and retrying could only be refused again -- and our count is
    brought up to the budget from now, so no notification is attempted for this object
    until that has aged out (Google does not say when its oldest one does).
    """

    now = utcnow()
    sent = session.scalar(select(func.count(GoogleNotification.id)).where(
        GoogleNotification.google_object_id == row.id,
        GoogleNotification.sent_at > now - NOTIFY_WINDOW)) or 0
    if sent >= NOTIFY_BUDGET:
        return False
    template = services.templates.get(card.program.template)
    text = objects.notify_text(template, cards.card_input(card, services))
    if not text:
        return False
    message = objects.message(f"n{int(time.time() * 1000)}{secrets.token_hex(2)}",
                              card.program.name, text, notify=True)
    try:
        client.add_message(resource, row.object_id, message)
    except GoogleApiError as exc:
        if not notification_limit_reached(exc):
            raise
        log.info("Google's notification limit for object %s was reached before ours "
                 "(%d of %d counted here): message dropped", row.object_id, sent, NOTIFY_BUDGET)
        session.add_all(GoogleNotification(tenant_id=card.tenant_id, google_object_id=row.id,
                                           sent_at=now) for _ in range(NOTIFY_BUDGET - sent))
        return False
    session.add(GoogleNotification(tenant_id=card.tenant_id, google_object_id=row.id,
                                   sent_at=now))
    return True


def notification_limit_reached(exc: GoogleApiError) -> bool:
    """Google's answer to a TEXT_AND_NOTIFY message over the pass's limit.

    Observed: 403, ``errors[0].reason`` ``quotaExceeded`` (domain ``walletobjects``),
    "Quota exceeded for issuer <id> when adding TEXT_AND_NOTIFY message to ..."; Google's
    docs name it a QuotaExceededException. A 429 saying the same is read the same way;
    a plain 429 rate limit (rateLimitExceeded) is not this, and stays retryable.
    """
    if exc.status not in (403, 429):
        return False
    return "quotaExceeded" in exc.reasons or "TEXT_AND_NOTIFY" in exc.message


def sign_save_jwt(info: dict[str, Any], payload: dict[str, Any], origins: list[str]) -> str:
    """RS256 with the service-account key; Google's claims for a save link."""
    claims = {"iss": info["client_email"], "aud": "google", "typ": "savetowallet",
              "iat": int(time.time()), "origins": origins, "payload": payload}
    return jwt.encode(claims, info["private_key"], algorithm="RS256",
                      headers={"kid": info.get("private_key_id", "")})


def save_url(session: Session, services: Services, card: Card,
             origins: list[str] | None = None) -> str:
    """Upsert over REST, then a skinny JWT {id, classId}. Built per click, never in bulk."""

    tenant = card.program.tenant
    info = service_account_info(services, tenant)
    template = services.templates.get(card.program.template)
    try:
        # The entry point may ask that no transaction waits on Google (whose client
        # sleeps between retries): then each call commits first (app.infra.db.before_outbound).
        client = before_outbound(session, services.google_client(tenant))
        class_ref = ensure_class(session, services, client, card.program)
        row = sync_object(session, services, client, card)
        token = sign_save_jwt(info, objects.save_payload(
            template, {"id": row.object_id, "classId": class_ref}), origins or [])
    except GoogleApiError as exc:
        if exc.status is not None and exc.status < 500 and exc.status != 429:
            raise  # our request is wrong or access is missing: not a reason to fall back
        body, _ = render_object(services, card)
        token = sign_save_jwt(info, objects.save_payload(template, body), origins or [])
        if len(token) > MAX_SAFE_JWT:
            raise GoogleUnavailable("Google Wallet cannot be reached right now") from exc
    return SAVE_URL + token


def issuer_configured(session: Session, issuer_id: str) -> bool:
    """Whether some tenant uses this Google issuer id (callbacks for others are refused)."""
    return session.scalar(select(Tenant.id).where(Tenant.google_issuer_id == issuer_id)
                          .limit(1)) is not None


def apply_callback(session: Session, message: CallbackMessage,
                   received_at: dt.datetime | None = None) -> bool:
    """Record a verified save/del callback once; True if the install state changed.
    Flushes; the caller commits (which releases the object's row lock).

    The nonce's primary key makes a replay a no-op. Google's order is the order of
    ``expTimeMillis`` (the time Google sent the message plus a fixed validity of about
    an hour), so a late 'save' after a 'del' does not bring the card back; at the same
    expTimeMillis the 'del' wins, whatever arrived first. The event's *time* is when
    Passerelle received it (``received_at``), never expTimeMillis, which lies in the
    future (see :func:`_callback_event_time` for how the two fit together).
    """
    received_at = received_at or utcnow()
    try:
        with session.begin_nested():
            session.add(GoogleCallbackNonce(nonce=message.nonce))
    except IntegrityError:
        return False
    # Locked until commit: callbacks for one object are applied one at a time, so the
    # order check below and the event time read the outcome of the previous one.
    row = session.scalar(select(GoogleObject).where(GoogleObject.object_id == message.object_id)
                         .with_for_update().execution_options(populate_existing=True))
    if row is None or message.event_type not in ("save", "del"):
        session.flush()
        return False  # not ours, or an event type we only acknowledge
    card = session.get(Card, row.card_id)
    assert card is not None  # the object's foreign key cascades with the card
    saved = message.event_type == "save"
    exp = message.exp_time_millis
    install_state.record(session, card, "google", "saved" if saved else "deleted",
                         occurred_at=_callback_event_time(session, card, row, exp, received_at))
    changed = False
    if exp > row.saved_state_at_ms or (exp == row.saved_state_at_ms and not saved):
        changed = saved != row.saved
        row.saved, row.saved_state_at_ms = saved, exp
    session.flush()
    return changed


_TICK = dt.timedelta(microseconds=1)  # the finest step both databases keep


def _callback_event_time(session: Session, card: Card, row: GoogleObject, exp_ms: int,
                         received_at: dt.datetime) -> dt.datetime:
    """The install-log time of a save/del callback: when it was received, adjusted so
    that the log's time order is Google's expTimeMillis order.

    The install state (app/install_state.py) is derived from the log by time, so the
    log must order a card's callbacks as Google sent them, while their times must be
    real ones (timelines, funnels). Callbacks can arrive out of order, so:

    - a callback newer (by expTimeMillis) than every one applied so far is dated when
      received -- or a microsecond after the newest logged callback if a clock (another
      worker's, or an event logged before this rule, dated at its expiry) is ahead;
    - one with the same expTimeMillis as the newest gets that callback's time: a tie,
      which the derivation resolves for the removal, as the ``saved`` flag does;
    - an older one, arriving late, is dated a microsecond before the newest logged
      callback (which superseded it, so it did happen before it), and never after its
      own receipt.

    By induction the newest callback by expTimeMillis is always the latest in the log,
    so the state is the same whatever order they came in, and a rebuild from the log
    agrees. Nothing is dated after its receipt, except a callback that follows one
    logged before this rule (dated at its expiry, up to an hour ahead): order wins
    there, for that hour.
    """
    latest = session.scalar(select(func.max(InstallEvent.occurred_at)).where(
        InstallEvent.card_id == card.id, InstallEvent.platform == "google",
        InstallEvent.kind.in_(("saved", "deleted"))))
    if latest is None:
        return received_at
    if exp_ms > row.saved_state_at_ms:
        return max(received_at, latest + _TICK)
    if exp_ms == row.saved_state_at_ms:
        return latest
    return min(received_at, latest - _TICK)

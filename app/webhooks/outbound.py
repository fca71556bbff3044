"""Outbound webhooks: events about cards and customers, signed and delivered with retries.

Why an outbox. An event is a ``WebhookDelivery`` row (one per matching
subscription) written in the transaction that made the change, so an event
exists if and only if its change was committed. After the outermost commit its
id goes to the job queue (``app.infra.outbox.queue_after_commit`` with
``WEBHOOK_DISPATCH_KEY``, like every outbox); if the queue or the worker is
down, the per-minute sweeper finds the row.

Signature (documented for receivers in docs/webhooks.md)::

    Passerelle-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

The timestamp is inside the signed string, so a captured request cannot be
replayed later with a fresh timestamp, and receivers refuse timestamps
outside a tolerance window (5 minutes by default). The event id stays the
same across retries and redeliveries, so receivers can drop repeats.

Retries: every answer other than 2xx, and every network error or timeout, is
retried with capped exponential backoff and jitter until 24 hours after the
event was created; then the delivery is given up. ``410 Gone`` means the
receiver asks us to stop (as in the Standard Webhooks recommendation): the
subscription is disabled and the delivery ends. Redirects are not followed
(a webhook URL that moves must be changed deliberately).

Customer events are noted while the transaction runs and written just before
it commits (``before_commit``; the listeners are installed by :func:`install`, called
when Services is built): ``customer.updated`` fires only when a data
field really changed value (SQLAlchemy attribute history, compared by value;
``attributes`` compared with the copy loaded from the database), whatever
path changed it, and several changes of one customer in one transaction make
one event. ``consent.changed`` comes from :func:`app.customers.customers.record_consent`,
which only records a consent that differs from the current one. When the
tenant has no subscription for an event type, noting it is a dictionary
lookup: subscriptions are read once per transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import requests
from sqlalchemy import event, inspect, or_, select
from sqlalchemy.orm import Session

from app.infra import events, netguard, outbox
from app.infra.db import TENANT_KEY, WEBHOOK_DISPATCH_KEY
from app.infra.models import (
    Card,
    Consent,
    Customer,
    Tenant,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from app.tracking.install_state import wallet_status

if TYPE_CHECKING:
    from app.infra.db import Database
    from app.services import Services

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "card.downloaded",
    "card.installed",
    "card.removed",
    "customer.enrolled",
    "customer.updated",
    "consent.changed",
)
SIGNATURE_HEADER = "Passerelle-Signature"
USER_AGENT = "Passerelle-Webhooks/1"
TOLERANCE = 300  # seconds a receiver accepts between our timestamp and its clock
LEASE = dt.timedelta(minutes=2)
GIVE_UP_AFTER = dt.timedelta(hours=24)
FIRST_RETRY = dt.timedelta(seconds=10)
MAX_RETRY = dt.timedelta(hours=1)
TIMEOUT = (5.0, 10.0)  # connect, read (seconds)
#: Customer fields whose change is a ``customer.updated`` (not updated_at, crm_fetched_at).
DATA_FIELDS = ("external_id", "email", "first_name", "last_name", "locale", "phone", "birthday",
               "attributes")

_SUBSCRIPTIONS = "passerelle.webhook_subscriptions"  # {tenant_id: [(id, event types)]}
_PENDING = "passerelle.webhook_pending"  # {(customer key): PendingCustomer}
_TENANT_SLUGS = "passerelle.webhook_tenant_slugs"
_LOADED_ATTRIBUTES = "passerelle.loaded_attributes"  # InstanceState.info key


class SignatureError(ValueError):
    """A signature header that does not verify (the message says why, never the secret)."""


# -- signing --------------------------------------------------------------------------

def body_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent: compact, key-sorted JSON, UTF-8 (the same on every attempt)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False).encode("utf-8")


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<hex>``: Stripe's layout, so receivers can reuse known code."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, tolerance: int = TOLERANCE,
           now: float | None = None) -> bool:
    """True if ``header`` signs ``body`` with ``secret`` and its time is within tolerance."""
    try:
        check_signature(secret, header, body, tolerance, now)
    except SignatureError:
        return False
    return True


def check_signature(secret: str, header: str, body: bytes, tolerance: int = TOLERANCE,
                    now: float | None = None) -> int:
    """Like :func:`verify`, but raise :class:`SignatureError` saying why; return the time."""
    parts = [item.split("=", 1) for item in header.split(",") if "=" in item]
    timestamps = [value.strip() for key, value in parts if key.strip() == "t"]
    candidates = [value.strip() for key, value in parts if key.strip() == "v1"]
    if len(timestamps) != 1 or not timestamps[0].isdigit() or not candidates:
        raise SignatureError("malformed signature header (expected t=<unix>,v1=<hex>)")
    timestamp = int(timestamps[0])
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError("timestamp outside the tolerance window (replay or clock skew)")
    expected = _mac(secret, timestamp, body)
    # Every candidate is compared (constant time each) so that timing says nothing.
    if not any([hmac.compare_digest(expected, candidate) for candidate in candidates]):
        raise SignatureError("signature does not match")
    return timestamp


# -- subscriptions --------------------------------------------------------------------

def create_subscription(session: Session, tenant_id: int, url: str, event_types: Iterable[str],
                        description: str | None = None, *,
                        allow_private: bool = False) -> WebhookSubscription:
    """A new subscription with a fresh secret (read it from the returned row, once).

    ``allow_private``: the operator's ``webhook_allow_private_networks`` setting
    (see :mod:`app.infra.netguard`)."""
    types = sorted(set(event_types))
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown or not types:
        raise ValueError(f"event types must be among {', '.join(EVENT_TYPES)}; "
                         f"got {', '.join(unknown) or 'none'}")
    netguard.check_url(url, allow_private=allow_private)
    subscription = WebhookSubscription(tenant_id=tenant_id, url=url, event_types=types,
                                       description=description)
    session.add(subscription)
    session.flush()
    session.info.pop(_SUBSCRIPTIONS, None)  # this transaction must see it
    return subscription


def _subscriptions(session: Session, tenant_id: int) -> list[tuple[int, list[str]]]:
    """Active subscriptions of a tenant, read once per transaction (imports call this a lot)."""
    cache: dict[int, list[tuple[int, list[str]]]] = session.info.setdefault(_SUBSCRIPTIONS, {})
    if tenant_id not in cache:
        with session.no_autoflush:  # a flush would come back here through before_flush
            rows = session.execute(select(WebhookSubscription.id,
                                          WebhookSubscription.event_types)
                                   .where(WebhookSubscription.tenant_id == tenant_id,
                                          WebhookSubscription.active.is_(True))).all()
        cache[tenant_id] = [(row.id, list(row.event_types or [])) for row in rows]
    return cache[tenant_id]


def subscribed(session: Session, tenant_id: int, event_type: str) -> bool:
    return any(event_type in types for _, types in _subscriptions(session, tenant_id))


# -- emitting -------------------------------------------------------------------------

def emit(session: Session, tenant_id: int, event_type: str, data: dict[str, Any]) -> None:
    """Queue ``event_type`` for every active subscription of the tenant that wants it.

    ``data`` is JSON-ready. If it names ``customer_id`` (our id), the customer's
    record (``customer``) and wallet status (``wallet``) are added unless given,
    and the internal id is dropped; ``card_id`` is resolved to its customer and
    program the same way. The rows join the caller's transaction and are
    queued after it commits; nothing is written when no subscription wants it.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    targets = [sub_id for sub_id, types in _subscriptions(session, tenant_id)
               if event_type in types]
    if not targets:
        return
    payload = {
        "id": str(uuid.uuid4()),
        "type": event_type,
        "created_at": _iso(utcnow()),
        "tenant": _tenant_slug(session, tenant_id),
        "data": _expand(session, dict(data)),
    }
    deliveries = [WebhookDelivery(tenant_id=tenant_id, subscription_id=sub_id,
                                  event_id=payload["id"], event_type=event_type,
                                  payload=payload) for sub_id in targets]
    session.add_all(deliveries)
    outbox.queue_after_commit(session, WEBHOOK_DISPATCH_KEY, deliveries)  # ids read at commit


def _tenant_slug(session: Session, tenant_id: int) -> str | None:
    slugs: dict[int, str | None] = session.info.setdefault(_TENANT_SLUGS, {})
    if tenant_id not in slugs:
        slugs[tenant_id] = session.scalar(select(Tenant.slug).where(Tenant.id == tenant_id))
    return slugs[tenant_id]


def _expand(session: Session, data: dict[str, Any]) -> dict[str, Any]:
    card_id = data.pop("card_id", None)
    if card_id is not None:
        card = session.get(Card, card_id)
        if card is not None:
            data.setdefault("customer_id", card.customer_id)
            data["card"] = {"program": card.program.slug, **data.get("card", {})}
    customer_id = data.pop("customer_id", None)
    if customer_id is not None:
        customer = session.get(Customer, customer_id)
        if customer is not None:
            data.setdefault("customer", customer_data(customer))
            data.setdefault("wallet", wallet_status(session, [customer_id])[customer_id])
    return data


def customer_data(customer: Customer) -> dict[str, Any]:
    """What receivers (email tools, CRMs) match and segment on: the public record."""
    return {
        "external_id": customer.external_id,
        "email": customer.email,
        "first_name": customer.first_name,
        "last_name": customer.last_name,
        "locale": customer.locale,
        "phone": customer.phone,
        "birthday": customer.birthday.isoformat() if customer.birthday else None,
        "attributes": dict(customer.attributes or {}),
    }


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- customer.updated and consent.changed, noted during the transaction ----------------

def install(database: Database) -> None:
    """Turn customer changes in ``database``'s sessions into ``customer.updated`` and
    ``consent.changed`` events. Called once where the process is put together
    (:class:`app.services.Services`): the customer code that changes rows does not
    know that webhooks exist."""
    for identifier, fn in (("load", _remember_loaded_attributes),
                           ("refresh", _remember_refreshed_attributes)):
        if not event.contains(Customer, identifier, fn):  # mapper events are per class
            event.listen(Customer, identifier, fn)
    database.listen("before_flush", _note_changed_customers)
    database.listen("after_flush_postexec", _refresh_loaded_copies)
    database.listen("before_commit", _emit_pending)
    database.listen("after_commit", _forget_subscriptions)
    database.listen("after_rollback", _forget_rolled_back)
    if _on_event not in database.subscribers:
        database.subscribers.append(_on_event)


def _on_event(session: Session, happened: events.Event) -> None:
    """Domain events published by earlier stages, turned into webhook events."""
    if isinstance(happened, events.ConsentRecorded):
        consent_recorded(session, happened.customer, happened.consent)
    else:
        emit(session, happened.tenant_id, happened.type, happened.data)


@dataclass
class _Pending:
    customer: Customer
    changed: set[str]
    consents: list[Consent]


def consent_recorded(session: Session, customer: Customer, consent: Consent) -> None:
    """A consent that differs from the current one (published by record_consent)."""
    tenant_id = customer.tenant_id or session.info.get(TENANT_KEY)
    if tenant_id is None or not subscribed(session, tenant_id, "consent.changed"):
        return
    _pending(session, customer).consents.append(consent)


def _pending(session: Session, customer: Customer) -> _Pending:
    pending: dict[int, _Pending] = session.info.setdefault(_PENDING, {})
    entry = pending.get(id(customer))
    if entry is None:
        entry = pending[id(customer)] = _Pending(customer, set(), [])
    return entry


def changed_fields(customer: Customer) -> set[str]:
    """Data fields of a loaded customer whose value differs from the database's."""
    state = inspect(customer)
    changed = {name for name in DATA_FIELDS if name != "attributes"
               and state.attrs[name].history.has_changes()}
    history = state.attrs.attributes.history
    if history.has_changes():
        before = (dict(history.deleted[0] or {}) if history.deleted
                  else state.info.get(_LOADED_ATTRIBUTES))
        after = dict(customer.attributes or {})
        if before is None:
            changed.add("attributes")
        else:
            changed.update(f"attributes.{key}" for key in set(before) | set(after)
                           if before.get(key) != after.get(key))
    return changed


def _remember_loaded_attributes(customer: Customer, _context: Any) -> None:
    # In-place edits of the JSON dict keep no old value; this copy is the "before".
    inspect(customer).info[_LOADED_ATTRIBUTES] = dict(customer.attributes or {})


def _remember_refreshed_attributes(customer: Customer, _context: Any, _attrs: Any) -> None:
    _remember_loaded_attributes(customer, _context)


def _note_changed_customers(session: Session, _ctx: Any, _instances: Any) -> None:
    for obj in session.dirty:
        if not isinstance(obj, Customer) or obj.tenant_id is None:
            continue
        if not subscribed(session, obj.tenant_id, "customer.updated"):
            continue
        changed = changed_fields(obj)
        if changed:
            _pending(session, obj).changed.update(changed)


def _refresh_loaded_copies(session: Session, _ctx: Any) -> None:
    # After a flush the database holds the new values: they are the next "before".
    for entry in session.info.get(_PENDING, {}).values():
        if entry.customer in session:
            inspect(entry.customer).info[_LOADED_ATTRIBUTES] = dict(
                entry.customer.attributes or {})


def _emit_pending(session: Session) -> None:
    if session.new or session.dirty or session.deleted:
        session.flush()  # notes the last changes (before_flush) and gives new rows ids
    pending: dict[int, _Pending] = session.info.pop(_PENDING, {})
    for entry in pending.values():
        customer = entry.customer
        if customer not in session or customer.id is None:
            continue  # rolled back with a savepoint
        if entry.changed:
            emit(session, customer.tenant_id, "customer.updated",
                 {"customer_id": customer.id, "changed": sorted(entry.changed)})
        for consent in entry.consents:
            if consent in session and consent.id is not None:
                emit(session, customer.tenant_id, "consent.changed", {
                    "customer_id": customer.id,
                    "consent": {"kind": consent.kind, "granted": consent.granted,
                                "source": consent.source,
                                "recorded_at": _iso(consent.recorded_at or utcnow())}})


def _forget_subscriptions(session: Session) -> None:
    session.info.pop(_SUBSCRIPTIONS, None)


def _forget_rolled_back(session: Session) -> None:
    for key in (_SUBSCRIPTIONS, _PENDING):
        session.info.pop(key, None)


# -- delivering -----------------------------------------------------------------------

@dataclass(frozen=True)
class Delivered:
    delivery_id: int
    state: str  # delivered | retry | gave_up | cancelled | skipped
    retry_in: float | None = None  # seconds, when state == "retry"
    status: int | None = None


def backoff(attempt: int) -> dt.timedelta:
    """Exponential (10 s, 20 s, 40 s ...), capped at an hour, with jitter so a receiver
    that comes back is not hit by every queued delivery in the same second."""
    return outbox.backoff(attempt, FIRST_RETRY, MAX_RETRY) * random.uniform(0.5, 1.0)


def claim(session: Session, delivery_id: int, now: dt.datetime) -> bool:
    """Take a delivery for one lease; False if done, leased elsewhere, or not due."""
    return outbox.claim(session, WebhookDelivery, delivery_id, now, LEASE)


@dataclass(frozen=True)
class _Answer:
    status: int | None
    error: str | None
    duration_ms: int
    final: bool = False  # no point retrying (the address is refused)


def _post(url: str, secret: str, delivery: WebhookDelivery, *, allow_private: bool) -> _Answer:
    body = body_bytes(delivery.payload)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature_header(secret, int(time.time()), body),
        "Passerelle-Event-Id": delivery.event_id,
        "Passerelle-Event-Type": delivery.event_type,
        "Passerelle-Delivery-Id": str(delivery.id),
    }
    started = time.monotonic()
    try:
        with netguard.guarded_session(allow_private=allow_private,
                                      user_agent=USER_AGENT) as http:
            response = http.post(url, data=body, headers=headers, timeout=TIMEOUT,
                                 allow_redirects=False)
            response.close()
    except netguard.BlockedAddress as exc:
        return _Answer(None, f"refused: {exc}", _ms_since(started), final=True)
    except requests.Timeout:
        return _Answer(None, "timeout", _ms_since(started))
    except requests.RequestException as exc:
        return _Answer(None, f"network error: {type(exc).__name__}", _ms_since(started))
    status = response.status_code
    error = None if 200 <= status < 300 else f"HTTP {status}"
    if 300 <= status < 400:
        error = f"HTTP {status}: redirects are not followed; update the subscription URL"
    return _Answer(status, error, _ms_since(started))


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def deliver(services: Services, delivery_id: int) -> Delivered:
    """One attempt at a delivery: claim, POST, log the attempt, then done or retry later."""
    now = utcnow()
    with services.db.session() as session:
        if not claim(session, delivery_id, now):
            return Delivered(delivery_id, "skipped")
        delivery = session.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        subscription = session.get(WebhookSubscription, delivery.subscription_id)
        if subscription is None or not subscription.active:
            _finish(delivery, now, "cancelled", "subscription disabled")
            session.commit()
            return Delivered(delivery_id, "cancelled")
        url, secret = subscription.url, subscription.secret
        session.commit()  # no transaction stays open during the HTTP call
        answer = _post(url, secret, delivery,
                       allow_private=services.settings.webhook_allow_private_networks)
        return _record(session, delivery, subscription, answer)


def _record(session: Session, delivery: WebhookDelivery, subscription: WebhookSubscription,
            answer: _Answer) -> Delivered:
    now = utcnow()
    session.add(WebhookAttempt(tenant_id=delivery.tenant_id, delivery_id=delivery.id,
                               status=answer.status, error=answer.error,
                               duration_ms=answer.duration_ms, attempted_at=now))
    delivery.last_status, delivery.last_error = answer.status, answer.error
    result: Delivered
    if answer.error is None:
        _finish(delivery, now, "delivered", None)
        result = Delivered(delivery.id, "delivered", status=answer.status)
    elif answer.status == 410:
        subscription.active = False
        log.warning("webhook subscription %s answered 410 Gone: disabled", subscription.id)
        _finish(delivery, now, "gave_up", "410 Gone: subscription disabled")
        result = Delivered(delivery.id, "gave_up", status=410)
    elif answer.final or now - delivery.created_at >= GIVE_UP_AFTER:
        _finish(delivery, now, "gave_up", answer.error)
        result = Delivered(delivery.id, "gave_up", status=answer.status)
    else:
        delay = backoff(delivery.attempts)
        delivery.not_before, delivery.claimed_until = now + delay, None
        result = Delivered(delivery.id, "retry", delay.total_seconds(), answer.status)
    session.commit()
    return result


def _finish(delivery: WebhookDelivery, now: dt.datetime, outcome: str,
            error: str | None) -> None:
    delivery.done_at, delivery.claimed_until, delivery.outcome = now, None, outcome
    if error is not None:
        delivery.last_error = error[:500]


def due_deliveries(services: Services, quiet_for: dt.timedelta = dt.timedelta(seconds=30),
                   limit: int = 1000) -> list[int]:
    """Deliveries nobody is working on: never run after ``quiet_for``, leases that ran
    out (a dead worker), retries that came due."""
    with services.db.session() as session:
        return outbox.due_ids(session, WebhookDelivery, utcnow(), quiet_for, limit)


def redeliver(session: Session, delivery_id: int) -> WebhookDelivery:
    """Send an event again (same event id and payload) as a new delivery with its own
    24-hour window; queued after the caller commits."""
    original = session.get(WebhookDelivery, delivery_id)
    if original is None:
        raise LookupError(f"no webhook delivery {delivery_id}")
    copy = WebhookDelivery(tenant_id=original.tenant_id,
                           subscription_id=original.subscription_id,
                           event_id=original.event_id, event_type=original.event_type,
                           payload=dict(original.payload))
    session.add(copy)
    session.flush()
    outbox.queue_after_commit(session, WEBHOOK_DISPATCH_KEY, [copy.id])
    return copy


# -- the operator's views (passerelle webhooks ...) -------------------------------------

def list_subscriptions(session: Session,
                       tenant_slug: str | None = None) -> list[tuple[WebhookSubscription, str]]:
    """Every subscription with its tenant's slug, oldest first; only one tenant's if named."""
    query = (select(WebhookSubscription, Tenant.slug)
             .join(Tenant, Tenant.id == WebhookSubscription.tenant_id)
             .order_by(WebhookSubscription.id))
    if tenant_slug:
        query = query.where(Tenant.slug == tenant_slug)
    return [(sub, slug) for sub, slug in session.execute(query)]


def recent_deliveries(session: Session, *, failed: bool = False,
                      limit: int = 50) -> list[tuple[WebhookDelivery, list[int | None]]]:
    """In a tenant session: the newest deliveries with each attempt's HTTP status (None
    when no answer came). ``failed``: given up, cancelled, or failing and still retried."""
    query = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
    if failed:
        query = query.where(or_(WebhookDelivery.outcome.in_(("gave_up", "cancelled")),
                                WebhookDelivery.last_error.is_not(None)
                                & WebhookDelivery.done_at.is_(None)))
    deliveries = session.scalars(query).all()
    codes: dict[int, list[int | None]] = {delivery.id: [] for delivery in deliveries}
    shown = query.with_only_columns(WebhookDelivery.id).subquery()
    for delivery_id, status in session.execute(
            select(WebhookAttempt.delivery_id, WebhookAttempt.status)
            .where(WebhookAttempt.delivery_id.in_(select(shown.c.id)))
            .order_by(WebhookAttempt.id)):
        codes.setdefault(delivery_id, []).append(status)
    return [(delivery, codes[delivery.id]) for delivery in deliveries]


def delivery_tenant(session: Session, delivery_id: int) -> int | None:
    """The tenant owning a delivery (None if there is none), to open its tenant session."""
    return session.scalar(select(WebhookDelivery.tenant_id)
                          .where(WebhookDelivery.id == delivery_id))


def set_subscription_active(session: Session, subscription_id: int, active: bool) -> bool:
    """Enable or disable a subscription; False if there is none with this id."""
    sub = session.get(WebhookSubscription, subscription_id)
    if sub is None:
        return False
    sub.active = active
    return True

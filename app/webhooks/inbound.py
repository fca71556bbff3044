"""Inbound webhooks: a loyalty engine's events change customer data, cards follow.

One ``InboundHook`` per tenant and sender: how requests authenticate (a shared
secret in a header, e.g. ``X-Secret-Key``, kept only as its SHA-256; or an
HMAC-SHA256 of the body, whose key we must keep), and how the sender's JSON
maps to our actions (:data:`DEFAULT_MAPPING`, overridable per hook).

Every authenticated request is stored as an ``InboundEvent`` before anything
else, with a status: ``applied``, ``ignored`` (understood, nothing to do: an
unknown type, an explicit ignore, a stale points event) or ``failed`` (could
not be applied: malformed JSON, unknown customer, bad value; ``error`` says
why). Nothing is dropped silently. Requests that fail authentication are not
stored (anyone can send them) and are logged with the hook id only.

Idempotency: events are unique per (hook, event id). A repeat of an applied or
ignored event changes nothing and returns the stored event. A repeat of a
*failed* event is tried again (it was never applied, and the cause, e.g. a
customer not yet created, may be gone); a conditional UPDATE makes sure two
concurrent repeats cannot both apply it. A sender that gives no event id gets
the SHA-256 of the body as id: byte-identical bodies count as one event.

Points: credits and debits add to ``attributes["points"]`` and commute, so
their arrival order does not matter; the event id keeps each one from
counting twice. A *balance* (a ``points.balance`` event, or a ``balance``
field on any points event) sets the points outright and is authoritative: it
is applied only if it is not older than the last balance applied (event time
``occurred_at``; a missing time counts as "now"), and a credit or debit older
than the last balance is ignored, since the balance already includes it.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.customers.customers import (
    STANDARD_FIELDS,
    CustomerChanges,
    CustomerDataError,
    find_by_email,
    find_customer,
    normalize_email,
    update_customer,
    upsert_customer,
)
from app.infra.db import rowcount
from app.infra.models import Customer, InboundEvent, InboundHook, Tenant, utcnow
from app.updates import refresh as updates
from app.webhooks import outbound as webhooks_out

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
AUTH_KINDS = ("header", "hmac")
DEFAULT_HEADER = {"header": "X-Secret-Key", "hmac": "X-Signature"}
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_KIND = re.compile(r"[^A-Za-z0-9_.-]+")

#: Where things are in the sender's JSON (a dotted path, or a list of paths tried in
#: order), what its event types mean, and which attributes we write.
DEFAULT_MAPPING: dict[str, Any] = {
    "event_id": ["id", "event_id", "eventId"],
    "event_type": ["type", "event", "eventName", "event_type"],
    "occurred_at": ["occurred_at", "created_at", "timestamp"],
    "customer": ["customer.id", "customer.external_id", "customer_id", "customerId",
                 "data.customer_id"],
    "customer_email": ["customer.email", "email", "data.email"],
    "points_delta": ["points", "amount", "data.points", "data.amount"],
    "balance": ["balance", "data.balance"],
    "reason": ["reason", "data.reason"],
    "tier": ["tier", "tier.name", "data.tier"],
    "expiring_points": ["expiring.points", "data.expiring.points", "data.points"],
    "expiring_date": ["expiring.date", "data.expiring.date", "data.date"],
    "list": ["list.name", "list.id", "list", "data.listId", "data.list"],
    "fields": {name: [f"customer.{name}", f"data.{name}"] for name in STANDARD_FIELDS},
    "customer_attributes": ["customer.attributes", "data.attributes"],
    "types": {
        "points.credited": "points_credit",
        "points.debited": "points_debit",
        "points.changed": "points_change",
        "points.balance": "points_balance",
        "points.expiring": "points_expiring",
        "tier.changed": "tier",
        "list.subscribed": "subscribe",
        "list.unsubscribed": "unsubscribe",
        "subscribed": "subscribe",
        "unsubscribed": "unsubscribe",
        "customer.created": "upsert",
        "customer.updated": "upsert",
    },
    # List name -> consent kind; unlisted lists become "list_<name>".
    "lists": {},
    # Our attribute names, for templates whose field_mapping uses others.
    "attributes": {
        "points": "points",
        "last_points_reason": "last_points_reason",
        "last_points_delta": "last_points_delta",
        "points_balance_at": "points_balance_at",
        "points_expiring": "points_expiring",
        "points_expiring_on": "points_expiring_on",
        "tier": "tier",
    },
}
ACTIONS = ("points_credit", "points_debit", "points_change", "points_balance",
           "points_expiring", "tier", "subscribe", "unsubscribe", "upsert", "ignore")


class InboundAuthError(Exception):
    """The request is not from the hook's sender: answer 401, store nothing."""


class EventError(ValueError):
    """The event cannot be applied; the message (no personal data) is stored with it."""


class EventIgnored(Exception):
    """The event is understood and deliberately not applied; the message says why."""


@dataclass(frozen=True)
class Received:
    event: InboundEvent
    status: str  # applied | ignored | failed | duplicate


# -- hooks ----------------------------------------------------------------------------

def create_hook(session: Session, tenant: Tenant, slug: str, auth: str = "header",
                mapping: dict[str, Any] | None = None,
                header_name: str | None = None) -> tuple[InboundHook, str]:
    """A new endpoint and its secret, returned once (a header secret is kept hashed)."""
    if auth not in AUTH_KINDS:
        raise ValueError(f"auth must be one of {', '.join(AUTH_KINDS)}")
    if not _SLUG.match(slug):
        raise ValueError("slug: lowercase letters, digits and dashes, at most 64")
    check_mapping(mapping or {})
    secret = secrets.token_urlsafe(32)
    hook = InboundHook(tenant_id=tenant.id, slug=slug, auth=auth,
                       header_name=header_name or DEFAULT_HEADER[auth], mapping=mapping or {})
    if auth == "header":
        hook.secret_hash = _sha256(secret.encode())
    else:
        hook.hmac_secret = secret
    session.add(hook)
    session.flush()
    return hook, secret


class Headers(Protocol):
    """Request headers: a dict or werkzeug's Headers (not a Mapping), read by items()."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def check_mapping(mapping: Mapping[str, Any]) -> None:
    """Refuse a mapping we would misread: unknown keys, actions, or path types."""
    unknown = set(mapping) - set(DEFAULT_MAPPING)
    if unknown:
        raise ValueError(f"mapping: unknown keys {', '.join(sorted(unknown))}")
    for event_type, action in (mapping.get("types") or {}).items():
        if action not in ACTIONS:
            raise ValueError(f"mapping: type {event_type!r} -> {action!r}; actions are "
                             f"{', '.join(ACTIONS)}")
    for key, value in mapping.items():
        if key in ("types", "lists", "attributes", "fields"):
            if not isinstance(value, dict):
                raise ValueError(f"mapping: {key} must be an object")
        elif not isinstance(value, str | list):
            raise ValueError(f"mapping: {key} must be a path or a list of paths")


def effective_mapping(hook: InboundHook) -> dict[str, Any]:
    """Defaults, overridden key by key; the nested tables are merged, not replaced."""
    merged = copy.deepcopy(DEFAULT_MAPPING)
    for key, value in (hook.mapping or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def url_path(tenant_slug: str, hook_slug: str) -> str:
    return f"/hooks/{tenant_slug}/{hook_slug}"


# -- authentication -------------------------------------------------------------------

def authenticate(hook: InboundHook, headers: Headers, body: bytes) -> None:
    """Raise InboundAuthError unless the request carries the hook's secret or signature.

    HMAC signatures are accepted as hex or base64, optionally prefixed ``sha256=``
    (GitHub, Shopify and most loyalty engines use one of these), or in
    Passerelle's own ``t=...,v1=...`` form, whose timestamp is then checked.
    """
    given = _header(headers, hook.header_name)
    if not given:
        raise InboundAuthError("missing credentials")
    if hook.auth == "header":
        if not hook.secret_hash or not hmac.compare_digest(
                _sha256(given.encode()), hook.secret_hash):
            raise InboundAuthError("wrong secret")
        return
    if not hook.hmac_secret or not _signature_matches(hook.hmac_secret, given, body):
        raise InboundAuthError("bad signature")


def _signature_matches(secret: str, given: str, body: bytes) -> bool:

    if given.startswith("t="):
        return webhooks_out.verify(secret, given, body)
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    value = given.split("=", 1)[1] if given.lower().startswith("sha256=") else given
    forms = [digest.hex(), base64.b64encode(digest).decode()]
    candidate = value.strip()
    matches = [hmac.compare_digest(candidate.lower() if i == 0 else candidate, form)
               for i, form in enumerate(forms)]
    return any(matches)


def _header(headers: Headers, name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- receiving ------------------------------------------------------------------------

def receive(session: Session, services: Services, hook: InboundHook,
            headers: Headers, body: bytes) -> Received:
    """Authenticate, store, and apply one event; the caller commits.

    Raises only InboundAuthError (nothing stored) and infrastructure errors
    (the transaction should roll back and the sender retry). Every bad event
    is stored as failed and returned.
    """
    authenticate(hook, headers, body)
    mapping = effective_mapping(hook)
    payload, parse_error = _parse(body)
    event_id = _event_id(mapping, payload, body)
    found_type = _first(mapping["event_type"], payload) if payload else None
    event_type = _text(found_type, 100) if isinstance(found_type, str | int) else None
    kept = payload if parse_error is None else {"raw": body.decode("utf-8", "replace")[:10000]}
    stored = _claim(session, hook, event_id, event_type, kept)
    if stored is None:
        existing = session.scalar(select(InboundEvent).where(
            InboundEvent.hook_id == hook.id, InboundEvent.event_id == event_id))
        assert existing is not None
        return Received(existing, "duplicate")
    if parse_error is not None:
        return _finish(stored, "failed", parse_error)
    return _apply_stored(session, services, hook, mapping, stored, payload)


def _parse(body: bytes) -> tuple[dict[str, Any], str | None]:
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "body is not UTF-8"
    except json.JSONDecodeError as exc:
        return {}, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if not isinstance(payload, dict):
        return {}, "the body is JSON but not an object"
    return payload, None


def _event_id(mapping: dict[str, Any], payload: dict[str, Any], body: bytes) -> str:
    value = _first(mapping["event_id"], payload) if payload else None
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
        text = str(value).strip()
        return text if len(text) <= 200 else "sha256:" + _sha256(text.encode())
    return "sha256:" + _sha256(body)


def _claim(session: Session, hook: InboundHook, event_id: str, event_type: str | None,
           payload: dict[str, Any]) -> InboundEvent | None:
    """The event row this request may apply, or None if it is a duplicate.

    New: inserted (a concurrent twin hits the unique index). Known and failed:
    taken back with a conditional UPDATE, so only one retry applies it.
    """
    existing = session.scalar(select(InboundEvent).where(
        InboundEvent.hook_id == hook.id, InboundEvent.event_id == event_id))
    if existing is not None:
        taken = session.execute(
            update(InboundEvent).where(InboundEvent.id == existing.id,
                                       InboundEvent.status == "failed")
            .values(status="processing").execution_options(synchronize_session=False))
        if rowcount(taken) != 1:
            return None
        session.refresh(existing)
        existing.event_type, existing.payload = event_type, payload  # this attempt's body
        return existing
    row = InboundEvent(tenant_id=hook.tenant_id, hook_id=hook.id, event_id=event_id,
                       event_type=event_type, payload=payload or {}, status="processing")
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return None
    return row


def _apply_stored(session: Session, services: Services, hook: InboundHook,
                  mapping: dict[str, Any], stored: InboundEvent,
                  payload: dict[str, Any]) -> Received:
    if not stored.event_type:
        return _finish(stored, "failed", "no event type found (mapping: event_type)")
    stored.error, stored.applied_at = None, None
    action = mapping["types"].get(stored.event_type)
    if action is None:
        return _finish(stored, "ignored", f"unknown event type {stored.event_type!r}")
    if action == "ignore":
        return _finish(stored, "ignored", "ignored by the hook's mapping")
    try:
        with session.begin_nested():
            customer, note = _apply(session, hook, mapping, action, payload)
            stored.customer_id = customer.id
    except EventIgnored as exc:
        return _finish(stored, "ignored", str(exc))
    except (EventError, CustomerDataError) as exc:
        return _finish(stored, "failed", str(exc))
    except IntegrityError:
        return _finish(stored, "failed", "conflicts with another customer (email or id)")
    if customer.id is not None and note.changed:
        problems = updates.customers_changed(session, services, [customer]).errors
        if problems:
            note.messages.append(f"{len(problems)} card(s) could not be re-rendered")
    received = _finish(stored, "applied", "; ".join(note.messages) or None)
    stored.applied_at = utcnow()
    return received


def _finish(stored: InboundEvent, status: str, error: str | None) -> Received:
    stored.status, stored.error = status, error[:500] if error else None
    return Received(stored, status)


# -- applying -------------------------------------------------------------------------

@dataclass
class _Note:
    changed: bool = False
    messages: list[str] = field(default_factory=list)


def _apply(session: Session, hook: InboundHook, mapping: dict[str, Any], action: str,
           payload: dict[str, Any]) -> tuple[Customer, _Note]:
    note = _Note()
    if action == "upsert":
        customer = _upsert(session, hook, mapping, payload, note)
        return customer, note
    customer = _find_customer(session, hook, mapping, payload)
    names = mapping["attributes"]
    if action in ("subscribe", "unsubscribe"):
        changes = CustomerChanges(consents={_list_kind(mapping, payload): action == "subscribe"})
    else:
        changes = CustomerChanges(
            attributes=_action_attributes(action, mapping, names, payload, customer))
    note.changed = update_customer(session, customer, changes, source="webhook").changed
    return customer, note


def _action_attributes(action: str, mapping: dict[str, Any], names: dict[str, str],
                       payload: dict[str, Any], customer: Customer) -> dict[str, Any]:
    if action == "tier":
        tier = _first(mapping["tier"], payload)
        if not isinstance(tier, str | int) or not str(tier).strip():
            raise EventError("tier.changed without a tier (mapping: tier)")
        return {names["tier"]: _text(tier, 100)}
    if action == "points_expiring":
        return _expiring(mapping, names, payload)
    return _points(action, mapping, names, payload, customer)


def _points(action: str, mapping: dict[str, Any], names: dict[str, str],
            payload: dict[str, Any], customer: Customer) -> dict[str, Any]:
    current = dict(customer.attributes or {})
    occurred = _occurred_at(mapping, payload)
    last_balance = current.get(names["points_balance_at"])
    balance = _first(mapping["balance"], payload)
    reason = _first(mapping["reason"], payload)
    out: dict[str, Any] = {}
    if reason is not None:
        out[names["last_points_reason"]] = _text(reason, 100)
    if action == "points_balance" or balance is not None:
        if balance is None:
            raise EventError("points.balance without a balance (mapping: balance)")
        if isinstance(last_balance, str) and occurred < last_balance:
            raise EventIgnored("older than the last balance applied")
        out[names["points"]] = _plain(_number(balance, "balance"))
        out[names["points_balance_at"]] = occurred
        if action != "points_balance" and _first(mapping["points_delta"], payload) is not None:
            out[names["last_points_delta"]] = _plain(_signed_delta(action, mapping, payload))
        return out
    if isinstance(last_balance, str) and occurred < last_balance:
        raise EventIgnored("older than the last balance applied, which includes it")
    delta = _signed_delta(action, mapping, payload)
    out[names["points"]] = _plain(_number(current.get(names["points"]) or 0, "current points")
                                  + delta)
    out[names["last_points_delta"]] = _plain(delta)
    return out


def _signed_delta(action: str, mapping: dict[str, Any], payload: dict[str, Any]) -> Decimal:
    raw = _first(mapping["points_delta"], payload)
    if raw is None:
        raise EventError("points event without an amount (mapping: points_delta)")
    amount = _number(raw, "points")
    if action == "points_credit":
        return abs(amount)
    if action == "points_debit":
        return -abs(amount)
    return amount


def _expiring(mapping: dict[str, Any], names: dict[str, str],
              payload: dict[str, Any]) -> dict[str, Any]:
    points = _first(mapping["expiring_points"], payload)
    day = _first(mapping["expiring_date"], payload)
    if points is None or not isinstance(day, str):
        raise EventError("points.expiring needs an amount and a date "
                         "(mapping: expiring_points, expiring_date)")
    try:
        on = dt.date.fromisoformat(day.strip()[:10])
    except ValueError:
        raise EventError("points.expiring: the date is not YYYY-MM-DD") from None
    return {names["points_expiring"]: _plain(abs(_number(points, "expiring points"))),
            names["points_expiring_on"]: on.isoformat()}


def _upsert(session: Session, hook: InboundHook, mapping: dict[str, Any],
            payload: dict[str, Any], note: _Note) -> Customer:
    changes = CustomerChanges()
    for name, paths in mapping["fields"].items():
        value = _first(paths, payload)
        if value is not None and name in STANDARD_FIELDS and str(value).strip():
            changes.fields[name] = str(value)  # checked by the upsert
    extra = _first(mapping["customer_attributes"], payload)
    changes.attributes = dict(extra) if isinstance(extra, dict) else {}
    external_id = _customer_ref(mapping, payload)
    if external_id is None and "email" in changes.fields:
        known = find_by_email(session, hook.tenant_id, normalize_email(changes.fields["email"]))
        external_id = known.external_id if known is not None else None
    if external_id is None:
        raise EventError("a new customer needs an id (mapping: customer)")
    result = upsert_customer(session, hook.tenant_id, external_id, changes, source="webhook")
    assert result is not None
    note.changed = result.changed and not result.created
    return result.customer


def _find_customer(session: Session, hook: InboundHook, mapping: dict[str, Any],
                   payload: dict[str, Any]) -> Customer:
    external_id = _customer_ref(mapping, payload)
    if external_id is not None:
        customer = find_customer(session, hook.tenant_id, external_id)
    else:
        email = _first(mapping["customer_email"], payload)
        if not isinstance(email, str):
            raise EventError("no customer id or email found (mapping: customer)")
        customer = find_by_email(session, hook.tenant_id, normalize_email(email))
    if customer is None:
        raise EventError("unknown customer")
    return customer


def _customer_ref(mapping: dict[str, Any], payload: dict[str, Any]) -> str | None:
    value = _first(mapping["customer"], payload)
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        return None
    text = str(value).strip()
    if len(text) > 128:
        raise EventError("customer id longer than 128 characters")
    return text


def _list_kind(mapping: dict[str, Any], payload: dict[str, Any]) -> str:
    name = _first(mapping["list"], payload)
    if isinstance(name, bool) or not isinstance(name, str | int) or not str(name).strip():
        raise EventError("list event without a list (mapping: list)")
    text = str(name).strip()
    kind = mapping["lists"].get(text)
    return str(kind) if kind else ("list_" + _KIND.sub("_", text))[:64]


def _occurred_at(mapping: dict[str, Any], payload: dict[str, Any]) -> str:
    """The event's time as ISO 8601 UTC (comparable as text); now if absent or unreadable."""
    value = _first(mapping["occurred_at"], payload)
    moment = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        moment = dt.datetime.fromtimestamp(value / 1000 if value > 1e11 else value, dt.UTC)
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
    moment = moment or utcnow()
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds")


# -- small helpers --------------------------------------------------------------------

def _first(paths: str | list[str], payload: dict[str, Any]) -> Any:
    """The value at the first dotted path that exists (lists: numeric segments)."""
    for path in [paths] if isinstance(paths, str) else paths:
        value: Any = payload
        for part in path.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                break
        else:
            if value is not None:
                return value
    return None


def _number(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise EventError(f"{what} is not a number")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise EventError(f"{what} is not a number") from None
    if not number.is_finite() or abs(number) > Decimal(10) ** 15:
        raise EventError(f"{what} is out of range")
    return number


def _plain(number: Decimal) -> int | float:
    """JSON-friendly: an int when whole (points usually are), else a float."""
    return int(number) if number == number.to_integral_value() else float(number)


def _text(value: Any, limit: int) -> str:
    return str(value).strip()[:limit]


def recent_events(session: Session, *, status: str | None = None,
                  limit: int = 50) -> list[tuple[InboundEvent, str]]:
    """In a tenant session: the newest received events with their hook's slug."""
    query = (select(InboundEvent, InboundHook.slug)
             .join(InboundHook, InboundHook.id == InboundEvent.hook_id)
             .order_by(InboundEvent.id.desc()).limit(limit))
    if status:
        query = query.where(InboundEvent.status == status)
    return [(item, hook_slug) for item, hook_slug in session.execute(query)]

"""Apple's PassKit web service, as domain operations (the HTTP shell is app/web/passkit.py).

Requests come from devices, not from a tenant, so lookups are keyed by Apple's
identifiers (pass type + serial, device library id) and never by a tenant
chosen by the caller. The authentication token is compared in constant time,
and an unknown serial costs the same comparison as a wrong token.
"""

from __future__ import annotations

import datetime as dt
import hmac
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from app import bounds, cards, install_state, updates
from app.models import Card, DeviceLog, Program, Registration, utcnow

if TYPE_CHECKING:
    from app.services import Services

DEVICE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
PASS_TYPE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
SERIAL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PUSH_TOKEN = re.compile(r"^[A-Za-z0-9]{1,200}$")
MAX_LOG_MESSAGES = 100
MAX_LOG_LENGTH = 4000
_DUMMY_TOKEN = "x" * 43
_SERIAL_IN_TEXT = re.compile(r"[A-Za-z0-9_-]{22}")


class BadRequest(ValueError):
    """Malformed input from a device: answered with 400 and this message."""


class NotAuthorized(Exception):
    """Unknown pass or wrong token: answered with 401, the two indistinguishable."""


def check_identifiers(device: str | None = None, pass_type: str | None = None,
                      serial: str | None = None) -> None:
    for value, pattern, name in ((device, DEVICE_ID, "device library identifier"),
                                 (pass_type, PASS_TYPE, "pass type identifier"),
                                 (serial, SERIAL, "serial number")):
        if value is not None and not pattern.match(value):
            raise BadRequest(f"malformed {name}")


def parse_authorization(header: str | None) -> str | None:
    if not header or not header.startswith("ApplePass "):
        return None
    return header[len("ApplePass "):].strip()


def authenticate(session: Session, pass_type: str, serial: str, header: str | None) -> Card:
    token = parse_authorization(header)
    # One query for everything a pass render needs (card, program, tenant, customer).
    card = session.scalar(
        select(Card).join(Program).where(Card.serial_number == serial,
                                         Program.pass_type_identifier == pass_type)
        .options(joinedload(Card.program).joinedload(Program.tenant),
                 joinedload(Card.customer)))
    expected = card.authentication_token if card is not None else _DUMMY_TOKEN
    matches = hmac.compare_digest(expected.encode(), (token or "").encode())
    if card is None or token is None or not matches:
        raise NotAuthorized()
    return card


def parse_push_token(body: object) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("pushToken"), str):
        raise BadRequest('body must be JSON like {"pushToken": "<hex>"}')
    token = body["pushToken"]
    if not PUSH_TOKEN.match(token):
        raise BadRequest("malformed pushToken")
    return token


def register(session: Session, card: Card, device: str, push_token: str) -> bool:
    """Upsert the registration; True when it is new (201), False when known (200)."""
    existing = session.scalar(select(Registration).where(
        Registration.card_id == card.id, Registration.device_library_identifier == device))
    if existing is not None:
        # Push tokens change: always keep the latest, and give flagged tokens a new chance.
        existing.push_token = push_token
        existing.push_problem = None
        session.commit()
        return False
    try:
        session.add(Registration(tenant_id=card.tenant_id, card_id=card.id,
                                 device_library_identifier=device,
                                 pass_type_identifier=card.program.pass_type_identifier,
                                 push_token=push_token))
        install_state.record(session, card, "apple", "registered", device=device)
        session.commit()
        return True
    except IntegrityError:  # the same device registered twice at once: the other won
        session.rollback()
        return register(session, session.merge(card), device, push_token)


def unregister(session: Session, card: Card, device: str) -> None:
    """Idempotent: 200 whether or not the registration still exists."""
    existing = session.scalar(select(Registration).where(
        Registration.card_id == card.id, Registration.device_library_identifier == device))
    if existing is not None:
        session.delete(existing)
        install_state.record(session, card, "apple", "unregistered", device=device)
    session.commit()


def parse_tag(since: str | None) -> int | None:
    """``passesUpdatedSince``: absent or empty (None), else a tag the update_tag column can
    hold; anything else was not given out here (400, before any query)."""
    if since is None or since == "":
        return None
    tag = bounds.parse_int(since, 0, bounds.UPDATE_TAG_MAX)
    if tag is None:
        raise BadRequest("passesUpdatedSince must be a tag this server returned")
    return tag


@dataclass(frozen=True)
class UpdatedSerials:
    serial_numbers: list[str]
    last_updated: str


def serials_since(session: Session, device: str, pass_type: str,
                  since: str | None) -> UpdatedSerials | None:
    """Serials of this device's passes changed after the tag; None means 204."""
    tag = parse_tag(since)
    query = (select(Card.serial_number, Card.update_tag)
             .join(Registration, Registration.card_id == Card.id)
             .where(Registration.device_library_identifier == device,
                    Registration.pass_type_identifier == pass_type))
    if tag is not None:
        query = query.where(Card.update_tag > tag)
    rows = session.execute(query.order_by(Card.update_tag)).all()
    if not rows:
        return None
    return UpdatedSerials([serial for serial, _ in rows], str(max(tag for _, tag in rows)))


@dataclass(frozen=True)
class LatestPass:
    card: Card
    render: cards.RenderedCard
    data: bytes | None  # None when the device already has it (304)
    last_modified: dt.datetime  # what to send as Last-Modified: never later than now
    etag: str  # opaque (weak) validator of the card's version


def version_tag(card: Card) -> str:
    """A weak ETag value: it changes exactly when version and Last-Modified move."""
    return f"{card.version}-{(card.content_hash or '')[:16]}"


def latest_pass(session: Session, services: Services, card: Card,
                if_modified_since: dt.datetime | None,
                if_none_match: Collection[str] | None = None) -> LatestPass:
    """Re-render (catching changes made out of band), then sign unless unchanged.

    ``if_none_match``: the request's entity tags (weak or strong, ``*`` for any).

    Last-Modified, and why it is never later than now. HTTP dates count whole
    seconds, so ``cards.next_last_modified`` gives each version its own second,
    one after the previous version's: a device holding version N (date D) then
    always finds N+1 later than D. After several quick updates that stored
    second is ahead of the clock, and RFC 9110 §8.8.2.1 forbids sending a
    Last-Modified in the future. So the stored value is what If-Modified-Since
    is compared with, and the response says ``min(stored, now)``: a date a
    device can only hold if its copy is not newer than the stored second.
    Ordering is kept (every date sent for version N is <= N's stored second <
    N+1's), nothing sent is in the future, and a device that fetched a version
    whose second had not yet come gets it once more before its 304s (rare: only
    after updates quicker than one a second). Clients that send If-None-Match
    with the ETag are answered by the version itself (RFC 9110 §13.2.2: it takes
    precedence over If-Modified-Since).
    """
    identity = cards.apple_identity(session, card.program)
    builder = services.pass_builder(card.program, identity)
    rendered = cards.render(card, services, builder)
    if rendered.changed:
        updates.mark_changed(session, [card])
    session.commit()
    stored = card.last_modified.replace(microsecond=0)
    shown = min(stored, utcnow().replace(microsecond=0))
    tag = version_tag(card)
    if if_none_match:
        unchanged = "*" in if_none_match or tag in if_none_match
    else:
        unchanged = if_modified_since is not None and stored <= if_modified_since
    if unchanged:
        return LatestPass(card, rendered, None, shown, tag)
    return LatestPass(card, rendered, builder.packager.build(rendered.pass_json, builder.signer),
                      shown, tag)


def parse_logs(body: object) -> list[str]:
    if not isinstance(body, dict):
        raise BadRequest('body must be JSON like {"logs": ["..."]}')
    logs = body.get("logs", body.get("description"))  # Apple's 2012 clients sent "description"
    if isinstance(logs, str):
        logs = [logs]
    if not isinstance(logs, list) or not all(isinstance(m, str) for m in logs):
        raise BadRequest('"logs" must be a list of strings')
    return [m[:MAX_LOG_LENGTH] for m in logs[:MAX_LOG_MESSAGES]]


def store_logs(session: Session, messages: list[str]) -> int:
    """Keep Wallet's messages; link each to a card when it names one of our serials."""
    for message in messages:
        card = None
        candidates = set(_SERIAL_IN_TEXT.findall(message))
        if candidates:
            card = session.scalar(select(Card).where(Card.serial_number.in_(candidates)))
        session.add(DeviceLog(message=message, card_id=card.id if card else None,
                              tenant_id=card.tenant_id if card else None))
    session.commit()
    return len(messages)


def registration_count(session: Session, card: Card) -> int:
    return session.scalar(select(func.count(Registration.id)).where(
        Registration.card_id == card.id)) or 0

"""Apple's PassKit web service, as domain operations (the HTTP shell is app/web/passkit.py).

Requests come from devices, not from a tenant, so lookups are keyed by Apple's
identifiers (pass type + serial, device library id) and never by a tenant
chosen by the caller. The authentication token is compared in constant time,
and an unknown serial costs the same comparison as a wrong token.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Select, bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from app.cards import cards
from app.infra import bounds
from app.infra.models import Card, DeviceLog, Program, Registration, SignedVersion, utcnow
from app.tracking import install_state
from app.updates import refresh as updates
from app.wallet.package import PassPackager

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
    token: str = body["pushToken"]
    if not PUSH_TOKEN.match(token):
        raise BadRequest("malformed pushToken")
    return token


def register(session: Session, card: Card, device: str, push_token: str) -> bool:
    """Upsert the registration; True when it is new (201), False when known (200).
    Flushes; the caller commits."""
    existing = _registration(session, card, device)
    if existing is None:
        try:
            with session.begin_nested():
                session.add(Registration(tenant_id=card.tenant_id, card_id=card.id,
                                         device_library_identifier=device,
                                         pass_type_identifier=card.program.pass_type_identifier,
                                         push_token=push_token))
        except IntegrityError:  # the same device registered twice at once: the other won
            existing = _registration(session, card, device)
            if existing is None:
                raise
        else:
            install_state.record(session, card, "apple", "registered", device=device)
            session.flush()
            return True
    # Push tokens change: always keep the latest, and give flagged tokens a new chance.
    existing.push_token = push_token
    existing.push_problem = None
    session.flush()
    return False


def _registration(session: Session, card: Card, device: str) -> Registration | None:
    return session.scalar(select(Registration).where(
        Registration.card_id == card.id, Registration.device_library_identifier == device))


def unregister(session: Session, card: Card, device: str) -> None:
    """Idempotent: 200 whether or not the registration still exists. Flushes."""
    existing = _registration(session, card, device)
    if existing is not None:
        session.delete(existing)
        install_state.record(session, card, "apple", "unregistered", device=device)
    session.flush()


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


def serials_since(session: Session | Connection, device: str, pass_type: str,
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
    data: bytes | None  # None when the device already has it (304)
    last_modified: dt.datetime  # what to send as Last-Modified: never later than now
    etag: str  # opaque (weak) validator of the card's version


def version_tag(last_modified: dt.datetime, content_hash: str | None) -> str:
    """A weak ETag value: it changes exactly when the version (its content and its
    stored Last-Modified second) moves."""
    return f"{int(last_modified.timestamp())}-{(content_hash or '')[:16]}"


def _validate(last_modified: dt.datetime, content_hash: str | None,
              if_modified_since: dt.datetime | None,
              if_none_match: Collection[str] | None) -> tuple[bool, dt.datetime, str]:
    """(the device already has this version, Last-Modified to send, ETag).

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
    stored = last_modified.replace(microsecond=0)
    shown = min(stored, utcnow().replace(microsecond=0))
    tag = version_tag(stored, content_hash)
    if if_none_match:
        unchanged = "*" in if_none_match or tag in if_none_match
    else:
        unchanged = if_modified_since is not None and stored <= if_modified_since
    return unchanged, shown, tag


_packagers: dict[str, PassPackager] = {}  # template digest -> its packager


@functools.cache
def _signed_query() -> Select[Any]:
    """Built once: a device storm should not pay for building the statement per request."""
    cards_t, programs_t, signed_t = Card.__table__, Program.__table__, SignedVersion.__table__
    return (select(cards_t.c.authentication_token, cards_t.c.content_hash,
                   cards_t.c.last_modified, programs_t.c.template, signed_t.c.content_hash,
                   signed_t.c.pass_json, signed_t.c.signature)
            .select_from(cards_t.join(programs_t, programs_t.c.id == cards_t.c.program_id)
                         .outerjoin(signed_t, signed_t.c.card_id == cards_t.c.id))
            .where(cards_t.c.serial_number == bindparam("serial"),
                   programs_t.c.pass_type_identifier == bindparam("pass_type")))


def signed_latest_pass(services: Services, pass_type: str, serial: str, header: str | None,
                       if_modified_since: dt.datetime | None,
                       if_none_match: Collection[str] | None = None) -> LatestPass | None:
    """The latest pass from its signed version: one query, no render, no signature, no
    commit. None when there is no signed version of the card's current content (never
    signed, or the template changed since): then :func:`latest_pass` renders it.

    Raises NotAuthorized like :func:`authenticate`, in the same constant time.
    """
    token = parse_authorization(header)
    with services.db.engine.connect() as connection:
        row = connection.execute(_signed_query(), {"serial": serial,
                                                   "pass_type": pass_type}).first()
    expected = row[0] if row is not None else _DUMMY_TOKEN
    matches = hmac.compare_digest(expected.encode(), (token or "").encode())
    if row is None or token is None or not matches:
        raise NotAuthorized()
    _, content_hash, last_modified, template_name, signed_hash, pass_json, signature = row
    if signed_hash is None or signed_hash != content_hash:
        return None
    template = services.templates.get(template_name)
    # The template's files are part of the content hash: a changed template on disk
    # makes the stored pass.json stale, and the slow path renders the new content.
    if hashlib.sha256(template.digest.encode() + pass_json).hexdigest() != content_hash:
        return None
    unchanged, shown, tag = _validate(last_modified, content_hash, if_modified_since,
                                      if_none_match)
    if unchanged:
        return LatestPass(None, shown, tag)
    packager = _packagers.get(template.digest)
    if packager is None:
        packager = _packagers[template.digest] = PassPackager(template.static_files)
    return LatestPass(packager.assemble(pass_json, signature), shown, tag)


def latest_pass(session: Session, services: Services, card: Card,
                if_modified_since: dt.datetime | None,
                if_none_match: Collection[str] | None = None) -> LatestPass:
    """Re-render (catching changes made out of band), then sign unless unchanged.

    ``if_none_match``: the request's entity tags (weak or strong, ``*`` for any).
    Flushes; the caller commits. What is signed here is kept as the card's signed
    version, so the next device
    asking for this version gets it from :func:`signed_latest_pass`. Validators:
    :func:`_validate`.
    """
    identity = cards.apple_identity(session, card.program)
    builder = services.pass_builder(card.program, identity)
    rendered = cards.render(card, services, builder)
    if rendered.changed:
        updates.mark_changed(session, [card])
    unchanged, shown, tag = _validate(card.last_modified, card.content_hash,
                                      if_modified_since, if_none_match)
    if unchanged:
        session.flush()
        return LatestPass(None, shown, tag)
    signature = builder.signer(builder.packager.manifest(rendered.pass_json))
    updates.store_signed(session, [(card.id, rendered.content_hash, rendered.pass_json,
                                    signature)])
    session.flush()
    return LatestPass(builder.packager.assemble(rendered.pass_json, signature), shown, tag)


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
    session.flush()
    return len(messages)


def registration_count(session: Session, card: Card) -> int:
    return session.scalar(select(func.count(Registration.id)).where(
        Registration.card_id == card.id)) or 0

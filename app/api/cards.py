"""/cards: issue, read, void, re-issue, force a push; /device-logs: what Wallet reported."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.api.core import (
    ApiProblem,
    bp,
    db,
    not_found,
    page,
    query,
    record,
    reply,
    require,
    responses,
    services,
    spec,
    tenant_id,
)
from app.api.core import body as json_body
from app.api.schemas import (
    CardAction,
    CardCreate,
    CardOut,
    DeviceLogOut,
    DeviceLogPage,
    DeviceLogQuery,
)
from app.cards import cards
from app.customers.imports import find_customer
from app.infra.models import Card, DeviceLog, Program
from app.updates import operations
from app.updates import refresh as updates

TAG = "cards"


def card_out(card: Card, cls: type[CardOut] = CardOut, **extra: Any) -> CardOut:
    apple, google = operations.device_counts(db(), card)
    return cls(serial_number=card.serial_number, program=card.program.slug,
               customer=card.customer.external_id, version=card.version, voided=card.voided,
               last_modified=card.last_modified, update_tag=card.update_tag,
               apple_devices=apple, google_saved=google, expires_at=card.expires_at,
               created_at=card.created_at, **extra)


def load_card(serial: str) -> Card:
    if len(serial) > 64:
        raise not_found("card")
    card = db().scalar(select(Card).where(Card.serial_number == serial))
    if card is None:
        raise not_found("card")
    return card


@bp.post("/cards")
@require("write")
@spec.validate(json=CardCreate, resp=responses({200: CardOut, 201: CardOut}, 400, 403, 404, 413,
                                               422),
               tags=[TAG], operation_id="issueCard")
def issue_card() -> Any:
    """Give a customer a card in a program (200 with the existing one if they have it).
    The card is rendered at once, so data that does not fit the template is a 422."""
    data = json_body(CardCreate)
    session = db()
    program = session.scalar(select(Program).where(Program.slug == data.program))
    if program is None:
        raise not_found("program")
    customer = find_customer(session, data.customer)
    if customer is None:
        raise not_found("customer")
    existing = session.scalar(select(Card).where(Card.program_id == program.id,
                                                 Card.customer_id == customer.id))
    if existing is not None:
        return reply(card_out(existing))
    card = cards.ensure_card(session, program, customer)
    refresh = updates.refresh_cards(session, services(), [card])
    if refresh.errors:
        session.rollback()
        raise ApiProblem(422, "Unprocessable Content", refresh.errors[0])
    record("card.issue", f"card:{card.serial_number}",
           {"program": program.slug, "customer": customer.external_id})
    session.commit()
    return reply(card_out(card), 201)


@bp.get("/cards/<serial>")
@require("read")
@spec.validate(resp=responses({200: CardOut}, 404), tags=[TAG], operation_id="getCard")
def get_card(serial: str) -> Any:
    """One card: version, state, devices."""
    return reply(card_out(load_card(serial)))


def _action(serial: str, action: str) -> Any:
    session = db()
    card = load_card(serial)
    if action == "void":
        result = operations.void_card(session, services(), card)
    elif action == "reissue":
        result = operations.reissue_card(session, services(), card)
    else:
        result = operations.push_card(session, card)
    record(f"card.{action}", f"card:{serial}", {"version": card.version,
                                                  "queued_pushes": result.queued_pushes})
    session.commit()
    return reply(card_out(card, CardAction, queued_pushes=result.queued_pushes,
                          card_problems=result.problems))


@bp.post("/cards/<serial>/void")
@require("write")
@spec.validate(resp=responses({200: CardAction}, 403, 404), tags=[TAG], operation_id="voidCard")
def void_card(serial: str) -> Any:
    """Void a card: Wallet shows it as void and stops updating it."""
    return _action(serial, "void")


@bp.post("/cards/<serial>/reissue")
@require("write")
@spec.validate(resp=responses({200: CardAction}, 403, 404), tags=[TAG],
               operation_id="reissueCard")
def reissue_card(serial: str) -> Any:
    """Re-issue: un-void and force a new version of the same serial, pushed to devices
    (Apple forbids changing an installed card's serial)."""
    return _action(serial, "reissue")


@bp.post("/cards/<serial>/push")
@require("write")
@spec.validate(resp=responses({200: CardAction}, 403, 404), tags=[TAG], operation_id="pushCard")
def push_card(serial: str) -> Any:
    """Force a push: every device of the card is told to check it again."""
    return _action(serial, "push")


@bp.get("/device-logs")
@require("read")
@spec.validate(query=DeviceLogQuery, resp=responses({200: DeviceLogPage}, 400, 404, 422),
               tags=[TAG], operation_id="listDeviceLogs")
def list_device_logs() -> Any:
    """Lines Apple Wallet posted about the tenant's cards (newest last)."""
    params = query(DeviceLogQuery)
    # DeviceLog is not TenantOwned (most lines name no card): filter by tenant explicitly.
    statement = select(DeviceLog).where(DeviceLog.tenant_id == tenant_id())
    serials: dict[int, str] = {}
    if params.serial:
        card = load_card(params.serial)
        statement = statement.where(DeviceLog.card_id == card.id)
        serials[card.id] = card.serial_number
    rows, cursor = page(db(), statement, DeviceLog.id, params.limit, params.cursor)
    missing = {r.card_id for r in rows if r.card_id is not None} - set(serials)
    if missing:
        for card_id, serial in db().execute(select(Card.id, Card.serial_number)
                                            .where(Card.id.in_(missing))):
            serials[card_id] = serial
    return reply(DeviceLogPage(items=[
        DeviceLogOut(id=r.id, serial_number=serials.get(r.card_id) if r.card_id else None,
                     message=r.message, received_at=r.received_at) for r in rows],
        next_cursor=cursor))

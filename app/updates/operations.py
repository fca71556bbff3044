"""Domain operations behind the API (and, later, the dashboard): programs and cards.

Each one works in the caller's tenant session and goes through the update
pipeline (``app/updates.py``), so a change that alters what a card shows gives
it a new version and tag and queues its pushes in the same transaction, as a
CSV import or a webhook does. No Flask here.

Re-issuing. Apple identifies an installed pass by (pass type, serial number)
and forbids changing its serial or authentication token: a "new" card with a
new serial would be a second pass in the customer's Wallet, and the old one
would stop updating. So re-issuing keeps the serial and token, clears
``voided``, and forces a new version (and push) even if the content is
unchanged; devices then download the current pass.

Forcing a push. Devices only fetch what changed since their last update tag.
A forced push gives the card a new tag (not a new version) and queues pushes,
so every device asks again and gets the card's current state; use it after
fixing a delivery problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.infra.models import Card, GoogleObject, Program, PushJob, Registration
from app.updates import refresh as updates
from app.wallet.template import TemplateError

if TYPE_CHECKING:
    from app.services import Services


@dataclass
class CardResult:
    card: Card
    queued_pushes: int
    problems: list[str]


def _pending_jobs(session: Session, card: Card) -> int:
    return session.scalar(select(func.count(PushJob.id)).where(
        PushJob.card_id == card.id, PushJob.done_at.is_(None))) or 0


def _refresh(session: Session, services: Services, card: Card) -> CardResult:
    before = _pending_jobs(session, card)
    refresh = updates.refresh_cards(session, services, [card])
    return CardResult(card, _pending_jobs(session, card) - before, refresh.errors)


def void_card(session: Session, services: Services, card: Card) -> CardResult:
    """Mark a card void: Wallet shows it as such and stops asking for updates."""
    card.voided = True
    return _refresh(session, services, card)


def reissue_card(session: Session, services: Services, card: Card) -> CardResult:
    """Un-void and force a new version of the same serial (see module docstring)."""
    card.voided = False
    card.content_hash = None  # the next render differs from "nothing": version + 1
    return _refresh(session, services, card)


def push_card(session: Session, card: Card) -> CardResult:
    """A new update tag and pushes to every device, content unchanged."""
    before = _pending_jobs(session, card)
    updates.mark_changed(session, [card])
    return CardResult(card, _pending_jobs(session, card) - before, [])


def device_counts(session: Session, card: Card) -> tuple[int, bool]:
    """(registered Apple devices, saved in Google Wallet)."""
    apple = session.scalar(select(func.count(Registration.id)).where(
        Registration.card_id == card.id)) or 0
    saved = session.scalar(select(GoogleObject.saved).where(GoogleObject.card_id == card.id))
    return apple, bool(saved)


# -- programs -----------------------------------------------------------------------------

@dataclass
class ProgramResult:
    program: Program
    cards_updated: int
    problems: list[str]


def update_program(session: Session, services: Services, program: Program,
                   changes: dict[str, Any]) -> ProgramResult:
    """Apply name/template/field_mapping/options changes, then refresh every card.

    A template that does not load is refused before anything changes
    (TemplateError); cards whose data no longer renders are reported, not undone.
    """
    if "template" in changes:
        services.templates.get(changes["template"])
    for name in ("name", "template", "field_mapping"):
        if name in changes:
            setattr(program, name, changes[name])
    if "options" in changes:
        options = dict(program.options or {})
        for name, value in changes["options"].items():
            if value is None:
                options.pop(name, None)
            else:
                options[name] = value
        program.options = options
    session.flush()
    cards = session.scalars(select(Card).where(Card.program_id == program.id)
                            .order_by(Card.id)).all()
    refresh = updates.refresh_cards(session, services, cards)
    return ProgramResult(program, len(refresh.changed), refresh.errors)


def card_count(session: Session, program: Program) -> int:
    return session.scalar(select(func.count(Card.id)).where(Card.program_id == program.id)) or 0


class ProgramInUse(ValueError):
    """Deleting would orphan installed cards without being asked to."""


def delete_program(session: Session, program: Program, *, cascade: bool) -> int:
    """Delete a program; with cards only when ``cascade`` (they stop updating). Returns
    the number of cards deleted."""
    count = card_count(session, program)
    if count and not cascade:
        raise ProgramInUse(f"program {program.slug!r} has {count} cards; delete with "
                           f"cascade=true to delete them too (installed cards stop updating)")
    for card in session.scalars(select(Card).where(Card.program_id == program.id)):
        session.delete(card)
    session.delete(program)
    session.flush()
    return count


__all__ = ["CardResult", "ProgramInUse", "ProgramResult", "TemplateError", "card_count",
           "delete_program", "device_counts", "push_card", "reissue_card", "update_program",
           "void_card"]

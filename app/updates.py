"""The update pipeline: customer data changed -> cards re-rendered -> devices told.

Update tags. Apple's ``passesUpdatedSince`` needs a marker that never skips
a change. Wall-clock seconds do (two changes in one second), and so does a
plain database sequence (a transaction that took tag 7 may commit after one
that took tag 8, and a device that read in between never sees 7). Here a tag
comes from one counter row incremented *inside* the transaction that changes
the card: the row lock is held until commit, so tags become visible in order.
Tags are taken as the last step before commit to keep that lock short.

Pushes. Each changed card with registered devices gets a ``PushJob`` row in
the same transaction (an outbox): if the process dies after commit, the row
is still there and the sweeper (app/jobs.py) queues it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import cards, outbox
from app.db import PUSH_DISPATCH_KEY
from app.models import Card, Counter, Customer, GoogleObject, PushJob, Registration

if TYPE_CHECKING:
    from app.services import Services

UPDATE_TAG = "card_update_tag"


def reserve_update_tags(session: Session, count: int = 1) -> range:
    """Take `count` consecutive tags; the counter row stays locked until commit."""
    for _ in range(2):
        value = session.execute(
            update(Counter).where(Counter.name == UPDATE_TAG)
            .values(value=Counter.value + count).returning(Counter.value)
        ).scalar()
        if value is not None:
            return range(value - count + 1, value + 1)
        try:
            with session.begin_nested():
                session.add(Counter(name=UPDATE_TAG, value=0))
        except IntegrityError:
            pass  # another transaction created it first: increment that one
    raise RuntimeError("could not create the update-tag counter")


def queue_pushes(session: Session, changes: list[tuple[int, int, int]]) -> int:
    """Add a push job for each (card id, tenant id, tag) whose card has devices to tell."""
    if not changes:
        return 0
    card_ids = [card_id for card_id, _, _ in changes]
    with_devices = set(session.scalars(
        select(Registration.card_id).where(Registration.card_id.in_(card_ids),
                                           Registration.push_problem.is_(None))))
    with_google = set(session.scalars(
        select(GoogleObject.card_id).where(GoogleObject.card_id.in_(card_ids))))
    jobs = [PushJob(tenant_id=tenant_id, card_id=card_id, update_tag=tag)
            for card_id, tenant_id, tag in changes if card_id in with_devices]
    # A card saved to Google Wallet gets its object patched through the same outbox.
    jobs += [PushJob(tenant_id=tenant_id, card_id=card_id, update_tag=tag, channel="google")
             for card_id, tenant_id, tag in changes if card_id in with_google]
    if jobs:
        session.add_all(jobs)
        session.flush()
        outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [job.id for job in jobs])
    return len(jobs)


def mark_changed(session: Session, changed: list[Card]) -> None:
    """Give changed cards new tags, and queue pushes for those with devices."""
    if not changed:
        return
    tags = reserve_update_tags(session, len(changed))
    for card, tag in zip(changed, tags):
        card.update_tag = tag
    session.flush()
    queue_pushes(session, [(card.id, card.tenant_id, card.update_tag) for card in changed])


@dataclass
class Refresh:
    changed: list[Card] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # cards whose data no longer renders


def refresh_cards(session: Session, services: Services, targets: Iterable[Card]) -> Refresh:
    """Re-render cards; those whose content changed get a new version, tag and push.

    A card whose data cannot be rendered (a template/data error naming the field)
    is reported and left as it was; the data change itself is kept.
    """
    result = Refresh()
    for card in targets:
        try:
            builder = services.pass_builder(card.program,
                                            cards.apple_identity(session, card.program))
            if cards.render(card, services, builder).changed:
                result.changed.append(card)
        except (ValueError, LookupError) as exc:
            result.errors.append(f"card {card.serial_number}: {exc}")
    mark_changed(session, result.changed)
    return result


def customers_changed(session: Session, services: Services,
                      customers: Iterable[Customer]) -> Refresh:
    """Call after changing customer data by any path (import, API, webhook, form)."""
    targets = [card for customer in customers for card in customer.cards]
    return refresh_cards(session, services, targets)



"""Domain events: a stage says what happened, later stages listen.

A stage that changes data publishes an event in the session making the change;
subscribers run right there, synchronously, so whatever they write (webhook
deliveries) commits or rolls back with the change. Subscribers are registered
per :class:`~app.infra.db.Database` by the composition root
(:class:`app.services.Services`), never at import time: the stage that publishes
does not import the ones that listen, so dependencies point one way (customers
and tracking below webhooks). A session of a database nobody subscribed to
publishes into the void.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from app.infra.models import Consent, Customer

#: Session.info key: the subscribers of the session's database (set by Database.session).
SUBSCRIBERS = "passerelle.event_subscribers"


@dataclass(frozen=True)
class ConsentRecorded:
    """A customer's consent decision that differs from the current one was recorded."""

    customer: Customer
    consent: Consent


@dataclass(frozen=True)
class Announced:
    """Something marketers' tools hear about, as a webhook event of ``type``
    (``customer.enrolled``, ``card.installed`` ...); ``data`` carries ids only."""

    tenant_id: int
    type: str
    data: dict[str, Any]


Event = ConsentRecorded | Announced
Subscriber = Callable[[Session, Event], None]


def publish(session: Session, event: Event) -> None:
    """Hand ``event`` to every subscriber of the session's database, in order."""
    for subscriber in session.info.get(SUBSCRIBERS, ()):
        subscriber(session, event)

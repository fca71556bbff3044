"""Delivering push jobs: tell every registered device of a changed card to fetch it.

A job is claimed with a lease (so two workers never push the same job at once,
and a job whose worker died is picked up again when the lease ends), pushed
through APNs, and each device's outcome is recorded:

- 410 Unregistered: the registration is removed and an install event says so;
- 400 BadDeviceToken / DeviceTokenNotForTopic: the registration is flagged and
  no longer pushed (usually a certificate or environment mix-up);
- 429, 5xx, network errors: those devices are retried with exponential backoff
  for up to 24 hours;
- 403 and topic errors: recorded for operators (the certificate is at fault).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import cards, install_state, outbox
from app.models import Card, PushAttempt, PushJob, Registration, utcnow

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)

LEASE = dt.timedelta(minutes=2)  # the default of PASSERELLE_PUSH_LEASE_SECONDS
GIVE_UP_AFTER = dt.timedelta(hours=24)
FIRST_RETRY = dt.timedelta(seconds=10)
MAX_RETRY = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Delivery:
    job_id: int
    state: str  # "done" | "retry" | "skipped" | "gave_up"
    retry_in: float | None = None  # seconds, when state == "retry"
    sent: int = 0


def backoff(attempt: int) -> dt.timedelta:
    return outbox.backoff(attempt, FIRST_RETRY, MAX_RETRY)


def claim(session: Session, job_id: int, now: dt.datetime,
          lease: dt.timedelta = LEASE) -> bool:
    """Take the job for one lease; False if done, leased by another worker, or not due."""
    return outbox.claim(session, PushJob, job_id, now, lease)


def deliver(services: Services, job_id: int) -> Delivery:
    now = utcnow()
    with services.db.session() as session:
        lease = dt.timedelta(seconds=services.settings.push_lease_seconds)
        if not claim(session, job_id, now, lease):
            return Delivery(job_id, "skipped")
        job = session.get(PushJob, job_id)
        assert job is not None
        card = session.get(Card, job.card_id)
        if job.channel == "google":
            return _deliver_google(session, services, job, card, now)
        query = select(Registration).where(Registration.card_id == job.card_id,
                                           Registration.push_problem.is_(None))
        if job.registration_ids is not None:
            query = query.where(Registration.id.in_(job.registration_ids))
        registrations = session.scalars(query).all()
        if card is None or not registrations:
            job.done_at, job.claimed_until = now, None
            session.commit()
            return Delivery(job_id, "done")
        identity_row = cards.apple_identity(session, card.program)
        client = services.apns_client(identity_row)
        results = client.push(identity_row.pass_type_identifier,
                              [r.push_token for r in registrations])
        retry_ids: list[int] = []
        sent = 0
        for registration, result in zip(registrations, results):
            session.add(PushAttempt(
                tenant_id=card.tenant_id, card_id=card.id,
                device=registration.device_library_identifier, status=result.status,
                outcome=result.outcome, reason=(result.reason or "")[:200] or None,
                apns_id=result.apns_id))
            if result.outcome == "sent":
                sent += 1
            elif result.outcome == "unregistered":
                session.delete(registration)
                install_state.record(session, card, "apple", "push_gone",
                                     device=registration.device_library_identifier)
            elif result.outcome == "bad_token":
                registration.push_problem = result.reason or "BadDeviceToken"
            elif result.outcome == "retry":
                retry_ids.append(registration.id)
            elif result.outcome == "credentials":
                log.error("APNs refused certificate for %s: %s",
                          identity_row.pass_type_identifier, result.reason)
        job.claimed_until = None
        if not retry_ids:
            job.done_at = now
            state = Delivery(job_id, "done", sent=sent)
        elif now - job.created_at > GIVE_UP_AFTER:
            job.done_at = now
            state = Delivery(job_id, "gave_up", sent=sent)
        else:
            delay = backoff(job.attempts)
            job.registration_ids = retry_ids
            job.not_before = now + delay
            state = Delivery(job_id, "retry", retry_in=delay.total_seconds(), sent=sent)
        session.commit()
        return state


def _deliver_google(session: Session, services: Services, job: PushJob, card: Card | None,
                    now: dt.datetime) -> Delivery:
    """Patch the card's Google Wallet object (and notify within Google's budget)."""
    from app.google.client import GoogleApiError
    from app.google.wallet import GoogleNotConfigured, sync_object

    state = Delivery(job.id, "done")
    if card is not None:
        try:
            client = services.google_client(card.program.tenant)
            sync_object(session, services, client, card)
        except GoogleNotConfigured:
            pass  # Google was switched off for this tenant: nothing to update
        except GoogleApiError as exc:
            retryable = exc.status is None or exc.status == 429 or exc.status >= 500
            if retryable and now - job.created_at <= GIVE_UP_AFTER:
                delay = backoff(job.attempts)
                job.not_before, job.claimed_until = now + delay, None
                session.commit()
                return Delivery(job.id, "retry", retry_in=delay.total_seconds())
            log.error("Google Wallet update of card %s failed: %s", card.serial_number, exc)
            state = Delivery(job.id, "gave_up")
    job.done_at, job.claimed_until = now, None
    session.commit()
    return state


def due_jobs(services: Services, quiet_for: dt.timedelta = dt.timedelta(seconds=30),
             limit: int = 1000) -> list[int]:
    """Jobs that should be running but are not queued anywhere we can see."""
    with services.db.session() as session:
        return outbox.due_ids(session, PushJob, utcnow(), quiet_for, limit)

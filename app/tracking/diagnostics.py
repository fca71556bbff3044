"""A card's diagnostic timeline, for "my card does not update" investigations.

Merges, in time order: the card's current version, install events, push jobs,
per-device push outcomes, the lines Wallet posted to /v1/log that name the card,
and, while the push workers cannot connect to APNs with the card's certificate,
that problem. Push outcomes and finished jobs are a window (app/retention.py,
`passerelle prune`): the timeline says how long it is.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.models import (
    AppleIdentity,
    Card,
    DeviceLog,
    InstallEvent,
    PushAttempt,
    PushJob,
    Registration,
    utcnow,
)


@dataclass(frozen=True)
class Entry:
    at: dt.datetime
    kind: str
    text: str


def _device(device: str | None) -> str:
    return (device or "?")[:8] + "…"  # enough to tell devices apart, not to replay


def timeline(session: Session, serial: str, keep_days: int = 30) -> list[Entry]:
    """Everything known about one card, oldest first; ``keep_days`` is the
    retention of push outcomes (0: kept forever)."""
    card = session.scalar(select(Card).where(Card.serial_number == serial))
    if card is None:
        raise LookupError(f"no card with serial {serial!r}")
    entries = [Entry(card.created_at, "issued", f"program {card.program.slug}"),
               Entry(card.last_modified, "content", f"version {card.version}, "
                                                    f"update tag {card.update_tag}"
                                                    + (", voided" if card.voided else ""))]
    for event in session.scalars(select(InstallEvent).where(InstallEvent.card_id == card.id)):
        entries.append(Entry(event.occurred_at, event.kind,
                             f"{event.platform} device {_device(event.device)}"))
    for reg in session.scalars(select(Registration).where(Registration.card_id == card.id)):
        if reg.push_problem:
            entries.append(Entry(reg.updated_at, "flagged",
                                 f"device {_device(reg.device_library_identifier)}: "
                                 f"{reg.push_problem} (check the certificate and environment)"))
    for job in session.scalars(select(PushJob).where(PushJob.card_id == card.id)):
        state = "done" if job.done_at else f"pending (attempts {job.attempts})"
        entries.append(Entry(job.created_at, "push queued", f"tag {job.update_tag}, {state}"))
    for attempt in session.scalars(select(PushAttempt).where(PushAttempt.card_id == card.id)):
        entries.append(Entry(attempt.attempted_at, "push", f"device {_device(attempt.device)}: "
                             f"{attempt.outcome} {attempt.status or ''} {attempt.reason or ''}"
                             .rstrip()))
    for log in session.scalars(select(DeviceLog).where(DeviceLog.card_id == card.id)):
        entries.append(Entry(log.received_at, "wallet log", log.message))
    identity = session.scalar(select(AppleIdentity).where(
        AppleIdentity.pass_type_identifier == card.program.pass_type_identifier))
    if identity is not None and identity.apns_failing_since is not None:
        entries.append(Entry(identity.apns_failing_since, "apns down",
                             f"connections with the certificate fail, pushes paused and "
                             f"retried: {identity.apns_problem}"))
    entries.sort(key=lambda e: e.at)
    window = utcnow() - dt.timedelta(days=keep_days)
    if keep_days and card.created_at < window:
        entries.insert(0, Entry(window, "history", f"push outcomes are kept "
                                                   f"{keep_days} days (passerelle prune)"))
    return entries

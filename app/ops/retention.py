"""Retention: logs and finished outbox rows are deleted once they are old enough.

Every table here grows with traffic and is read only for recent history
(support timelines, delivery logs) or for deduplication within a short window.
What marketers target — install state, consents, customers, cards — is never
pruned: segments and install states are the same before and after
(`tests/test_retention.py`). Install events stay too: they are the source the
install state is rebuilt from.

Deletion runs in batches of a few thousand rows, each in its own short
transaction, oldest ids first, so no table is locked for long and a large
backlog is worked off by repeated runs (the worker's daily task, or
``passerelle prune``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, delete, select

from app.infra.db import Database
from app.infra.models import (
    CrmOutboxEntry,
    DeviceLog,
    FunnelEvent,
    GoogleCallbackNonce,
    ImportJob,
    InboundEvent,
    MailOutboxEntry,
    PushAttempt,
    PushJob,
    WebhookDelivery,
    utcnow,
)

BATCH = 5000


@dataclass(frozen=True)
class Policy:
    name: str
    model: Any
    age: Any  # the column whose age counts
    days: int  # default; 0 = keep forever
    why: str
    #: Overrides below this are refused (0, keep forever, is always allowed).
    minimum: int = 1
    extra: Callable[[], list[ColumnElement[bool]]] = field(default=lambda: [])

    def conditions(self, cutoff: dt.datetime) -> list[ColumnElement[bool]]:
        return [self.age.is_not(None), self.age < cutoff, *self.extra()]


#: The tables, their default retention in days, and why that long. The README's
#: settings table and docs/operations.md repeat these numbers.
POLICIES: tuple[Policy, ...] = (
    Policy("push_attempts", PushAttempt, PushAttempt.attempted_at, 30,
           "per-device push outcomes for support timelines", minimum=8),
    Policy("device_logs", DeviceLog, DeviceLog.received_at, 30,
           "messages Wallet posts to /log, for support"),
    Policy("push_jobs", PushJob, PushJob.done_at, 8,
           "finished push and Google update jobs", minimum=8),
    Policy("webhook_deliveries", WebhookDelivery, WebhookDelivery.done_at, 30,
           "finished webhook deliveries and their attempts (redelivery window)"),
    Policy("crm_outbox", CrmOutboxEntry, CrmOutboxEntry.done_at, 30, "finished CRM writes"),
    Policy("mail_outbox", MailOutboxEntry, MailOutboxEntry.done_at, 30,
           "finished card-link emails (the cooldown reads the last 15 minutes)"),
    Policy("import_jobs", ImportJob, ImportJob.finished_at, 90,
           "finished import jobs and their per-row errors"),
    Policy("inbound_events", InboundEvent, InboundEvent.received_at, 30,
           "inbound hook events kept for idempotency: a replay older than this is applied "
           "again", extra=lambda: [InboundEvent.status != "failed"]),
    Policy("google_callback_nonces", GoogleCallbackNonce, GoogleCallbackNonce.received_at, 7,
           "callback nonces; Google's callbacks expire within an hour"),
    Policy("funnel_events", FunnelEvent, FunnelEvent.occurred_at, 400,
           "link opens, downloads and form events; campaign funnels older than this lose "
           "their counts"),
)


def parse_overrides(text: str) -> dict[str, int]:
    """``"push_attempts=14, device_logs=7"`` → days per table (0 = keep forever)."""
    known = {p.name: p for p in POLICIES}
    overrides: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, days = part.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(f"PASSERELLE_RETENTION: {part!r} is not <table>=<days> with a "
                             f"table among {', '.join(sorted(known))}")
        try:
            overrides[name] = int(days)
        except ValueError:
            raise ValueError(f"PASSERELLE_RETENTION: {part!r}: days must be a whole "
                             f"number") from None
        if overrides[name] < 0:
            raise ValueError(f"PASSERELLE_RETENTION: {part!r}: days cannot be negative")
        if 0 < overrides[name] < known[name].minimum:
            raise ValueError(f"PASSERELLE_RETENTION: {part!r}: at least "
                             f"{known[name].minimum} days (the dashboard's health page reads "
                             f"the last 7), or 0 to keep forever")
    return overrides


def effective_days(overrides: str) -> dict[str, int]:
    days = {p.name: p.days for p in POLICIES}
    days.update(parse_overrides(overrides))
    return days


def prune(db: Database, overrides: str = "", *, now: dt.datetime | None = None,
          batch: int = BATCH, only: set[str] | None = None,
          progress: Callable[[str, int], object] | None = None) -> dict[str, int]:
    """Delete rows past their retention, table by table; returns rows deleted per table."""
    now = now or utcnow()
    days = effective_days(overrides)
    deleted: dict[str, int] = {}
    for policy in POLICIES:
        if (only is not None and policy.name not in only) or days[policy.name] == 0:
            continue
        cutoff = now - dt.timedelta(days=days[policy.name])
        deleted[policy.name] = 0
        for count in _batches(db, policy, cutoff, batch):
            deleted[policy.name] += count
            if progress:
                progress(policy.name, count)
    return deleted


def _batches(db: Database, policy: Policy, cutoff: dt.datetime, batch: int) -> Iterator[int]:
    key = policy.model.__mapper__.primary_key[0]
    while True:
        with db.transaction() as session:
            ids = list(session.scalars(select(key).where(*policy.conditions(cutoff))
                                       .order_by(key).limit(batch)))
            if not ids:
                return
            # webhook_attempts, like every child row here, go with their parent by
            # ON DELETE CASCADE.
            session.execute(delete(policy.model).where(key.in_(ids))
                            .execution_options(synchronize_session=False))
        yield len(ids)
        if len(ids) < batch:
            return

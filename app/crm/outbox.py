"""The CRM outbox: writes to an external CRM that survive its outages.

Why an outbox: an enrollment or an update is committed locally together with
a ``CrmOutboxEntry`` row (same transaction, :func:`record_write`); delivery
happens afterwards, from a worker, as often as needed. A CRM that is down
therefore delays a write but never loses it.

Delivery mirrors the push outbox (app/pushes.py): an entry is claimed with a
lease (two workers never send it at once; a dead worker's entry is taken
again when the lease ends), sent, and then either done, retried with
exponential backoff, or finished with ``last_error`` set:

- ``done``: ``done_at`` set, ``last_error`` cleared;
- ``retry``: CRM unavailable (network, timeout, 5xx, 429, 401/403): ``not_before``
  moves by the backoff, ``last_error`` says why;
- ``rejected``: the CRM refused the write (4xx): ``done_at`` set and
  ``last_error`` starts with ``rejected:`` — kept for operators, never retried;
- ``gave_up``: still unavailable 7 days after the write: ``done_at`` set,
  ``last_error`` starts with ``gave up``.

Entries of one customer are delivered in order: an entry is not claimed while
an older one of the same customer is undone (a create is never overtaken by
its update). Delivery is at least once; each entry carries a stable
``Idempotency-Key`` so a CRM that honours it can drop a repeat.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, exists, func, literal_column, select, update
from sqlalchemy.orm import Session, aliased

from app.crm.builtin import BuiltinConnector
from app.crm.connections import connector_for
from app.crm.connector import (
    STANDARD_FIELDS,
    Connector,
    CrmError,
    CrmNotFound,
    CrmRejected,
    CrmUnavailable,
)
from app.infra import outbox as lease
from app.infra.db import CRM_DISPATCH_KEY
from app.infra.models import CrmConnection, CrmOutboxEntry, Customer, utcnow
from app.updates import refresh as updates

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)

LEASE = dt.timedelta(minutes=2)
GIVE_UP_AFTER = dt.timedelta(days=7)
FIRST_RETRY = dt.timedelta(seconds=10)
MAX_RETRY = dt.timedelta(hours=1)
OPERATIONS = ("create", "update")


# -- what is written ----------------------------------------------------------------------

def customer_payload(customer: Customer,
                     changed_fields: Iterable[str] | None = None) -> dict[str, Any]:
    """The customer as we send it, in our field names (HttpConnector maps it to the CRM's).

    ``changed_fields`` limits it to what changed: standard field names,
    ``attributes``/``consents`` (all of them) or ``attributes.<name>`` /
    ``consents.<kind>``. None: everything. Only named consents are sent, so a
    later write never replays an old decision over one made in the CRM.
    Consents carry their exact text, time and source. Flush first, so new
    consents have their time.
    """
    wanted = None if changed_fields is None else set(changed_fields)
    _check_field_names(wanted)

    def named(group: str, name: str) -> bool:
        return wanted is None or group in wanted or f"{group}.{name}" in wanted

    payload: dict[str, Any] = {"external_id": customer.external_id}
    for name in STANDARD_FIELDS:
        if wanted is None or name in wanted:
            value = getattr(customer, name)
            payload[name] = value.isoformat() if isinstance(value, dt.date) else value
    attributes = dict(customer.attributes or {})
    if wanted is not None:  # a named attribute that is gone is sent as null
        attributes.update({n.split(".", 1)[1]: None for n in wanted
                           if n.startswith("attributes.") and n.split(".", 1)[1] not in attributes})
    picked = {name: value for name, value in attributes.items() if named("attributes", name)}
    consents = {kind: {"granted": c.granted, "text": c.text,
                       "recorded_at": c.recorded_at.isoformat() if c.recorded_at else None,
                       "source": c.source}
                for kind, c in customer.current_consents().items() if named("consents", kind)}
    if picked or wanted is None:
        payload["attributes"] = picked
    if consents or wanted is None:
        payload["consents"] = consents
    return payload


def _check_field_names(wanted: set[str] | None) -> None:
    for name in wanted or ():
        group = name.split(".", 1)[0]
        if name not in (*STANDARD_FIELDS, "external_id", "attributes", "consents") \
                and not (group in ("attributes", "consents") and "." in name):
            raise ValueError(f"changed_fields: {name!r} is not a customer field")


def record_write(session: Session, customer: Customer, operation: str,
                 changed_fields: Iterable[str] | None = None) -> CrmOutboxEntry | None:
    """Queue a write to the tenant's external CRM, in the caller's transaction.

    None when the tenant's CRM is the built-in store. A ``create`` always carries
    the whole customer; an ``update`` the ``changed_fields`` (None: everything).
    The entry is queued for delivery when the transaction commits.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"unknown CRM operation {operation!r}")
    kind = session.scalar(select(CrmConnection.kind)
                          .where(CrmConnection.tenant_id == customer.tenant_id))
    if kind in (None, "builtin"):
        return None
    session.flush()  # the customer's id, and the time of consents just recorded
    entry = CrmOutboxEntry(
        tenant_id=customer.tenant_id, customer_id=customer.id, operation=operation,
        payload=customer_payload(customer, None if operation == "create" else changed_fields))
    session.add(entry)
    session.flush()
    lease.queue_after_commit(session, CRM_DISPATCH_KEY, [entry.id])
    return entry




def pending_fields(session: Session, customer_id: int) -> set[str]:
    """Field names (``email``, ``attributes.points``, ``consents.sms``) written locally
    and not yet delivered: a fresh read must not overwrite them with older CRM data."""
    names: set[str] = set()
    for payload in session.scalars(select(CrmOutboxEntry.payload).where(
            CrmOutboxEntry.customer_id == customer_id, CrmOutboxEntry.done_at.is_(None))):
        names |= {name for name in STANDARD_FIELDS if name in payload}
        names |= {f"attributes.{name}" for name in payload.get("attributes") or {}}
        names |= {f"consents.{kind}" for kind in payload.get("consents") or {}}
    return names


# -- delivering ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    entry_id: int
    state: str  # "done" | "retry" | "gave_up" | "rejected" | "skipped"
    retry_in: float | None = None  # seconds, when state == "retry"
    unblocked: tuple[int, ...] = ()  # the same customer's next entry, now deliverable


def backoff(attempt: int) -> dt.timedelta:
    return lease.backoff(attempt, FIRST_RETRY, MAX_RETRY)


def _not_blocked() -> ColumnElement[bool]:
    """No older undone entry of the same customer (writes keep their order)."""
    older = aliased(CrmOutboxEntry)
    return ~exists().where(older.customer_id == CrmOutboxEntry.customer_id,
                           older.id < CrmOutboxEntry.id, older.done_at.is_(None))


def _claimable(now: dt.datetime) -> list[ColumnElement[bool]]:
    return [*lease.claimable(CrmOutboxEntry, now), _not_blocked()]


def claim(session: Session, entry_id: int, now: dt.datetime) -> bool:
    """Take the entry for one lease; False if done, leased, not due, or behind an older one."""
    return lease.claim(session, CrmOutboxEntry, entry_id, now, LEASE, _not_blocked())


def deliver(services: Services, entry_id: int) -> str:
    """Deliver one entry: "done" | "retry" | "gave_up" | "rejected" | "skipped"."""
    return attempt(services, entry_id).state


def attempt(services: Services, entry_id: int) -> Outcome:
    """:func:`deliver`, with the retry delay and the entries it unblocked (for the worker)."""
    now = utcnow()
    with services.db.session() as session:
        if not claim(session, entry_id, now):
            return Outcome(entry_id, "skipped")
        entry = session.get(CrmOutboxEntry, entry_id)
        customer = session.get(Customer, entry.customer_id) if entry else None
        if entry is None or customer is None:
            return Outcome(entry_id, "skipped")  # deleted with its customer meanwhile
        try:
            connector = connector_for(session, services, entry.tenant_id)
            if isinstance(connector, BuiltinConnector):
                raise CrmUnavailable(f"tenant {entry.tenant_id}: no external CRM is configured")
            payload = {**entry.payload, "external_id": customer.external_id}
            # Everything we know, in case the CRM lost the customer an update is for.
            whole = customer_payload(customer) if entry.operation == "update" else payload
            session.commit()  # hold no transaction while waiting for the CRM
            crm_id = _send(connector, entry, payload, whole)
        except CrmRejected as exc:
            log.warning("CRM outbox entry %s rejected: %s", entry_id, exc)
            return _finish(session, entry, now, "rejected", f"rejected: {exc}")
        except CrmError as exc:
            return _retry_or_give_up(session, entry, now, exc)
        _adopt_crm_id(session, services, customer, crm_id)
        return _finish(session, entry, now, "done", None)


def _send(connector: Connector, entry: CrmOutboxEntry, payload: dict[str, Any],
          whole: dict[str, Any]) -> str | None:
    key = f"passerelle-{entry.tenant_id}-{entry.id}-{int(entry.created_at.timestamp())}"
    try:
        return connector.write(entry.operation, payload, idempotency_key=key)
    except CrmNotFound:
        # The CRM lost (or never had) this customer: create them with all we know.
        log.warning("CRM has no customer %s; creating it (outbox entry %s)",
                    payload.get("external_id"), entry.id)
        return connector.write("create", whole, idempotency_key=f"{key}-create")


def _adopt_crm_id(session: Session, services: Services, customer: Customer,
                  crm_id: str | None) -> None:
    """A CRM that assigns its own ids wins: links, emails and the barcode use its id."""
    if not crm_id or crm_id == customer.external_id:
        return
    taken = session.scalar(select(Customer.id).where(
        Customer.tenant_id == customer.tenant_id, Customer.external_id == crm_id))
    if taken is not None or len(crm_id) > 128:
        log.error("CRM gave customer %s the id %s, which is unusable or held by customer %s; "
                  "kept %s", customer.id, crm_id, taken, customer.external_id)
        return
    log.info("customer %s: external id %s -> %s (assigned by the CRM)", customer.id,
             customer.external_id, crm_id)
    customer.external_id = crm_id
    updates.customers_changed(session, services, [customer])


def _finish(session: Session, entry: CrmOutboxEntry, now: dt.datetime, state: str,
            error: str | None) -> Outcome:
    entry.done_at, entry.claimed_until = now, None
    entry.last_error = error[:500] if error else None
    session.commit()
    following = session.scalar(
        select(CrmOutboxEntry.id).where(CrmOutboxEntry.customer_id == entry.customer_id,
                                        CrmOutboxEntry.id > entry.id,
                                        CrmOutboxEntry.done_at.is_(None))
        .order_by(CrmOutboxEntry.id).limit(1))
    session.commit()
    return Outcome(entry.id, state, unblocked=(following,) if following else ())


def _retry_or_give_up(session: Session, entry: CrmOutboxEntry, now: dt.datetime,
                      exc: CrmError) -> Outcome:
    if now - entry.created_at > GIVE_UP_AFTER:
        log.error("CRM outbox entry %s: gave up after %d attempts: %s",
                  entry.id, entry.attempts, exc)
        return _finish(session, entry, now, "gave_up",
                       f"gave up after {entry.attempts} attempts: {exc}")
    delay = backoff(entry.attempts)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        delay = min(max(delay, dt.timedelta(seconds=retry_after)), MAX_RETRY)
    entry.not_before, entry.claimed_until = now + delay, None
    entry.last_error = str(exc)[:500]
    session.commit()
    log.info("CRM outbox entry %s: retry in %ds: %s", entry.id, delay.total_seconds(), exc)
    return Outcome(entry.id, "retry", retry_in=delay.total_seconds())


def due_entries(services: Services, quiet_for: dt.timedelta = dt.timedelta(seconds=30),
                limit: int = 1000, tenant_id: int | None = None) -> list[int]:
    """Entries that should be running but are not queued anywhere we can see: never
    delivered after ``quiet_for``, leases that ran out, retries that came due."""
    extra = [_not_blocked()]
    if tenant_id is not None:
        extra.append(CrmOutboxEntry.tenant_id == tenant_id)
    with services.db.session() as session:
        return lease.due_ids(session, CrmOutboxEntry, utcnow(), quiet_for, limit, *extra)


# -- operating it -------------------------------------------------------------------------

def flush(services: Services, tenant_id: int,
          progress: Callable[[int], object] | None = None) -> Counter[str]:
    """Deliver a tenant's undone entries now, waiting backoffs included (the operator
    says the CRM is back). Returns how many ended in each state."""
    with services.db.session() as session:
        session.execute(
            update(CrmOutboxEntry)
            .where(CrmOutboxEntry.tenant_id == tenant_id, CrmOutboxEntry.done_at.is_(None))
            .values(not_before=None).execution_options(synchronize_session=False))
        session.commit()
    states: Counter[str] = Counter()
    tried: set[int] = set()
    while True:  # a customer's next entry becomes due when the one before it is done
        batch = [i for i in due_entries(services, dt.timedelta(0), tenant_id=tenant_id)
                 if i not in tried]
        if not batch:
            return states
        for entry_id in batch:
            tried.add(entry_id)
            states[deliver(services, entry_id)] += 1
            if progress:
                progress(1)


@dataclass
class OutboxSummary:
    pending: int = 0  # not delivered yet
    retrying: int = 0  # of which already tried at least once
    delivered: int = 0
    failed: int = 0  # rejected by the CRM or given up: kept with last_error
    problems: list[CrmOutboxEntry] = field(default_factory=list)  # latest with last_error


def summary(session: Session, tenant_id: int, problems: int = 10) -> OutboxSummary:
    entry = CrmOutboxEntry
    result = OutboxSummary()
    groups = (entry.done_at.is_(None), entry.attempts > literal_column("0"),
              entry.last_error.is_(None))  # no bound parameter: PostgreSQL must see one expression
    rows = session.execute(select(*groups, func.count()).where(entry.tenant_id == tenant_id)
                           .group_by(*groups))
    for undone, tried, clean, count in rows:
        if undone:
            result.pending += count
            result.retrying += count if tried else 0
        elif clean:
            result.delivered += count
        else:
            result.failed += count
    result.problems = list(session.scalars(
        select(entry).where(entry.tenant_id == tenant_id, entry.last_error.is_not(None))
        .order_by(entry.id.desc()).limit(problems)))
    return result

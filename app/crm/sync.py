"""Read-through: a customer is fetched fresh from the tenant's CRM when their link opens.

Why read-through rather than periodic sync: a link is opened rarely and by
one person, and that moment is when the card must show current points. The
local row is a copy: it is created or updated from the CRM's answer, its
cards re-render if anything they show changed, and it is what we serve when
the CRM is down — if it is recent enough.

Freshness of a copy is ``crm_fetched_at``; a copy never read from the CRM
(created here by an enrollment, its create maybe still in the outbox) counts
as fresh as its ``created_at``, because it holds exactly what the person just
gave us. Fields with writes still waiting in the outbox are not overwritten by
a fetch: the CRM's value for them is older than ours until delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crm import outbox
from app.crm.connections import connector_for
from app.crm.connector import STANDARD_FIELDS, CrmRecord, CrmStale, CrmUnavailable
from app.customers.customers import (
    CustomerChanges,
    CustomerConflict,
    CustomerDataError,
    UpsertResult,
    check_consent,
    clean_attribute,
    clean_standard,
    email_owner,
    find_customer,
    update_customer,
    upsert_customer,
)
from app.infra.models import CrmConnection, Customer, utcnow
from app.updates import refresh as updates

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)


def load_customer(session: Session, services: Services, tenant_id: int,
                  external_id: str) -> Customer | None:
    """The customer a link names, as current as the CRM allows; the caller commits.

    Built-in CRM: the local row or None. HTTP CRM: fetched fresh and stored
    locally; None if the CRM does not know them (unless our own create for them
    is still waiting in the outbox). CRM down: the local copy if within the
    tenant's staleness limit, else CrmStale.
    """
    local = find_customer(session, tenant_id, external_id)
    try:
        connector = connector_for(session, services, tenant_id)
        if connector.kind == "builtin":
            return local
        record = connector.fetch(external_id)
    except CrmUnavailable as exc:
        return _fallback(session, tenant_id, external_id, local, exc)
    if record is None:
        if local is not None and outbox.pending_fields(session, local.id):
            return local  # our create has not reached the CRM yet
        return None
    return store_record(session, services, tenant_id, record, external_id=external_id,
                        local=local)


def refresh_customer(session: Session, services: Services, customer: Customer) -> Customer:
    """:func:`load_customer` for a customer we already hold (unchanged if the CRM lacks them)."""
    fresh = load_customer(session, services, customer.tenant_id, customer.external_id)
    return fresh if fresh is not None else customer


def store_record(session: Session, services: Services, tenant_id: int, record: CrmRecord, *,
                 external_id: str | None = None, local: Customer | None = None) -> Customer:
    """Create or update the local copy of a CRM record (e.g. from ``find_by_email``),
    re-render its cards if it changed, and mark it fetched now."""
    external_id = external_id or record.external_id
    if local is None:
        local = find_customer(session, tenant_id, external_id)
    try:
        result = _store(session, tenant_id, external_id, local, record)
    except CustomerConflict:
        local = find_customer(session, tenant_id, external_id)  # a concurrent open created it
        if local is None:
            raise
        result = _store(session, tenant_id, external_id, local, record)
    customer = result.customer
    customer.crm_fetched_at = utcnow()
    session.flush()
    if result.changed and not result.created:
        updates.customers_changed(session, services, [customer])
    return customer


def _store(session: Session, tenant_id: int, external_id: str, local: Customer | None,
           record: CrmRecord) -> UpsertResult:
    changes = _changes(session, tenant_id, external_id, local, record)
    if local is not None:
        return update_customer(session, local, changes, source="crm")
    result = upsert_customer(session, tenant_id, external_id, changes, source="crm")
    assert result is not None
    return result


def _changes(session: Session, tenant_id: int, external_id: str, local: Customer | None,
             record: CrmRecord) -> CustomerChanges:
    """The record's provided fields, except those with writes still undelivered, and
    values the upsert would refuse (logged and skipped: the rest of the copy stays useful)."""
    provided = record.provided()
    if local is not None and local.id is not None:
        provided = provided - outbox.pending_fields(session, local.id)
    changes = CustomerChanges()
    for name in STANDARD_FIELDS:
        if name in provided:
            changes.fields[name] = _usable(record, name, partial(_standard, record, name))
    email = changes.fields.get("email")
    if email and email is not _SKIP and email_owner(session, tenant_id, email) not in (
            None, external_id):
        log.warning("CRM record %s: its email belongs to another local customer; not copied",
                    record.external_id)
        changes.fields["email"] = _SKIP
    for name, value in record.attributes.items():
        if f"attributes.{name}" in provided:
            changes.attributes[name] = _usable(record, f"attributes.{name}",
                                               partial(clean_attribute, name, value))
    for kind, granted in record.consents.items():
        if f"consents.{kind}" in provided:
            changes.consents[kind] = _usable(record, f"consents.{kind}",
                                             partial(check_consent, kind, granted))
    changes.fields = {k: v for k, v in changes.fields.items() if v is not _SKIP}
    changes.attributes = {k: v for k, v in changes.attributes.items() if v is not _SKIP}
    changes.consents = {k: v for k, v in changes.consents.items() if v is not _SKIP}
    return changes


_SKIP: Any = object()


def _standard(record: CrmRecord, name: str) -> Any:
    value = getattr(record, name)
    return None if value is None else clean_standard(name, value)


def _usable(record: CrmRecord, name: str, clean: Callable[[], Any]) -> Any:
    try:
        return clean()
    except CustomerDataError:
        # The field's name only: the value may be personal data.
        log.warning("CRM record %s: %s is not a value Passerelle stores; not copied",
                    record.external_id, name)
        return _SKIP


def _fallback(session: Session, tenant_id: int, external_id: str, local: Customer | None,
              exc: CrmUnavailable) -> Customer:
    limit = session.scalar(select(CrmConnection.max_staleness_seconds)
                           .where(CrmConnection.tenant_id == tenant_id)) or 0
    if local is None:
        raise CrmStale(f"{exc}; no local copy of customer {external_id}") from None
    age = (utcnow() - (local.crm_fetched_at or local.created_at)).total_seconds()
    if age > limit:
        raise CrmStale(f"{exc}; the copy of customer {external_id} is {int(age)}s old "
                       f"(limit {limit}s)") from None
    log.info("CRM unavailable; serving the %ds old copy of customer %s", age, external_id)
    return local

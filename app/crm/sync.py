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
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import updates
from app.crm import outbox
from app.crm.connector import STANDARD_FIELDS, CrmRecord, CrmStale, CrmUnavailable, connector_for
from app.customers import apply_changes, record_consent
from app.models import CrmConnection, Customer, utcnow

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
    local = _local(session, tenant_id, external_id)
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
        local = _local(session, tenant_id, external_id)
    created = False
    if local is None:
        local, created = _create_local(session, tenant_id, external_id)
    customer = local
    changed = _apply(session, customer, record)
    customer.crm_fetched_at = utcnow()
    session.flush()
    if changed and not created:
        updates.customers_changed(session, services, [customer])
    return customer


def _local(session: Session, tenant_id: int, external_id: str) -> Customer | None:
    return session.scalar(select(Customer).where(Customer.tenant_id == tenant_id,
                                                 Customer.external_id == external_id))


def _create_local(session: Session, tenant_id: int, external_id: str) -> tuple[Customer, bool]:
    customer = Customer(tenant_id=tenant_id, external_id=external_id, attributes={})
    try:
        with session.begin_nested():
            session.add(customer)
            session.flush()
    except IntegrityError:
        existing = _local(session, tenant_id, external_id)  # a concurrent open created it
        if existing is None:
            raise
        return existing, False
    return customer, True


def _apply(session: Session, customer: Customer, record: CrmRecord) -> bool:
    """Copy the record's provided fields, except those with writes still undelivered."""
    provided = record.provided()
    if customer.id is not None:
        provided = provided - outbox.pending_fields(session, customer.id)
    values = {name: getattr(record, name) for name in STANDARD_FIELDS if name in provided}
    if values.get("email") and _email_taken(session, customer, values["email"]):
        log.warning("CRM record %s: its email belongs to another local customer; not copied",
                    record.external_id)
        del values["email"]
    attributes = {name: value for name, value in record.attributes.items()
                  if f"attributes.{name}" in provided}
    changed = apply_changes(customer, values, attributes)
    for kind, granted in record.consents.items():
        if f"consents.{kind}" in provided:
            changed = record_consent(session, customer, kind, granted, "crm") or changed
    return changed


def _email_taken(session: Session, customer: Customer, email: str) -> bool:
    owner = session.scalar(select(Customer.id).where(Customer.tenant_id == customer.tenant_id,
                                                     Customer.email == email))
    return owner is not None and owner != customer.id


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

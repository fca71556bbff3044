"""The built-in store: Passerelle's own ``customers`` table is the CRM.

Why a connector at all for the local table: links and forms call the same
interface whatever the tenant runs, so the built-in case is not a branch in
every caller. Reads come from the caller's (tenant) session; writes are no-ops
because the caller has already changed the local row in its own transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crm.connector import STANDARD_FIELDS, CrmRecord
from app.customers.customers import CustomerDataError, normalize_email
from app.infra.models import Customer


def record_of(customer: Customer) -> CrmRecord:
    """A local customer as a CrmRecord (every field present)."""
    consents = {kind: c.granted for kind, c in customer.current_consents().items()}
    attributes = dict(customer.attributes or {})
    present = set(STANDARD_FIELDS) | {f"attributes.{name}" for name in attributes}
    present |= {f"consents.{kind}" for kind in consents}
    return CrmRecord(
        external_id=customer.external_id, email=customer.email,
        first_name=customer.first_name, last_name=customer.last_name, locale=customer.locale,
        phone=customer.phone, birthday=customer.birthday, attributes=attributes,
        consents=consents, present=frozenset(present))


class BuiltinConnector:
    kind = "builtin"

    def __init__(self, session: Session, tenant_id: int) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def fetch(self, external_id: str) -> CrmRecord | None:
        customer = self.session.scalar(select(Customer).where(
            Customer.tenant_id == self.tenant_id, Customer.external_id == external_id))
        return record_of(customer) if customer is not None else None

    def find_by_email(self, email: str) -> CrmRecord | None:
        try:
            normalized = normalize_email(email)
        except CustomerDataError:
            return None
        customer = self.session.scalar(select(Customer).where(
            Customer.tenant_id == self.tenant_id, Customer.email == normalized))
        return record_of(customer) if customer is not None else None

    def write(self, operation: str, payload: dict[str, Any], *,
              idempotency_key: str | None = None) -> str | None:
        if operation not in ("create", "update"):
            raise ValueError(f"unknown CRM operation {operation!r}")
        return None  # the caller's transaction already wrote the local row

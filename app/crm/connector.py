"""The one interface every CRM connector implements, the record it returns, its errors.

Why an interface: a tenant either lets Passerelle's own ``customers`` table be
the CRM (:mod:`app.crm.builtin`) or keeps its customer data in an external
system reached over HTTP (:mod:`app.crm.http`). Everything above this layer
(links, forms, the outbox) codes against :class:`Connector` and never asks
which one it has, except through ``kind``.

Error messages never carry personal data: they name ids, HTTP statuses and
field names only, because they end up in logs and in ``crm_outbox.last_error``.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from app.infra import db
from app.infra.models import CrmConnection

if TYPE_CHECKING:
    from app.crm.http import HttpConnector
    from app.services import Services

#: The customer fields a CRM record can carry besides ``attributes.*`` and ``consents.*``.
STANDARD_FIELDS = ("email", "first_name", "last_name", "locale", "phone", "birthday")


class CrmError(Exception):
    """Base of the connector errors; messages hold ids and statuses, never personal data."""


class CrmUnavailable(CrmError):
    """Network error, timeout, 5xx, 429 (or a misconfiguration an operator can fix):
    try again later. ``retry_after``: seconds the CRM asked us to wait, if it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CrmRejected(CrmError):
    """The CRM refuses this write (a 4xx about the request itself): retrying will not help."""


class CrmNotFound(CrmError):
    """An update named a customer the CRM does not have (HTTP 404 on PATCH)."""


class CrmStale(CrmError):
    """The CRM is down and our copy is older than the tenant's staleness limit (or absent)."""


@dataclass
class CrmRecord:
    """Customer data as the CRM has it, already mapped to our field names.

    ``present`` names the fields the CRM's answer actually contained (``email``,
    ``attributes.points``, ``consents.marketing_email``...), a null value
    included: a present ``None`` means "the CRM has no value", an absent field
    means "not mapped or not sent, leave ours alone". Left empty by a producer
    that does not know, every non-None value counts as present.
    """

    external_id: str
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    locale: str | None = None
    phone: str | None = None
    birthday: dt.date | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    consents: dict[str, bool] = field(default_factory=dict)
    present: frozenset[str] = frozenset()

    def provided(self) -> frozenset[str]:
        """The field names to apply to a local copy (see ``present``)."""
        if self.present:
            return self.present
        names = {name for name in STANDARD_FIELDS if getattr(self, name) is not None}
        names |= {f"attributes.{name}" for name in self.attributes}
        names |= {f"consents.{kind}" for kind in self.consents}
        return frozenset(names)


class Connector(Protocol):
    """Reads customers from a CRM and writes enrollments and updates back."""

    kind: str  # "builtin" | "http"

    def fetch(self, external_id: str) -> CrmRecord | None:
        """The CRM's current record, or None if it does not know this id.
        Raises CrmUnavailable."""
        ...

    def find_by_email(self, email: str) -> CrmRecord | None:
        """The CRM's record holding this email (for enrolling someone it already has)."""
        ...

    def write(self, operation: str, payload: dict[str, Any], *,
              idempotency_key: str | None = None) -> str | None:
        """Apply a ``create`` or ``update`` (payload from ``customer_payload``).
        Returns the CRM's id for a create if it assigns one. Raises CrmUnavailable,
        CrmRejected, or CrmNotFound (update of a customer the CRM does not have)."""
        ...


# -- choosing a tenant's connector ------------------------------------------------------

# HTTP connectors (each with its connection pool) are kept per Services object and
# tenant, and rebuilt when the tenant's configuration changes.
_http_cache: weakref.WeakKeyDictionary[Services, dict[int, tuple[str, HttpConnector]]] = (
    weakref.WeakKeyDictionary())
_cache_lock = threading.Lock()


def connector_for(session: Session, services: Services, tenant_id: int) -> Connector:
    """The tenant's connector: built-in when it has no CrmConnection or kind "builtin".

    A connection that cannot be used as configured raises CrmUnavailable, so reads
    fall back to local copies and outbox writes wait for the operator's fix.
    """
    from app.crm.builtin import BuiltinConnector

    row = session.scalar(select(CrmConnection).where(CrmConnection.tenant_id == tenant_id))
    if row is None or row.kind == "builtin":
        return BuiltinConnector(session, tenant_id)
    if row.kind != "http":
        raise CrmUnavailable(f"tenant {tenant_id}: unknown CRM kind {row.kind!r}")
    key = json.dumps([row.base_url, row.auth_header, row.auth_value_env, row.mapping,
                      row.timeout_seconds, row.max_staleness_seconds], sort_keys=True)
    with _cache_lock:
        per_tenant = _http_cache.setdefault(services, {})
        cached = per_tenant.get(tenant_id)
        if cached is None or cached[0] != key:
            cached = (key, _make_http(row))
            per_tenant[tenant_id] = cached
    # Entry points that hold no transaction across HTTP get a connector that commits first.
    return db.before_outbound(session, cached[1])


def connection_for_update(session: Session, tenant_id: int) -> CrmConnection:
    """The tenant's CrmConnection to edit, added to the session if it has none yet.

    A new row gets its columns' scalar defaults now, not at INSERT: a caller reading it
    before the flush (e.g. to print a summary) would see None instead."""
    row = session.scalar(select(CrmConnection).where(CrmConnection.tenant_id == tenant_id))
    if row is None:
        defaults = {column.key: column.default.arg
                    for column in CrmConnection.__table__.columns
                    if isinstance(column.default, ScalarElementColumnDefault)}
        row = CrmConnection(tenant_id=tenant_id, mapping={}, **defaults)
        session.add(row)
    return row


def _make_http(row: CrmConnection) -> HttpConnector:
    from app.crm.http import HttpConnector, Mapping

    if not row.base_url:
        raise CrmUnavailable(f"tenant {row.tenant_id}: the CRM connection has no base URL")
    try:
        mapping = Mapping.parse(dict(row.mapping or {}))
    except ValueError as exc:
        raise CrmUnavailable(f"tenant {row.tenant_id}: {exc}") from None
    return HttpConnector(
        tenant_id=row.tenant_id, base_url=row.base_url, mapping=mapping,
        auth_header=row.auth_header, auth_value_env=row.auth_value_env,
        timeout_seconds=row.timeout_seconds, max_staleness_seconds=row.max_staleness_seconds)

"""Which connector a tenant uses: the built-in store or its HTTP CRM (cached per process).

Apart from :mod:`app.crm.connector` (the interface) so that the two implementations can
import the interface and this module can import both, without a cycle.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from app.crm.builtin import BuiltinConnector
from app.crm.connector import Connector, CrmUnavailable
from app.crm.http import HttpConnector, Mapping
from app.infra import db
from app.infra.models import CrmConnection

if TYPE_CHECKING:
    from app.services import Services

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

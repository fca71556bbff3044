"""The audit log: who changed what through the API (or dashboard), append-only.

Entries are written in the same transaction as the change they describe, so a
change that rolls back leaves no entry and a committed change always has one.
Targets and details carry identifiers (slugs, serials, the caller's own
external ids, key prefixes), never names, emails or other personal data.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.infra.db import TENANT_KEY
from app.infra.models import AuditEntry

MAX_TARGET = 200


def record(session: Session, actor: str, action: str, target: str | None = None,
           details: dict[str, Any] | None = None, *, tenant_id: int | None = None) -> AuditEntry:
    """Add an audit entry to the session's transaction.

    ``tenant_id`` defaults to the tenant of a tenant session (the usual case for
    API requests); system sessions must name it.
    """
    tenant_id = tenant_id if tenant_id is not None else session.info.get(TENANT_KEY)
    if tenant_id is None:
        raise ValueError("audit.record needs a tenant session or an explicit tenant_id")
    entry = AuditEntry(tenant_id=tenant_id, actor=actor[:120], action=action[:64],
                       target=target[:MAX_TARGET] if target else None, details=details or {})
    session.add(entry)
    return entry

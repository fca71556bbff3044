"""Admin scope: the tenant itself, its API keys, and the audit log."""

from __future__ import annotations

from typing import Any

from flask import Response
from sqlalchemy import select

from app.admin import apikeys
from app.api.core import (
    ApiProblem,
    bp,
    db,
    key,
    not_found,
    page,
    query,
    record,
    reply,
    require,
    responses,
    spec,
    tenant_id,
)
from app.api.core import body as json_body
from app.api.schemas import (
    AuditOut,
    AuditPage,
    KeyCreate,
    KeyCreated,
    KeyOut,
    KeyPage,
    PageQuery,
    TenantOut,
    TenantPatch,
)
from app.infra.models import ApiKey, AuditEntry, Tenant

TAG = "admin"


def key_out(row: ApiKey, cls: type[KeyOut] = KeyOut, **extra: Any) -> KeyOut:
    # Validated from a dict: the scope column is a plain string, the field a Literal.
    return cls.model_validate(dict(id=row.id, name=row.name, prefix=row.prefix, scope=row.scope,
                                   created_at=row.created_at, last_used_at=row.last_used_at,
                                   revoked_at=row.revoked_at, **extra))


def tenant_out(tenant: Tenant) -> TenantOut:
    return TenantOut(slug=tenant.slug, name=tenant.name, google_issuer_id=tenant.google_issuer_id,
                     created_at=tenant.created_at)


def _tenant() -> Tenant:
    tenant = db().scalar(select(Tenant).where(Tenant.id == tenant_id()))
    assert tenant is not None  # the key's tenant: deleting it deletes the key
    return tenant


@bp.get("/tenant")
@require("admin")
@spec.validate(resp=responses({200: TenantOut}, 403), tags=[TAG], operation_id="getTenant")
def get_tenant() -> Any:
    """The tenant this key belongs to."""
    return reply(tenant_out(_tenant()))


@bp.patch("/tenant")
@require("admin")
@spec.validate(json=TenantPatch, resp=responses({200: TenantOut}, 400, 403, 413, 422),
               tags=[TAG], operation_id="updateTenant")
def update_tenant() -> Any:
    """Rename the tenant (the organisation name written on cards from their next version)."""
    tenant = _tenant()
    tenant.name = json_body(TenantPatch).name.strip()
    record("tenant.update", f"tenant:{tenant.slug}", {"fields": ["name"]})
    db().commit()
    return reply(tenant_out(tenant))


@bp.get("/keys")
@require("admin")
@spec.validate(query=PageQuery, resp=responses({200: KeyPage}, 400, 403, 422), tags=[TAG],
               operation_id="listKeys")
def list_keys() -> Any:
    """The tenant's API keys (prefixes only: a key's secret is never shown again)."""
    params = query(PageQuery)
    rows, cursor = page(db(), select(ApiKey), ApiKey.id, params.limit, params.cursor)
    return reply(KeyPage(items=[key_out(r) for r in rows], next_cursor=cursor))


@bp.post("/keys")
@require("admin")
@spec.validate(json=KeyCreate, resp=responses({201: KeyCreated}, 400, 403, 413, 422), tags=[TAG],
               operation_id="createKey")
def create_key() -> Any:
    """Create a key. The answer holds the key itself, once; only its hash is kept."""
    data = json_body(KeyCreate)
    session = db()
    try:
        row, raw = apikeys.create_key(session, tenant_id(), data.name, data.scope)
    except apikeys.ApiKeyError as exc:
        raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    record("key.create", f"key:{row.prefix}", {"scope": row.scope})
    session.commit()
    return reply(key_out(row, KeyCreated, key=raw), 201)


@bp.delete("/keys/<id:key_id>")
@require("admin")
@spec.validate(resp=responses({204: None}, 403, 404), tags=[TAG], operation_id="revokeKey")
def revoke_key(key_id: int) -> Any:
    """Revoke a key at once (kept, revoked, for the audit trail). A key may revoke itself."""
    session = db()
    row = session.scalar(select(ApiKey).where(ApiKey.id == key_id))
    if row is None:
        raise not_found("API key")
    if apikeys.revoke(row):
        record("key.revoke", f"key:{row.prefix}",
               {"self": row.id == key().id})
        session.commit()
    return Response(status=204)


@bp.get("/audit")
@require("admin")
@spec.validate(query=PageQuery, resp=responses({200: AuditPage}, 400, 403, 422), tags=[TAG],
               operation_id="listAudit")
def list_audit() -> Any:
    """Who changed what through the API, oldest first."""
    params = query(PageQuery)
    rows, cursor = page(db(), select(AuditEntry), AuditEntry.id, params.limit, params.cursor)
    return reply(AuditPage(items=[
        AuditOut(id=r.id, actor=r.actor, action=r.action, target=r.target,
                 details=dict(r.details or {}), occurred_at=r.occurred_at) for r in rows],
        next_cursor=cursor))

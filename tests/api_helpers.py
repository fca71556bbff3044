"""Helpers shared by the API tests: keys, a second tenant, authenticated requests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from app.admin import apikeys
from app.infra.models import (
    AppleIdentity,
    Card,
    Customer,
    ImportJob,
    Program,
    Tenant,
    WebhookDelivery,
    WebhookSubscription,
)
from app.services import Services


def make_key(services: Services, tenant_id: int, scope: str, name: str = "test") -> str:
    with services.db.transaction() as session:
        _, raw = apikeys.create_key(session, tenant_id, name, scope)
    return raw


def auth(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def is_problem(response: Any, status: int) -> bool:
    """An RFC 9457 body with the given status (what every API error must be)."""
    body = response.get_json(silent=True) or {}
    return (response.status_code == status
            and response.mimetype == "application/problem+json"
            and body.get("status") == status and isinstance(body.get("title"), str))


@dataclass
class OtherTenant:
    tenant_id: int
    program_slug: str
    external_id: str
    serial: str
    import_job_id: int
    key_id: int
    key: str
    subscription_id: int
    delivery_id: int


def make_other_tenant(services: Services) -> OtherTenant:
    """Tenant B with one of everything, under ids tenant A (the demo) does not use."""
    with services.db.transaction() as session:
        tenant = Tenant(slug="other-brand", name="Other Brand")
        session.add(tenant)
        session.flush()
        demo_identity = session.scalar(select(AppleIdentity))
        assert demo_identity is not None
        session.add(AppleIdentity(tenant_id=tenant.id, pass_type_identifier="pass.test.other",
                                  team_identifier="OTHERTEAM1",
                                  certificate_file=demo_identity.certificate_file,
                                  key_file=demo_identity.key_file))
        program = Program(tenant_id=tenant.id, slug="other-only", name="Other card",
                          template="loyalty", pass_type_identifier="pass.test.other",
                          team_identifier="OTHERTEAM1", field_mapping={}, options={})
        customer = Customer(tenant_id=tenant.id, external_id="B-ONLY-1",
                            email="b.person@example.org", attributes={"points": 7})
        session.add_all([program, customer])
        session.flush()
        card = Card(tenant_id=tenant.id, program=program, customer=customer)
        job = ImportJob(tenant_id=tenant.id, format="csv", source_path="/nonexistent",
                        status="done", errors=[])
        session.add_all([card, job])
        session.flush()
        key_row, raw = apikeys.create_key(session, tenant.id, "b-admin", "admin")
        subscription = WebhookSubscription(tenant_id=tenant.id, url="https://b.example/hook",
                                           event_types=["card.installed"])
        session.add(subscription)
        session.flush()
        delivery = WebhookDelivery(tenant_id=tenant.id, subscription_id=subscription.id,
                                   event_id="evt-b-1", event_type="card.installed",
                                   payload={"b": True})
        session.add(delivery)
        session.flush()
        return OtherTenant(tenant.id, program.slug, customer.external_id, card.serial_number,
                           job.id, key_row.id, raw, subscription.id, delivery.id)

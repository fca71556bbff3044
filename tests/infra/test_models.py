"""Schema and tenancy: migrations match the models; tenants never see each other."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.infra import migrate
from app.infra.models import Base, Card, Customer, Program, Tenant


def test_migrations_match_models(services) -> None:  # type: ignore[no-untyped-def]
    engine = services.db.engine
    assert migrate.is_current(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


def _tenant_with_customer(session, slug: str, external_id: str) -> Tenant:  # type: ignore[no-untyped-def]
    tenant = Tenant(slug=slug, name=slug.title())
    session.add(tenant)
    session.flush()
    session.add(Customer(tenant_id=tenant.id, external_id=external_id, email=f"{slug}@x.test",
                         attributes={}))
    session.add(Program(tenant_id=tenant.id, slug="rewards", name="R", template="loyalty",
                        pass_type_identifier=f"pass.{slug}", team_identifier="T",
                        field_mapping={}, options={}))
    return tenant


def test_tenant_session_only_sees_its_rows(services) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        a = _tenant_with_customer(session, "alpha", "same-id")
        b = _tenant_with_customer(session, "beta", "same-id")
        ids = (a.id, b.id)
    with services.db.tenant_session(ids[0]) as session:
        customers = session.scalars(select(Customer)).all()
        assert [c.tenant_id for c in customers] == [ids[0]]
        # Even an explicit filter on the other tenant returns nothing.
        assert session.scalars(select(Customer).where(Customer.tenant_id == ids[1])).all() == []
        assert len(session.scalars(select(Program)).all()) == 1
        # Joins are scoped too.
        joined = session.execute(select(Customer, Program).join(
            Program, Program.tenant_id == Customer.tenant_id)).all()
        assert {(c.tenant_id, p.tenant_id) for c, p in joined} == {(ids[0], ids[0])}


def test_tenant_session_refuses_to_write_other_tenants_rows(services) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        a = _tenant_with_customer(session, "alpha", "c1")
        b = _tenant_with_customer(session, "beta", "c2")
        ids = (a.id, b.id)
    with services.db.tenant_session(ids[0]) as session:
        session.add(Customer(tenant_id=ids[1], external_id="intruder", attributes={}))
        with pytest.raises(PermissionError):
            session.flush()
        session.rollback()
        # A new row without tenant gets the session's tenant.
        customer = Customer(external_id="new", attributes={})
        session.add(customer)
        session.flush()
        assert customer.tenant_id == ids[0]


def test_uniqueness_per_tenant(services) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        tenant = _tenant_with_customer(session, "alpha", "c1")
        tenant_id = tenant.id
    with services.db.session() as session:
        session.add(Customer(tenant_id=tenant_id, external_id="c1", attributes={}))
        with pytest.raises(IntegrityError):
            session.flush()
        session.rollback()
        session.add(Customer(tenant_id=tenant_id, external_id="c9", email="alpha@x.test",
                             attributes={}))
        with pytest.raises(IntegrityError):
            session.flush()


def test_card_secrets_are_random_and_long(services) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        tenant = _tenant_with_customer(session, "alpha", "c1")
        session.flush()
        customer = session.scalars(select(Customer)).one()
        program = session.scalars(select(Program)).one()
        card = Card(tenant_id=tenant.id, program=program, customer=customer)
        session.add(card)
        session.flush()
        assert len(card.authentication_token) >= 32
        assert len(card.serial_number) >= 22  # 128 bits, URL-safe
        assert card.version == 0 and card.content_hash is None
        assert card.last_modified.tzinfo is not None

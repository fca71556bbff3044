"""Data migrations: rows written under an older schema come out right under the new one.

Runs on a database of its own (a SQLite file, or a scratch PostgreSQL database next to
the test database), migrated step by step with rows inserted in between.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from sqlalchemy import JSON, Boolean, DateTime, Integer, MetaData, create_engine, select, text
from sqlalchemy.engine import Engine, make_url

from app.infra import migrate
from tests.conftest import configured_database_url


@pytest.fixture()
def scratch_url(tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    configured = configured_database_url()  # this xdist worker's own database
    if not configured:
        yield f"sqlite:///{tmp_path / 'migrations.sqlite3'}"
        return
    url = make_url(configured)
    scratch = url.set(database=f"{url.database}_migrations")
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch.database}"'))
        conn.execute(text(f'CREATE DATABASE "{scratch.database}"'))
    try:
        yield scratch.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch.database}" WITH (FORCE)'))
        admin.dispose()


def _insert(engine: Engine, table_name: str, **given: Any) -> int:
    """Insert a row giving only what the test cares about; other required columns get a
    plain value of their type. Returns the new id (or the given one)."""
    table = MetaData()
    table.reflect(engine, only=[table_name])
    columns = table.tables[table_name].columns
    row = dict(given)
    for column in columns:
        if column.name in row or column.nullable or column.primary_key:
            continue
        if column.server_default is not None:
            continue
        kind = column.type
        if isinstance(kind, Boolean):
            row[column.name] = False
        elif isinstance(kind, Integer):
            row[column.name] = 0
        elif isinstance(kind, DateTime):
            row[column.name] = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        elif isinstance(kind, JSON) or "JSON" in type(kind).__name__.upper():
            row[column.name] = {}
        else:
            row[column.name] = f"{column.name}-{len(given)}-{table_name}"[:16]
    with engine.begin() as conn:
        result = conn.execute(table.tables[table_name].insert().values(**row))
        return int(given.get("id") or result.inserted_primary_key[0])


def test_0008_backfills_current_consents_and_install_state_customers(scratch_url) -> None:  # type: ignore[no-untyped-def]
    migrate.upgrade(scratch_url, "0007")
    engine = create_engine(scratch_url)
    tenant = _insert(engine, "tenants", slug="t", name="T")
    program = _insert(engine, "programs", tenant_id=tenant, slug="p", name="P",
                      template="loyalty", field_mapping={}, options={})
    ann = _insert(engine, "customers", tenant_id=tenant, external_id="A", attributes={})
    bob = _insert(engine, "customers", tenant_id=tenant, external_id="B", attributes={})
    card = _insert(engine, "cards", tenant_id=tenant, program_id=program, customer_id=bob,
                   serial_number="s-1", authentication_token="t" * 32)
    for platform in ("apple", "google"):
        _insert(engine, "card_install_states", tenant_id=tenant, card_id=card,
                program_id=program, platform=platform, state="installed")

    def decide(customer: int, kind: str, granted: bool, day: int) -> None:
        _insert(engine, "consents", tenant_id=tenant, customer_id=customer, kind=kind,
                granted=granted, source=f"s{day}",
                recorded_at=dt.datetime(2026, 1, day, tzinfo=dt.UTC))

    decide(ann, "marketing_email", True, 1)
    decide(ann, "marketing_email", False, 3)    # Ann withdrew
    decide(ann, "sms", False, 2)
    decide(bob, "marketing_email", False, 5)    # arrived first, decided later
    decide(bob, "marketing_email", True, 4)
    decide(bob, "sms", True, 6)
    decide(bob, "sms", False, 6)                # a tie in time: the later row wins
    engine.dispose()

    migrate.upgrade(scratch_url)
    engine = create_engine(scratch_url)
    with engine.connect() as conn:
        current = {(row.customer_id, row.kind): (row.granted, row.source) for row in conn.execute(
            text("SELECT k.customer_id, k.kind, k.granted, c.source FROM current_consents k "
                 "JOIN consents c ON c.id = k.consent_id AND c.customer_id = k.customer_id"))}
        owners = set(conn.execute(select(text("customer_id")).select_from(
            text("card_install_states"))).scalars())
    assert current == {(ann, "marketing_email"): (False, "s3"), (ann, "sms"): (False, "s2"),
                       (bob, "marketing_email"): (False, "s5"), (bob, "sms"): (False, "s6")}
    assert owners == {bob}

    command.downgrade(migrate.alembic_config(scratch_url), "0007")  # and back again
    with engine.connect() as conn:
        assert "current_consents" not in {row[0] for row in conn.execute(text(
            "SELECT name FROM sqlite_master WHERE type = 'table'" if engine.dialect.name ==
            "sqlite" else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))}
    engine.dispose()
    migrate.upgrade(scratch_url)

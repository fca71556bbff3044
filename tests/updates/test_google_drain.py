"""Google Wallet objects drained in batches against the Google stand-in (which validates
every body against the walletobjects discovery document): many saved objects change,
one drain syncs them concurrently, each object once per batch, and Google's budget of
3 notifications per object per 24 hours still holds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from app.infra.models import Card, Customer, GoogleObject, Program, PushJob
from app.updates import pushes
from app.updates import refresh as updates
from tests import factories
from tests.google_standin import GoogleStandin


@pytest.fixture()
def standin() -> Iterator[GoogleStandin]:
    with GoogleStandin() as server:
        yield server


@pytest.fixture()
def settings(settings, standin):  # type: ignore[no-untyped-def]
    settings.google_api_url = standin.url
    settings.google_keys_url = standin.keys_url
    return settings


@pytest.fixture()
def google(services, demo, standin, tmp_path):  # type: ignore[no-untyped-def]
    return factories.google_issuer(services, demo["tenant_id"], standin, tmp_path)


def _change_everyone(services, points: int) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        customers = session.scalars(select(Customer)).all()
        for customer in customers:
            customer.attributes = {**customer.attributes, "points": points}
        updates.customers_changed(session, services, customers)


def test_many_saved_objects_are_synced_in_one_drain_within_the_budget(
        client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        serials = session.scalars(select(Card.serial_number).join(Program)
                                  .where(Program.slug == "rewards")).all()
    for serial in serials:  # every member saves the card to Google Wallet
        assert client.get(f"/demo/cards/{serial}/google").status_code == 303
    with services.db.session() as session:
        objects = session.scalars(select(GoogleObject.object_id)).all()
    assert len(objects) == len(serials) >= 3

    # Two changes before any worker runs: two jobs per object, one PATCH each.
    _change_everyone(services, 2000)
    _change_everyone(services, 2100)
    drained = pushes.drain(services)
    google_jobs = 2 * len(objects)
    assert drained.states["done"] >= google_jobs
    patched = Counter(r.path.rsplit("/", 1)[1] for r in standin.api_requests("PATCH"))
    assert patched == dict.fromkeys(objects, 1)
    assert {o["loyaltyPoints"]["balance"]["int"]
            for o in standin.objects["loyaltyObject"].values()} == {2100}

    for points in (2200, 2300, 2400, 2500):  # more statements: the budget caps the notices
        _change_everyone(services, points)
        pushes.drain(services)
    notices = Counter(r.path.split("/")[-2] for r in standin.api_requests("POST")
                      if r.path.endswith("/addMessage"))
    assert notices == dict.fromkeys(objects, 3)
    with services.db.session() as session:
        assert session.scalars(select(PushJob).where(PushJob.done_at.is_(None))).all() == []

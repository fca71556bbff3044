"""Concurrent updates against a polling device: no update is ever skipped.

Writers change customers in parallel transactions while a device polls
"serials since my tag". If a tag could become visible before a smaller one
(the classic sequence/clock bug), some poll would move the device's tag past
a change it never saw. Runs on SQLite and, in CI, on PostgreSQL.
"""

from __future__ import annotations

import threading

from sqlalchemy import select

from app.infra.models import Card, Customer, Program, Registration
from app.updates import apple_service as passkit
from app.updates import refresh as updates

DEVICE = "concurrent-device"
PASS_TYPE = "pass.dev.passerelle.demo"
CUSTOMERS = 24
WRITERS = 6
ROUNDS = 3


def test_parallel_updates_are_never_skipped_by_a_polling_device(services, demo) -> None:  # type: ignore[no-untyped-def]
    tenant_id = demo["tenant_id"]
    program_id = demo["program_ids"]["rewards"]
    with services.db.transaction(tenant_id) as session:
        program = session.get(Program, program_id)
        for i in range(CUSTOMERS):
            customer = Customer(external_id=f"P-{i}", first_name="Poll", attributes={"points": 0})
            session.add(customer)
            session.flush()
            card = Card(program=program, customer=customer)
            session.add(card)
            session.flush()
            session.add(Registration(card_id=card.id, device_library_identifier=DEVICE,
                                     pass_type_identifier=PASS_TYPE, push_token="ab" * 32))
    with services.db.session() as session:
        first = passkit.serials_since(session, DEVICE, PASS_TYPE, None)
    assert first is not None and len(first.serial_numbers) == CUSTOMERS

    errors: list[BaseException] = []
    done = threading.Event()
    polls: list[tuple[int, int, set[str]]] = []  # (since, lastUpdated, serials)

    def writer(index: int) -> None:
        try:
            for round_ in range(1, ROUNDS + 1):
                for i in range(index, CUSTOMERS, WRITERS):
                    with services.db.transaction(tenant_id) as session:
                        customer = session.scalar(
                            select(Customer).where(Customer.external_id == f"P-{i}"))
                        customer.attributes["points"] = round_ * 100 + i
                        result = updates.customers_changed(session, services, [customer])
                        assert not result.errors, result.errors
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def poller() -> None:
        tag = first.last_updated
        try:
            while True:
                finished = done.is_set()
                with services.db.session() as session:
                    answer = passkit.serials_since(session, DEVICE, PASS_TYPE, tag)
                if answer is not None:
                    polls.append((int(tag), int(answer.last_updated), set(answer.serial_numbers)))
                    tag = answer.last_updated
                if finished:
                    return
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    watcher = threading.Thread(target=poller)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    assert not errors, errors

    with services.db.session() as session:
        final = {serial: tag for serial, tag in session.execute(
            select(Card.serial_number, Card.update_tag).where(Card.program_id == program_id)
            .join(Customer).where(Customer.external_id.like("P-%")))}
    assert len(final) == CUSTOMERS
    assert len(set(final.values())) == CUSTOMERS, "two cards share an update tag"
    for serial, tag in final.items():
        # Some poll covered this card's last change and listed it.
        assert any(since < tag <= last and serial in seen for since, last, seen in polls), (
            f"the device never saw the last change of {serial} (tag {tag})")


def test_parallel_registrations_lose_none(app, services, demo) -> None:  # type: ignore[no-untyped-def]
    """Many devices register at once, some twice at the same moment: every device ends
    up registered exactly once, and no request fails."""
    with services.db.session() as session:
        card = session.scalars(select(Card).where(
            Card.program_id == demo["program_ids"]["rewards"])).first()
        serial, token = card.serial_number, card.authentication_token
    statuses: list[int] = []
    lock = threading.Lock()

    def register(device: str) -> None:
        client = app.test_client()
        response = client.post(
            f"/passkit/v1/devices/{device}/registrations/{PASS_TYPE}/{serial}",
            json={"pushToken": "ef" * 32}, headers={"Authorization": f"ApplePass {token}"})
        with lock:
            statuses.append(response.status_code)

    devices = [f"dev{i:03d}" for i in range(30)] * 2  # each device twice, concurrently
    threads = [threading.Thread(target=register, args=(d,)) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) <= [200, 201] and len(statuses) == 60
    assert statuses.count(201) == 30
    with services.db.session() as session:
        registered = session.scalars(select(Registration.device_library_identifier).where(
            Registration.card_id == card.id)).all()
    assert sorted(registered) == sorted(set(devices))


# -- imports that change many cards at once (issue 12, item 2) ----------------------------

BULK = 70  # above updates.POOL_THRESHOLD: the batch is rendered in worker processes


def _bulk_cards(services, demo, registered: int) -> list[int]:  # type: ignore[no-untyped-def]
    """BULK customers with a rewards card each; the first `registered` have a device."""
    tenant_id, program_id = demo["tenant_id"], demo["program_ids"]["rewards"]
    ids = []
    with services.db.transaction(tenant_id) as session:
        program = session.get(Program, program_id)
        for i in range(BULK):
            customer = Customer(external_id=f"B-{i:03d}", first_name="Bulk",
                                attributes={"points": "0"})
            card = Card(program=program, customer=customer)
            session.add(card)
            session.flush()
            ids.append(card.id)
            if i < registered:
                session.add(Registration(card_id=card.id, device_library_identifier=f"bulk-{i}",
                                         pass_type_identifier=PASS_TYPE, push_token="ab" * 32))
        updates.refresh_cards(session, services, session.scalars(
            select(Card).where(Card.id.in_(ids))).all())  # every card's first version
    return ids


def _csv(tmp_path, rows: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
    path = tmp_path / "bulk.csv"
    path.write_text("external_id,points\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


def _state(services, ids: list[int]) -> dict[int, tuple[int, int, str]]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return {card.id: (card.version, card.update_tag, card.content_hash)
                for card in session.scalars(select(Card).where(Card.id.in_(ids)))}


def test_bulk_import_renders_in_the_pool_and_writes_set_based(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import event

    from app.customers.customers import import_csv
    from app.infra.models import PushJob, SignedVersion
    from app.updates.rendering import RenderPool

    ids = _bulk_cards(services, demo, registered=40)
    before = _state(services, ids)
    # Every member's points change except the last five, whose rows repeat what they have.
    rows = [(f"B-{i:03d}", str(i + 1) if i < BULK - 5 else "0") for i in range(BULK)]
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(services.db.engine, "before_cursor_execute", count)
    try:
        with services.db.tenant_session(demo["tenant_id"]) as session, \
                updates.CardRefresher(services, RenderPool(workers=2)) as refresher:
            report = import_csv(session, demo["tenant_id"], _csv(tmp_path, rows),
                                on_changed=refresher.on_changed)
    finally:
        event.remove(services.db.engine, "before_cursor_execute", count)
    assert (report.updated, report.unchanged, report.card_problems) == (BULK - 5, 5, [])

    after = _state(services, ids)
    changed = [card_id for card_id in ids if after[card_id] != before[card_id]]
    assert changed == ids[:BULK - 5]  # the version moves only where the content changed
    for card_id in changed:
        assert after[card_id][0] == before[card_id][0] + 1
    tags = [after[card_id][1] for card_id in changed]
    last_tag = max(t for _, t, _ in before.values())
    assert len(set(tags)) == len(tags) and min(tags) > last_tag
    with services.db.session() as session:
        jobs = session.scalars(select(PushJob.card_id).where(
            PushJob.card_id.in_(ids), PushJob.update_tag > last_tag)).all()
        signed = dict(session.execute(select(SignedVersion.card_id, SignedVersion.content_hash)
                                      .where(SignedVersion.card_id.in_(ids))).all())
    assert sorted(jobs) == ids[:40]  # one push job per changed card with a device
    # The changed cards with a device were signed once, at update time, in the pool.
    assert {k: v for k, v in signed.items()} == {card_id: after[card_id][2]
                                                 for card_id in ids[:40]}
    # Set-based: the Apple identity once, the cards updated in one statement.
    identity_selects = [s for s in statements if "FROM apple_identities" in s]
    card_updates = [s for s in statements if s.startswith("UPDATE cards")]
    assert len(identity_selects) == 1, identity_selects
    assert len(card_updates) == 1, card_updates


def test_bulk_refresh_reports_cards_that_do_not_render(services, demo, tmp_path,  # type: ignore[no-untyped-def]
                                                       monkeypatch) -> None:
    from app.cards import cards
    from app.customers.customers import import_csv
    from app.updates.rendering import RenderPool

    ids = _bulk_cards(services, demo, registered=0)
    before = _state(services, ids)
    real = cards.card_input

    def broken_for_one(card, svc):  # type: ignore[no-untyped-def]
        if card.id == ids[3]:
            raise ValueError("points: not a number")
        return real(card, svc)

    monkeypatch.setattr(cards, "card_input", broken_for_one)
    rows = [(f"B-{i:03d}", str(i + 100)) for i in range(BULK)]
    with services.db.tenant_session(demo["tenant_id"]) as session, \
            updates.CardRefresher(services, RenderPool(workers=2)) as refresher:
        report = import_csv(session, demo["tenant_id"], _csv(tmp_path, rows),
                            on_changed=refresher.on_changed)
    assert report.updated == BULK  # the data is imported all the same
    assert len(report.card_problems) == 1 and "points: not a number" in report.card_problems[0]
    after = _state(services, ids)
    assert after[ids[3]] == before[ids[3]]
    assert all(after[i][0] == before[i][0] + 1 for i in ids if i != ids[3])

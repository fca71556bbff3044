"""Concurrent updates against a polling device: no update is ever skipped.

Writers change customers in parallel transactions while a device polls
"serials since my tag". If a tag could become visible before a smaller one
(the classic sequence/clock bug), some poll would move the device's tag past
a change it never saw. Runs on SQLite and, in CI, on PostgreSQL.
"""

from __future__ import annotations

import threading

from sqlalchemy import select

from app import passkit, updates
from app.models import Card, Customer, Program, Registration

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

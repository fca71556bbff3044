"""Install state per card and platform: transitions, duplicates, disorder, races, rebuild."""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update

from app.infra import events
from app.infra.models import (
    Card,
    CardInstallState,
    Customer,
    GoogleObject,
    InstallEvent,
    Program,
    Registration,
)
from app.tracking import install_state
from app.tracking.google_callbacks import CallbackMessage
from app.updates.google_wallet import apply_callback

PASS_TYPE = "pass.dev.passerelle.demo"
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


@pytest.fixture()
def card_id(services, demo) -> int:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.scalar(select(Card.id).join(Program).join(Customer).where(
            Program.slug == "rewards", Customer.external_id == "C-1001"))


@pytest.fixture()
def emitted(services) -> Iterator[list[tuple[str, dict[str, Any]]]]:  # type: ignore[no-untyped-def]
    """Events install_state announces, heard as any later stage hears them (a subscriber)."""
    heard: list[tuple[str, dict[str, Any]]] = []

    def listen(_session: Any, event: events.Event) -> None:
        if isinstance(event, events.Announced):
            heard.append((event.type, event.data))

    services.db.subscribers.append(listen)
    yield heard
    services.db.subscribers.remove(listen)


def record(services, card_id: int, platform: str, kind: str, device: str | None = None,  # type: ignore[no-untyped-def]
           minutes: float | None = None) -> CardInstallState:
    with services.db.transaction() as session:
        card = session.get(Card, card_id)
        row = install_state.record(session, card, platform, kind, device=device,
                                   occurred_at=None if minutes is None else at(minutes))
        session.flush()
        return row


def state(services, card_id: int, platform: str) -> tuple[str, int] | None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        row = session.scalar(select(CardInstallState).where(
            CardInstallState.card_id == card_id, CardInstallState.platform == platform))
        return None if row is None else (row.state, row.device_count)


# -- transitions ------------------------------------------------------------------------------

def test_apple_transitions_and_their_webhooks(services, card_id, emitted) -> None:  # type: ignore[no-untyped-def]
    row = record(services, card_id, "apple", "downloaded", minutes=0)
    assert (row.state, row.device_count, row.first_downloaded_at) == ("downloaded", 0, at(0))
    with services.db.session() as session:  # closed at once: an open one blocks TRUNCATE
        assert row.program_id == session.get(Card, card_id).program_id
    row = record(services, card_id, "apple", "registered", "phone", minutes=1)
    assert (row.state, row.device_count, row.first_installed_at) == ("installed", 1, at(1))
    row = record(services, card_id, "apple", "registered", "watch", minutes=2)
    assert (row.state, row.device_count, row.last_installed_at) == ("installed", 2, at(2))
    row = record(services, card_id, "apple", "unregistered", "phone", minutes=3)
    assert (row.state, row.device_count, row.removed_at) == ("installed", 1, None)
    row = record(services, card_id, "apple", "push_gone", "watch", minutes=4)
    assert (row.state, row.device_count, row.removed_at) == ("removed", 0, at(4))
    assert row.first_installed_at == at(1)  # history survives a removal
    assert [event_type for event_type, _ in emitted] == [
        "card.downloaded", "card.installed", "card.removed"]
    _, data = emitted[1]
    assert data["platform"] == "apple" and data["state"] == "installed"
    assert data["card_id"] == card_id and data["card"]["program"] == "rewards"
    assert "email" not in str(data)  # ids only; the emitter adds what receivers may see


def test_a_second_download_emits_nothing(services, card_id, emitted) -> None:  # type: ignore[no-untyped-def]
    record(services, card_id, "apple", "downloaded", minutes=5)
    record(services, card_id, "apple", "downloaded", minutes=1)  # an earlier one, late
    assert [event_type for event_type, _ in emitted] == ["card.downloaded"]
    with services.db.session() as session:
        row = session.scalar(select(CardInstallState).where(CardInstallState.card_id == card_id))
        assert row.first_downloaded_at == at(1)


def test_google_transitions_follow_event_time(services, card_id, emitted) -> None:  # type: ignore[no-untyped-def]
    assert record(services, card_id, "google", "downloaded", minutes=0).state == "downloaded"
    assert record(services, card_id, "google", "saved", minutes=1).state == "installed"
    assert record(services, card_id, "google", "deleted", minutes=3).state == "removed"
    # A late save, older than the del: logged, but the card stays removed and no event fires.
    row = record(services, card_id, "google", "saved", minutes=2)
    assert (row.state, row.removed_at) == ("removed", at(3))
    assert record(services, card_id, "google", "deleted", minutes=3).state == "removed"  # twice
    assert record(services, card_id, "google", "has_users", minutes=9).state == "installed"
    assert [event_type for event_type, _ in emitted] == [
        "card.downloaded", "card.installed", "card.removed", "card.installed"]
    with services.db.session() as session:
        assert session.scalar(select(func.count(InstallEvent.id))) == 6


def test_duplicated_and_out_of_order_apple_events(services, card_id, emitted) -> None:  # type: ignore[no-untyped-def]
    record(services, card_id, "apple", "registered", "phone", minutes=1)
    record(services, card_id, "apple", "registered", "phone", minutes=1)  # duplicate
    assert state(services, card_id, "apple") == ("installed", 1)
    record(services, card_id, "apple", "unregistered", "phone", minutes=5)
    record(services, card_id, "apple", "registered", "phone", minutes=3)  # late, older
    assert state(services, card_id, "apple") == ("removed", 0)
    record(services, card_id, "apple", "unregistered", "phone", minutes=5)  # duplicate
    record(services, card_id, "apple", "registered", "phone", minutes=7)  # really back
    assert state(services, card_id, "apple") == ("installed", 1)
    assert [event_type for event_type, _ in emitted] == [
        "card.installed", "card.removed", "card.installed"]


def test_a_removal_wins_a_tie(services, card_id) -> None:  # type: ignore[no-untyped-def]
    record(services, card_id, "apple", "unregistered", "phone", minutes=1)
    record(services, card_id, "apple", "registered", "phone", minutes=1)
    assert state(services, card_id, "apple") == ("removed", 0)


@pytest.mark.parametrize(("platform", "kind", "device"), [
    ("android", "saved", None), ("apple", "saved", "x"), ("google", "registered", None),
    ("apple", "registered", None)])
def test_bad_events_are_refused(services, card_id, platform, kind, device) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        record(services, card_id, platform, kind, device)
    with services.db.session() as session:
        assert session.scalar(select(func.count(InstallEvent.id))) == 0


def test_webhooks_reach_the_outbox(services, demo, card_id) -> None:  # type: ignore[no-untyped-def]
    webhooks_out = pytest.importorskip("app.webhooks.outbound")
    from app.infra.models import WebhookDelivery

    with services.db.transaction() as session:
        webhooks_out.create_subscription(session, demo["tenant_id"], "https://hooks.example.test/",
                                         ["card.installed", "card.removed"])
    record(services, card_id, "apple", "downloaded")
    record(services, card_id, "apple", "registered", "phone")
    with services.db.session() as session:
        [delivery] = session.scalars(select(WebhookDelivery)).all()
    assert delivery.event_type == "card.installed"
    data = delivery.payload["data"]
    assert data["card"]["serial_number"] and data["state"] == "installed"
    assert data["customer"]["external_id"] == "C-1001"


# -- through the real endpoints ----------------------------------------------------------------

def _auth(services, card_id: int) -> tuple[str, dict[str, str]]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        card = session.get(Card, card_id)
        return card.serial_number, {"Authorization": f"ApplePass {card.authentication_token}"}


def test_device_web_service_drives_the_state(client, services, card_id) -> None:  # type: ignore[no-untyped-def]
    serial, headers = _auth(services, card_id)
    url = f"/passkit/v1/devices/{{}}/registrations/{PASS_TYPE}/{serial}"
    for device in ("dev-a", "dev-b", "dev-a"):
        assert client.post(url.format(device), json={"pushToken": "ab" * 32},
                           headers=headers).status_code in (200, 201)
    assert state(services, card_id, "apple") == ("installed", 2)
    assert client.delete(url.format("dev-a"), headers=headers).status_code == 200
    assert client.delete(url.format("dev-a"), headers=headers).status_code == 200  # again
    assert state(services, card_id, "apple") == ("installed", 1)
    assert client.delete(url.format("dev-b"), headers=headers).status_code == 200
    assert state(services, card_id, "apple") == ("removed", 0)


def test_demo_downloads_are_logged(client, services, card_id) -> None:  # type: ignore[no-untyped-def]
    serial, _ = _auth(services, card_id)
    assert client.get(f"/demo/cards/{serial}.pkpass").status_code == 200
    assert state(services, card_id, "apple") == ("downloaded", 0)


def test_parallel_registrations_make_one_state_row(app, services, card_id) -> None:  # type: ignore[no-untyped-def]
    """Twenty devices (each twice) register one card at once: one state row per platform,
    and its device count is the number of Registration rows."""
    serial, headers = _auth(services, card_id)
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def register(devices: list[str]) -> None:
        client = app.test_client()
        barrier.wait()
        for device in devices:
            response = client.post(f"/passkit/v1/devices/{device}/registrations/{PASS_TYPE}/"
                                   f"{serial}", json={"pushToken": "ef" * 32}, headers=headers)
            with lock:
                statuses.append(response.status_code)

    devices = [f"dev{i:02d}" for i in range(20)] * 2
    random.Random(7).shuffle(devices)
    threads = [threading.Thread(target=register, args=(devices[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {200, 201} and statuses.count(201) == 20
    with services.db.session() as session:
        rows = session.scalars(select(CardInstallState).where(
            CardInstallState.card_id == card_id)).all()
        registered = session.scalar(select(func.count(Registration.id)).where(
            Registration.card_id == card_id))
    assert [(r.platform, r.state, r.device_count) for r in rows] == [("apple", "installed", 20)]
    assert registered == 20


def test_google_callbacks_drive_the_state(services, card_id) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        card = session.get(Card, card_id)
        session.add(GoogleObject(tenant_id=card.tenant_id, card_id=card.id,
                                 object_id="3388000000012345678.obj", notified_values={}))
    ms = int(T0.timestamp() * 1000)

    def callback(kind: str, nonce: str, offset_ms: int) -> bool:
        with services.db.transaction() as session:  # the entry point commits
            return apply_callback(session, CallbackMessage(
                "3388000000012345678.class", "3388000000012345678.obj", kind, nonce,
                ms + offset_ms))

    assert callback("save", "n1", 1000) is True
    assert callback("save", "n1", 1000) is False  # replayed nonce: not even logged
    assert state(services, card_id, "google") == ("installed", 1)
    assert callback("del", "n2", 3000) is True
    assert callback("save", "n3", 2000) is False  # late save
    assert state(services, card_id, "google") == ("removed", 0)
    with services.db.session() as session:
        assert session.scalar(select(func.count(InstallEvent.id))) == 3


def test_an_existing_google_object_with_users_counts_as_installed(services, card_id) -> None:  # type: ignore[no-untyped-def]
    from app.updates import google_wallet as wallet

    class Client:
        def get(self, resource: str, object_id: str) -> dict[str, Any]:
            return {"id": object_id, "hasUsers": True}

    with services.db.transaction() as session:
        card = session.get(Card, card_id)
        assert wallet._inserted(session, Client(), card, "loyaltyObject", {"id": "x"}) is False
    assert state(services, card_id, "google") == ("installed", 1)


# -- rebuild equals incremental ---------------------------------------------------------------

def _random_events(rng: random.Random, card_ids: list[int]) -> list[tuple[int, str, str,
                                                                           str | None, float]]:
    events = []
    for card_id in card_ids:
        for _ in range(rng.randrange(0, 9)):
            if rng.random() < 0.5:
                device = rng.choice(["d1", "d2", "d3"])
                kind = rng.choice(["downloaded", "registered", "registered", "unregistered",
                                   "push_gone"])
                events.append((card_id, "apple", kind, None if kind == "downloaded" else device,
                               float(rng.randrange(0, 12))))
            else:
                kind = rng.choice(["downloaded", "saved", "saved", "deleted", "has_users"])
                events.append((card_id, "google", kind, None, float(rng.randrange(0, 12))))
    events += rng.sample(events, k=len(events) // 4)  # duplicates
    rng.shuffle(events)  # arrival order unrelated to event time
    return events


def _expected(events: list[tuple[int, str, str, str | None, float]]) -> dict[tuple[int, str],
                                                                              tuple[str, int]]:
    """An independent replay: chronological, a removal after an install at the same time."""
    result = {}
    for key in {(e[0], e[1]) for e in events}:
        mine = sorted((e for e in events if (e[0], e[1]) == key),
                      key=lambda e: (e[4], e[2] in ("unregistered", "push_gone", "deleted")))
        present: dict[str | None, bool] = {}
        for _, _, kind, device, _ in mine:
            if kind in ("registered", "saved", "has_users"):
                present[device] = True
            elif kind != "downloaded":
                present[device] = False
        active = sum(present.values())
        result[key] = ("installed" if active else "removed" if present else "downloaded", active)
    return result


def _snapshot(services) -> dict[tuple[int, str], tuple[Any, ...]]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return {(r.card_id, r.platform): (r.program_id, r.state, r.device_count,
                                          r.first_downloaded_at, r.first_installed_at,
                                          r.last_installed_at, r.removed_at, r.last_event_id)
                for r in session.scalars(select(CardInstallState))}


@pytest.mark.parametrize("seed", [1, 2, 3, 5, 8, 13])
def test_rebuild_equals_incremental_in_any_order(services, demo, seed) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    with services.db.session() as session:
        card_ids = list(session.scalars(select(Card.id).order_by(Card.id)))
    events = _random_events(rng, card_ids)
    for card_id, platform, kind, device, minutes in events:
        record(services, card_id, platform, kind, device, minutes)
    incremental = _snapshot(services)
    assert {key: value[1:3] for key, value in incremental.items()} == _expected(events)

    assert install_state.rebuild(services) == len(incremental)
    assert _snapshot(services) == incremental  # the same answer from the log alone
    with services.db.transaction() as session:  # lose or spoil the state: rebuild repairs it
        session.execute(delete(CardInstallState).where(CardInstallState.id % 2 == 0))
        session.execute(update(CardInstallState).values(state="installed", device_count=7))
    install_state.rebuild(services, progress=lambda n: None)
    assert _snapshot(services) == incremental


def test_rebuild_drops_states_without_events_and_respects_tenants(services, demo, card_id) -> None:  # type: ignore[no-untyped-def]
    record(services, card_id, "google", "saved", minutes=1)
    with services.db.transaction() as session:
        card = session.get(Card, card_id)
        session.add(CardInstallState(tenant_id=card.tenant_id, card_id=card.id,
                                     program_id=card.program_id, customer_id=card.customer_id,
                                     platform="apple",
                                     state="installed", device_count=3))
    assert install_state.rebuild(services, tenant_id=demo["tenant_id"] + 1) == 0
    assert state(services, card_id, "apple") == ("installed", 3)  # another tenant's run
    assert install_state.rebuild(services, tenant_id=demo["tenant_id"]) == 1
    assert state(services, card_id, "apple") is None
    assert state(services, card_id, "google") == ("installed", 1)


def test_wallet_status(services, demo, card_id) -> None:  # type: ignore[no-untyped-def]
    record(services, card_id, "apple", "registered", "phone", minutes=1)
    record(services, card_id, "apple", "registered", "pad", minutes=2)
    record(services, card_id, "google", "downloaded", minutes=3)
    with services.db.session() as session:
        customer_id = session.get(Card, card_id).customer_id
        other = session.scalar(select(Customer.id).where(Customer.external_id == "C-1002"))
        status = install_state.wallet_status(session, [customer_id, other],
                                             program_id=demo["program_ids"]["rewards"])
        elsewhere = install_state.wallet_status(session, [customer_id],
                                                program_id=demo["program_ids"]["club"])
    assert status[customer_id] == {
        "wallet_status": "apple", "wallet_installed": True, "wallet_apple_installed": True,
        "wallet_google_installed": False, "wallet_apple_state": "installed",
        "wallet_google_state": "downloaded", "wallet_apple_devices": 2,
        "wallet_apple_installed_at": at(1).isoformat(), "wallet_google_installed_at": None}
    assert status[other] == install_state.empty_status()
    assert elsewhere[customer_id] == install_state.empty_status()


def test_installs_rebuild_command_twice_prints_the_same_table(runner, services, demo,  # type: ignore[no-untyped-def]
                                                            card_id) -> None:
    record(services, card_id, "apple", "registered", "phone", minutes=1)
    record(services, card_id, "google", "downloaded", minutes=2)
    first = runner.invoke(args=["installs", "rebuild"])
    assert first.exit_code == 0, first.output
    assert "demo" in first.output and "installed" in first.output
    second = runner.invoke(args=["installs", "rebuild", "--tenant", "demo"])
    assert second.exit_code == 0, second.output
    table = [line for line in first.output.splitlines() if "rewards" in line]
    assert table and table == [line for line in second.output.splitlines() if "rewards" in line]
    assert runner.invoke(args=["installs", "rebuild", "--tenant", "nope"]).exit_code == 1

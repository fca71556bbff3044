"""Outbound webhooks: signatures (and the docs' snippets), the outbox, retries against a
real receiver that fails then recovers, giving up, redelivery, and which data changes
make events."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from app.cli import main
from app.customers.customers import apply_changes, record_consent
from app.infra.db import WEBHOOK_DISPATCH_KEY
from app.infra.models import (
    Card,
    CardInstallState,
    Customer,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from app.webhooks import outbound as webhooks_out
from tests import factories
from tests.webhook_receiver import WebhookReceiver, signature_ok

DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def _subscribe(services, tenant_id: int, url: str, *types: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    with services.db.transaction(tenant_id) as session:
        sub = webhooks_out.create_subscription(session, tenant_id, url, types,
                                               allow_private=True)  # local receivers
        return sub.id, sub.secret


def _deliveries(services, event_type: str | None = None) -> list[WebhookDelivery]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        query = select(WebhookDelivery).order_by(WebhookDelivery.id)
        if event_type:
            query = query.where(WebhookDelivery.event_type == event_type)
        return list(session.scalars(query))


def _no_dispatch(services) -> list[int]:  # type: ignore[no-untyped-def]
    """Record dispatched ids instead of queueing them (the tests deliver by hand)."""
    dispatched: list[int] = []
    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = dispatched.extend
    return dispatched


# -- signatures -----------------------------------------------------------------------------

def test_signature_verifies_and_refuses_tampering_and_replays() -> None:
    body = b'{"id":"e1","type":"customer.updated"}'
    now = int(time.time())
    header = webhooks_out.signature_header("s3cret", now, body)
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
    assert webhooks_out.verify("s3cret", header, body)
    assert signature_ok("s3cret", header, body)  # the test receiver's own check agrees
    assert not webhooks_out.verify("other", header, body)
    assert not webhooks_out.verify("s3cret", header, body + b" ")
    assert not webhooks_out.verify("s3cret", "v1=" + header.split("v1=")[1], body)
    # A captured request replayed later: its signed time is outside the window...
    old = webhooks_out.signature_header("s3cret", now - 301, body)
    with pytest.raises(webhooks_out.SignatureError, match="tolerance"):
        webhooks_out.check_signature("s3cret", old, body)
    # ...and moving t forward breaks the signature.
    forged = old.replace(f"t={now - 301}", f"t={now}")
    with pytest.raises(webhooks_out.SignatureError, match="does not match"):
        webhooks_out.check_signature("s3cret", forged, body)
    assert webhooks_out.verify("s3cret", old, body, now=now - 290)


def _docs_block(marker: str) -> str:
    found = re.search(rf"<!-- {marker} -->\s*```\w+\n(.*?)```", DOCS.read_text(encoding="utf-8"),
                      re.S)
    assert found, f"docs/webhooks.md has no block marked {marker}"
    return found.group(1)


def test_docs_python_snippet_verifies_our_signatures() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_docs_block("verify-python"), "docs/webhooks.md", "exec"), namespace)
    check = namespace["verify_passerelle_signature"]
    body = webhooks_out.body_bytes({"id": "e1", "data": {"name": "Jiří"}})
    now = int(time.time())
    assert check("k", webhooks_out.signature_header("k", now, body), body)  # type: ignore[operator]
    assert not check("k", webhooks_out.signature_header("k", now - 600, body), body)  # type: ignore[operator]
    assert not check("k", webhooks_out.signature_header("x", now, body), body)  # type: ignore[operator]
    assert not check("k", webhooks_out.signature_header("k", now, body), body[:-1])  # type: ignore[operator]
    assert not check("k", "garbage", body)  # type: ignore[operator]


def test_docs_node_snippet_verifies_our_signatures(tmp_path: Path) -> None:
    body = webhooks_out.body_bytes({"id": "e1", "data": {"name": "Zoë"}})
    now = int(time.time())
    cases = {"good": (webhooks_out.signature_header("k", now, body), True),
             "old": (webhooks_out.signature_header("k", now - 600, body), False),
             "key": (webhooks_out.signature_header("x", now, body), False)}
    (tmp_path / "body.json").write_bytes(body)
    script = _docs_block("verify-node") + """
const fs = require("fs");
const body = fs.readFileSync(process.argv[2]);
for (const header of process.argv.slice(3)) console.log(verifyPasserelleSignature("k", header, body));
"""
    (tmp_path / "check.js").write_text(script, encoding="utf-8")
    out = subprocess.run(["node", str(tmp_path / "check.js"), str(tmp_path / "body.json"),
                          *(header for header, _ in cases.values())],
                         capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.split() == [str(ok).lower() for _, ok in cases.values()]


# -- which changes make events ----------------------------------------------------------------

def test_no_subscription_no_rows_and_one_lookup_per_transaction(services, demo) -> None:  # type: ignore[no-untyped-def]
    lookups: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if "FROM webhook_subscriptions" in statement:
            lookups.append(statement)

    event.listen(services.db.engine, "before_cursor_execute", count)
    try:
        with services.db.transaction(demo["tenant_id"]) as session:
            for customer in session.scalars(select(Customer)):
                for n in range(20):  # like an import: many consents in one transaction
                    record_consent(session, customer, f"list_{n}", True, "import")
                apply_changes(customer, {"first_name": "X"}, {"points": 1})
            webhooks_out.emit(session, demo["tenant_id"], "card.installed", {"x": 1})
    finally:
        event.remove(services.db.engine, "before_cursor_execute", count)
    assert len(lookups) == 1, lookups
    assert _deliveries(services) == []


def test_customer_events_come_from_listeners_installed_with_services(  # type: ignore[no-untyped-def]
        services, demo, database_url) -> None:
    """No import-time listener: a Database that Services did not put together (the
    composition root) writes no customer.updated; the one Services built does."""
    from app.infra.db import Database

    _no_dispatch(services)
    tenant = demo["tenant_id"]
    _subscribe(services, tenant, "https://hooks.example.test/a", "customer.updated")
    bare = Database(database_url)
    try:
        with bare.transaction(tenant) as session:
            factories.customer(session).first_name = "Bare"
    finally:
        bare.dispose()
    assert _deliveries(services) == []
    with services.db.transaction(tenant) as session:
        factories.customer(session).first_name = "Wired"
    [delivery] = _deliveries(services, "customer.updated")
    assert delivery.payload["data"]["changed"] == ["first_name"]


def test_customer_updated_only_on_real_change(services, demo) -> None:  # type: ignore[no-untyped-def]
    _no_dispatch(services)
    tenant = demo["tenant_id"]
    _subscribe(services, tenant, "https://hooks.example.test/a", "customer.updated")
    with services.db.transaction(tenant) as session:
        customer = factories.customer(session)
        assert not apply_changes(customer, {"first_name": customer.first_name},
                                 {"points": customer.attributes["points"]})
        customer.last_name = customer.last_name  # same value
        customer.attributes["tier"] = customer.attributes["tier"]  # in place, same value
        customer.crm_fetched_at = utcnow()  # bookkeeping, not data
    assert _deliveries(services) == []

    with services.db.transaction(tenant) as session:
        customer = factories.customer(session)
        customer.attributes["points"] = 999  # in place
        session.flush()
        apply_changes(customer, {"first_name": "Jirka"}, {})  # a second change, same customer
        session.add(Customer(external_id="C-NEW", attributes={"points": 1}))  # created: no event
    [delivery] = _deliveries(services)
    data = delivery.payload["data"]
    assert delivery.event_type == "customer.updated" and delivery.payload["tenant"] == "demo"
    assert data["changed"] == ["attributes.points", "first_name"]
    assert data["customer"]["external_id"] == "C-1002"
    assert data["customer"]["attributes"]["points"] == 999
    assert data["wallet"]["wallet_status"] == "none"
    assert delivery.payload["id"] == delivery.event_id

    with services.db.transaction(tenant) as session:
        customer = factories.customer(session)
        customer.attributes = {**customer.attributes, "points": 999}  # replaced, same content
    assert len(_deliveries(services)) == 1


def test_rolled_back_change_makes_no_event(services, demo) -> None:  # type: ignore[no-untyped-def]
    _no_dispatch(services)
    _subscribe(services, demo["tenant_id"], "https://hooks.example.test/a",
               "customer.updated", "consent.changed")
    with pytest.raises(RuntimeError):
        with services.db.transaction(demo["tenant_id"]) as session:
            customer = factories.customer(session)
            customer.attributes["points"] = 1
            record_consent(session, customer, "sms", True, "api")
            session.flush()
            raise RuntimeError("boom")
    assert _deliveries(services) == []


def test_consent_changed_on_real_change_including_imports(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.customers.customers import import_csv

    _no_dispatch(services)
    tenant = demo["tenant_id"]
    _subscribe(services, tenant, "https://hooks.example.test/c", "consent.changed")
    with services.db.transaction(tenant) as session:
        customer = factories.customer(session)
        assert not record_consent(session, customer, "marketing_email", True, "api")  # same
        assert record_consent(session, customer, "marketing_email", False, "api")
    [delivery] = _deliveries(services)
    assert delivery.payload["data"]["consent"]["kind"] == "marketing_email"
    assert delivery.payload["data"]["consent"]["granted"] is False
    assert delivery.payload["data"]["consent"]["source"] == "api"
    assert delivery.payload["data"]["customer"]["external_id"] == "C-1002"

    csv_file = tmp_path / "c.csv"
    csv_file.write_text("external_id,consent_sms\nC-NEW-1,yes\nC-1001,no\n", encoding="utf-8")
    with services.db.tenant_session(tenant) as session:
        report = import_csv(session, tenant, csv_file)
    assert report.created == 1 and not report.errors
    imported = {(d.payload["data"]["customer"]["external_id"], d.payload["data"]["consent"]["kind"])
                for d in _deliveries(services)[1:]}
    assert imported == {("C-NEW-1", "sms"), ("C-1001", "sms")}


def test_wallet_status_in_payload(services, demo) -> None:  # type: ignore[no-untyped-def]
    _no_dispatch(services)
    tenant = demo["tenant_id"]
    _subscribe(services, tenant, "https://hooks.example.test/w", "customer.updated")
    with services.db.transaction(tenant) as session:
        customer = factories.customer(session)
        card = session.scalar(select(Card).where(Card.customer_id == customer.id))
        session.add(CardInstallState(card_id=card.id, program_id=card.program_id,
                                     customer_id=card.customer_id,
                                     platform="apple", state="installed", device_count=1,
                                     first_installed_at=utcnow(), last_installed_at=utcnow()))
        session.add(CardInstallState(card_id=card.id, program_id=card.program_id,
                                     customer_id=card.customer_id,
                                     platform="google", state="removed", device_count=0))
    with services.db.transaction(tenant) as session:
        customer = factories.customer(session)  # held: SQLAlchemy forgets in-place edits of dropped rows
        customer.attributes["points"] = 5
    [delivery] = _deliveries(services)
    wallet = delivery.payload["data"]["wallet"]
    assert wallet["wallet_status"] == "apple"
    assert wallet["wallet_apple_installed"] is True and wallet["wallet_google_installed"] is False
    assert wallet["wallet_google_state"] == "removed"


def test_emit_refuses_unknown_types_and_subscriptions_validate(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        with pytest.raises(ValueError, match="unknown webhook event type"):
            webhooks_out.emit(session, demo["tenant_id"], "card.exploded", {})
        with pytest.raises(ValueError, match="event types"):
            webhooks_out.create_subscription(session, demo["tenant_id"], "https://x.test",
                                             ["card.exploded"])
        with pytest.raises(ValueError, match="URL"):
            webhooks_out.create_subscription(session, demo["tenant_id"], "ftp://x.test",
                                             ["card.installed"])


# -- delivery -------------------------------------------------------------------------------

def _change_points(services, tenant_id: int, points: int) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(tenant_id) as session:
        customer = factories.customer(session)  # held: SQLAlchemy forgets in-place edits of dropped rows
        customer.attributes["points"] = points


def _attempts(services, delivery_id: int) -> list[WebhookAttempt]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return list(session.scalars(select(WebhookAttempt).where(
            WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)))


def test_receiver_fails_then_recovers_delivered_once(services, demo, monkeypatch,
                                                      keep_signal_handlers) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(webhooks_out, "FIRST_RETRY", dt.timedelta(milliseconds=50))
    monkeypatch.setattr(webhooks_out, "TIMEOUT", (1.0, 0.5))
    with WebhookReceiver(hang_seconds=1.5) as receiver:
        _, receiver.secret = _subscribe(services, demo["tenant_id"], receiver.url,
                                        "customer.updated")
        receiver.script = [500, "timeout", 503]
        consumer = services.jobs.consumer(workers=2)
        consumer.start()
        try:
            _change_points(services, demo["tenant_id"], 4321)  # dispatched after commit
            requests = receiver.wait_for(4)
            [delivery] = _deliveries(services)
            deadline = time.monotonic() + 10
            while delivery.outcome is None and time.monotonic() < deadline:
                time.sleep(0.05)
                [delivery] = _deliveries(services)
        finally:
            consumer.stop(graceful=True)
    assert [r.answered for r in requests] == [500, "timeout", 503, 200]
    assert all(r.signature_ok for r in requests)
    assert {r.json["id"] for r in requests} == {delivery.event_id}
    assert {r.headers["Passerelle-Event-Id"] for r in requests} == {delivery.event_id}
    assert requests[0].headers["User-Agent"].startswith("Passerelle-Webhooks")
    assert len(receiver.accepted()) == 1
    assert requests[-1].json["data"]["customer"]["attributes"]["points"] == 4321
    assert delivery.outcome == "delivered" and delivery.attempts == 4
    assert delivery.last_status == 200 and delivery.done_at is not None
    attempts = _attempts(services, delivery.id)
    assert [(a.status, a.error) for a in attempts] == [
        (500, "HTTP 500"), (None, "timeout"), (503, "HTTP 503"), (200, None)]
    assert attempts[1].duration_ms >= 400


def test_gives_up_24_hours_after_the_event(services, demo) -> None:  # type: ignore[no-untyped-def]
    _no_dispatch(services)
    with WebhookReceiver() as receiver:
        _, receiver.secret = _subscribe(services, demo["tenant_id"], receiver.url,
                                        "customer.updated")
        receiver.script = [500, 500]
        _change_points(services, demo["tenant_id"], 1)
        [delivery] = _deliveries(services)
        first = webhooks_out.deliver(services, delivery.id)
        assert first.state == "retry" and 5 <= first.retry_in <= 10
        assert webhooks_out.deliver(services, delivery.id).state == "skipped"  # not due yet
        with services.db.transaction() as session:
            row = session.get(WebhookDelivery, delivery.id)
            row.created_at -= dt.timedelta(hours=24, minutes=1)
            row.not_before = None
        assert webhooks_out.deliver(services, delivery.id).state == "gave_up"
    [delivery] = _deliveries(services)
    assert delivery.outcome == "gave_up" and delivery.last_status == 500
    assert [a.status for a in _attempts(services, delivery.id)] == [500, 500]
    assert webhooks_out.due_deliveries(services, quiet_for=dt.timedelta(0)) == []


def test_410_disables_the_subscription_and_redirects_are_not_followed(services, demo) -> None:  # type: ignore[no-untyped-def]
    _no_dispatch(services)
    with WebhookReceiver() as receiver:
        sub_id, receiver.secret = _subscribe(services, demo["tenant_id"], receiver.url,
                                             "customer.updated")
        receiver.script = [302, 410]
        _change_points(services, demo["tenant_id"], 1)
        _change_points(services, demo["tenant_id"], 2)
        first, second = _deliveries(services)
        assert webhooks_out.deliver(services, first.id).state == "retry"
        assert len(receiver.requests) == 1  # the redirect's target was not requested
        assert webhooks_out.deliver(services, second.id).state == "gave_up"
        with services.db.transaction() as session:
            session.get(WebhookDelivery, first.id).not_before = None
        assert webhooks_out.deliver(services, first.id).state == "cancelled"
        assert len(receiver.requests) == 2
    first, second = _deliveries(services)
    assert "redirects are not followed" in _attempts(services, first.id)[0].error
    assert second.last_error == "410 Gone: subscription disabled"
    assert first.outcome == "cancelled"
    with services.db.session() as session:
        assert session.get(WebhookSubscription, sub_id).active is False
    _change_points(services, demo["tenant_id"], 3)
    assert len(_deliveries(services)) == 2  # a disabled subscription gets no new events


def test_redelivery_sends_the_same_event_again(services, demo) -> None:  # type: ignore[no-untyped-def]
    dispatched = _no_dispatch(services)
    with WebhookReceiver() as receiver:
        _, receiver.secret = _subscribe(services, demo["tenant_id"], receiver.url,
                                        "customer.updated")
        _change_points(services, demo["tenant_id"], 77)
        [original] = _deliveries(services)
        assert dispatched == [original.id]
        assert webhooks_out.deliver(services, original.id).state == "delivered"
        assert webhooks_out.deliver(services, original.id).state == "skipped"  # done
        with services.db.transaction(demo["tenant_id"]) as session:
            copy_id = webhooks_out.redeliver(session, original.id).id
            assert dispatched == [original.id]  # not before commit
        assert dispatched == [original.id, copy_id]
        assert webhooks_out.deliver(services, copy_id).state == "delivered"
        first, again = receiver.requests
    assert first.body == again.body and first.json["id"] == original.event_id
    assert first.headers["Passerelle-Delivery-Id"] != again.headers["Passerelle-Delivery-Id"]
    with services.db.session() as session:
        with pytest.raises(LookupError):
            webhooks_out.redeliver(session, 10**9)


def test_sweeper_finds_forgotten_and_due_deliveries(services, demo) -> None:  # type: ignore[no-untyped-def]
    _no_dispatch(services)
    sub_id, _ = _subscribe(services, demo["tenant_id"], "http://127.0.0.1:9/x",
                           "customer.updated")
    old = utcnow() - dt.timedelta(minutes=5)
    with services.db.transaction(demo["tenant_id"]) as session:
        rows = {name: WebhookDelivery(subscription_id=sub_id, event_id=name,
                                      event_type="customer.updated", payload={}, created_at=old,
                                      **extra)
                for name, extra in {
                    "forgotten": {}, "lease_expired": {"claimed_until": old, "attempts": 1},
                    "leased": {"claimed_until": utcnow() + dt.timedelta(minutes=1)},
                    "later": {"not_before": utcnow() + dt.timedelta(minutes=1)},
                    "done": {"done_at": old, "outcome": "delivered"}}.items()}
        session.add_all(rows.values())
        session.add(WebhookDelivery(subscription_id=sub_id, event_id="fresh",
                                    event_type="customer.updated", payload={}))
        session.flush()
        ids = {name: row.id for name, row in rows.items()}
    assert sorted(webhooks_out.due_deliveries(services)) == sorted(
        [ids["forgotten"], ids["lease_expired"]])
    now = utcnow()
    with services.db.session() as session:
        assert webhooks_out.claim(session, ids["forgotten"], now)
        assert not webhooks_out.claim(session, ids["forgotten"], now)  # leased
        assert webhooks_out.claim(session, ids["forgotten"], now + webhooks_out.LEASE * 2)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    for attempt, ceiling in ((1, 10), (2, 20), (3, 40), (12, 3600), (40, 3600)):
        delays = [webhooks_out.backoff(attempt).total_seconds() for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


# -- commands -------------------------------------------------------------------------------

def test_commands_add_list_deliveries_redeliver(runner, services, demo) -> None:  # type: ignore[no-untyped-def]
    _no_dispatch(services)
    added = runner.invoke(main, ["webhooks", "add", "--tenant", "demo", "--url",
                                 "https://hooks.example.test/x", "--events",
                                 "customer.updated,card.installed"], catch_exceptions=False)
    assert added.exit_code == 0, added.output
    with services.db.session() as session:
        sub = session.scalar(select(WebhookSubscription))
    assert sub.secret in added.output and sub.event_types == ["card.installed", "customer.updated"]
    listed = runner.invoke(main, ["webhooks", "list"], catch_exceptions=False)
    assert "https://hooks.example.test/x" in listed.output and sub.secret not in listed.output
    bad = runner.invoke(main, ["webhooks", "add", "--tenant", "demo", "--url", "https://x.test",
                               "--events", "nope"])
    assert bad.exit_code == 1 and "event types" in bad.output

    _change_points(services, demo["tenant_id"], 8)
    [delivery] = _deliveries(services)
    with services.db.transaction() as session:
        row = session.get(WebhookDelivery, delivery.id)
        row.outcome, row.done_at, row.last_status = "gave_up", utcnow(), 500
    log = runner.invoke(main, ["webhooks", "deliveries", "--tenant", "demo", "--failed"],
                        catch_exceptions=False)
    assert log.exit_code == 0 and f"{delivery.id}" in log.output and "gave_up" in log.output
    again = runner.invoke(main, ["webhooks", "redeliver", str(delivery.id)],
                          catch_exceptions=False)
    assert again.exit_code == 0, again.output
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery).where(
            WebhookDelivery.event_id == delivery.event_id)) == 2
    disabled = runner.invoke(main, ["webhooks", "disable", str(sub.id)], catch_exceptions=False)
    assert disabled.exit_code == 0
    with services.db.session() as session:
        assert session.get(WebhookSubscription, sub.id).active is False


def test_recent_deliveries_newest_first_with_their_own_attempt_statuses(  # type: ignore[no-untyped-def]
        services, demo) -> None:
    _no_dispatch(services)
    tenant_id = demo["tenant_id"]
    _subscribe(services, tenant_id, "https://hooks.example.test/x", "customer.updated")
    _change_points(services, tenant_id, 8)
    _change_points(services, tenant_id, 9)
    deliveries = _deliveries(services)
    assert len(deliveries) >= 2
    oldest, newest = deliveries[0], deliveries[-1]
    with services.db.transaction(tenant_id) as session:
        for delivery_id, status in ((oldest.id, 500), (newest.id, 200), (oldest.id, None)):
            session.add(WebhookAttempt(tenant_id=tenant_id, delivery_id=delivery_id,
                                       status=status))
        session.get(WebhookDelivery, oldest.id).outcome = "gave_up"
    with services.db.tenant_session(tenant_id) as session:
        listed = [(d.id, codes) for d, codes in webhooks_out.recent_deliveries(session)]
        assert listed[0] == (newest.id, [200]) and listed[-1] == (oldest.id, [500, None])
        assert [d.id for d in deliveries][::-1] == [d_id for d_id, _ in listed]
        assert [(d.id, codes) for d, codes in webhooks_out.recent_deliveries(session, limit=1)] \
            == [(newest.id, [200])]
        assert [(d.id, codes) for d, codes in webhooks_out.recent_deliveries(
            session, failed=True)] == [(oldest.id, [500, None])]

"""Inbound loyalty-engine webhooks through the real endpoint: authentication, every event
type end to end (card re-rendered, push queued), replays, bad events stored, mappings."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from app.cli import main
from app.infra.db import PUSH_DISPATCH_KEY, WEBHOOK_DISPATCH_KEY
from app.infra.models import (
    Card,
    Customer,
    InboundEvent,
    InboundHook,
    PushJob,
    Tenant,
)
from app.webhooks import inbound as webhooks_in
from app.webhooks import outbound as webhooks_out
from tests import factories

URL = "/hooks/demo/loyalty"


def _hook(services, auth: str = "header", mapping: dict[str, Any] | None = None,  # type: ignore[no-untyped-def]
          slug: str = "loyalty") -> str:
    with services.db.transaction() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.slug == "demo"))
        _, secret = webhooks_in.create_hook(session, tenant, slug, auth, mapping)
    return secret


def _post(client, secret: str, event: dict[str, Any] | bytes, url: str = URL,  # type: ignore[no-untyped-def]
          header: str = "X-Secret-Key"):
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    return client.post(url, data=body, headers={header: secret,
                                                "Content-Type": "application/json"})


def _customer(services, external_id: str = "C-1002") -> Customer:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == external_id))
        if customer is not None:
            customer.current_consents()  # load them while the session is open
        return customer


def _events(services) -> list[InboundEvent]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return list(session.scalars(select(InboundEvent).order_by(InboundEvent.id)))


@pytest.fixture()
def device(services, demo) -> int:  # type: ignore[no-untyped-def]
    """C-1002's rewards card, installed on one Apple device: its changes must be pushed."""
    with services.db.transaction(demo["tenant_id"]) as session:
        card = factories.card(session, "C-1002")
        factories.device(session, card, "phone-1")
        return card.id


def _card_state(services, card_id: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        version = session.get(Card, card_id).version
        jobs = session.scalar(select(func.count()).select_from(PushJob).where(
            PushJob.card_id == card_id, PushJob.channel == "apple"))
        return version, jobs


# -- authentication -------------------------------------------------------------------------

def test_header_secret_auth_and_refusals_are_not_stored(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)
    with services.db.session() as session:
        hook = session.scalar(select(InboundHook))
        assert hook.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in json.dumps([hook.secret_hash, hook.hmac_secret, hook.mapping])
    event = {"id": "e-1", "type": "tier.changed", "customer": {"id": "C-1002"}, "tier": "Gold"}
    for bad in (secret[:-1] + "x", "", "x" * 43):
        refused = _post(client, bad, event)
        assert refused.status_code == 401
        assert refused.mimetype == "application/problem+json"
    assert client.post(URL, json=event).status_code == 401  # no header at all
    assert _events(services) == []
    ok = _post(client, secret, event)
    assert ok.status_code == 200 and ok.get_json() == {"status": "applied", "event_id": "e-1"}
    assert _customer(services).attributes["tier"] == "Gold"


def test_hmac_signatures_in_the_usual_encodings(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    key = _hook(services, auth="hmac")
    with services.db.session() as session:
        assert session.scalar(select(InboundHook)).secret_hash is None

    def body(n: int) -> bytes:
        return json.dumps({"id": f"h-{n}", "type": "tier.changed",
                           "customer": {"id": "C-1002"}, "tier": f"T{n}"}).encode()

    def mac(data: bytes) -> bytes:
        return hmac.new(key.encode(), data, hashlib.sha256).digest()

    signatures = [
        lambda b: mac(b).hex(),
        lambda b: mac(b).hex().upper(),
        lambda b: "sha256=" + mac(b).hex(),
        lambda b: base64.b64encode(mac(b)).decode(),
        lambda b: webhooks_out.signature_header(key, int(time.time()), b),
    ]
    for n, sign in enumerate(signatures):
        answer = _post(client, sign(body(n)), body(n), header="X-Signature")
        assert answer.status_code == 200, (n, answer.get_json())
    assert _customer(services).attributes["tier"] == f"T{len(signatures) - 1}"
    tampered = body(99)
    assert _post(client, mac(body(98)).hex(), tampered, header="X-Signature").status_code == 401
    stale = webhooks_out.signature_header(key, int(time.time()) - 3600, tampered)
    assert _post(client, stale, tampered, header="X-Signature").status_code == 401
    other_key = hmac.new(b"other", tampered, hashlib.sha256).hexdigest()
    assert _post(client, other_key, tampered, header="X-Signature").status_code == 401
    assert len(_events(services)) == len(signatures)


# -- every event type, end to end -----------------------------------------------------------

def test_points_credit_and_debit_rerender_the_card_and_push(client, services, demo,  # type: ignore[no-untyped-def]
                                                           device) -> None:
    secret = _hook(services)
    version, jobs = _card_state(services, device)
    credited = _post(client, secret, {"id": "p-1", "type": "points.credited",
                                      "customer": {"id": "C-1002"}, "points": 50,
                                      "reason": "order"})
    assert credited.get_json()["status"] == "applied"
    attributes = _customer(services).attributes
    assert attributes["points"] == 390 and attributes["last_points_reason"] == "order"
    assert attributes["last_points_delta"] == 50
    assert _card_state(services, device) == (version + 1, jobs + 1)

    debited = _post(client, secret, {"id": "p-2", "type": "points.debited",
                                     "customer": {"id": "C-1002"}, "points": -15,
                                     "reason": "review"})
    assert debited.get_json()["status"] == "applied"
    assert _customer(services).attributes["points"] == 375
    assert _card_state(services, device) == (version + 2, jobs + 2)
    [first, second] = _events(services)
    assert (first.status, first.event_type, first.customer_id) == (
        "applied", "points.credited", _customer(services).id)
    assert first.applied_at is not None and second.payload["reason"] == "review"


def test_replayed_event_is_applied_once(client, services, demo, device) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)
    event = {"id": "evt-42", "type": "points.credited", "customer": {"id": "C-1002"},
             "points": 10, "reason": "birthday"}
    assert _post(client, secret, event).get_json()["status"] == "applied"
    after_first = _card_state(services, device)
    for _ in range(3):
        again = _post(client, secret, event)
        assert again.status_code == 200
        assert again.get_json() == {"status": "duplicate", "event_id": "evt-42"}
    assert _customer(services).attributes["points"] == 350
    assert _card_state(services, device) == after_first
    assert len(_events(services)) == 1


def test_expiring_tier_and_list_events(client, services, demo, device) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)
    events = [
        {"id": "x-1", "type": "points.expiring", "customer": {"id": "C-1002"},
         "expiring": {"points": 120, "date": "2026-12-31"}},
        {"id": "x-2", "type": "tier.changed", "customer": {"id": "C-1002"}, "tier": "Gold"},
        {"id": "x-3", "type": "list.subscribed", "customer": {"id": "C-1002"},
         "list": {"name": "newsletter"}},
        {"id": "x-4", "type": "list.unsubscribed", "customer": {"id": "C-1002"},
         "list": {"name": "newsletter"}},
    ]
    for event in events:
        answer = _post(client, secret, event)
        assert answer.get_json()["status"] == "applied", answer.get_json()
    customer = _customer(services)
    assert customer.attributes["points_expiring"] == 120
    assert customer.attributes["points_expiring_on"] == "2026-12-31"
    assert customer.attributes["tier"] == "Gold"
    consents = [(c.kind, c.granted, c.source) for c in customer.consents
                if c.kind == "list_newsletter"]
    assert consents == [("list_newsletter", True, "webhook"), ("list_newsletter", False, "webhook")]
    version, jobs = _card_state(services, device)
    assert version >= 1 and jobs >= 1  # the tier is on the card


def test_customer_created_then_updated(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)
    created = _post(client, secret, {
        "id": "c-1", "type": "customer.created",
        "customer": {"id": "L-77", "email": " New.Member@Example.com ", "first_name": "Ada",
                     "attributes": {"points": 5, "referral_id": "R9"}}})
    assert created.get_json()["status"] == "applied"
    customer = _customer(services, "L-77")
    assert customer.email == "new.member@example.com" and customer.first_name == "Ada"
    assert customer.attributes == {"points": 5, "referral_id": "R9"}
    updated = _post(client, secret, {"id": "c-2", "type": "customer.updated",
                                     "customer": {"id": "L-77", "first_name": "Adèle"}})
    assert updated.get_json()["status"] == "applied"
    assert _customer(services, "L-77").first_name == "Adèle"
    clash = _post(client, secret, {"id": "c-3", "type": "customer.updated",
                                   "customer": {"id": "L-77",
                                                "email": "camille.martin@example.com"}})
    assert clash.status_code == 422
    assert clash.get_json()["detail"] == "email is already used by another customer"
    assert _customer(services, "L-77").email == "new.member@example.com"


def test_inbound_change_emits_customer_updated_webhook(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = lambda ids: None
    with services.db.transaction(demo["tenant_id"]) as session:
        webhooks_out.create_subscription(session, demo["tenant_id"], "https://x.test/h",
                                         ["customer.updated", "consent.changed"])
    secret = _hook(services)
    _post(client, secret, {"id": "w-1", "type": "points.credited",
                           "customer": {"id": "C-1002"}, "points": 1, "reason": "review"})
    _post(client, secret, {"id": "w-2", "type": "list.subscribed",
                           "customer": {"id": "C-1002"}, "list": {"name": "sms"}})
    with services.db.session() as session:
        types = [(d.event_type, d.payload["data"].get("changed"))
                 for d in session.scalars(select(webhooks_out.WebhookDelivery).order_by(
                     webhooks_out.WebhookDelivery.id))]
    assert types == [("customer.updated", ["attributes.last_points_delta",
                                           "attributes.last_points_reason",
                                           "attributes.points"]),
                     ("consent.changed", None)]


def test_inbound_hook_queues_its_webhook_and_push_only_once_committed(  # type: ignore[no-untyped-def]
        client, services, demo, device) -> None:
    """The hook applies the event inside savepoints; releasing one is not a commit. Every
    row handed to the queue must already be visible to another connection (a worker)."""
    seen: dict[str, list[tuple[int, bool]]] = {"webhook": [], "push": []}

    def recorder(kind: str, model: Any):  # type: ignore[no-untyped-def]
        def dispatch(ids: list[int]) -> None:
            with services.db.engine.connect() as worker:  # not the request's connection
                visible = set(worker.scalars(select(model.id).where(model.id.in_(ids))))
            seen[kind] += [(row_id, row_id in visible) for row_id in ids]
        return dispatch

    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = recorder("webhook", webhooks_out.WebhookDelivery)
    services.db.dispatchers[PUSH_DISPATCH_KEY] = recorder("push", PushJob)
    with services.db.transaction(demo["tenant_id"]) as session:
        webhooks_out.create_subscription(session, demo["tenant_id"], "https://x.test/h",
                                         ["customer.updated"])
    secret = _hook(services)
    answer = _post(client, secret, {"id": "late-1", "type": "points.credited",
                                    "customer": {"id": "C-1002"}, "points": 5})
    assert answer.get_json()["status"] == "applied"
    with services.db.session() as session:
        [delivery] = session.scalars(select(webhooks_out.WebhookDelivery.id))
        [job] = session.scalars(select(PushJob.id).where(PushJob.card_id == device))
    assert seen == {"webhook": [(delivery, True)], "push": [(job, True)]}


# -- bad events are stored, never dropped ---------------------------------------------------

def test_malformed_json_is_stored_failed_and_reported(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)
    answer = _post(client, secret, b'{"id": "m-1", "type": ')
    assert answer.status_code == 422 and answer.mimetype == "application/problem+json"
    problem = answer.get_json()
    assert problem["event_status"] == "failed" and problem["event_id"].startswith("sha256:")
    assert "malformed JSON" in problem["detail"]
    assert _post(client, secret, b'{"id": "m-1", "type": ').status_code == 422
    assert _post(client, secret, b"[1, 2]").status_code == 422
    assert _post(client, secret, b"\xff\xfe").status_code == 422
    events = _events(services)
    assert [e.status for e in events] == ["failed"] * 3
    assert events[0].payload == {"raw": '{"id": "m-1", "type": '}
    assert events[2].error == "body is not UTF-8"


def test_unknown_types_are_ignored_and_bad_values_fail(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)
    cases = [
        ({"id": "u-1", "type": "pin.changed", "customer": {"id": "C-1002"}}, 200, "ignored"),
        ({"id": "u-2", "customer": {"id": "C-1002"}}, 422, "failed"),
        ({"id": "u-3", "type": "points.credited", "customer": {"id": "C-1002"},
          "points": "lots"}, 422, "failed"),
        ({"id": "u-4", "type": "points.credited", "customer": {"id": "C-1002"}}, 422, "failed"),
        ({"id": "u-5", "type": "points.expiring", "customer": {"id": "C-1002"},
          "expiring": {"points": 5, "date": "next week"}}, 422, "failed"),
        ({"id": "u-6", "type": "tier.changed", "customer": {"id": "C-1002"}}, 422, "failed"),
        ({"id": "u-7", "type": "list.subscribed", "customer": {"id": "C-1002"}}, 422, "failed"),
    ]
    for event, status, _stored in cases:
        answer = _post(client, secret, event)
        assert answer.status_code == status, (event, answer.get_json())
    events = _events(services)
    assert [e.status for e in events] == [stored for _, _, stored in cases]
    assert events[0].error == "unknown event type 'pin.changed'"
    assert all(e.error for e in events)
    assert _customer(services).attributes["points"] == 340  # nothing half-applied


def test_failed_event_is_applied_when_sent_again_after_the_cause_is_gone(client, services,  # type: ignore[no-untyped-def]
                                                                        demo) -> None:
    secret = _hook(services)
    credit = {"id": "late-1", "type": "points.credited", "customer": {"id": "L-1"},
              "points": 7}
    first = _post(client, secret, credit)
    assert first.status_code == 422 and first.get_json()["detail"] == "unknown customer"
    _post(client, secret, {"id": "late-0", "type": "customer.created",
                           "customer": {"id": "L-1"}})
    assert _post(client, secret, credit).get_json()["status"] == "applied"
    assert _post(client, secret, credit).get_json()["status"] == "duplicate"
    assert _customer(services, "L-1").attributes["points"] == 7
    assert [e.status for e in _events(services)] == ["applied", "applied"]


def test_balance_wins_over_older_credits(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)

    def send(n: int, when: str, **fields: Any) -> str:
        event = {"id": f"b-{n}", "customer": {"id": "C-1002"}, "occurred_at": when, **fields}
        return _post(client, secret, event).get_json()["status"]

    assert send(1, "2026-03-01T10:00:00Z", type="points.balance", balance=1000) == "applied"
    assert send(2, "2026-03-01T09:00:00Z", type="points.credited", points=50) == "ignored"
    assert send(3, "2026-03-01T11:00:00Z", type="points.credited", points=10) == "applied"
    assert send(4, "2026-03-01T08:00:00Z", type="points.balance", balance=1) == "ignored"
    assert send(5, "2026-03-01T12:00:00Z", type="points.debited", points=5,
                balance=1005) == "applied"
    assert _customer(services).attributes["points"] == 1005
    assert _events(services)[1].error == "older than the last balance applied, which includes it"


def test_custom_mapping_smartemailing_style(client, services, demo, device) -> None:  # type: ignore[no-untyped-def]
    mapping = {"event_id": "eventId", "event_type": "eventName", "customer": "data.member",
               "points_delta": "data.credit", "reason": "data.why",
               "types": {"ellity-credit-changed": "points_change",
                         "ellity-pin-changed": "ignore"},
               "lists": {"1": "marketing_email"},
               "attributes": {"points": "loyalty_points"}}
    secret = _hook(services, mapping=mapping)
    changed = _post(client, secret, {"eventId": 1, "eventName": "ellity-credit-changed",
                                     "data": {"member": "C-1002", "credit": -40,
                                              "why": "anniversary"}})
    assert changed.get_json() == {"status": "applied", "event_id": "1"}
    customer = _customer(services)
    assert customer.attributes["loyalty_points"] == -40  # started from none
    assert customer.attributes["last_points_reason"] == "anniversary"
    subscribed = _post(client, secret, {"eventName": "unsubscribed",
                                        "data": {"email": "Jiri.Novak@example.com",
                                                 "listId": "1"}})
    assert subscribed.get_json()["status"] == "applied"
    assert subscribed.get_json()["event_id"].startswith("sha256:")  # no id: the body's hash
    assert _customer(services).current_consents()["marketing_email"].granted is False
    ignored = _post(client, secret, {"eventId": 2, "eventName": "ellity-pin-changed"})
    assert ignored.get_json()["status"] == "ignored"
    with services.db.transaction() as session:
        tenant = session.scalar(select(Tenant))
        with pytest.raises(ValueError, match="unknown keys"):
            webhooks_in.create_hook(session, tenant, "bad", mapping={"evnt_id": "x"})
        with pytest.raises(ValueError, match="actions are"):
            webhooks_in.create_hook(session, tenant, "bad", mapping={"types": {"a": "explode"}})


# -- the endpoint's edges -------------------------------------------------------------------

def test_unknown_hook_oversized_body_and_rate_limit(client, services, demo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)
    assert client.post("/hooks/demo/nope", json={}).status_code == 404
    assert client.post("/hooks/nobody/loyalty", json={}).status_code == 404
    big = _post(client, secret, b'{"pad": "' + b"x" * (256 * 1024) + b'"}')
    assert big.status_code == 413 and big.mimetype == "application/problem+json"
    assert _events(services) == []
    from app.web import hooks

    monkeypatch.setattr(hooks, "HOOK_LIMIT", "5 per minute")
    statuses = [_post(client, "wrong", {"id": n}).status_code for n in range(6)]
    assert statuses[:4] == [401] * 4 and statuses[-1] == 429
    assert _post(client, "wrong", {}).mimetype == "application/problem+json"
    assert client.post("/hooks/demo/other", json={}).status_code == 404  # per hook


def test_hook_commands(runner, services, demo, tmp_path, client) -> None:  # type: ignore[no-untyped-def]
    mapping_file = tmp_path / "mapping.json"
    mapping_file.write_text(json.dumps({"types": {"credit": "points_credit"}}))
    created = runner.invoke(main, ["hooks", "create", "--tenant", "demo", "--slug", "loyalty",
                                   "--mapping-file", str(mapping_file)], catch_exceptions=False)
    assert created.exit_code == 0, created.output
    assert "https://wallet.example.test/hooks/demo/loyalty" in created.output
    secret = created.output.split("X-Secret-Key: ")[1].split()[0]
    assert _post(client, secret, {"id": "k-1", "type": "credit", "customer": {"id": "C-1002"},
                                  "points": 1}).status_code == 200
    assert _post(client, secret, {"id": "k-2", "type": "what"}).status_code == 200
    again = runner.invoke(main, ["hooks", "create", "--tenant", "demo", "--slug", "loyalty"])
    assert again.exit_code == 1 and "already has" in again.output
    hmac_hook = runner.invoke(main, ["hooks", "create", "--tenant", "demo", "--slug", "signed",
                                     "--auth", "hmac"], catch_exceptions=False)
    assert "HMAC-SHA256 key for the X-Signature header" in hmac_hook.output
    listed = runner.invoke(main, ["hooks", "events", "--tenant", "demo", "--status", "ignored"],
                           catch_exceptions=False)
    assert "k-2" in listed.output and "k-1" not in listed.output
    assert "unknown event type" in listed.output

"""Webhook URLs cannot reach the server's own network unless the operator allows it."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.infra import netguard
from app.infra.db import WEBHOOK_DISPATCH_KEY
from app.infra.models import Customer, WebhookAttempt, WebhookDelivery
from app.webhooks import outbound as webhooks_out
from tests.api_helpers import auth, is_problem, make_key
from tests.webhook_receiver import WebhookReceiver

REFUSED = [
    "http://localhost:8000/hook",
    "https://LOCALHOST./hook",
    "http://admin.localhost/hook",
    "http://127.0.0.1:5432/",
    "http://10.1.2.3/hook",
    "http://192.168.0.10/hook",
    "http://169.254.169.254/latest/meta-data/",   # cloud metadata
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",             # IPv4 loopback dressed as IPv6
    "http://[fd00::1]/hook",
    "http://0.0.0.0/hook",
    "http://100.64.0.1/hook",                      # carrier-grade NAT
]


@pytest.mark.parametrize("url", REFUSED)
def test_private_destinations_are_refused_when_subscribing(url: str) -> None:
    with pytest.raises(ValueError, match="PASSERELLE_WEBHOOK_ALLOW_PRIVATE_NETWORKS"):
        netguard.check_url(url, allow_private=False)
    netguard.check_url(url, allow_private=True)  # the operator's choice


@pytest.mark.parametrize("url, message", [
    ("ftp://hooks.example.com/", "https://"),
    ("https:///no-host", "https://"),
    ("hooks.example.com/x", "https://"),
    ("https://user:pw@hooks.example.com/", "user name or password"),
    ("https://hooks.example.com:99999/", "port"),
])
def test_malformed_urls_are_refused_whatever_the_setting(url: str, message: str) -> None:
    for allow in (False, True):
        with pytest.raises(ValueError, match=message):
            netguard.check_url(url, allow_private=allow)


def test_public_names_and_addresses_pass() -> None:
    for url in ("https://hooks.example.com/passerelle", "https://93.184.215.14/h",
                "http://[2606:4700::1111]/h"):
        netguard.check_url(url, allow_private=False)


def test_api_answers_a_problem_for_a_metadata_url(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    services.settings.webhook_allow_private_networks = False
    admin = auth(make_key(services, demo["tenant_id"], "admin"))
    answer = client.post("/api/v1/webhooks", headers=admin, json={
        "url": "http://169.254.169.254/latest/meta-data/", "event_types": ["card.installed"]})
    assert is_problem(answer, 422)
    assert "not a public address" in answer.get_json()["detail"]


def test_a_name_resolving_to_loopback_is_refused_at_connection_time(services, demo) -> None:  # type: ignore[no-untyped-def]
    """The subscription was accepted (the operator allowed private networks then, or
    the name's DNS answer changed since): the connection itself is checked."""
    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = lambda ids: None  # delivered by hand below
    tenant = demo["tenant_id"]
    with WebhookReceiver() as receiver:
        port = receiver.url.rsplit(":", 1)[1]
        with services.db.transaction(tenant) as session:
            sub = webhooks_out.create_subscription(
                session, tenant, f"http://localhost:{port}", ["customer.updated"],
                allow_private=True)
            receiver.secret = sub.secret
        with services.db.transaction(tenant) as session:
            customer = session.scalar(select(Customer).where(Customer.external_id == "C-1002"))
            customer.attributes["points"] = 777
        with services.db.session() as session:
            [delivery_id] = session.scalars(select(WebhookDelivery.id)).all()

        services.settings.webhook_allow_private_networks = False
        refused = webhooks_out.deliver(services, delivery_id)
        assert receiver.requests == []  # not a byte reached it

    assert refused.state == "gave_up"  # a decision, not a hiccup: no retries
    with services.db.session() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        [attempt] = session.scalars(select(WebhookAttempt).where(
            WebhookAttempt.delivery_id == delivery_id)).all()
    assert delivery.outcome == "gave_up" and delivery.done_at is not None
    assert attempt.status is None
    assert attempt.error.startswith("refused: ") and "is not a public address" in attempt.error


def test_allowed_private_networks_deliver_as_before(services, demo) -> None:  # type: ignore[no-untyped-def]
    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = lambda ids: None
    tenant = demo["tenant_id"]
    with WebhookReceiver() as receiver:
        with services.db.transaction(tenant) as session:
            sub = webhooks_out.create_subscription(session, tenant, receiver.url,
                                                   ["customer.updated"], allow_private=True)
            receiver.secret = sub.secret
        with services.db.transaction(tenant) as session:
            customer = session.scalar(select(Customer).where(Customer.external_id == "C-1002"))
            customer.attributes["points"] = 778
        with services.db.session() as session:
            [delivery_id] = session.scalars(select(WebhookDelivery.id)).all()
        assert services.settings.webhook_allow_private_networks  # the test default
        assert webhooks_out.deliver(services, delivery_id).state == "delivered"
        [request] = receiver.requests
    assert request.signature_ok

"""docs/webhooks.md shows one example body per outbound event type; each must have exactly
the keys and value types of the body Passerelle really sends for that type, built here
by the same code paths that send it (install log, enrollment form, data change, consent).
A failing test prints the real body, ready to paste into the doc."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.customers.customers import record_consent
from app.distribution import enrollment
from app.infra.db import WEBHOOK_DISPATCH_KEY
from app.infra.models import Card, Customer, Program, WebhookDelivery
from app.tracking import install_state
from app.webhooks import outbound as webhooks_out
from tests.distribution.test_enrollment import _form, _texts

DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
#: Free-form objects whose keys are the tenant's own (compared as "an object" only).
FREE_FORM = {"data.customer.attributes"}
_EXAMPLE = re.compile(r"<!-- payload: ([a-z.]+) -->\s*```json\n(.*?)\n```", re.S)


def real_payloads(services, tenant_id: int) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """One real body per event type, in the order the doc shows them."""
    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = lambda ids: None
    with services.db.transaction(tenant_id) as session:
        webhooks_out.create_subscription(session, tenant_id, "https://hooks.example.test/p",
                                         webhooks_out.EVENT_TYPES)
    with services.db.transaction(tenant_id) as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1002"))
        card = session.scalar(select(Card).join(Program).where(
            Card.customer_id == customer.id, Program.slug == "rewards"))
        install_state.record(session, card, "apple", "downloaded")
    with services.db.transaction(tenant_id) as session:
        card = session.get(Card, card.id)
        install_state.record(session, card, "apple", "registered", device="phone-1")
    with services.db.transaction(tenant_id) as session:
        customer = session.get(Customer, customer.id)
        customer.attributes = {**customer.attributes, "points": 390,
                               "last_points_reason": "order"}
    with services.db.transaction(tenant_id) as session:
        record_consent(session, session.get(Customer, customer.id), "marketing_email", False,
                       "webhook")
    with services.db.transaction(tenant_id) as session:
        card = session.get(Card, card.id)
        install_state.record(session, card, "apple", "unregistered", device="phone-1")
    with services.db.transaction(tenant_id) as session:
        program = session.get(Program, card.program_id)
        enrollment.enroll(session, services, program, _form(), "en", _texts(program))
    with services.db.session() as session:
        rows = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id))
        payloads: dict[str, dict[str, Any]] = {}
        for row in rows:  # the first of each type (enrolling records consents too)
            payloads.setdefault(row.event_type, row.payload)
    assert set(payloads) == set(webhooks_out.EVENT_TYPES)
    return payloads


def shape(value: Any, path: str = "") -> Any:
    """Keys and JSON types, recursively (null is its own type)."""
    if isinstance(value, dict):
        if path in FREE_FORM:
            return "object"
        return {key: shape(item, f"{path}.{key}".lstrip(".")) for key, item in value.items()}
    if isinstance(value, list):
        return sorted({json.dumps(shape(item, path)) for item in value})
    return {bool: "boolean", int: "number", float: "number", str: "string",
            type(None): "null"}[type(value)]


def doc_examples() -> list[tuple[str, dict[str, Any]]]:
    return [(kind, json.loads(body)) for kind, body in _EXAMPLE.findall(DOCS.read_text())]


def test_every_documented_payload_is_the_real_one(services, demo) -> None:  # type: ignore[no-untyped-def]
    real = real_payloads(services, demo["tenant_id"])
    examples = doc_examples()
    documented = [kind for kind, _ in examples if kind != "envelope"]
    assert sorted(documented) == sorted(webhooks_out.EVENT_TYPES)  # each type, once
    for kind, example in examples:
        if kind == "envelope":  # the common shape: compared with every real body
            for body in real.values():
                assert shape({**body, "data": {}}) == shape({**example, "data": {}})
            continue
        assert shape(example) == shape(real[kind]), (
            f"docs/webhooks.md's {kind} example differs from the real body:\n"
            + json.dumps(real[kind], indent=2, ensure_ascii=False))
        assert example["type"] == kind


def test_the_wallet_table_names_every_wallet_property(services, demo) -> None:  # type: ignore[no-untyped-def]
    text = DOCS.read_text()
    table = [line for line in text.splitlines() if line.startswith("| `wallet_")]
    documented = {name for line in table for name in re.findall(r"`(wallet_\w+)`",
                                                                line.split("|")[1])}
    assert documented == set(install_state.empty_status())

"""The one customer write path (customers.upsert_customer / update_customer): what every
writer (imports, API, forms, CRM reads, inbound hooks, dashboard, demo) relies on."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.crm.connector import CrmRecord
from app.crm.sync import store_record
from app.customers.customers import (
    EMAIL_TAKEN,
    MAX_ATTRIBUTES,
    CustomerChanges,
    CustomerConflict,
    CustomerDataError,
    ImportFileError,
    UpsertBatch,
    find_customer,
    import_csv,
    update_customer,
    upsert_customer,
)
from app.infra.db import WEBHOOK_DISPATCH_KEY
from app.infra.models import Consent, Customer, InboundHook, Tenant, WebhookDelivery
from app.webhooks import inbound as webhooks_in
from app.webhooks import outbound as webhooks_out


def _upsert(session, tenant_id: int, external_id: str, **changes):  # type: ignore[no-untyped-def]
    return upsert_customer(session, tenant_id, external_id, CustomerChanges(**changes),
                           source="test")


def _consents(services, external_id: str) -> list[tuple[str, bool, str]]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == external_id))
        return [(c.kind, c.granted, c.source) for c in sorted(customer.consents,
                                                             key=lambda c: c.id)]


def _customer_updated(services) -> list[list[str]]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return [d.payload["data"]["changed"] for d in session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.event_type == "customer.updated")
            .order_by(WebhookDelivery.id))]


@pytest.fixture()
def subscribed(services, demo):  # type: ignore[no-untyped-def]
    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = lambda ids: None
    with services.db.transaction(demo["tenant_id"]) as session:
        webhooks_out.create_subscription(session, demo["tenant_id"], "https://x.test/h",
                                         ["customer.updated", "consent.changed"])
    return demo


def test_a_new_customer_is_created_with_cleaned_values(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        result = _upsert(session, demo["tenant_id"], "N-1",
                         fields={"email": " Nina@Example.COM ", "locale": "fr_FR",
                                 "first_name": " Nina ", "birthday": "1990-05-17"},
                         attributes={"points": 10, "tier": "Gold"},
                         consents={"marketing_email": True})
        assert result is not None and result.created and result.customer.id is not None
        assert result.changed_fields == {"email", "locale", "first_name", "birthday",
                                         "attributes.points", "attributes.tier",
                                         "consents.marketing_email"}
    with services.db.session() as session:
        customer = find_customer(session, demo["tenant_id"], "N-1")
        assert (customer.email, customer.locale, customer.first_name, customer.birthday) == (
            "nina@example.com", "fr-FR", "Nina", dt.date(1990, 5, 17))
        assert customer.attributes == {"points": 10, "tier": "Gold"}
    assert _consents(services, "N-1") == [("marketing_email", True, "test")]


def test_an_update_changes_only_what_it_names(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        result = _upsert(session, demo["tenant_id"], "C-1001",
                         fields={"first_name": "Camille-Anne", "phone": None},
                         attributes={"points": 1300, "membership_level": None})
        assert result is not None and not result.created
        assert result.changed_fields == {"first_name", "attributes.points",
                                         "attributes.membership_level"}
        assert result.data_changed
    with services.db.session() as session:
        customer = find_customer(session, demo["tenant_id"], "C-1001")
        assert customer.first_name == "Camille-Anne" and customer.last_name == "Martin"
        assert customer.email == "camille.martin@example.com"
        assert customer.attributes == {"points": 1300, "tier": "Gold", "points_to_next_tier": 720}


def test_an_absent_customer_is_not_created_when_creating_is_not_allowed(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        assert upsert_customer(session, demo["tenant_id"], "NOPE", CustomerChanges(),
                               source="test", create=False) is None
        with pytest.raises(CustomerConflict, match="external_id: 'C-1001' is already used"):
            upsert_customer(session, demo["tenant_id"], "C-1001", CustomerChanges(),
                            source="test", only_create=True)
        assert session.scalar(select(func.count(Customer.id))) == 5


@pytest.mark.parametrize("email", ["camille.martin@example.com", " CAMILLE.Martin@Example.com"])
def test_an_email_taken_by_another_customer_is_refused_and_nothing_written(services, demo, email) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        with pytest.raises(CustomerConflict) as refused:
            _upsert(session, demo["tenant_id"], "C-1002",
                    fields={"email": email, "first_name": "Other"},
                    consents={"sms": True})
        assert str(refused.value) == EMAIL_TAKEN == "email is already used by another customer"
        assert isinstance(refused.value, CustomerDataError)  # every writer's 4xx path
        with pytest.raises(CustomerConflict):
            _upsert(session, demo["tenant_id"], "NEW-1", fields={"email": email})
        # The session stays usable and the transaction commits what else it did.
        assert _upsert(session, demo["tenant_id"], "NEW-2", fields={"first_name": "Ok"})
    with services.db.session() as session:
        customer = find_customer(session, demo["tenant_id"], "C-1002")
        assert (customer.email, customer.first_name) == ("jiri.novak@example.com", "Jiří")
        assert find_customer(session, demo["tenant_id"], "NEW-1") is None
        assert find_customer(session, demo["tenant_id"], "NEW-2") is not None
    assert ("sms", True, "test") not in _consents(services, "C-1002")


def test_a_customer_keeps_its_own_email(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        result = _upsert(session, demo["tenant_id"], "C-1001",
                         fields={"email": "Camille.Martin@example.com"})
        assert result is not None and not result.changed


def test_an_email_belongs_to_one_customer_per_tenant_not_across_tenants(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        other = Tenant(slug="other", name="Other")
        session.add(other)
        session.flush()
        other_id = other.id
    with services.db.transaction(other_id) as session:
        result = _upsert(session, other_id, "C-1002", fields={"email": "camille.martin@example.com"})
        assert result is not None and result.created


def test_an_import_batch_refuses_the_second_row_claiming_an_email(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        batch = UpsertBatch.load(session, demo["tenant_id"], {"B-1", "B-2"}, {"b@example.com"})
        first = upsert_customer(session, demo["tenant_id"], "B-1",
                                CustomerChanges({"email": "b@example.com"}), source="import",
                                batch=batch)
        assert first is not None and first.created
        with pytest.raises(CustomerConflict, match=EMAIL_TAKEN):
            upsert_customer(session, demo["tenant_id"], "B-2",
                            CustomerChanges({"email": "b@example.com"}), source="import",
                            batch=batch)
        session.flush()
        assert session.scalar(select(func.count(Customer.id)).where(
            Customer.email == "b@example.com")) == 1


def test_consents_are_appended_only_when_the_decision_changes(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        customer = find_customer(session, demo["tenant_id"], "C-1001")
        same = update_customer(session, customer, CustomerChanges(
            consents={"marketing_email": True}), source="form")
        assert same.changed_fields == set()
        withdrawn = update_customer(session, customer, CustomerChanges(
            consents={"marketing_email": False, "sms": True},
            consent_texts={"marketing_email": "Offers by email", "sms": "Texts"}),
            source="form")
        assert withdrawn.changed_fields == {"consents.marketing_email", "consents.sms"}
        assert not withdrawn.data_changed  # cards do not show consents
    assert _consents(services, "C-1001") == [("marketing_email", True, "demo"),
                                             ("marketing_email", False, "form"),
                                             ("sms", True, "form")]
    with services.db.session() as session:
        texts = {c.kind: c.text for c in session.scalars(select(Consent).where(
            Consent.source == "form"))}
        assert texts == {"marketing_email": "Offers by email", "sms": "Texts"}


def test_a_consent_decided_without_the_text_shown_is_a_programming_error(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        customer = find_customer(session, demo["tenant_id"], "C-1001")
        with pytest.raises(ValueError, match="its text was not given"):
            update_customer(session, customer, CustomerChanges(
                consents={"sms": True}, consent_texts={}), source="form")


def test_a_no_op_update_emits_no_customer_updated_event(services, subscribed) -> None:  # type: ignore[no-untyped-def]
    tenant_id = subscribed["tenant_id"]
    with services.db.transaction(tenant_id) as session:
        result = _upsert(session, tenant_id, "C-1003",
                         fields={"email": "LENA.MUELLER@example.com", "first_name": "Lena"},
                         attributes={"points": 15420}, consents={"marketing_email": True})
        assert result is not None and not result.changed
    assert _customer_updated(services) == []
    with services.db.transaction(tenant_id) as session:
        result = _upsert(session, tenant_id, "C-1003", attributes={"points": 15500})
        assert result is not None and result.changed_fields == {"attributes.points"}
    assert _customer_updated(services) == [["attributes.points"]]


@pytest.mark.parametrize("changes, words", [
    ({"fields": {"email": "not an email"}}, "is not an email address"),
    ({"fields": {"locale": "xx-nowhere-9"}}, "not a known language tag"),
    ({"fields": {"birthday": "1850-01-01"}}, "out of range"),
    ({"fields": {"first_name": "x" * 201}}, "longer than 200"),
    ({"fields": {"nickname": "x"}}, "not a customer field"),
    ({"fields": {"phone": 123}}, "must be text"),
    ({"attributes": {"bad name": 1}}, "not usable"),
    ({"attributes": {"nested": {"a": 1}}}, "must be text, a number"),
    ({"attributes": {"long": "x" * 1001}}, "longer than 1000"),
    ({"attributes": {"huge": 10**16}}, "out of range"),
    ({"attributes": {f"a{i}": i for i in range(MAX_ATTRIBUTES + 1)}}, "at most 100 attributes"),
    ({"consents": {"bad kind!": True}}, "consent kind"),
    ({"consents": {"sms": "yes"}}, "true or false"),
])
def test_values_no_customer_can_take_are_refused_before_writing(services, demo, changes, words) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        with pytest.raises(CustomerDataError, match=words):
            _upsert(session, demo["tenant_id"], "C-1004", **changes)
        assert not session.dirty and not session.new
    with pytest.raises(CustomerDataError, match="external_id must be"):
        with services.db.transaction(demo["tenant_id"]) as session:
            _upsert(session, demo["tenant_id"], " C-1004\n")


# -- what changed for some writers when they came to the one upsert -------------------

def _hook_receiver(services, demo):  # type: ignore[no-untyped-def]
    """Posts events to a new inbound hook of the demo tenant; returns (status, error)."""
    with services.db.transaction() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.slug == "demo"))
        hook, secret = webhooks_in.create_hook(session, tenant, "loyalty")
        hook_id = hook.id

    def receive(event: dict) -> tuple[str, str | None]:  # type: ignore[type-arg]
        with services.db.transaction(demo["tenant_id"]) as session:
            hook = session.get(InboundHook, hook_id)
            received = webhooks_in.receive(session, services, hook, {"X-Secret-Key": secret},
                                           json.dumps(event).encode())
            return received.status, received.event.error
    return receive


def test_inbound_hook_attributes_follow_the_upsert_rules(services, demo) -> None:  # type: ignore[no-untyped-def]
    """Before: a hook stored any JSON as an attribute (nested objects, nulls)."""
    receive = _hook_receiver(services, demo)
    status, error = receive({"id": "e-1", "type": "customer.updated",
                             "customer": {"id": "C-1004", "attributes": {"profile": {"a": 1}}}})
    assert status == "failed" and "must be text, a number" in str(error)
    status, _ = receive({"id": "e-2", "type": "customer.updated",
                         "customer": {"id": "C-1004", "attributes": {"points_to_next_tier": None,
                                                                     "tier": "Silver"}}})
    assert status == "applied"
    with services.db.session() as session:
        assert find_customer(session, demo["tenant_id"], "C-1004").attributes == {
            "points": 0, "tier": "Silver"}


def test_inbound_hook_finds_a_customer_by_email_as_typed(services, demo) -> None:  # type: ignore[no-untyped-def]
    receive = _hook_receiver(services, demo)
    status, _ = receive({"id": "e-1", "type": "customer.updated",
                         "data": {"email": " LENA.Mueller@Example.com ", "first_name": "Léna"}})
    assert status == "applied"
    with services.db.session() as session:
        assert find_customer(session, demo["tenant_id"], "C-1003").first_name == "Léna"
    status, error = receive({"id": "e-2", "type": "customer.updated",
                             "data": {"email": "nobody@example.com", "first_name": "X"}})
    assert (status, error) == ("failed", "a new customer needs an id (mapping: customer)")


def test_csv_import_attributes_follow_the_upsert_rules(services, demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Before: a CSV cell of any length was stored; a consent column needed no kind."""
    path = tmp_path / "customers.csv"
    path.write_text(f"external_id,note\nI-1,{'x' * 1001}\nI-2,short\n", encoding="utf-8")
    with services.db.tenant_session(demo["tenant_id"]) as session:
        report = import_csv(session, demo["tenant_id"], path)
    assert (report.created, [str(e) for e in report.errors]) == (
        1, ["line 2: attribute note: text longer than 1000 characters or containing NUL"])
    path.write_text("external_id,consent_\nI-3,yes\n", encoding="utf-8")
    with services.db.tenant_session(demo["tenant_id"]) as session:
        with pytest.raises(ImportFileError, match="consent_"):
            import_csv(session, demo["tenant_id"], path)


def test_a_crm_value_no_customer_can_take_is_skipped_and_the_rest_copied(services, demo, caplog) -> None:  # type: ignore[no-untyped-def]
    """Before: CRM attributes were copied unchecked (a nested object, 5,000 characters)."""
    caplog.set_level(logging.WARNING)
    record = CrmRecord(external_id="R-1", email="r1@example.com", first_name="Rita",
                       attributes={"points": 42, "profile": {"secret": "x"},
                                   "bio": "y" * 5000},
                       consents={"sms": True, "bad kind!": True})
    with services.db.transaction(demo["tenant_id"]) as session:
        customer = store_record(session, services, demo["tenant_id"], record)
        assert customer.attributes == {"points": 42}
        assert customer.email == "r1@example.com" and customer.crm_fetched_at is not None
    assert _consents(services, "R-1") == [("sms", True, "crm")]
    assert "attributes.profile" in caplog.text and "attributes.bio" in caplog.text
    assert "consents.bad kind!" in caplog.text
    assert "secret" not in caplog.text and "yyyy" not in caplog.text

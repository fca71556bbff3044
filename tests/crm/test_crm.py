"""The CRM connector against a real HTTP stand-in: mapping, read-through with its
staleness fallback, the durable write outbox (CRM down, back, refusing), the worker."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

import pytest
from sqlalchemy import func, select

from app.cards.cards import ensure_card
from app.cli import main
from app.crm import (
    CrmRecord,
    CrmStale,
    connector_for,
    customer_payload,
    deliver,
    due_entries,
    load_customer,
    record_write,
    refresh_customer,
)
from app.crm import outbox as crm_outbox
from app.crm.http import Mapping
from app.customers.customers import apply_changes, record_consent
from app.infra.models import (
    Card,
    Consent,
    CrmConnection,
    CrmOutboxEntry,
    Customer,
    Program,
    PushJob,
    utcnow,
)
from app.services import Services
from app.updates import refresh as updates
from tests import factories
from tests.crm_standin import CrmStandin

TOKEN_ENV = "PASSERELLE_TEST_CRM_TOKEN"
TOKEN = "Bearer s3cret-crm-t0ken-value"
MAPPING = {
    "external_id": "id",
    "email": "contact.email",
    "first_name": "contact.first_name",
    "last_name": "contact.last_name",
    "birthday": "contact.birthday",
    "locale": "prefs.locale",
    "phone": "phones.0.number",
    "attributes.points": "loyalty.points",
    "attributes.tier": "loyalty.tier",
    "consents.marketing_email": "optins.email",
    "consents.marketing_email.text": "optins.email_text",
    "consents.marketing_email.recorded_at": "optins.email_at",
}


def crm_json(external_id: str, email: str, first: str, last: str, points: int, *,
             tier: str = "Gold", locale: str = "fr-FR", marketing: bool = True,
             phone: str | None = None, birthday: str | None = None) -> dict:
    """A record the way the CRM nests it (written out by hand, not by our mapping)."""
    record: dict = {"id": external_id,
                    "contact": {"email": email, "first_name": first, "last_name": last},
                    "prefs": {"locale": locale},
                    "loyalty": {"points": points, "tier": tier},
                    "optins": {"email": marketing}}
    if phone is not None:
        record["phones"] = [{"type": "mobile", "number": phone}]
    if birthday is not None:
        record["contact"]["birthday"] = birthday
    return record


CAMILLE = dict(external_id="C-1001", email="camille.martin@example.com", first="Camille",
               last="Martin", points=1280)


def _connect(services: Services, tenant_id: int, url: str, **overrides: object) -> None:
    with services.db.transaction(tenant_id) as session:
        session.add(CrmConnection(
            tenant_id=tenant_id, kind="http", base_url=url, auth_header="Authorization",
            auth_value_env=TOKEN_ENV, mapping=dict(MAPPING), max_staleness_seconds=3600,
            timeout_seconds=2, **overrides))


@pytest.fixture()
def crm(services, demo, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with CrmStandin(auth_value=TOKEN) as standin:
        _connect(services, demo["tenant_id"], standin.url)
        yield standin


def _entry(services: Services, entry_id: int) -> CrmOutboxEntry:
    with services.db.session() as session:
        entry = session.get(CrmOutboxEntry, entry_id)
        assert entry is not None
        return entry


def _later(monkeypatch, minutes: float) -> None:  # type: ignore[no-untyped-def]
    """Move the outbox's clock forward (backoffs and leases come due)."""
    now = utcnow()
    monkeypatch.setattr(crm_outbox, "utcnow",
                        lambda: now + dt.timedelta(minutes=minutes) + (utcnow() - now))


def _enroll(services: Services, tenant_id: int, external_id: str = "W-1") -> int:
    """What an enrollment form does: the customer, a consent with its wording, the write."""
    with services.db.transaction(tenant_id) as session:
        customer = Customer(tenant_id=tenant_id, external_id=external_id, attributes={})
        session.add(customer)
        apply_changes(customer, {"email": f"{external_id.lower()}@example.org",
                                 "first_name": "Noor"}, {})
        record_consent(session, customer, "marketing_email", True, "form",
                       text="Send me offers by email")
        entry = record_write(session, customer, "create")
        assert entry is not None
        return entry.id


# -- mapping ------------------------------------------------------------------------------

def test_mapping_writes_nested_and_indexed_paths_and_reads_them_back() -> None:
    mapping = Mapping.parse(MAPPING)
    payload = {"external_id": "C-9", "email": "ana@example.com", "first_name": "Ana",
               "last_name": None, "phone": "+420 777 000 111", "birthday": "1991-04-05",
               "locale": "cs-CZ", "attributes": {"points": 42, "tier": "Silver", "unmapped": 1},
               "consents": {"marketing_email": {"granted": False, "text": "Offers by email",
                                                "recorded_at": "2026-01-02T03:04:05+00:00",
                                                "source": "form"},
                            "sms": {"granted": True, "text": None, "recorded_at": None,
                                    "source": "form"}}}
    document = mapping.write(payload, include_id=True)
    assert document == {
        "id": "C-9",
        "contact": {"email": "ana@example.com", "first_name": "Ana", "last_name": None,
                    "birthday": "1991-04-05"},
        "prefs": {"locale": "cs-CZ"},
        "phones": [{"number": "+420 777 000 111"}],
        "loyalty": {"points": 42, "tier": "Silver"},
        "optins": {"email": False, "email_text": "Offers by email",
                   "email_at": "2026-01-02T03:04:05+00:00"},
    }  # unmapped attribute and consent kind are not written
    record = mapping.read(document)
    assert record == CrmRecord(
        external_id="C-9", email="ana@example.com", first_name="Ana", last_name=None,
        locale="cs-CZ", phone="+420 777 000 111", birthday=dt.date(1991, 4, 5),
        attributes={"points": 42, "tier": "Silver"}, consents={"marketing_email": False},
        present=record.present)
    assert record.present == {"email", "first_name", "last_name", "birthday", "locale", "phone",
                              "attributes.points", "attributes.tier",
                              "consents.marketing_email"}
    # An update leaves the id to the URL; a create leaves empty fields out.
    assert "id" not in mapping.write(payload, include_id=False)
    assert "last_name" not in mapping.write(payload, include_id=True,
                                            skip_nulls=True)["contact"]


def test_mapping_indexes_lists_deeper_and_pads_them() -> None:
    mapping = Mapping.parse({"phone": "contacts.1.phones.0.number", "attributes.x": "a.b"})
    document = mapping.write({"phone": "123", "attributes": {"x": 1}}, include_id=False)
    assert document == {"contacts": [None, {"phones": [{"number": "123"}]}], "a": {"b": 1}}
    record = mapping.read({"id": 7, **document})
    assert (record.external_id, record.phone, record.attributes) == ("7", "123", {"x": 1})
    # A path that is not there is simply absent (not None).
    assert mapping.read({"id": 8, "contacts": []}).provided() == frozenset()


def test_mapping_skips_values_a_customer_cannot_take() -> None:
    mapping = Mapping.parse(MAPPING)
    record = mapping.read({"id": "C-1", "contact": {"email": "not an email",
                                                    "birthday": "1990-02-03T00:00:00Z"},
                           "optins": {"email": "maybe"}, "prefs": {"locale": "en_GB"}})
    assert record.email is None and "email" not in record.present
    assert "consents.marketing_email" not in record.present
    assert record.birthday == dt.date(1990, 2, 3) and record.locale == "en-GB"


@pytest.mark.parametrize("bad, words", [
    ({"nickname": "nick"}, "not a customer field"),
    ({"email": "contact", "first_name": "contact.first_name"}, "overlap"),
    ({"email": "a..b"}, "dotted path"),
    ({"email": ""}, "non-empty"),
    ({"@resource": "../admin"}, "@resource"),
    ({"consents.sms.colour": "x"}, "not a customer field"),
])
def test_mapping_refuses_what_it_cannot_honour(bad: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        Mapping.parse(bad)


# -- built-in store -----------------------------------------------------------------------

def test_builtin_store_reads_local_customers_and_writes_nothing(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        connector = connector_for(session, services, demo["tenant_id"])
        assert connector.kind == "builtin"
        record = connector.fetch("C-1001")
        assert record is not None and record.email == "camille.martin@example.com"
        assert record.attributes["points"] == 1280 and record.consents == {
            "marketing_email": True}
        assert connector.find_by_email(" Camille.Martin@Example.com ").external_id == "C-1001"
        assert connector.find_by_email("nobody@example.com") is None
        assert connector.fetch("nobody") is None
        assert connector.write("update", {"external_id": "C-1001"}) is None
        camille = load_customer(session, services, demo["tenant_id"], "C-1001")
        assert camille is not None and camille.crm_fetched_at is None
        assert load_customer(session, services, demo["tenant_id"], "nobody") is None
        assert record_write(session, camille, "update", ["first_name"]) is None
        assert refresh_customer(session, services, camille) is camille


# -- read-through -------------------------------------------------------------------------

def test_a_link_opened_fetches_a_new_customer_into_a_local_copy(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    crm.add(crm_json("X-77", "Ines.Duval@Example.com", "Inès", "Duval", 310, tier="Silver",
                     phone="+33 6 00 00 00 01", birthday="1988-07-14"))
    tenant_id = demo["tenant_id"]
    with services.db.transaction(tenant_id) as session:
        customer = load_customer(session, services, tenant_id, "X-77")
        assert customer is not None and customer.id is not None
    with services.db.tenant_session(tenant_id) as session:
        copy = factories.customer(session, "X-77")
        assert (copy.email, copy.first_name, copy.last_name, copy.locale, copy.phone) == (
            "ines.duval@example.com", "Inès", "Duval", "fr-FR", "+33 6 00 00 00 01")
        assert copy.birthday == dt.date(1988, 7, 14)
        assert copy.attributes == {"points": 310, "tier": "Silver"}
        consent = copy.current_consents()["marketing_email"]
        assert consent.granted is True and consent.source == "crm"
        assert utcnow() - copy.crm_fetched_at < dt.timedelta(seconds=30)
        assert load_customer(session, services, tenant_id, "unknown-to-crm") is None
    assert [r.path for r in crm.accepted("GET")] == ["/customers/X-77"]


def test_http_search_by_email_and_ids_that_are_not_path_safe(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    crm.add(crm_json(**CAMILLE))
    crm.add(crm_json("A/../B?c", "odd@example.com", "Odd", "Id", 1))
    with services.db.tenant_session(demo["tenant_id"]) as session:
        connector = connector_for(session, services, demo["tenant_id"])
        assert connector.kind == "http"
        assert connector.find_by_email("Camille.Martin@example.com").external_id == "C-1001"
        assert connector.find_by_email("nobody@example.com") is None
        assert connector.fetch("A/../B?c").first_name == "Odd"
        assert crm.log[-1].path == "/customers/A%2F..%2FB%3Fc"
        # A CRM that ignores the filter must not hand us somebody else.
        crm._search = lambda request: (200, list(crm.records.values()), {})
        assert connector.find_by_email("odd@example.com").external_id == "A/../B?c"
        assert connector.find_by_email("nobody@example.com") is None


def test_fresh_points_re_render_the_card_and_queue_its_push(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    tenant_id, rewards = demo["tenant_id"], demo["program_ids"]["rewards"]
    with services.db.transaction(tenant_id) as session:
        camille = factories.customer(session, "C-1001")
        updates.customers_changed(session, services, [camille])  # cards as installed
        card = session.scalar(select(Card).where(Card.customer_id == camille.id,
                                                 Card.program_id == rewards))
        factories.device(session, card)
        before = (card.id, card.version, card.update_tag)
    crm.add(crm_json(**CAMILLE))  # the CRM has what we have: nothing to re-render
    with services.db.transaction(tenant_id) as session:
        load_customer(session, services, tenant_id, "C-1001")
    with services.db.session() as session:
        card = session.get(Card, before[0])
        assert (card.version, card.update_tag) == before[1:]
        assert session.scalar(select(func.count()).select_from(PushJob)) == 0
    crm.add(crm_json(**{**CAMILLE, "points": 2000}))
    with services.db.transaction(tenant_id) as session:
        customer = load_customer(session, services, tenant_id, "C-1001")
        assert customer.attributes["points"] == 2000
    with services.db.session() as session:
        card = session.get(Card, before[0])
        assert card.version == before[1] + 1 and card.update_tag > before[2]
        job = session.scalar(select(PushJob))
        assert job is not None and job.card_id == card.id


@pytest.mark.parametrize("mode", ["503", "closed"])
def test_crm_down_serves_the_copy_within_the_staleness_limit(services, demo, crm, mode) -> None:  # type: ignore[no-untyped-def]
    tenant_id = demo["tenant_id"]
    crm.add(crm_json(**CAMILLE))
    with services.db.transaction(tenant_id) as session:
        load_customer(session, services, tenant_id, "C-1001")
        factories.customer(session, "C-1001").crm_fetched_at = utcnow() - dt.timedelta(minutes=50)
    crm.down(mode)
    with services.db.transaction(tenant_id) as session:
        customer = load_customer(session, services, tenant_id, "C-1001")
        assert customer is not None and customer.attributes["points"] == 1280
        assert refresh_customer(session, services, customer) is customer
    with services.db.transaction(tenant_id) as session:  # ten minutes later: too old
        factories.customer(session, "C-1001").crm_fetched_at = utcnow() - dt.timedelta(minutes=61)
    with services.db.tenant_session(tenant_id) as session, \
            pytest.raises(CrmStale, match="C-1001 is 36[0-9]{2}s old") as raised:
        load_customer(session, services, tenant_id, "C-1001")
    assert "camille" not in str(raised.value).lower()
    with services.db.tenant_session(tenant_id) as session, \
            pytest.raises(CrmStale, match="no local copy of customer X-1"):
        load_customer(session, services, tenant_id, "X-1")
    crm.up()
    with services.db.tenant_session(tenant_id) as session:
        assert load_customer(session, services, tenant_id, "C-1001") is not None


def test_a_copy_never_fetched_counts_from_its_creation(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    tenant_id = demo["tenant_id"]
    _enroll(services, tenant_id, "W-5")  # made here just now; the CRM never saw it
    crm.down("503")
    with services.db.tenant_session(tenant_id) as session:
        assert load_customer(session, services, tenant_id, "W-5").first_name == "Noor"
    # The demo customers were created here too, but long ago for this test's purpose.
    with services.db.transaction(tenant_id) as session:
        factories.customer(session, "C-1002").created_at = utcnow() - dt.timedelta(days=2)
    with services.db.tenant_session(tenant_id) as session, pytest.raises(CrmStale):
        load_customer(session, services, tenant_id, "C-1002")


def test_our_undelivered_create_keeps_the_customer_the_crm_does_not_know_yet(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    tenant_id = demo["tenant_id"]
    _enroll(services, tenant_id, "W-6")  # not delivered: the CRM answers 404
    with services.db.tenant_session(tenant_id) as session:
        assert load_customer(session, services, tenant_id, "W-6") is not None
        # A local customer the CRM does not know, with nothing pending: not served.
        assert load_customer(session, services, tenant_id, "C-1003") is None


def test_a_pending_local_write_is_not_overwritten_by_older_crm_data(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    tenant_id = demo["tenant_id"]
    crm.add(crm_json(**CAMILLE))
    crm.down("503")
    with services.db.transaction(tenant_id) as session:
        camille = factories.customer(session, "C-1001")
        apply_changes(camille, {"first_name": "Camila"}, {})
        record_write(session, camille, "update", ["first_name"])
    crm.up()
    crm.add(crm_json(**{**CAMILLE, "points": 1300}))
    with services.db.transaction(tenant_id) as session:
        camille = load_customer(session, services, tenant_id, "C-1001")
        assert camille.first_name == "Camila" and camille.attributes["points"] == 1300


# -- the outbox ---------------------------------------------------------------------------

def test_an_enrollment_is_written_to_the_crm_as_submitted(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    entry_id = _enroll(services, demo["tenant_id"])
    with services.db.tenant_session(demo["tenant_id"]) as session:
        consent = session.scalar(select(Consent).where(Consent.source == "form"))
        entry = session.get(CrmOutboxEntry, entry_id)
        assert entry.payload["consents"]["marketing_email"] == {
            "granted": True, "text": "Send me offers by email",
            "recorded_at": consent.recorded_at.isoformat(), "source": "form"}
    assert deliver(services, entry_id) == "done"
    (post,) = crm.accepted("POST")
    assert post.body == {"id": "W-1",
                         "contact": {"email": "w-1@example.org", "first_name": "Noor"},
                         "optins": {"email": True, "email_text": "Send me offers by email",
                                    "email_at": consent.recorded_at.isoformat()}}
    assert post.headers["authorization"] == TOKEN and post.headers["idempotency-key"]
    entry = _entry(services, entry_id)
    assert entry.done_at is not None and entry.last_error is None and entry.attempts == 1
    assert deliver(services, entry_id) == "skipped"
    assert len(crm.accepted()) == 1


@pytest.mark.parametrize("mode", ["503", "closed"])
def test_crm_down_during_a_submission_keeps_it_and_delivers_it_once_back(  # type: ignore[no-untyped-def]
        services, demo, crm, mode, monkeypatch) -> None:
    tenant_id = demo["tenant_id"]
    crm.add(crm_json(**CAMILLE))
    crm.down(mode)
    with services.db.transaction(tenant_id) as session:  # an enrichment form submitted
        camille = factories.customer(session, "C-1001")
        apply_changes(camille, {"phone": "+33 6 11 22 33 44"}, {})
        record_consent(session, camille, "marketing_email", False, "form",
                       text="Send me offers by email")
        entry_id = record_write(session, camille, "update",
                                ["phone", "consents.marketing_email"]).id
    assert deliver(services, entry_id) == "retry"
    entry = _entry(services, entry_id)
    assert entry.done_at is None and entry.attempts == 1 and entry.claimed_until is None
    assert ("HTTP 503" if mode == "503" else "connection failed") in entry.last_error
    assert entry.not_before > utcnow() + dt.timedelta(seconds=5)
    assert "C-1001" in entry.last_error and "camille" not in entry.last_error.lower()
    assert due_entries(services, quiet_for=dt.timedelta(0)) == []  # backing off
    assert deliver(services, entry_id) == "skipped"
    crm.up()
    _later(monkeypatch, 1)
    assert due_entries(services) == [entry_id]  # what the sweeper queues
    assert deliver(services, entry_id) == "done"
    assert deliver(services, entry_id) == "skipped" and due_entries(services) == []
    (patch,) = crm.accepted("PATCH")
    assert patch.path == "/customers/C-1001"
    with services.db.tenant_session(tenant_id) as session:
        consent = factories.customer(session, "C-1001").current_consents()["marketing_email"]
    assert patch.body == {"phones": [{"number": "+33 6 11 22 33 44"}],
                          "optins": {"email": False, "email_text": "Send me offers by email",
                                     "email_at": consent.recorded_at.isoformat()}}
    assert crm.records["C-1001"]["optins"]["email"] is False
    entry = _entry(services, entry_id)
    assert entry.attempts == 2 and entry.last_error is None and entry.done_at is not None


def test_a_refused_write_is_kept_with_its_error_and_not_retried(services, demo, crm, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    entry_id = _enroll(services, demo["tenant_id"])
    crm.fail_next(422)
    assert deliver(services, entry_id) == "rejected"
    entry = _entry(services, entry_id)
    assert entry.done_at is not None and entry.last_error.startswith("rejected:")
    assert "HTTP 422" in entry.last_error and "w-1@example.org" not in entry.last_error
    _later(monkeypatch, 120)
    assert due_entries(services) == [] and deliver(services, entry_id) == "skipped"
    assert len(crm.log) == 1


def test_a_refused_credential_is_retried_not_rejected(services, demo, crm, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    entry_id = _enroll(services, demo["tenant_id"])
    monkeypatch.setenv(TOKEN_ENV, "Bearer expired")
    assert deliver(services, entry_id) == "retry"
    assert "HTTP 401 (credential refused)" in _entry(services, entry_id).last_error
    monkeypatch.delenv(TOKEN_ENV)
    _later(monkeypatch, 1)
    assert deliver(services, entry_id) == "retry"
    assert f"{TOKEN_ENV} (the CRM credential) is not set" in _entry(services,
                                                                     entry_id).last_error
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _later(monkeypatch, 2)
    assert deliver(services, entry_id) == "done"


def test_writes_give_up_after_seven_days(services, demo, crm, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    entry_id = _enroll(services, demo["tenant_id"])
    crm.down("503")
    _later(monkeypatch, 7 * 24 * 60 + 1)
    assert deliver(services, entry_id) == "gave_up"
    entry = _entry(services, entry_id)
    assert entry.done_at is not None and entry.last_error.startswith("gave up after 1 attempts")


def test_a_customers_writes_are_delivered_in_order(services, demo, crm, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tenant_id = demo["tenant_id"]
    crm.down("closed")
    create_id = _enroll(services, tenant_id, "W-2")
    with services.db.transaction(tenant_id) as session:
        customer = factories.customer(session, "W-2")
        apply_changes(customer, {"last_name": "Haddad"}, {"points": 5})
        update_id = record_write(session, customer, "update",
                                 ["last_name", "attributes.points"]).id
    assert deliver(services, create_id) == "retry"
    _later(monkeypatch, 1)
    assert due_entries(services) == [create_id]  # the update waits behind the create
    assert deliver(services, update_id) == "skipped"
    crm.up()
    outcome = crm_outbox.attempt(services, create_id)
    assert outcome.state == "done" and outcome.unblocked == (update_id,)
    assert deliver(services, update_id) == "done"
    assert [r.method for r in crm.accepted()] == ["POST", "PATCH"]
    assert crm.records["W-2"]["contact"]["last_name"] == "Haddad"
    assert crm.records["W-2"]["loyalty"] == {"points": 5}


def test_an_id_assigned_by_the_crm_becomes_ours(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    crm.assign_ids = True
    tenant_id = demo["tenant_id"]
    entry_id = _enroll(services, tenant_id, "W-3")
    with services.db.transaction(tenant_id) as session:
        customer = factories.customer(session, "W-3")
        program = session.get(Program, demo["program_ids"]["rewards"])
        card = ensure_card(session, program, customer)
        updates.customers_changed(session, services, [customer])
        card_id, version = card.id, card.version
        update_id = record_write(session, customer, "update", ["first_name"]).id
    assert deliver(services, entry_id) == "done"
    with services.db.tenant_session(tenant_id) as session:
        assert factories.customer(session, "W-3") is None and factories.customer(session, "CRM-1") is not None
        assert session.get(Card, card_id).version == version + 1  # the barcode shows the id
    assert deliver(services, update_id) == "done"
    assert crm.accepted("PATCH")[0].path == "/customers/CRM-1"


def test_an_update_of_a_customer_the_crm_lost_creates_them(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    tenant_id = demo["tenant_id"]
    with services.db.transaction(tenant_id) as session:
        camille = factories.customer(session, "C-1001")
        apply_changes(camille, {"first_name": "Cami"}, {})
        entry_id = record_write(session, camille, "update", ["first_name"]).id
    assert deliver(services, entry_id) == "done"
    assert [(r.method, r.status) for r in crm.log] == [("PATCH", 404), ("POST", 201)]
    assert crm.records["C-1001"]["contact"] == {
        "email": "camille.martin@example.com", "first_name": "Cami", "last_name": "Martin"}
    assert crm.records["C-1001"]["loyalty"]["points"] == 1280


def test_customer_payload_sends_only_what_changed() -> None:
    customer = Customer(tenant_id=1, external_id="C-5", email="a@example.com",
                        birthday=dt.date(1990, 1, 2), attributes={"points": 3, "tier": "Gold"})
    assert customer_payload(customer, ["birthday", "attributes.points", "attributes.gone"]) == {
        "external_id": "C-5", "birthday": "1990-01-02",
        "attributes": {"points": 3, "gone": None}}
    full = customer_payload(customer)
    assert full["email"] == "a@example.com" and full["consents"] == {}
    assert full["attributes"] == {"points": 3, "tier": "Gold"}
    with pytest.raises(ValueError, match="nickname"):
        customer_payload(customer, ["nickname"])


def test_the_credential_comes_from_the_environment_and_is_never_logged(services, demo, crm, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    crm.add(crm_json(**CAMILLE))
    tenant_id = demo["tenant_id"]
    with services.db.transaction(tenant_id) as session:
        load_customer(session, services, tenant_id, "C-1001")
    entry_id = _enroll(services, tenant_id)
    assert deliver(services, entry_id) == "done"
    crm.down("503")
    with services.db.transaction(tenant_id) as session:
        load_customer(session, services, tenant_id, "C-1001")
    assert {r.headers["authorization"] for r in crm.log} == {TOKEN}
    with services.db.session() as session:
        stored = session.scalar(select(CrmConnection))
        assert TOKEN not in json.dumps([stored.auth_header, stored.auth_value_env,
                                        stored.mapping])
    assert caplog.records and "s3cret" not in caplog.text and "camille" not in caplog.text


# -- the worker ---------------------------------------------------------------------------

def test_worker_delivers_a_write_made_while_the_crm_was_down(  # type: ignore[no-untyped-def]
        settings, demo, monkeypatch, keep_signal_handlers) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setattr(crm_outbox, "FIRST_RETRY", dt.timedelta(seconds=0.3))
    services = Services(settings)
    consumer = services.jobs.consumer(workers=2)
    with CrmStandin(auth_value=TOKEN) as crm:
        _connect(services, demo["tenant_id"], crm.url)
        crm.down("503")
        consumer.start()
        try:
            entry_id = _enroll(services, demo["tenant_id"])  # dispatched on commit
            deadline = time.monotonic() + 15
            while not crm.log and time.monotonic() < deadline:
                time.sleep(0.05)
            crm.up()
            while _entry(services, entry_id).done_at is None and time.monotonic() < deadline:
                time.sleep(0.05)
            entry = _entry(services, entry_id)
        finally:
            consumer.stop(graceful=True)
            services.close()
    assert entry.done_at is not None and entry.last_error is None and entry.attempts >= 2
    assert len(crm.accepted("POST")) == 1 and crm.log[0].status == 503


def test_the_sweeper_queues_writes_nobody_queued(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    huey = services.jobs.huey
    entry_id = _enroll(services, demo["tenant_id"])
    assert huey.pending_count() == 1  # dispatched when the enrollment committed
    huey.flush()  # ...but that queue entry was lost (worker killed, queue wiped)
    assert services.jobs.sweep_crm_outbox.call_local() == 0  # too recent to be lost
    with services.db.transaction() as session:
        session.get(CrmOutboxEntry, entry_id).created_at = utcnow() - dt.timedelta(minutes=5)
    assert services.jobs.sweep_crm_outbox.call_local() == 1
    assert huey.pending_count() == 1
    huey.execute(huey.dequeue())  # the worker runs it
    assert _entry(services, entry_id).done_at is not None and len(crm.accepted("POST")) == 1


# -- commands -----------------------------------------------------------------------------

def _invoke(runner, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(main, list(args), catch_exceptions=False)


def test_crm_commands_configure_check_outbox_and_flush(runner, services, demo, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    mapping_file = tmp_path / "mapping.json"
    mapping_file.write_text(json.dumps(MAPPING))
    with CrmStandin(auth_value=TOKEN) as crm:
        crm.add(crm_json(**CAMILLE))
        result = _invoke(runner, "crm", "configure", "--tenant", "demo", "--kind", "http",
                         "--base-url", crm.url, "--auth-header", "Authorization",
                         "--auth-env", TOKEN_ENV, "--mapping-file", str(mapping_file),
                         "--max-staleness-hours", "2")
        assert result.exit_code == 0, result.output
        assert "10 mapped fields" in result.output and "2 h" in result.output
        with services.db.session() as session:
            row = session.scalar(select(CrmConnection))
            assert (row.kind, row.max_staleness_seconds, row.mapping) == ("http", 7200, MAPPING)

        result = _invoke(runner, "crm", "check", "--tenant", "demo", "--external-id", "C-1001")
        assert result.exit_code == 0, result.output
        assert "attributes.points" in result.output and "mapped but not in the record: " \
            "birthday, phone" in result.output
        assert "camille" not in result.output.lower() and "1280" not in result.output
        assert _invoke(runner, "crm", "check", "--tenant", "demo").exit_code == 0

        crm.down("closed")
        assert runner.invoke(main, ["crm", "check", "--tenant", "demo"]).exit_code == 1
        entry_id = _enroll(services, demo["tenant_id"])
        deliver(services, entry_id)
        result = _invoke(runner, "crm", "outbox", "--tenant", "demo")
        assert "pending: 1 (1 retrying), delivered: 0, failed: 0" in result.output
        assert f"#{entry_id} create" in result.output and "connection failed" in result.output
        result = runner.invoke(main, ["crm", "flush", "--tenant", "demo"])
        assert result.exit_code == 2 and "1 retry" in result.output

        crm.up()
        result = _invoke(runner, "crm", "flush", "--tenant", "demo")  # no need to wait
        assert result.exit_code == 0 and "1 done" in result.output
        assert "delivered: 1, failed: 0" in _invoke(runner, "crm", "outbox", "--tenant",
                                                    "demo").output
        assert len(crm.accepted("POST")) == 1

    bad = tmp_path / "bad.json"
    bad.write_text('{"nickname": "x"}')
    result = runner.invoke(main, ["crm", "configure", "--tenant", "demo",
                                  "--mapping-file", str(bad)])
    assert result.exit_code == 1 and "not a customer field" in result.output
    result = runner.invoke(main, ["crm", "configure", "--tenant", "demo", "--base-url", "ftp://x"])
    assert result.exit_code == 1
    result = _invoke(runner, "crm", "configure", "--tenant", "demo", "--kind", "builtin")
    assert result.exit_code == 0 and "built-in" in result.output
    assert "built-in store" in _invoke(runner, "crm", "check", "--tenant", "demo").output

"""Enrollment and enrichment, the domain part: form settings, validation, what is stored,
what goes to the CRM, and how a known email is handled without revealing anything."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from app.distribution import enrollment
from app.distribution.enrollment import FormInvalid
from app.infra.models import (
    Card,
    Consent,
    CrmConnection,
    CrmOutboxEntry,
    Customer,
    FunnelEvent,
    Program,
    utcnow,
)
from tests.crm_standin import CrmStandin

TOKEN_ENV = "PASSERELLE_TEST_ENROLL_CRM_TOKEN"
TOKEN = "Bearer enroll-crm-token"
MAPPING = {"external_id": "id", "email": "contact.email", "first_name": "contact.first_name",
           "last_name": "contact.last_name", "attributes.points": "loyalty.points",
           "attributes.postal_code": "contact.zip", "consents.marketing_email": "optins.email",
           "consents.terms": "optins.terms"}


def _program(session, demo, slug: str = "rewards") -> Program:  # type: ignore[no-untyped-def]
    return session.get(Program, demo["program_ids"][slug])


def _texts(program: Program, lang: str = "en") -> dict[str, str]:
    return enrollment.consent_texts(enrollment.form_config(program), lang, program)


def _form(**overrides: str) -> dict[str, str]:
    form = {"email": "  Noor.Haddad@Example.ORG ", "first_name": "Noor", "last_name": "Haddad",
            "consent_terms": "yes", "consent_marketing_email": "yes"}
    form.update(overrides)
    return form


def _enroll(services, demo, form: dict[str, str], lang: str = "en"):  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        program = _program(session, demo)
        result = enrollment.enroll(session, services, program, form, lang, _texts(program, lang))
        return result.customer.id, result.held


def _count(services, model, *where) -> int:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


# -- settings -----------------------------------------------------------------------------

def test_defaults_ask_names_and_two_consents() -> None:
    config = enrollment.form_config(Program(forms={}))
    assert config.shown() == ["first_name", "last_name"]
    assert [(c.kind, c.required) for c in config.consents] == [("marketing_email", False),
                                                                ("terms", True)]
    assert config.required("email") and not config.required("first_name")


def test_program_settings_override_and_typos_are_reported_not_fatal() -> None:
    forms = {"fields": {"phone": "required", "birthday": "optional", "nickname": "optional",
                        "last_name": "sometimes"},
             "consents": [{"kind": "sms", "required": False},
                          {"kind": "newsletter_partner", "required": False},  # no text
                          {"kind": "club_rules", "required": True,
                           "text": {"en": "I accept the club rules.", "fr": "J'accepte."}}]}
    config = enrollment.form_config(Program(forms=forms))
    assert config.shown() == ["first_name", "last_name", "phone", "birthday"]
    assert config.required("phone") and not config.required("last_name")
    assert [c.kind for c in config.consents] == ["sms", "club_rules"]
    problems = enrollment.check_forms(forms)
    assert len(problems) == 3 and "nickname" in problems[0] and "sometimes" in problems[1]
    assert "consents[1]" in problems[2]
    assert enrollment.check_forms({"fields": {"phone": "optional"}}) == []


def test_consent_wording_configured_or_built_in(services, demo) -> None:  # type: ignore[no-untyped-def]
    spec = enrollment.ConsentSpec("club_rules", True, {"en": "Rules apply.", "fr": "Règles."})
    assert enrollment.consent_text(spec, "fr", brand="B", program="P") == "Règles."
    assert enrollment.consent_text(spec, "de", brand="B", program="P") == "Rules apply."
    only_cs = enrollment.ConsentSpec("x", False, {"cs": "Souhlasím."})
    assert enrollment.consent_text(only_cs, "en", brand="B", program="P") == "Souhlasím."
    with services.db.session() as session:
        texts = _texts(_program(session, demo), "de")
    assert texts["marketing_email"] == ("Ich möchte Neuigkeiten und Angebote von Maison Aurore "
                                        "per E-Mail erhalten.")
    assert "Aurore Rewards" in texts["terms"]
    assert enrollment.texts_digest(texts) != enrollment.texts_digest({**texts, "terms": "x"})


# -- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, errors", [
    ({"email": ""}, {"email": "error.required"}),
    ({"email": "not-an-email"}, {"email": "error.email"}),
    ({"email": "x" * 1001}, {"email": "error.too_long"}),
    ({"first_name": "N" * 201}, {"first_name": "error.too_long"}),
    ({"consent_terms": ""}, {"consent_terms": "error.consent_required"}),
    ({"email": "", "consent_terms": "no"}, {"email": "error.required",
                                            "consent_terms": "error.consent_required"}),
])
def test_validation_names_each_bad_field(overrides, errors) -> None:  # type: ignore[no-untyped-def]
    config = enrollment.form_config(Program(forms={}))
    result = enrollment.validate(config, _form(**overrides), email=True, fields=True)
    assert result.errors == errors


def test_optional_fields_are_cleaned() -> None:
    config = enrollment.form_config(Program(forms={"fields": {
        "phone": "optional", "birthday": "optional", "postal_code": "required"}}))
    ok = enrollment.validate(config, _form(phone="+420 777 123 456", birthday="1990-04-01",
                                           postal_code="75011"), email=True, fields=True)
    assert ok.errors == {}
    assert ok.values["email"] == "noor.haddad@example.org"
    assert ok.values["birthday"] == dt.date(1990, 4, 1) and ok.attributes == {"postal_code": "75011"}
    future = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=2)).isoformat()
    bad = enrollment.validate(config, _form(phone="call me", birthday=future, postal_code="<b>"),
                              email=True, fields=True)
    assert bad.errors == {"phone": "error.phone", "birthday": "error.birthday",
                          "postal_code": "error.postal_code"}
    missing = enrollment.validate(config, _form(), email=True, fields=True)
    assert missing.errors == {"postal_code": "error.required"}


# -- enrollment ---------------------------------------------------------------------------

def test_new_email_becomes_a_customer_with_consents_and_a_rendered_card(services, demo) -> None:  # type: ignore[no-untyped-def]
    before = utcnow()
    customer_id, held = _enroll(services, demo, _form(consent_marketing_email=""), lang="fr")
    assert held is False
    with services.db.session() as session:
        customer = session.get(Customer, customer_id)
        assert customer.email == "noor.haddad@example.org"
        assert customer.external_id.startswith("px_") and len(customer.external_id) == 19
        assert (customer.first_name, customer.last_name, customer.locale) == ("Noor", "Haddad", "fr")
        consents = {c.kind: c for c in customer.consents}
        assert consents["terms"].granted and not consents["marketing_email"].granted
        assert consents["terms"].source == "enrollment" and consents["terms"].recorded_at >= before
        program = _program(session, demo)
        assert consents["marketing_email"].text == _texts(program, "fr")["marketing_email"]
        assert consents["marketing_email"].text.startswith("Je souhaite recevoir")
        card = session.scalar(select(Card).where(Card.customer_id == customer_id))
        assert card is not None and card.content_hash is not None and card.version == 1
        events = session.scalars(select(FunnelEvent)).all()
        assert [(e.kind, e.customer_id, e.card_id) for e in events] == \
            [("enrolled", customer_id, card.id)]
    assert _count(services, CrmOutboxEntry) == 0  # built-in CRM: nothing to send


def test_invalid_form_stores_nothing(services, demo) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FormInvalid) as caught:
        _enroll(services, demo, _form(email="nope", consent_terms=""))
    assert caught.value.errors == {"email": "error.email", "consent_terms": "error.consent_required"}
    assert "nope" not in str(caught.value)  # field names only in messages
    assert _count(services, Customer) == 5


def test_known_email_changes_nothing_of_the_member_and_gets_a_held_card(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        member = session.scalar(select(Customer).where(Customer.external_id == "C-1002"))
        snapshot = (member.first_name, member.last_name, member.locale, dict(member.attributes))
        consents_before = len(member.consents)
    customer_id, held = _enroll(services, demo, _form(email=" JIRI.novak@example.com",
                                                      first_name="Mallory", last_name="X"))
    assert held is True
    with services.db.session() as session:
        member = session.get(Customer, member.id)
        assert (member.first_name, member.last_name, member.locale,
                dict(member.attributes)) == snapshot
        assert len(member.consents) == consents_before
        holder = session.get(Customer, customer_id)
        assert holder.id != member.id and holder.email is None
        assert holder.first_name == "Mallory" and holder.external_id.startswith("px_")
        assert holder.attributes == {"enrollment_held": "email_known"}
        assert {c.kind for c in holder.consents} == {"terms", "marketing_email"}
        assert session.scalar(select(Card).where(Card.customer_id == holder.id)) is not None
        events = session.scalars(select(FunnelEvent)).all()
        assert [(e.kind, e.customer_id) for e in events] == [("link_requested", member.id)]


# -- with an external CRM -----------------------------------------------------------------

@pytest.fixture()
def crm(services, demo, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with CrmStandin(auth_value=TOKEN) as standin:
        with services.db.transaction(demo["tenant_id"]) as session:
            session.add(CrmConnection(
                tenant_id=demo["tenant_id"], kind="http", base_url=standin.url,
                auth_header="Authorization", auth_value_env=TOKEN_ENV, mapping=dict(MAPPING),
                max_staleness_seconds=3600, timeout_seconds=2))
        yield standin


def _email_lookups(standin: CrmStandin) -> int:
    return sum(1 for r in standin.log if r.method == "GET" and "email" in r.query)


def test_new_enrollment_is_queued_for_the_crm(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    customer_id, held = _enroll(services, demo, _form())
    assert held is False and _email_lookups(crm) == 1
    with services.db.session() as session:
        entry = session.scalar(select(CrmOutboxEntry))
        assert entry.customer_id == customer_id and entry.operation == "create"
        assert entry.payload["email"] == "noor.haddad@example.org"
        assert entry.payload["consents"]["terms"]["text"] == _texts(_program(session, demo))["terms"]


def test_email_known_only_to_the_crm_is_held_and_the_member_imported(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    crm.add({"id": "CRM-77", "contact": {"email": "noor.haddad@example.org",
                                         "first_name": "Noor", "last_name": "H."},
             "loyalty": {"points": 40}})
    customer_id, held = _enroll(services, demo, _form(first_name="Someone"))
    assert held is True
    with services.db.session() as session:
        member = session.scalar(select(Customer).where(Customer.external_id == "CRM-77"))
        assert member is not None and member.first_name == "Noor"
        assert session.get(Customer, customer_id).email is None
        events = session.scalars(select(FunnelEvent)).all()
        assert [(e.kind, e.customer_id) for e in events] == [("link_requested", member.id)]
    assert _count(services, CrmOutboxEntry) == 0  # a held enrollment is not written to the CRM


def test_known_and_new_emails_cost_the_same_crm_round_trip(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    _enroll(services, demo, _form(email="camille.martin@example.com"))  # known locally
    assert _email_lookups(crm) == 1
    _enroll(services, demo, _form(email="brand.new@example.org"))
    assert _email_lookups(crm) == 2


def test_crm_down_still_enrolls_and_keeps_the_write(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    crm.down("closed")
    customer_id, held = _enroll(services, demo, _form())
    assert held is False
    with services.db.session() as session:
        entry = session.scalar(select(CrmOutboxEntry))
        assert entry.customer_id == customer_id and entry.done_at is None
        assert session.scalar(select(Card).where(Card.customer_id == customer_id)) is not None


# -- enrichment ---------------------------------------------------------------------------

def _enrich(services, demo, external_id: str, form: dict[str, str], *,  # type: ignore[no-untyped-def]
            purpose: str = "enrich", forms: dict | None = None) -> set[str]:
    with services.db.transaction(demo["tenant_id"]) as session:
        program = _program(session, demo)
        if forms is not None:
            program.forms = forms
        customer = session.scalar(select(Customer).where(Customer.external_id == external_id))
        return enrollment.enrich(session, services, customer, form, "en", _texts(program),
                                 program=program, purpose=purpose)


def test_prefill_shows_the_current_record(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        program = _program(session, demo)
        program.forms = {"fields": {"postal_code": "optional"}}
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        customer.attributes = {**customer.attributes, "postal_code": "75011"}
        values = enrollment.prefill(enrollment.form_config(program), customer)
        session.rollback()
    assert values == {"first_name": "Camille", "last_name": "Martin", "postal_code": "75011",
                      "consent_marketing_email": "yes"}


def test_enrich_applies_changes_records_consents_and_rerenders(services, demo, crm) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        card = session.scalar(select(Card).join(Customer).where(
            Customer.external_id == "C-1001", Card.program_id == demo["program_ids"]["rewards"]))
        version_before = card.version
    forms = {"fields": {"postal_code": "optional"}}
    changed = _enrich(services, demo, "C-1001", {"first_name": "Camila", "last_name": "Martin",
                                                 "postal_code": "69002", "consent_terms": "yes",
                                                 "consent_marketing_email": "yes"}, forms=forms)
    assert changed == {"first_name", "attributes.postal_code", "consents.terms"}
    with services.db.session() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        assert customer.first_name == "Camila" and customer.attributes["postal_code"] == "69002"
        terms = customer.current_consents()["terms"]
        assert terms.granted and terms.source == "form" and "Aurore Rewards" in terms.text
        entry = session.scalar(select(CrmOutboxEntry))
        assert entry.operation == "update"
        assert set(entry.payload) == {"external_id", "first_name", "attributes", "consents"}
        assert session.get(Card, card.id).version == version_before + 1  # the name is on the card
    # The same form again changes nothing and queues nothing.
    assert _enrich(services, demo, "C-1001", {"first_name": "Camila", "last_name": "Martin",
                                              "postal_code": "69002", "consent_terms": "yes",
                                              "consent_marketing_email": "yes"}, forms=forms) == set()
    assert _count(services, CrmOutboxEntry) == 1


def test_consent_form_ignores_posted_fields_and_records_withdrawal(services, demo) -> None:  # type: ignore[no-untyped-def]
    changed = _enrich(services, demo, "C-1003", {"first_name": "Hacked", "consent_terms": "yes"},
                      purpose="consent")
    assert changed == {"consents.marketing_email", "consents.terms"}
    with services.db.session() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1003"))
        assert customer.first_name == "Lena"
        assert customer.current_consents()["marketing_email"].granted is False
        assert _count(services, Consent, Consent.customer_id == customer.id) == 3


def test_enrich_refuses_a_missing_required_field(services, demo) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FormInvalid) as caught:
        _enrich(services, demo, "C-1001", {"first_name": "", "consent_terms": "yes"},
                forms={"fields": {"first_name": "required"}})
    assert caught.value.errors == {"first_name": "error.required"}


def test_only_a_real_enrollment_is_announced_to_webhook_subscribers(services, demo) -> None:  # type: ignore[no-untyped-def]
    from app.infra.models import WebhookDelivery
    from app.webhooks import outbound as webhooks_out

    with services.db.transaction(demo["tenant_id"]) as session:
        webhooks_out.create_subscription(session, demo["tenant_id"], "https://hooks.example.test",
                                         ["customer.enrolled"])
    _enroll(services, demo, _form())
    _enroll(services, demo, _form(email="camille.martin@example.com"))  # held: no event
    with services.db.session() as session:
        [delivery] = session.scalars(select(WebhookDelivery)).all()
    assert delivery.event_type == "customer.enrolled"
    assert delivery.payload["data"]["customer"]["email"] == "noor.haddad@example.org"
    assert delivery.payload["data"]["program"] == "rewards"

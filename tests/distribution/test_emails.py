"""One email check for every way an address enters (issue 11, item 8): the domain function
itself, then each entry point fed the same bad and good addresses — enrollment form, CSV
and NDJSON imports, the API (create, update, bulk import), CRM reads, inbound hooks, the
dashboard and its users, and the demo."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.admin import dashboard
from app.admin import users as admin_users
from app.crm.builtin import BuiltinConnector
from app.crm.http import Mapping
from app.customers import imports
from app.customers.customers import CustomerDataError, import_csv, normalize_email
from app.infra.models import Customer, InboundEvent, Tenant
from app.tenants.demo import DEMO_CUSTOMERS
from app.webhooks import inbound as webhooks_in
from tests.api_helpers import auth, is_problem, make_key

#: Each refused by the validator; the old regex let every one of them through.
BAD = {
    "angle brackets": "<x>@example.net",
    "display name": "Noor <noor@example.net>",
    "65-character local part": "a" * 65 + "@example.net",
    "250-character local part": "b" * 250 + "@example.net",
    "space": "noor haddad@example.net",
    "missing domain": "noor@",
    "domain without a dot": "noor@localhost",
    "two dots": "noor..haddad@example.net",
    "quoted local part": '"noor"@example.net',
    "IP literal": "noor@[192.0.2.1]",
    "reserved domain": "noor@shop.test",
    "bad IDN label": "noor@-bücher.de",
}
#: A handful per entry point, so each is exercised without running the whole list everywhere.
SOME_BAD = ["angle brackets", "65-character local part", "space", "missing domain"]
#: Valid input -> the form stored (lower-cased as before; an IDN domain in Unicode form).
GOOD = {
    " Noor.Haddad@Example.ORG ": "noor.haddad@example.org",
    "a" * 64 + "@example.net": "a" * 64 + "@example.net",
    "first.last+tag@mail.example.co.uk": "first.last+tag@mail.example.co.uk",
    "user@xn--bcher-kva.de": "user@bücher.de",
    "User@BÜCHER.de": "user@bücher.de",
    "Jörg@Example.de": "jörg@example.de",
}


# -- the domain function ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_addresses_are_refused(name: str) -> None:
    with pytest.raises(CustomerDataError, match=r"^email: "):
        normalize_email(BAD[name])


@pytest.mark.parametrize("raw", sorted(GOOD))
def test_good_addresses_are_stored_in_one_normalized_form(raw: str) -> None:
    assert normalize_email(raw) == GOOD[raw]
    assert normalize_email(GOOD[raw]) == GOOD[raw]  # the stored form is a fixed point


def test_no_dns_is_asked(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import dns.resolver

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a DNS lookup was made")

    monkeypatch.setattr(dns.resolver.Resolver, "resolve", refuse)
    assert normalize_email("someone@example.org") == "someone@example.org"


def test_oversized_input_is_refused_without_echoing_it() -> None:
    with pytest.raises(CustomerDataError) as caught:
        normalize_email("x" * 5000 + "@example.org")
    assert len(str(caught.value)) < 200


def test_demo_emails_are_valid_as_stored() -> None:
    for _, email, *_rest in DEMO_CUSTOMERS:
        assert normalize_email(email) == email


# -- enrollment form ----------------------------------------------------------------------

def _join(client, email: str):  # type: ignore[no-untyped-def]
    page = client.get("/join/demo/rewards").get_data(as_text=True)
    form = {name: found.group(1) for name in ("csrf_token", "lang", "texts", "submission")
            if (found := re.search(rf'name="{name}" value="([^"]*)"', page))}
    form.update({"email": email, "first_name": "Noor", "consent_terms": "yes"})
    return client.post("/join/demo/rewards", data=form)


def _customers(services) -> int:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.scalar(select(func.count()).select_from(Customer)) or 0


@pytest.mark.parametrize("name", SOME_BAD)
def test_enrollment_form_refuses_bad_addresses(client, services, demo, name) -> None:  # type: ignore[no-untyped-def]
    before = _customers(services)
    response = _join(client, BAD[name])
    assert response.status_code == 422
    assert "Enter an email address such as" in response.get_data(as_text=True)
    assert _customers(services) == before


def test_enrollment_form_stores_an_idn_address_in_its_normal_form(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    assert _join(client, "Noor@XN--BCHER-KVA.de").status_code == 303
    with services.db.session() as session:
        assert session.scalar(select(Customer).where(Customer.first_name == "Noor")).email \
            == "noor@bücher.de"


# -- CSV and NDJSON imports ---------------------------------------------------------------

def test_csv_import_reports_bad_addresses_and_normalizes_good_ones(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = [f"BAD-{i},{BAD[name]}" for i, name in enumerate(SOME_BAD)]
    path = tmp_path / "people.csv"
    path.write_text("external_id,email\n" + "\n".join(
        [*(f'"{r.split(",", 1)[0]}","{r.split(",", 1)[1]}"' for r in rows),
         "OK-1,User@XN--BCHER-KVA.de"]) + "\n", encoding="utf-8")
    with services.db.tenant_session(demo["tenant_id"]) as session:
        report = import_csv(session, demo["tenant_id"], path)
    assert report.created == 1
    assert [e.line for e in report.errors] == [2, 3, 4, 5]
    assert all("email" in e.message for e in report.errors)
    with services.db.session() as session:
        assert session.scalar(select(Customer.email).where(Customer.external_id == "OK-1")) \
            == "user@bücher.de"
        assert not session.scalar(select(func.count()).select_from(Customer).where(
            Customer.external_id.like("BAD-%")))


def test_ndjson_import_reports_bad_addresses_and_normalizes_good_ones(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lines = [json.dumps({"external_id": f"BAD-{i}", "email": BAD[name]})
             for i, name in enumerate(SOME_BAD)]
    lines.append(json.dumps({"external_id": "OK-1", "email": " Jörg@Example.DE "}))
    path = tmp_path / "people.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with services.db.tenant_session(demo["tenant_id"]) as session:
        report = imports.import_ndjson(session, services, demo["tenant_id"], path)
    assert report.created == 1
    assert [line for line, _ in report.errors] == [1, 2, 3, 4]
    assert all(message.startswith("email: ") for _, message in report.errors)
    with pytest.raises(CustomerDataError):
        imports.parse_ndjson_record({"external_id": "X", "email": BAD["angle brackets"]})


# -- API ----------------------------------------------------------------------------------

API = "/api/v1"


@pytest.fixture()
def write(services, demo):  # type: ignore[no-untyped-def]
    return auth(make_key(services, demo["tenant_id"], "write"))


@pytest.mark.parametrize("name", SOME_BAD)
def test_api_create_and_update_refuse_bad_addresses(client, services, demo, write, name) -> None:  # type: ignore[no-untyped-def]
    created = client.put(f"{API}/customers/API-1", json={"email": BAD[name]}, headers=write)
    assert is_problem(created, 422) or is_problem(created, 400), created.get_json()
    patched = client.patch(f"{API}/customers/C-1001", json={"email": BAD[name]}, headers=write)
    assert is_problem(patched, 422) or is_problem(patched, 400), patched.get_json()
    with services.db.session() as session:
        assert session.scalar(select(Customer.email).where(Customer.external_id == "C-1001")) \
            == "camille.martin@example.com"
        assert session.scalar(select(Customer).where(Customer.external_id == "API-1")) is None


def test_api_stores_one_form_per_address_so_uniqueness_holds(client, services, demo, write) -> None:  # type: ignore[no-untyped-def]
    first = client.put(f"{API}/customers/API-1", json={"email": "User@XN--BCHER-KVA.de"},
                       headers=write)
    assert first.status_code in (200, 201), first.get_json()
    got = client.get(f"{API}/customers/API-1", headers=write).get_json()
    assert got["email"] == "user@bücher.de"
    # The same address spelled the other way belongs to API-1 already.
    clash = client.put(f"{API}/customers/API-2", json={"email": "user@BÜCHER.DE"},
                       headers=write)
    assert is_problem(clash, 409), clash.get_json()


def test_api_bulk_import_refuses_bad_addresses(client, services, demo, write) -> None:  # type: ignore[no-untyped-def]
    services.jobs.huey.immediate = True
    lines = [json.dumps({"external_id": f"BAD-{i}", "email": BAD[name]})
             for i, name in enumerate(SOME_BAD)]
    lines.append(json.dumps({"external_id": "OK-1", "email": "ok@example.org"}))
    response = client.post(f"{API}/customer-imports", data="\n".join(lines).encode(),
                           content_type="application/x-ndjson", headers=write)
    assert response.status_code == 202
    job = client.get(response.headers["Location"], headers=write).get_json()
    assert job["status"] == "done" and job["created"] == 1
    assert [e["line"] for e in job["errors"]] == [1, 2, 3, 4]


# -- CRM reads ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", SOME_BAD)
def test_crm_records_with_bad_addresses_lose_the_address_not_the_record(name) -> None:  # type: ignore[no-untyped-def]
    mapping = Mapping.parse({"external_id": "id", "email": "contact.email",
                             "first_name": "contact.first_name"})
    record = mapping.read({"id": "C-1", "contact": {"email": BAD[name], "first_name": "Ana"}})
    assert record.email is None and "email" not in record.present
    assert record.first_name == "Ana"


def test_crm_record_addresses_are_normalized() -> None:
    mapping = Mapping.parse({"external_id": "id", "email": "contact.email"})
    assert mapping.read({"id": "C-1", "contact": {"email": "Ana@XN--BCHER-KVA.de"}}).email \
        == "ana@bücher.de"


def test_builtin_crm_search_normalizes_and_refuses(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        connector = BuiltinConnector(session, demo["tenant_id"])
        assert connector.find_by_email(" Camille.Martin@EXAMPLE.com").external_id == "C-1001"
        assert connector.find_by_email("<camille.martin@example.com>") is None


# -- inbound hooks ------------------------------------------------------------------------

def _hook(services) -> str:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.slug == "demo"))
        _, secret = webhooks_in.create_hook(session, tenant, "loyalty", "header", None)
    return secret


def _post(client, secret: str, event: dict) -> object:  # type: ignore[no-untyped-def]
    return client.post("/hooks/demo/loyalty", data=json.dumps(event).encode(),
                       headers={"X-Secret-Key": secret, "Content-Type": "application/json"})


def test_inbound_hooks_refuse_bad_addresses(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    secret = _hook(services)
    for i, name in enumerate(SOME_BAD):
        response = _post(client, secret, {"id": f"e-{i}", "type": "customer.created",
                                           "customer": {"id": f"H-{i}", "email": BAD[name]}})
        assert response.status_code == 422, name
        assert response.get_json()["detail"].startswith("email: ")
    # An event naming its customer by a malformed email fails; by a good one, it applies.
    by_bad = _post(client, secret, {"id": "p-1", "type": "points.credited", "points": 5,
                                    "email": "<camille.martin@example.com>"})
    assert by_bad.status_code == 422
    ok = _post(client, secret, {"id": "c-ok", "type": "customer.created",
                                "customer": {"id": "H-OK", "email": "Hook@XN--BCHER-KVA.de"}})
    assert ok.get_json()["status"] == "applied"
    with services.db.session() as session:
        statuses = list(session.scalars(select(InboundEvent.status).order_by(InboundEvent.id)))
        assert statuses == ["failed"] * (len(SOME_BAD) + 1) + ["applied"]
        assert session.scalar(select(Customer.email).where(Customer.external_id == "H-OK")) \
            == "hook@bücher.de"
        assert not session.scalar(select(func.count()).select_from(Customer).where(
            Customer.external_id.like("H-_")))


# -- dashboard, its users, CLI ------------------------------------------------------------

@pytest.mark.parametrize("name", SOME_BAD)
def test_dashboard_new_customer_and_new_users_refuse_bad_addresses(services, demo, name) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        with pytest.raises(CustomerDataError, match="^email: "):
            dashboard.create_customer(session, demo["tenant_id"], "D-1", {"email": BAD[name]})
    with pytest.raises(admin_users.AdminUserError):
        admin_users.check_email(BAD[name])


def test_dashboard_and_users_store_the_normal_form(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        customer = dashboard.create_customer(session, demo["tenant_id"], "D-1",
                                             {"email": "D@XN--BCHER-KVA.de"})
        assert customer.email == "d@bücher.de"
    assert admin_users.check_email(" Ops@Example.ORG ") == "ops@example.org"
    assert admin_users.normalize_email("OPS@example.org") == "ops@example.org"


def test_cli_import_refuses_bad_addresses(runner, services, demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cli.csv"
    path.write_text("external_id,email\nCLI-1,<x>@example.net\nCLI-2,cli@example.org\n",
                    encoding="utf-8")
    result = runner.invoke(args=["customers", "import", "--tenant", "demo", str(path)])
    assert "line 2" in result.output, result.output
    with services.db.session() as session:
        emails = dict(session.execute(select(Customer.external_id, Customer.email).where(
            Customer.external_id.like("CLI-%"))).all())
    assert emails == {"CLI-2": "cli@example.org"}


# -- the card mail to an internationalized address ----------------------------------------

def test_a_member_at_an_idn_domain_is_known_in_either_spelling_and_mailed(services, demo) -> None:  # type: ignore[no-untyped-def]
    from app.distribution import enrollment
    from app.infra.models import Program
    from tests.smtp_standin import SmtpStandin

    with services.db.transaction(demo["tenant_id"]) as session:
        session.scalar(select(Customer).where(Customer.external_id == "C-1001")).email = \
            normalize_email("Camille@Bücher.de")
    with SmtpStandin() as smtp:
        services.settings.smtp_url = smtp.url
        services.settings.mail_from = "Rewards <cards@brand.example>"
        services.jobs.huey.immediate = True
        with services.db.transaction(demo["tenant_id"]) as session:
            program = session.get(Program, demo["program_ids"]["rewards"])
            texts = enrollment.consent_texts(enrollment.form_config(program), "en", program)
            result = enrollment.enroll(session, services, program,
                                       {"email": "camille@XN--BCHER-KVA.DE", "consent_terms": "yes"},
                                       "en", texts)
            assert result.held  # the same address as the member's
        [(recipients, message)] = smtp.received
    # Sent in ASCII (the domain's A-labels), so a relay without SMTPUTF8 takes it.
    assert recipients == ["camille@xn--bcher-kva.de"]
    assert "camille@xn--bcher-kva.de" in message["To"]

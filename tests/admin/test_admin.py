"""The admin dashboard through Flask's test client: sign-in, roles, tenant isolation,
CSRF, the segment count and export, search, webhooks, health, users, audit, CLI."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
from typing import Any

import pytest
from argon2 import PasswordHasher
from PIL import Image
from sqlalchemy import func, select

from app.admin import users as admin_users
from app.distribution import links
from app.infra.models import (
    AdminUser,
    AuditEntry,
    Card,
    Customer,
    LinkToken,
    Program,
    PushAttempt,
    PushJob,
    Tenant,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from app.segments import segments
from app.tracking import install_state
from app.web import admin as admin_views

PASSWORD = "correct horse battery"
OTHER_SECRET_NAME = "Zebra Secret Club"


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture()
def world(services, demo) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The demo tenant with three users, and a second tenant with its own everything."""
    ids: dict[str, Any] = {"tenant_a": demo["tenant_id"]}
    with services.db.transaction() as session:
        for role in admin_users.ROLES:
            user = admin_users.create_user(session, demo["tenant_id"], f"{role}@a.example",
                                           PASSWORD, role)
            ids[role] = user.id
        disabled = admin_users.create_user(session, demo["tenant_id"], "gone@a.example",
                                           PASSWORD, "admin")
        disabled.disabled_at = utcnow()
        ids["gone"] = disabled.id
        other = Tenant(slug="other", name="Other Brand")
        session.add(other)
        session.flush()
        ids["tenant_b"] = other.id
        ids["b_admin"] = admin_users.create_user(session, other.id, "admin@a.example", PASSWORD,
                                                 "admin").id
        ids["b_user_other"] = admin_users.create_user(session, other.id, "viewer@b.example",
                                                      PASSWORD, "viewer").id
        secret_program = Program(tenant_id=other.id, slug="zebra", name=OTHER_SECRET_NAME,
                                 template="loyalty", pass_type_identifier="pass.other.zebra",
                                 team_identifier="OTHERTEAM1")
        same_slug = Program(tenant_id=other.id, slug="rewards", name="Other Rewards",
                            template="loyalty", pass_type_identifier="pass.other.zebra",
                            team_identifier="OTHERTEAM1")
        session.add_all([secret_program, same_slug])
        b_customer = Customer(tenant_id=other.id, external_id="B-SECRET-1",
                              email="b.secret@other.example", first_name="Bea", attributes={})
        session.add(b_customer)
        session.flush()
        ids["b_customer"] = b_customer.id
        sub = WebhookSubscription(tenant_id=other.id, url="https://b.example/hook",
                                  event_types=["card.installed"])
        session.add(sub)
        session.flush()
        ids["b_subscription"] = sub.id
        delivery = WebhookDelivery(tenant_id=other.id, subscription_id=sub.id, event_id="evt-b",
                                   event_type="card.installed", payload={"secret": "b"})
        session.add(delivery)
        session.flush()
        ids["b_delivery"] = delivery.id
        a_sub = WebhookSubscription(tenant_id=demo["tenant_id"], url="https://a.example/hook",
                                    event_types=["card.installed", "customer.updated"])
        session.add(a_sub)
        session.flush()
        ids["a_subscription"] = a_sub.id
        a_delivery = WebhookDelivery(tenant_id=demo["tenant_id"], subscription_id=a_sub.id,
                                     event_id="evt-a", event_type="card.installed",
                                     payload={"card": "x"}, attempts=2, last_status=500,
                                     last_error="HTTP 500")
        session.add(a_delivery)
        session.flush()
        session.add(WebhookAttempt(tenant_id=demo["tenant_id"], delivery_id=a_delivery.id,
                                   status=500, error="HTTP 500", duration_ms=12))
        ids["a_delivery"] = a_delivery.id
        ids["a_customer"] = session.scalar(select(Customer.id).where(
            Customer.tenant_id == demo["tenant_id"], Customer.external_id == "C-1001"))
    return ids


def csrf_token(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def login(client, email: str, password: str = PASSWORD, tenant: str = "demo",  # type: ignore[no-untyped-def]
          **extra: str):
    page = client.get("/admin/login").get_data(as_text=True)
    return client.post("/admin/login", data={"csrf_token": csrf_token(page), "tenant": tenant,
                                             "email": email, "password": password, **extra})


def token_of(client) -> str:  # type: ignore[no-untyped-def]
    return csrf_token(client.get("/admin/account").get_data(as_text=True))


def signed_in(app, email: str, tenant: str = "demo"):  # type: ignore[no-untyped-def]
    client = app.test_client()
    response = login(client, email, tenant=tenant)
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


def audit_actions(services, tenant_id: int) -> list[str]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return list(session.scalars(select(AuditEntry.action).where(
            AuditEntry.tenant_id == tenant_id).order_by(AuditEntry.id)))


# -- passwords --------------------------------------------------------------------------------

def test_passwords_are_argon2id_and_verified(services) -> None:  # type: ignore[no-untyped-def]
    hashed = admin_users.hash_password(PASSWORD)
    assert hashed.startswith("$argon2id$")
    assert admin_users.verify_password(hashed, PASSWORD)
    assert not admin_users.verify_password(hashed, PASSWORD + "!")
    assert not admin_users.verify_password("not a hash", PASSWORD)
    with pytest.raises(admin_users.AdminUserError, match="at least 12"):
        admin_users.check_password("short")
    with pytest.raises(admin_users.AdminUserError, match="email"):
        admin_users.check_password("someone@example.org", "Someone@example.org")


def test_weak_hash_is_upgraded_at_login(services, world) -> None:  # type: ignore[no-untyped-def]
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    with services.db.transaction() as session:
        session.get(AdminUser, world["viewer"]).password_hash = weak
    with services.db.transaction(world["tenant_a"]) as session:
        outcome = admin_users.authenticate(session, world["tenant_a"], "VIEWER@a.example ",
                                           PASSWORD)
        assert outcome.reason == "ok" and outcome.user is not None
        assert outcome.user.password_hash != weak
        assert "m=19456,t=2,p=1" in outcome.user.password_hash


def test_unknown_user_still_costs_one_verification(services, world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []
    real = admin_users.verify_password
    monkeypatch.setattr(admin_users, "verify_password",
                        lambda h, p: calls.append(h) or real(h, p))
    with services.db.transaction(world["tenant_a"]) as session:
        for email in ("nobody@a.example", "gone@a.example", "viewer@a.example"):
            outcome = admin_users.authenticate(session, world["tenant_a"], email, "wrong pass 123")
            assert outcome.user is None
    assert len(calls) == 3 and calls[0] == admin_users._dummy_hash()


# -- signing in -------------------------------------------------------------------------------

def test_login_sets_a_hardened_session_cookie_without_personal_data(app, client, services, world) -> None:  # type: ignore[no-untyped-def]
    response = login(client, "viewer@a.example")
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/admin/programs")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" in cookie  # the test app's public URL is https
    value = cookie.split(";")[0].split("=", 1)[1]
    data = app.session_interface.get_signing_serializer(app).loads(value)
    assert set(data[admin_views.SESSION_KEY]) == {"uid", "tid", "fp", "at"}
    assert "viewer@a.example" not in str(data)
    page = client.get("/admin/programs")
    assert page.status_code == 200 and "Aurore Rewards" in page.get_data(as_text=True)
    assert page.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert audit_actions(services, world["tenant_a"]) == ["login"]
    with services.db.session() as session:
        assert session.get(AdminUser, world["viewer"]).last_login_at is not None


@pytest.mark.parametrize("tenant, email, password", [
    ("demo", "viewer@a.example", "wrong password!"),
    ("demo", "nobody@a.example", PASSWORD),
    ("nope", "viewer@a.example", PASSWORD),
    ("demo", "gone@a.example", PASSWORD),  # disabled
])
def test_refused_logins_look_the_same(client, world, tenant, email, password) -> None:  # type: ignore[no-untyped-def]
    response = login(client, email, password, tenant=tenant)
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    assert "The organisation, email or password is not right, or the account is disabled." in body
    assert client.get("/admin/programs").status_code == 302


def test_failed_logins_of_known_users_are_audited(client, services, world) -> None:  # type: ignore[no-untyped-def]
    login(client, "viewer@a.example", "wrong password!")
    login(client, "gone@a.example")
    with services.db.session() as session:
        entries = session.execute(select(AuditEntry.actor, AuditEntry.action, AuditEntry.details)
                                  .order_by(AuditEntry.id)).all()
    assert entries == [(f"user:{world['viewer']}", "login.failed", {"reason": "bad_password"}),
                       (f"user:{world['gone']}", "login.failed", {"reason": "disabled"})]


def test_lockout_after_repeated_failures(app, client, world) -> None:  # type: ignore[no-untyped-def]
    for _ in range(5):
        assert login(client, "marketer@a.example", "wrong password!").status_code == 200
    locked = login(client, "marketer@a.example")  # the right password, too late
    assert locked.status_code == 429
    assert int(locked.headers["Retry-After"]) > 0
    assert "Too many failed sign-ins" in locked.get_data(as_text=True)
    # Another account (same address) is not locked.
    assert login(app.test_client(), "viewer@a.example").status_code == 302


def test_sign_in_attempts_are_limited_per_address(app, world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(admin_users, "verify_password", lambda *_: False)  # speed only
    client = app.test_client()
    token = csrf_token(client.get("/admin/login").get_data(as_text=True))
    statuses = [client.post("/admin/login", data={"csrf_token": token, "tenant": "demo",
                                                  "email": f"n{n}@a.example",
                                                  "password": "whatever it is"}).status_code
                for n in range(21)]
    assert statuses == [200] * 20 + [429]


def test_sign_in_works_when_the_lockout_storage_fails(app, world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    class Down:
        def __getattr__(self, _name: str) -> Any:
            raise ConnectionError("storage down")

    monkeypatch.setattr(admin_views, "_strategy", Down)
    assert login(app.test_client(), "viewer@a.example", "wrong password!").status_code == 200
    assert login(app.test_client(), "viewer@a.example").status_code == 302


def test_lockout_counter_resets_after_a_good_login(app, world) -> None:  # type: ignore[no-untyped-def]
    for _ in range(2):
        for _ in range(4):
            login(app.test_client(), "marketer@a.example", "wrong password!")
        assert login(app.test_client(), "marketer@a.example").status_code == 302


def test_disabling_a_user_ends_their_session(app, services, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "viewer@a.example")
    assert client.get("/admin/programs").status_code == 200
    with services.db.transaction() as session:
        session.get(AdminUser, world["viewer"]).disabled_at = utcnow()
    assert client.get("/admin/programs").status_code == 302


def test_password_change_ends_other_sessions(app, world) -> None:  # type: ignore[no-untyped-def]
    first, second = signed_in(app, "viewer@a.example"), signed_in(app, "viewer@a.example")
    new = "an even better passphrase"
    response = first.post("/admin/account", data={"csrf_token": token_of(first),
                                                  "current": PASSWORD, "password": new,
                                                  "confirm": new})
    assert response.status_code == 302
    assert first.get("/admin/programs").status_code == 200
    assert second.get("/admin/programs").status_code == 302
    assert login(app.test_client(), "viewer@a.example", new).status_code == 302


def test_wrong_current_password_changes_nothing(app, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "viewer@a.example")
    response = client.post("/admin/account", data={"csrf_token": token_of(client),
                                                   "current": "not it at all", "password": "x" * 12,
                                                   "confirm": "x" * 12})
    assert response.status_code == 400
    assert login(app.test_client(), "viewer@a.example").status_code == 302


def test_session_expires(app, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "viewer@a.example")
    with client.session_transaction() as session:
        old = time.time() - admin_views.SESSION_HOURS * 3600 - 1
        session[admin_views.SESSION_KEY] = {**session[admin_views.SESSION_KEY], "at": old}
    assert client.get("/admin/programs").status_code == 302


def test_logout(app, services, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "viewer@a.example")
    response = client.post("/admin/logout", data={"csrf_token": token_of(client)})
    assert response.status_code == 302 and response.headers["Location"].endswith("/admin/login")
    assert client.get("/admin/programs").status_code == 302
    assert audit_actions(services, world["tenant_a"])[-1] == "logout"


@pytest.mark.parametrize("target, expected", [
    ("/admin/health", "/admin/health"),
    ("//evil.example/admin/", "/admin/programs"),
    ("https://evil.example/", "/admin/programs"),
    ("/admin/\\evil", "/admin/programs"),
])
def test_next_goes_only_inside_the_dashboard(client, world, target, expected) -> None:  # type: ignore[no-untyped-def]
    response = login(client, "viewer@a.example", next=target)
    assert response.headers["Location"] == expected


def test_anonymous_visitors_are_sent_to_login(app, client, world) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/admin/health")
    assert response.status_code == 302
    assert response.headers["Location"] == "/admin/login?next=/admin/health"
    assert client.get("/admin/segments/count?program=rewards").status_code == 401
    for rule in _admin_rules(app):
        if rule.endpoint in admin_views.PUBLIC_ENDPOINTS:
            continue
        url = _url(rule, world)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if method == "POST":
                continue  # CSRF answers first (400); covered below
            assert client.open(url, method=method).status_code in (302, 401), url


# -- CSRF -------------------------------------------------------------------------------------

def test_forms_without_csrf_token_are_refused(app, client, world) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/admin/login", data={"tenant": "demo", "email": "viewer@a.example",
                                                  "password": PASSWORD})
    assert response.status_code == 400
    admin = signed_in(app, "admin@a.example")
    for rule in _admin_rules(app):
        if "POST" in rule.methods:
            assert admin.post(_url(rule, world), data={}).status_code == 400, rule.rule
            assert admin.post(_url(rule, world), data={"csrf_token": "forged"}).status_code == 400
    assert admin.get("/admin/programs").status_code == 200  # still signed in


# -- roles and tenant isolation, over every route -----------------------------------------------

def _admin_rules(app) -> list[Any]:  # type: ignore[no-untyped-def]
    return sorted((r for r in app.url_map.iter_rules() if r.endpoint.startswith("admin.")),
                  key=lambda r: r.rule)


#: URL parameters per route argument: this tenant's rows (the isolation test swaps in B's).
_ARGS = {"slug": "rewards", "customer_id": "a_customer", "delivery_id": "a_delivery",
         "subscription_id": "a_subscription", "user_id": "viewer"}


def _url(rule, world, overrides: dict[str, Any] | None = None) -> str:  # type: ignore[no-untyped-def]
    values = {}
    for name in rule.arguments:
        assert name in _ARGS, f"new route argument {name!r}: add it to the isolation test"
        value = (overrides or {}).get(name, _ARGS[name])
        values[name] = world.get(value, value) if isinstance(value, str) else value
    return rule.build(values)[1]


def test_every_route_declares_a_role(app) -> None:  # type: ignore[no-untyped-def]
    for rule in _admin_rules(app):
        view = app.view_functions[rule.endpoint]
        if rule.endpoint in admin_views.PUBLIC_ENDPOINTS:
            assert not hasattr(view, "admin_role")
        else:
            assert getattr(view, "admin_role", None) in admin_users.ROLES, rule.endpoint


@pytest.mark.parametrize("role", admin_users.ROLES)
def test_role_enforcement_per_route(app, world, role) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, f"{role}@a.example")
    token = token_of(client)
    checked = 0
    for rule in _admin_rules(app):
        if rule.endpoint in admin_views.PUBLIC_ENDPOINTS | {"admin.logout"}:
            continue
        needed = app.view_functions[rule.endpoint].admin_role
        url = _url(rule, world)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            data = {"csrf_token": token} if method == "POST" else None
            status = client.open(url, method=method, data=data).status_code
            if admin_users.role_allows(role, needed):
                assert status != 403 and status < 500, (role, method, url, status)
            else:
                assert status == 403, (role, method, url, status)
            checked += 1
    assert checked >= 20


def test_tenant_isolation_over_every_route(app, world) -> None:  # type: ignore[no-untyped-def]
    """An admin of tenant A asks for each of tenant B's rows by id or slug: never found."""
    client = signed_in(app, "admin@a.example")
    token = token_of(client)
    b_rows = {"slug": "zebra", "customer_id": "b_customer", "delivery_id": "b_delivery",
              "subscription_id": "b_subscription", "user_id": "b_user_other"}
    for rule in _admin_rules(app):
        if not rule.arguments:
            continue
        url = _url(rule, world, b_rows)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            data = {"csrf_token": token, "action": "disable"} if method == "POST" else None
            response = client.open(url, method=method, data=data)
            assert response.status_code == 404, (method, url, response.status_code)
    # Lists and searches show A's rows only.
    pages = [client.get(path).get_data(as_text=True) for path in
             ("/admin/programs", "/admin/webhooks", "/admin/users", "/admin/audit",
              "/admin/health", "/admin/segments", "/admin/programs/rewards")]
    pages.append(client.post("/admin/customers", data={"csrf_token": token, "q": ""})
                 .get_data(as_text=True))
    pages.append(client.post("/admin/customers", data={"csrf_token": token, "q": "b."})
                 .get_data(as_text=True))
    for page in pages:
        for secret in (OTHER_SECRET_NAME, "Other Rewards", "B-SECRET-1", "b.secret@other",
                       "https://b.example/hook", "viewer@b.example", "pass.other.zebra"):
            assert secret not in page
    assert "Aurore Rewards" in pages[0]
    count = client.get("/admin/segments/count?program=zebra")
    assert count.status_code == 400 and count.get_json() == {"error": "There is no such program."}
    # Nothing of B's was changed.
    with app.extensions["passerelle"].db.session() as session:
        assert session.get(WebhookSubscription, world["b_subscription"]).active
        assert session.get(AdminUser, world["b_user_other"]).disabled_at is None
        assert session.scalar(select(func.count(WebhookDelivery.id)).where(
            WebhookDelivery.tenant_id == world["tenant_b"])) == 1


def test_same_email_in_two_tenants_signs_in_to_the_named_one(app, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "admin@a.example", tenant="other")
    page = client.get("/admin/programs").get_data(as_text=True)
    assert OTHER_SECRET_NAME in page and "Aurore Rewards" not in page


# -- programs, previews, installs -------------------------------------------------------------

def _install(services, world, external_id: str, program: str, platform: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        card = session.scalar(select(Card).join(Customer).join(Program).where(
            Customer.tenant_id == world["tenant_a"], Customer.external_id == external_id,
            Program.slug == program))
        install_state.record(session, card, platform, kind,
                             device=f"device-{external_id}" if platform == "apple" else None)


def test_programs_show_previews_and_installs_by_platform(app, services, world) -> None:  # type: ignore[no-untyped-def]
    _install(services, world, "C-1001", "rewards", "apple", "registered")
    _install(services, world, "C-1002", "rewards", "apple", "registered")
    _install(services, world, "C-1003", "rewards", "google", "saved")
    _install(services, world, "C-1004", "rewards", "apple", "downloaded")
    client = signed_in(app, "viewer@a.example")
    page = client.get("/admin/programs").get_data(as_text=True)
    assert '/admin/programs/rewards/preview.png' in page and "Nordhaven Club" in page
    detail = client.get("/admin/programs/rewards").get_data(as_text=True)
    assert re.search(r'<rect class="bar apple"[^>]*data-value="2"', detail)  # Apple installed
    assert re.search(r'<rect class="bar google"[^>]*data-value="1"', detail)
    assert "Apple · downloaded" in detail
    preview = client.get("/admin/programs/rewards/preview.png")
    assert preview.status_code == 200 and preview.mimetype == "image/png"
    image = Image.open(io.BytesIO(preview.data))
    assert image.width == 640 and image.height > 400
    assert client.get("/admin/programs/missing").status_code == 404


def test_funnel_chart_per_campaign(app, services, world) -> None:  # type: ignore[no-untyped-def]
    from app.distribution import links
    from app.tracking import funnel

    with services.db.transaction() as session:
        program = session.scalar(select(Program).where(Program.tenant_id == world["tenant_a"],
                                                       Program.slug == "rewards"))
        customers = {c.external_id: c for c in session.scalars(select(Customer).where(
            Customer.tenant_id == world["tenant_a"]))}
        tokens = {eid: links.issue_token(session, program, customers[eid], "download",
                                         campaign="spring") for eid in ("C-1001", "C-1002",
                                                                        "C-1003")}
        links.issue_token(session, program, customers["C-1004"], "download")  # no campaign
        for eid in ("C-1001", "C-1002"):
            grant = links.resolve_token(session, tokens[eid])
            funnel.record(session, grant, "link_opened", platform="apple")
        grant = links.resolve_token(session, tokens["C-1001"])
        card = session.scalar(select(Card).where(Card.program_id == program.id,
                                                 Card.customer_id == customers["C-1001"].id))
        funnel.record(session, grant, "apple_downloaded", platform="apple", card=card)
    _install(services, world, "C-1001", "rewards", "apple", "registered")
    client = signed_in(app, "viewer@a.example")
    page = client.get("/admin/programs/rewards").get_data(as_text=True)
    spring = page.split("<h3>spring</h3>")[1].split("</svg>")[0]
    values = [int(v) for v in re.findall(r'class="bar[^"]*"[^>]*data-value="(\d+)"', spring)]
    assert values == [3, 2, 1, 0, 1, 0]  # issued, opened, Apple dl, Google, Apple inst, Google
    assert "<h3>No campaign</h3>" in page
    assert "Not available yet" not in page


# -- segments ---------------------------------------------------------------------------------

def test_segment_count_json_matches_the_domain_count(app, services, world) -> None:  # type: ignore[no-untyped-def]
    _install(services, world, "C-1001", "rewards", "apple", "registered")
    client = signed_in(app, "marketer@a.example")
    everyone = client.get("/admin/segments/count?program=rewards").get_json()
    assert everyone["count"] == 5 and everyone["program"] == "rewards"
    installed = client.get("/admin/segments/count?program=rewards&state=installed-any")
    assert installed.get_json()["count"] == 1
    gold = client.get("/admin/segments/count?program=rewards&points_min=1000").get_json()
    with services.db.session() as session:
        program_id = session.scalar(select(Program.id).where(
            Program.tenant_id == world["tenant_a"], Program.slug == "rewards"))
        expected = segments.count(session, segments.Segment(program_id, points_min=1000))
    assert gold["count"] == expected == 2
    bad = client.get("/admin/segments/count?program=rewards&points_min=lots")
    assert bad.status_code == 400 and "points_min" in bad.get_json()["error"]
    assert client.get("/admin/segments/count").status_code == 400


def test_segment_builder_counts_without_javascript(app, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "marketer@a.example")
    page = client.get("/admin/segments?program=rewards&tier=gold").get_data(as_text=True)
    assert re.search(r'id="segment-count">1<', page)
    assert 'name="tier" value="gold"' in page  # carried to the export form
    bad = client.get("/admin/segments?program=rewards&created_from=yesterday")
    assert bad.status_code == 400 and "created_from" in bad.get_data(as_text=True)


def test_export_streams_csv_with_a_link_per_row(app, services, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "marketer@a.example")
    response = client.post("/admin/segments/export", data={
        "csrf_token": token_of(client), "program": "rewards", "points_max": "1000",
        "link_purpose": "download", "link_campaign": "spring", "link_days": "10"})
    assert response.status_code == 200
    assert response.is_streamed and response.mimetype == "text/csv"
    assert 'attachment; filename="rewards-segment-' in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert sorted(r["external_id"] for r in rows) == ["C-1002", "C-1004", "C-1005"]
    assert all(r["url"].startswith("https://wallet.example.test/l/") for r in rows)
    with services.db.session() as session:
        links = session.scalars(select(LinkToken)).all()
        assert len(links) == 3 and {link.campaign for link in links} == {"spring"}
        assert all(dt.timedelta(days=9) < link.expires_at - utcnow() <= dt.timedelta(days=10)
                   for link in links)
        entry = session.scalar(select(AuditEntry).where(AuditEntry.action == "segment.export"))
    assert entry.target == "program:rewards" and entry.actor == f"user:{world['marketer']}"
    assert entry.details["segment"]["points_max"] == 1000


def test_export_of_a_large_segment_streams_in_chunks(app, services, world) -> None:  # type: ignore[no-untyped-def]
    from app.customers.customers import record_consent

    with services.db.transaction() as session:
        for n in range(segments.CHUNK + 5):
            customer = Customer(tenant_id=world["tenant_a"], external_id=f"BULK-{n:05d}",
                                attributes={"points": 1})
            session.add(customer)
            session.flush()
            record_consent(session, customer, "marketing_email", True, "test")
    client = signed_in(app, "marketer@a.example")
    response = client.post("/admin/segments/export", data={
        "csrf_token": token_of(client), "program": "club", "points_max": "1"})
    chunks = list(response.response)
    assert len(chunks) >= 2  # the first thousand left before the rest were made
    rows = list(csv.reader(io.StringIO("".join(
        c.decode() if isinstance(c, bytes) else c for c in chunks))))
    assert rows[0][0] == "external_id" and len(rows) == 1 + segments.CHUNK + 5 + 1  # + C-1004
    response.close()


def test_an_export_the_browser_leaves_stops_issuing_links(app, services, world) -> None:  # type: ignore[no-untyped-def]
    from app.customers.customers import record_consent
    from app.infra.models import LinkToken

    with services.db.transaction() as session:
        for n in range(2 * segments.CHUNK + 5):
            customer = Customer(tenant_id=world["tenant_a"], external_id=f"GONE-{n:05d}",
                                attributes={"points": 1})
            session.add(customer)
            session.flush()
            record_consent(session, customer, "marketing_email", True, "test")
    client = signed_in(app, "marketer@a.example")
    response = client.post("/admin/segments/export", data={
        "csrf_token": token_of(client), "program": "club", "points_max": "1"})
    chunks = iter(response.response)
    next(chunks), next(chunks)  # the header, then the first thousand rows
    response.close()  # the browser went away
    with services.db.session() as session:
        issued = session.scalar(select(func.count()).select_from(LinkToken)) or 0
    assert issued == segments.CHUNK  # the second thousand was never made


def test_export_refuses_bad_options(app, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "marketer@a.example")
    token = token_of(client)
    for data in ({"program": "rewards", "link_purpose": "enroll"},
                 {"program": "rewards", "link_days": "999"},
                 {"program": "nope"}, {}):
        assert client.post("/admin/segments/export",
                           data={"csrf_token": token, **data}).status_code == 400


# -- customers --------------------------------------------------------------------------------

def test_customer_search_by_email_prefix_and_external_id(app, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "viewer@a.example")
    token = token_of(client)
    page = client.post("/admin/customers", data={"csrf_token": token, "q": "CAMILLE."})
    body = page.get_data(as_text=True)
    assert "C-1001" in body and "C-1002" not in body
    body = client.post("/admin/customers", data={"csrf_token": token, "q": "C-1003"}).get_data(
        as_text=True)
    assert "lena.mueller@example.com" in body and "C-1001" not in body
    body = client.post("/admin/customers", data={"csrf_token": token, "q": "%"}).get_data(
        as_text=True)
    assert "No customer matches" in body  # wildcards are literal
    # GET never searches: a query string would put the email into access logs.
    assert "C-1001" not in client.get("/admin/customers?q=camille").get_data(as_text=True)


def test_customer_search_is_paginated(app, services, world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.admin import dashboard

    monkeypatch.setattr(dashboard, "SEARCH_PAGE", 2)
    client = signed_in(app, "viewer@a.example")
    token = token_of(client)
    seen: list[str] = []
    data = {"csrf_token": token, "q": "C-10"}
    for _ in range(4):
        body = client.post("/admin/customers", data=data).get_data(as_text=True)
        seen += re.findall(r">(C-100\d)</a>", body)
        after = re.search(r'name="after_id" value="(\d+)"', body)
        if after is None:
            break
        data = {**data, "after_id": after.group(1)}
    assert seen == ["C-1001", "C-1002", "C-1003", "C-1004", "C-1005"]


def test_customer_page(app, services, world) -> None:  # type: ignore[no-untyped-def]
    _install(services, world, "C-1001", "club", "google", "saved")
    client = signed_in(app, "viewer@a.example")
    body = client.get(f"/admin/customers/{world['a_customer']}").get_data(as_text=True)
    assert "camille.martin@example.com" in body and "marketing_email" in body
    assert "club" in body and "saved" not in body and "installed" in body


def _new_customer(client, token: str, **fields: str):  # type: ignore[no-untyped-def]
    return client.post("/admin/customers/new", data={"csrf_token": token, **fields})


def test_marketer_creates_a_customer(app, services, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "marketer@a.example")
    assert 'action="/admin/customers/new"' in client.get("/admin/customers").get_data(as_text=True)
    response = _new_customer(client, token_of(client), external_id=" N-1 ",
                             email=" Nina@Example.COM", first_name="Nina", last_name="Nouveau",
                             locale="fr_FR")
    assert response.status_code == 303
    with services.db.session() as session:
        created = session.scalar(select(Customer).where(
            Customer.tenant_id == world["tenant_a"], Customer.external_id == "N-1"))
        assert (created.email, created.first_name, created.last_name, created.locale) == (
            "nina@example.com", "Nina", "Nouveau", "fr-FR")
        entry = session.scalar(select(AuditEntry).where(AuditEntry.action == "customer.create"))
        assert entry.target == "customer:N-1" and "nina" not in str(entry.details).lower()
    assert response.headers["Location"] == f"/admin/customers/{created.id}"
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "The customer was created." in page and "Card and personal link" in page


@pytest.mark.parametrize("fields, message", [
    ({"external_id": "C-1001", "email": "fresh@example.com"}, "already used"),
    ({"external_id": "N-2", "email": "CAMILLE.MARTIN@example.com"}, "already used"),
    ({"external_id": "N-3", "email": "not an email"}, "is not an email address"),
    ({"external_id": "N-4", "locale": "xx-nowhere-9"}, "not a known language tag"),
    ({"external_id": "  ", "email": "blank@example.com"}, "external_id"),
])
def test_refused_new_customer_shows_the_form_again(app, services, world, fields, message) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "marketer@a.example")
    with services.db.session() as session:
        before = session.scalar(select(func.count(Customer.id)))
    response = _new_customer(client, token_of(client), **fields)
    body = response.get_data(as_text=True)
    assert response.status_code == 400 and message in body
    assert 'id="create-error"' in body and 'name="external_id"' in body
    with services.db.session() as session:
        assert session.scalar(select(func.count(Customer.id))) == before
    assert "customer.create" not in audit_actions(services, world["tenant_a"])


def test_new_customer_needs_marketer_and_csrf(app, services, world) -> None:  # type: ignore[no-untyped-def]
    viewer = signed_in(app, "viewer@a.example")
    assert "/admin/customers/new" not in viewer.get("/admin/customers").get_data(as_text=True)
    assert _new_customer(viewer, token_of(viewer), external_id="V-1").status_code == 403
    marketer = signed_in(app, "marketer@a.example")
    assert marketer.post("/admin/customers/new", data={"external_id": "V-2"}).status_code == 400
    with services.db.session() as session:
        assert not session.scalar(select(Customer.id).where(Customer.external_id.in_(
            ["V-1", "V-2"])))


def test_card_and_personal_link_for_a_customer(app, services, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "marketer@a.example")
    token = token_of(client)
    created = _new_customer(client, token, external_id="N-9", email="n9@example.com")
    customer_id = int(created.headers["Location"].rsplit("/", 1)[1])
    page = client.get(f"/admin/customers/{customer_id}").get_data(as_text=True)
    assert 'name="program" value="rewards"' in page and 'name="program" value="club"' in page
    response = client.post(f"/admin/customers/{customer_id}/link",
                           data={"csrf_token": token, "program": "rewards",
                                 "campaign": " desk "})
    assert response.status_code == 200
    assert "Set-Cookie" not in response.headers or "/l/" not in response.headers["Set-Cookie"]
    body = response.get_data(as_text=True)
    match = re.search(r'id="issued-url">(https://wallet\.example\.test/l/([^<]+))<', body)
    assert match, body
    raw = match.group(2)
    assert 'id="copy-link"' in body and "navigator.clipboard" in body
    nonce = re.search(r"script-src 'nonce-([^']+)'", response.headers["Content-Security-Policy"])
    assert f'<script nonce="{nonce.group(1)}">' in body
    with services.db.session() as session:
        grant = links.resolve_token(session, raw)
        program = session.get(Program, grant.program_id)
        assert (grant.customer_id, program.slug, grant.purpose, grant.campaign) == (
            customer_id, "rewards", "download", "desk")
        card = session.scalar(select(Card).where(Card.customer_id == customer_id,
                                                 Card.program_id == program.id))
        assert card is not None and card.serial_number in body
        entry = session.scalar(select(AuditEntry).where(AuditEntry.action == "customer.link"))
        assert entry.target == "customer:N-9" and entry.tenant_id == world["tenant_a"]
        assert entry.details["serial"] == card.serial_number
        assert raw not in str(entry.details) and raw not in (entry.target or "")
        assert links.hash_token(raw) not in str(entry.details)
    # A second link reuses the card; the first URL is not shown again.
    again = client.post(f"/admin/customers/{customer_id}/link",
                        data={"csrf_token": token, "program": "rewards"}).get_data(as_text=True)
    assert raw not in again and card.serial_number in again
    assert raw not in client.get(f"/admin/customers/{customer_id}").get_data(as_text=True)
    with services.db.session() as session:
        assert session.scalar(select(func.count(Card.id)).where(
            Card.customer_id == customer_id)) == 1
        assert session.scalar(select(func.count(LinkToken.id)).where(
            LinkToken.customer_id == customer_id)) == 2


def test_card_link_refusals(app, services, world) -> None:  # type: ignore[no-untyped-def]
    marketer = signed_in(app, "marketer@a.example")
    token = token_of(marketer)
    url = f"/admin/customers/{world['a_customer']}/link"
    assert marketer.post(url, data={"csrf_token": token, "program": "zebra"}).status_code == 400
    too_long = marketer.post(url, data={"csrf_token": token, "program": "rewards",
                                        "campaign": "x" * 101})
    assert too_long.status_code == 400 and "campaign" in too_long.get_data(as_text=True)
    assert marketer.post(url, data={"program": "rewards"}).status_code == 400  # no CSRF
    other = marketer.post(f"/admin/customers/{world['b_customer']}/link",
                          data={"csrf_token": token, "program": "rewards"})
    assert other.status_code == 404
    viewer = signed_in(app, "viewer@a.example")
    assert viewer.post(url, data={"csrf_token": token_of(viewer),
                                  "program": "rewards"}).status_code == 403
    assert "Card and personal link" not in viewer.get(
        f"/admin/customers/{world['a_customer']}").get_data(as_text=True)
    with services.db.session() as session:
        assert session.scalar(select(func.count(LinkToken.id)).where(
            LinkToken.customer_id.in_([world["a_customer"], world["b_customer"]]))) == 0
        assert not session.scalar(select(Card.id).where(Card.customer_id == world["b_customer"]))
    assert "customer.link" not in audit_actions(services, world["tenant_a"])


# -- webhooks ---------------------------------------------------------------------------------

def test_webhook_deliveries_and_attempts(app, services, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "viewer@a.example")
    body = client.get("/admin/webhooks").get_data(as_text=True)
    assert "https://a.example/hook" in body and "HTTP 500" in body and "failing" in body
    assert "Send again" not in client.get(f"/admin/webhooks/deliveries/{world['a_delivery']}"
                                          ).get_data(as_text=True)  # viewers only read
    assert "card.installed" not in client.get("/admin/webhooks?status=delivered").get_data(
        as_text=True).split('id="deliveries-title"')[1]
    assert client.get("/admin/webhooks?status=bogus").status_code == 400
    filtered = client.get("/admin/webhooks?status=failing")
    # The filter reaches the template (marked current), not the HTTP status line.
    assert filtered.status_code == 200
    assert ('status=failing" aria-current="page"' in filtered.get_data(as_text=True))
    detail = client.get(f"/admin/webhooks/deliveries/{world['a_delivery']}").get_data(as_text=True)
    assert "evt-a" in detail and "12 ms" in detail


def test_admin_redelivers_and_manages_subscriptions(app, services, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "admin@a.example")
    token = token_of(client)
    response = client.post(f"/admin/webhooks/deliveries/{world['a_delivery']}/redeliver",
                           data={"csrf_token": token})
    assert response.status_code == 302
    created = client.post("/admin/webhooks/subscriptions", data={
        "csrf_token": token, "url": "https://crm.a.example/in", "event_types": ["card.removed"]})
    body = created.get_data(as_text=True)
    assert created.status_code == 200 and "shown this once" in body
    secret = re.search(r"<p><code>([^<]+)</code></p>", body).group(1)
    refused = client.post("/admin/webhooks/subscriptions", data={
        "csrf_token": token, "url": "ftp://x", "event_types": ["card.removed"]})
    assert refused.status_code == 302
    off = client.post(f"/admin/webhooks/subscriptions/{world['a_subscription']}/active",
                      data={"csrf_token": token, "active": "no"})
    assert off.status_code == 302
    with services.db.session() as session:
        copies = session.scalars(select(WebhookDelivery).where(
            WebhookDelivery.event_id == "evt-a")).all()
        assert len(copies) == 2
        assert not session.get(WebhookSubscription, world["a_subscription"]).active
        new = session.scalar(select(WebhookSubscription).where(
            WebhookSubscription.url == "https://crm.a.example/in"))
        assert new.secret == secret
        details = [e.details for e in session.scalars(select(AuditEntry))]
    assert secret not in str(details)
    assert audit_actions(services, world["tenant_a"])[-3:] == [
        "webhook.redeliver", "webhook.subscription.create", "webhook.subscription.disable"]


# -- health -----------------------------------------------------------------------------------

def test_health_shows_certificates_push_failures_and_queues(app, services, world) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        card = session.scalar(select(Card).where(Card.tenant_id == world["tenant_a"]))
        session.add(PushAttempt(tenant_id=world["tenant_a"], card_id=card.id, device="dev-1",
                                status=400, outcome="bad_token", reason="BadDeviceToken"))
        session.add(PushAttempt(tenant_id=world["tenant_a"], card_id=card.id, device="dev-2",
                                status=200, outcome="sent"))
        session.add(PushJob(tenant_id=world["tenant_a"], card_id=card.id, update_tag=1))
        session.add(PushJob(tenant_id=world["tenant_a"], card_id=card.id, update_tag=2,
                            channel="google", attempts=2, not_before=utcnow()))
        serial = card.serial_number
    client = signed_in(app, "viewer@a.example")
    body = client.get("/admin/health").get_data(as_text=True)
    assert "pass.dev.passerelle.demo" in body
    expires = re.search(r"<code>pass.dev.passerelle.demo</code></td>\s*<td>(\d{4}-\d\d-\d\d)</td>",
                        body)
    assert expires and dt.date.fromisoformat(expires.group(1)) > dt.datetime.now(dt.UTC).date()
    assert "BadDeviceToken" in body and serial in body
    queues = body.split('id="queues"')[1].split("</section>")[0]
    assert re.search(r"Apple pushes</th><td class=\"num\">1<", queues)
    assert re.search(r"Google Wallet updates</th><td class=\"num\">1<", queues)
    google = body.split('id="google"')[1].split("</section>")[0]
    assert re.search(r"waiting for a retry</th><td class=\"num\">1<", google)
    assert str(services.settings.certs_path) not in body  # no server paths on the page


# -- users and audit --------------------------------------------------------------------------

def test_admin_manages_users(app, services, world) -> None:  # type: ignore[no-untyped-def]
    client = signed_in(app, "admin@a.example")
    token = token_of(client)
    created = client.post("/admin/users", data={"csrf_token": token, "email": "New@A.example",
                                                "role": "marketer", "password": PASSWORD})
    assert created.status_code == 302
    duplicate = client.post("/admin/users", data={"csrf_token": token, "email": "new@a.example",
                                                  "role": "viewer", "password": PASSWORD})
    assert duplicate.status_code == 400 and "already exists" in duplicate.get_data(as_text=True)
    short = client.post("/admin/users", data={"csrf_token": token, "email": "x@a.example",
                                              "role": "viewer", "password": "short"})
    assert short.status_code == 400
    with services.db.session() as session:
        new = session.scalar(select(AdminUser).where(AdminUser.email == "new@a.example"))
        assert new.role == "marketer" and new.password_hash.startswith("$argon2id$")
    assert login(app.test_client(), "new@a.example").status_code == 302
    client.post(f"/admin/users/{new.id}", data={"csrf_token": token, "action": "role",
                                                "role": "viewer"})
    client.post(f"/admin/users/{new.id}", data={"csrf_token": token, "action": "disable"})
    assert login(app.test_client(), "new@a.example").status_code == 200
    # The last active admin can neither leave the role nor be disabled.
    for action in ({"action": "role", "role": "viewer"}, {"action": "disable"}):
        client.post(f"/admin/users/{world['admin']}", data={"csrf_token": token, **action})
    with services.db.session() as session:
        me = session.get(AdminUser, world["admin"])
        assert me.role == "admin" and me.disabled_at is None
        assert session.get(AdminUser, new.id).role == "viewer"
    audit_page = client.get("/admin/audit").get_data(as_text=True)
    for action in ("user.create", "user.role", "user.disable", "login"):
        assert f"<code>{action}</code>" in audit_page
    assert "new@a.example" not in audit_page  # ids in the audit log, never emails


def test_cli_creates_and_lists_admins(runner, services, world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PASSERELLE_ADMIN_PASSWORD", PASSWORD)
    result = runner.invoke(args=["admins", "create", "--tenant", "demo", "--email",
                                 "Boss@A.example", "--role", "admin"])
    assert result.exit_code == 0, result.output
    assert "created admin user:" in result.output and PASSWORD not in result.output
    monkeypatch.delenv("PASSERELLE_ADMIN_PASSWORD")
    prompted = runner.invoke(args=["admins", "create", "--tenant", "demo", "--email",
                                   "typed@a.example", "--role", "viewer"],
                             input=f"{PASSWORD}\n{PASSWORD}\n")
    assert prompted.exit_code == 0, prompted.output
    bad = runner.invoke(args=["admins", "create", "--tenant", "demo", "--email", "x@a.example"],
                        input="short\nshort\n")
    assert bad.exit_code == 1 and "at least 12" in bad.output
    listed = runner.invoke(args=["admins", "list", "--tenant", "demo"])
    assert "boss@a.example\tadmin\tactive" in listed.output
    assert "typed@a.example\tviewer\tactive" in listed.output
    disabled = runner.invoke(args=["admins", "disable", "--tenant", "demo", "--email",
                                   "typed@a.example"])
    assert disabled.exit_code == 0 and "disabled" in disabled.output
    assert runner.invoke(args=["admins", "create", "--tenant", "nope", "--email", "a@b.example"],
                         input=f"{PASSWORD}\n{PASSWORD}\n").exit_code == 1
    with services.db.session() as session:
        assert session.scalar(select(AdminUser.role).where(
            AdminUser.email == "boss@a.example")) == "admin"
        actors = session.scalars(select(AuditEntry.actor).where(
            AuditEntry.action.in_(("user.create", "user.disable")))).all()
    assert set(actors) == {"cli"} and len(actors) == 3

"""The admin dashboard in a real browser: Debian's Chromium driven by Playwright against a
live server. Signs in, looks at every panel, builds a segment and watches the live count,
downloads an export. Screenshots go to test-artifacts/admin-*.png.

Nothing leaves the machine: requests to any other host are aborted (and counted).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator

import pytest
from PIL import Image, ImageStat
from sqlalchemy import select

from app.admin import users as admin_users
from app.distribution import links
from app.infra.models import (
    Card,
    Customer,
    LinkToken,
    Program,
    PushAttempt,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
)
from app.tracking import funnel, install_state
from tests.browser import ARTIFACTS, CHROMIUM, live_server

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("PASSERELLE_REQUIRE_BROWSER"),
    reason="needs Debian's chromium package (.ci/run installs it)")

PASSWORD = "correct horse battery"


@pytest.fixture()
def server(app, services, demo) -> Iterator[str]:  # type: ignore[no-untyped-def]
    _seed(services, demo["tenant_id"])
    with live_server(app) as base:
        services.settings.public_url = base  # export links name this server
        app.config["SESSION_COOKIE_SECURE"] = False  # plain HTTP on localhost
        yield base


def _seed(services, tenant_id: int) -> None:  # type: ignore[no-untyped-def]
    """An admin, a few installs, a failing webhook and a refused push: every panel has rows."""
    with services.db.transaction() as session:
        admin_users.create_user(session, tenant_id, "ops@maison-aurore.example", PASSWORD,
                                "admin")
        cards = {(c.customer.external_id, c.program.slug): c for c in session.scalars(
            select(Card).join(Customer).where(Card.tenant_id == tenant_id))}
        # A campaign: four links sent, three opened, two downloads; three install afterwards.
        for external_id in ("C-1001", "C-1002", "C-1003", "C-1004"):
            card = cards[(external_id, "rewards")]
            token = links.issue_token(session, card.program, card.customer, "download",
                                      campaign="spring-mailing")
            if external_id == "C-1004":
                continue
            grant = links.resolve_token(session, token)
            funnel.record(session, grant, "link_opened", platform="apple")
            if external_id != "C-1003":
                funnel.record(session, grant, "apple_downloaded", platform="apple", card=card)
        for external_id, platform, kind in (("C-1001", "apple", "registered"),
                                            ("C-1002", "apple", "registered"),
                                            ("C-1003", "google", "saved"),
                                            ("C-1004", "apple", "downloaded"),
                                            ("C-1005", "google", "downloaded")):
            install_state.record(session, cards[(external_id, "rewards")], platform, kind,
                                 device=f"device-{external_id}" if platform == "apple" else None)
        subscription = WebhookSubscription(tenant_id=tenant_id, url="https://crm.example/hooks",
                                           event_types=["card.installed"])
        session.add(subscription)
        session.flush()
        delivery = WebhookDelivery(tenant_id=tenant_id, subscription_id=subscription.id,
                                   event_id="evt-1", event_type="card.installed",
                                   payload={"type": "card.installed"}, attempts=1,
                                   last_status=503, last_error="HTTP 503")
        session.add(delivery)
        session.flush()
        session.add(WebhookAttempt(tenant_id=tenant_id, delivery_id=delivery.id, status=503,
                                   error="HTTP 503", duration_ms=41))
        session.add(PushAttempt(tenant_id=tenant_id, card_id=cards[("C-1001", "rewards")].id,
                                device="device-C-1001", status=400, outcome="bad_token",
                                reason="BadDeviceToken"))


def _shot(page, name: str, full_page: bool = True) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"admin-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    image = Image.open(path).convert("L")
    assert ImageStat.Stat(image).stddev[0] > 10, f"{path} looks blank"


def test_dashboard_in_chromium(browser, server, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Locator expectations poll from outside the page: the dashboard's CSP forbids eval.
    from playwright.sync_api import expect

    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    outside: list[str] = []

    def route(request_route) -> None:  # type: ignore[no-untyped-def]
        if request_route.request.url.startswith(server):
            request_route.continue_()
        else:
            outside.append(request_route.request.url)
            request_route.abort()

    context.route("**/*", route)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    # Sign in: the dashboard sends an anonymous visitor to the login form, then back.
    page.goto(f"{server}/admin/health")
    assert "/admin/login" in page.url
    page.get_by_label("Organisation").fill("demo")
    page.get_by_label("Email").fill("ops@maison-aurore.example")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text().startswith("The organisation, email or password")
    page.get_by_label("Password").fill(PASSWORD)
    _shot(page, "login", full_page=False)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{server}/admin/health")

    # Health: certificate expiry, APNs failures, queue depth.
    health = page.locator("main").inner_text()
    assert "pass.dev.passerelle.demo" in health and "BadDeviceToken" in health
    assert re.search(r"\d{4}-\d\d-\d\d", page.locator("#certificates").inner_text())
    _shot(page, "health")

    # Programs, with every preview image really loaded.
    page.get_by_role("link", name="Programs").click()
    page.wait_for_load_state("networkidle")
    images = page.locator("main img")
    assert images.count() == 2
    widths = images.evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert all(width > 0 for width in widths), widths
    assert page.get_by_role("heading", name="Aurore Rewards").is_visible()
    _shot(page, "programs")

    # One program: installs by platform and the funnel panel.
    page.get_by_role("link", name="Aurore Rewards").first.click()
    page.wait_for_load_state("networkidle")
    assert page.locator("main img").evaluate("i => i.naturalWidth") > 0
    bars = page.locator("#installs-chart rect.bar")
    assert bars.count() == 6
    values = [int(v) for v in bars.evaluate_all("rs => rs.map(r => r.dataset.value)")]
    assert values == [2, 1, 0, 1, 1, 0]  # Apple installed/downloaded/removed, Google likewise
    assert bars.first.bounding_box()["width"] > 100  # the largest bar is drawn, not just said
    chart = page.locator("#funnel svg.chart")
    assert chart.count() == 1 and "spring-mailing" in page.locator("#funnel").inner_text()
    steps = [int(v) for v in chart.locator("rect.bar").evaluate_all(
        "rs => rs.map(r => r.dataset.value)")]
    assert steps == [4, 3, 2, 0, 2, 1]  # issued, opened, Apple/Google dl, Apple/Google inst
    _shot(page, "program")

    # Segments: the count follows the filters without a page load.
    page.get_by_role("link", name="Segments").click()
    count = page.locator("#segment-count")
    page.get_by_label("Program").select_option("rewards")
    expect(count).to_have_text("5")
    url_before = page.url
    page.get_by_label("Wallet state").select_option("installed-any")
    expect(count).to_have_text("3")
    page.get_by_label("Points at most").fill("1000")
    expect(count).to_have_text("1")
    page.get_by_label("Points at most").fill("")
    expect(count).to_have_text("3")
    assert page.url == url_before  # counted by fetch(), not by reloading
    assert count.inner_text() == "3"
    _shot(page, "segments")

    # Export: the download holds as many rows as the count said, each with a fresh link.
    page.get_by_label("Campaign name for these links").fill("browser-test")
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Export CSV").click()
    download = download_info.value
    assert re.match(r"rewards-segment-\d{8}-\d{6}\.csv$", download.suggested_filename)
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    with saved.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["external_id"] for r in rows) == ["C-1001", "C-1002", "C-1003"]
    assert all(r["url"].startswith(f"{server}/l/") for r in rows)
    assert {r["wallet_apple_installed"] for r in rows} == {"true", "false"}
    with services.db.session() as session:
        assert set(session.scalars(select(LinkToken.campaign))) == {"browser-test",
                                                                    "spring-mailing"}

    # Customer search: by POST, so the email prefix never shows in the address bar.
    page.get_by_role("link", name="Customers").click()
    page.get_by_label("External id or start of the email address").fill("camille")
    page.get_by_role("button", name="Search").click()
    results = page.locator("#customer-results")
    assert "C-1001" in results.inner_text() and "C-1002" not in results.inner_text()
    assert "camille" not in page.url
    _shot(page, "customers")
    results.get_by_role("link", name="C-1001").click()
    assert "camille.martin@example.com" in page.locator("main").inner_text()
    _shot(page, "customer")

    # Webhook deliveries, and one delivery's attempts.
    page.get_by_role("link", name="Webhooks").click()
    deliveries = page.locator("#deliveries")
    assert "card.installed" in deliveries.inner_text() and "failing" in deliveries.inner_text()
    _shot(page, "webhooks")
    deliveries.get_by_role("link").first.click()
    assert "41 ms" in page.locator("#attempts").inner_text()

    # The audit log saw the sign-in and the export.
    page.get_by_role("link", name="Audit log").click()
    audit = page.locator("#audit").inner_text()
    assert "segment.export" in audit and "login" in audit

    # A phone-sized look at the programs page.
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{server}/admin/programs")
    page.wait_for_load_state("networkidle")
    _shot(page, "programs-phone")

    page.get_by_role("button", name="Sign out").click()
    assert "/admin/login" in page.url
    assert not outside, outside
    assert not problems, problems  # no script error, no CSP violation
    context.close()


def test_segment_builder_works_without_javascript(browser, server, services) -> None:  # type: ignore[no-untyped-def]
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{server}/admin/login")
    page.get_by_label("Organisation").fill("demo")
    page.get_by_label("Email").fill("ops@maison-aurore.example")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.goto(f"{server}/admin/segments")
    page.get_by_label("Program").select_option("rewards")
    page.get_by_label("Tier").fill("gold")
    page.get_by_role("button", name="Count").click()
    assert page.locator("#segment-count").inner_text() == "1"
    with services.db.session() as session:
        assert session.scalar(select(Program.id).where(Program.slug == "rewards"))
    context.close()


def test_new_customer_and_personal_link_in_chromium(browser, server, services) -> None:  # type: ignore[no-untyped-def]
    """The integrator's path: a customer by hand, their card, a personal link copied once."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    page = context.new_page()
    problems: list[str] = []
    # Chromium's own favicon request (the dashboard has none) is not a page problem.
    page.on("console", lambda m: problems.append(m.text) if m.type == "error"
            and "favicon.ico" not in m.text + m.location.get("url", "") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"{server}/admin/login")
    page.get_by_label("Organisation").fill("demo")
    page.get_by_label("Email").fill("ops@maison-aurore.example")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.goto(f"{server}/admin/customers")
    page.locator("#new-customer summary").click()
    page.get_by_label("External id (required)").fill("DESK-7")
    page.get_by_label("Email", exact=True).fill("desk7@example.com")
    page.get_by_label("First name").fill("Dora")
    page.get_by_role("button", name="Create customer").click()
    expect(page.get_by_text("The customer was created.")).to_be_visible()
    page.get_by_label("Campaign (optional)").first.fill("front-desk")
    page.get_by_role("button", name="Card and personal link: Aurore Rewards").click()
    expect(page.locator("#issued-url")).to_be_visible()
    url = page.locator("#issued-url").inner_text()
    assert url.startswith(f"{server}/l/")
    page.get_by_role("button", name="Copy link").click()
    expect(page.locator("#copy-status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == url
    _shot(page, "customer-link")
    with services.db.session() as session:
        grant = links.resolve_token(session, url.rsplit("/", 1)[1])
        customer = session.get(Customer, grant.customer_id)
        assert customer.external_id == "DESK-7" and grant.campaign == "front-desk"
    assert "/l/" not in page.url
    assert not problems, problems
    context.close()

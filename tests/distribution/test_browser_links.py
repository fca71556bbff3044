"""Personal links and enrollment in a real browser: Debian's Chromium driven by Playwright
against a live server, as an iPhone, an iPad (old UA, and iPadOS's Mac UA with touch), an
Android phone and a desktop. Screenshots go to test-artifacts/.

Nothing leaves the machine: every request to another host is aborted, except Google's save
page, which is answered locally so the save link (a JWT) can be checked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from sqlalchemy import select

from app.crm import outbox as crm_outbox
from app.distribution import links
from app.infra.models import CrmConnection, CrmOutboxEntry, Customer, FunnelEvent, Program
from tests import factories
from tests.browser import ARTIFACTS, CHROMIUM, live_server
from tests.crm_standin import CrmStandin
from tests.distribution.test_platforms import (
    ANDROID_CHROME,
    DESKTOP_CHROME,
    IPAD_OLD,
    IPADOS,
    IPHONE_SAFARI,
)
from tests.google_standin import GoogleStandin
from tests.pkpass_check import verify_pkpass
from tests.smtp_standin import SmtpStandin

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("PASSERELLE_REQUIRE_BROWSER"),
    reason="needs Debian's chromium package (.ci/run installs it)")

SAVE_PREFIX = "https://pay.google.com/gp/v/save/"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
         "is_mobile": True, "has_touch": True}
DEVICES = {
    "iphone": {"user_agent": IPHONE_SAFARI, **PHONE},
    "ipad": {"user_agent": IPAD_OLD, "viewport": {"width": 820, "height": 1180},
             "is_mobile": True, "has_touch": True},
    "ipados": {"user_agent": IPADOS, "viewport": {"width": 820, "height": 1180},
               "has_touch": True},
    "android": {"user_agent": ANDROID_CHROME, "viewport": {"width": 412, "height": 915},
                "device_scale_factor": 2, "is_mobile": True, "has_touch": True},
    "desktop": {"user_agent": DESKTOP_CHROME, "viewport": {"width": 1280, "height": 800}},
    "mac": {"user_agent": IPADOS, "viewport": {"width": 1280, "height": 800}},  # no touch
}
CRM_TOKEN_ENV = "PASSERELLE_TEST_BROWSER_CRM_TOKEN"


@pytest.fixture()
def server(app, services, demo) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with live_server(app) as base:
        # Links, QR codes and the save JWT's origins name this server; it speaks plain HTTP.
        services.settings.public_url = base
        app.config["SESSION_COOKIE_SECURE"] = False
        yield base


class Visit:
    """One browser context (a device) with the outside world cut off."""

    def __init__(self, browser, device: str, locale: str = "en-GB") -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(accept_downloads=True, locale=locale,
                                           **DEVICES[device])
        self.saves: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        if device == "ipados":  # a real iPad reports 5 touch points; Playwright's touch, 1
            cdp = self.context.new_cdp_session(self.page)
            cdp.send("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})

    def _route(self, route) -> None:  # type: ignore[no-untyped-def]
        url = route.request.url
        if url.startswith("http://127.0.0.1:"):
            route.continue_()
        elif url.startswith(SAVE_PREFIX):
            self.saves.append(url)
            route.fulfill(status=200, content_type="text/html",
                          body="<!doctype html><title>Google Wallet</title><p>saved</p>")
        else:
            route.abort()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def visit(browser) -> Iterator:  # type: ignore[no-untyped-def]
    opened: list[Visit] = []

    def open_(device: str, locale: str = "en-GB") -> Visit:
        opened.append(Visit(browser, device, locale))
        return opened[-1]

    yield open_
    for one in opened:
        one.close()


def issue(services, demo, external_id: str = "C-1001", **options) -> str:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        program = session.get(Program, demo["program_ids"]["rewards"])
        customer = session.scalar(select(Customer).where(Customer.external_id == external_id))
        return links.issue_token(session, program, customer, "download", **options)


def download_apple(visit: Visit) -> bytes:
    with visit.page.expect_download() as caught:
        visit.page.click("a.wallet.apple")
    download = caught.value
    assert download.suggested_filename == "rewards.pkpass"
    return Path(download.path()).read_bytes()


def funnel(services) -> list[tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        rows = session.execute(select(FunnelEvent.kind, FunnelEvent.platform)
                               .order_by(FunnelEvent.id)).all()
    return [tuple(row) for row in rows]


def ca_file(services) -> Path:  # type: ignore[no-untyped-def]
    return services.settings.certs_path / "dev" / "root-ca.pem"


# -- landings and downloads ---------------------------------------------------------------

def test_iphone_downloads_a_verified_pkpass(server, services, demo, visit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    phone = visit("iphone", locale="fr-FR")
    response = phone.page.goto(f"{server}/l/{issue(services, demo, campaign='spring')}")
    assert response.status == 200 and response.headers["cache-control"] == "no-store"
    assert phone.page.locator("a.wallet").all_inner_texts() == ["Ajouter à Apple Wallet"]
    assert phone.page.locator(".qr").count() == 0
    phone.shot("links-iphone-landing.png")
    data = download_apple(phone)
    pass_json = verify_pkpass(data, ca_file(services), tmp_path)
    assert pass_json["serialNumber"] and pass_json["barcodes"][0]["message"] == "C-1001"
    assert funnel(services) == [("link_opened", "apple"), ("apple_downloaded", "apple")]


def test_android_opens_google_with_a_save_jwt_signed_by_the_service_account(  # type: ignore[no-untyped-def]
        server, settings, services, demo, visit, tmp_path) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with GoogleStandin() as google:
        settings.google_api_url = google.url
        info = factories.google_issuer(services, demo["tenant_id"], google, tmp_path)
        phone = visit("android", locale="de-DE")
        phone.page.goto(f"{server}/l/{issue(services, demo, 'C-1003')}")
        assert phone.page.locator("a.wallet").all_inner_texts() == ["Zu Google Wallet hinzufügen"]
        phone.shot("links-android-landing.png")
        phone.page.click("a.wallet.google")
        phone.page.wait_for_url(SAVE_PREFIX + "**")
        [save] = phone.saves
        public_key = load_pem_private_key(info["private_key"].encode(), None).public_key()
        claims = jwt.decode(save[len(SAVE_PREFIX):], public_key, algorithms=["RS256"],
                            audience="google")
        assert claims["origins"] == [server]
        [ref] = claims["payload"]["loyaltyObjects"]
        assert ref["id"] in google.objects["loyaltyObject"]  # the object exists at Google
        assert google.objects["loyaltyObject"][ref["id"]]["accountName"] == "Lena Müller"
    assert funnel(services) == [("link_opened", "google"), ("google_opened", "google")]


def test_desktop_offers_both_wallets_and_a_qr_code_of_the_same_link(  # type: ignore[no-untyped-def]
        server, services, demo, visit) -> None:
    import qrcode
    import qrcode.image.svg

    token = issue(services, demo, "C-1004")  # Sam reads English
    desk = visit("desktop")
    desk.page.goto(f"{server}/l/{token}")
    assert desk.page.locator("a.wallet.apple").is_visible()
    assert desk.page.locator(".qr svg").is_visible()
    assert desk.page.get_by_role("img", name="QR code that opens this page on a phone").count() == 1
    drawn = desk.page.locator(".qr svg path").get_attribute("d")
    expected = qrcode.make(f"{server}/l/{token}", image_factory=qrcode.image.svg.SvgPathImage,
                           border=2).to_string(encoding="unicode")
    assert f'd="{drawn}"' in expected  # the code encodes this very link
    desk.shot("links-desktop-landing.png")


def test_ipads_get_apple_whatever_their_user_agent(server, services, demo, visit,  # type: ignore[no-untyped-def]
                                                   tmp_path) -> None:
    old = visit("ipad")
    old.page.goto(f"{server}/l/{issue(services, demo, 'C-1004')}")
    assert old.page.locator("a.wallet").all_inner_texts() == ["Add to Apple Wallet"]

    modern = visit("ipados")
    modern.page.goto(f"{server}/l/{issue(services, demo, 'C-1004')}")
    assert modern.page.evaluate("navigator.maxTouchPoints") == 5
    assert modern.page.get_attribute(".page", "data-platform") == "ipad"
    assert not modern.page.locator(".qr").is_visible()
    assert modern.page.locator(".ipad-help").is_visible()
    assert modern.page.locator("a.wallet").first.inner_text() == "Add to Apple Wallet"
    modern.shot("links-ipados-landing.png")
    verify_pkpass(download_apple(modern), ca_file(services), tmp_path)
    # The server was told: this "Mac" is an iPad, so the download counts as Apple.
    assert funnel(services)[-1] == ("apple_downloaded", "apple")
    assert funnel(services)[1] == ("link_opened", "desktop")  # what the server alone could see


def test_a_mac_without_touch_keeps_the_desktop_page(server, services, demo, visit) -> None:  # type: ignore[no-untyped-def]
    mac = visit("mac")
    mac.page.goto(f"{server}/l/{issue(services, demo)}")
    assert mac.page.get_attribute(".page", "data-platform") == "desktop"
    assert mac.page.locator(".qr").is_visible()


# -- bad links ----------------------------------------------------------------------------

def test_tampered_and_expired_links_show_friendly_pages(server, services, demo, visit) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    from app.infra.models import LinkToken, utcnow

    phone = visit("iphone", locale="cs-CZ")
    token = issue(services, demo)
    tampered = token[:-1] + ("x" if token[-1] != "x" else "y")
    response = phone.page.goto(f"{server}/l/{tampered}")
    assert response.status == 403
    assert phone.page.locator("h1").inner_text() == "Tento odkaz nefunguje"
    assert phone.page.get_attribute("html", "lang") == "cs"
    phone.shot("links-tampered-cs.png")
    with services.db.transaction() as session:
        session.execute(LinkToken.__table__.update().values(
            expires_at=utcnow() - dt.timedelta(minutes=1)))
    response = phone.page.goto(f"{server}/l/{token}")
    assert response.status == 410
    # A genuine link speaks its member's language: Camille reads French, whatever the phone.
    assert phone.page.locator("h1").inner_text() == "Ce lien a expiré"
    assert phone.page.get_attribute("html", "lang") == "fr"


# -- what the program offers, and dead links with a way forward (issue 11, items 5 and 6) --

@pytest.fixture()
def smtp(services) -> Iterator[SmtpStandin]:  # type: ignore[no-untyped-def]
    with SmtpStandin() as standin:
        services.settings.smtp_url = standin.url
        services.settings.mail_from = "Nordhaven <cards@brand.example>"
        services.jobs.huey.immediate = True  # queued after commit, sent in-process
        yield standin


def issue_for(services, demo, external_id: str, program: str, **options) -> str:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        row = session.get(Program, demo["program_ids"][program])
        customer = session.scalar(select(Customer).where(Customer.external_id == external_id))
        return links.issue_token(session, row, customer, "download", **options)


def mailed_token(smtp: SmtpStandin, address: str) -> str:
    [(recipients, message)] = smtp.received
    assert recipients == [address]
    [token] = re.findall(r"/l/([A-Za-z0-9_-]{32})", message.get_body(("plain",)).get_content())
    return token


def test_android_without_google_is_told_so_and_can_have_its_card_emailed(  # type: ignore[no-untyped-def]
        server, services, demo, visit, smtp) -> None:
    phone = visit("android", locale="en-US")
    phone.page.goto(f"{server}/l/{issue_for(services, demo, 'C-1003', 'rewards')}")
    assert phone.page.get_attribute("html", "lang") == "de"  # Lena's language
    assert phone.page.locator("a.wallet").count() == 0  # no .pkpass for an Android phone
    assert phone.page.get_by_text("Am Computer?").count() == 0
    assert phone.page.locator(".unavailable").inner_text() == \
        "Diese Karte ist für Google Wallet noch nicht verfügbar."
    phone.shot("links-android-no-google.png")
    phone.page.get_by_role("button", name="Karte per E-Mail schicken").click()
    phone.page.wait_for_url(re.compile(r"/send$"))
    assert phone.page.locator("h1").inner_text() == "Sehen Sie in Ihrem Posteingang nach"
    phone.shot("links-android-card-emailed.png")
    fresh = mailed_token(smtp, "lena.mueller@example.com")
    phone.page.goto(f"{server}/l/{fresh}")
    assert phone.page.locator(".unavailable").count() == 1  # her own card, still no Google
    phone.page.get_by_role("link", name=re.compile("Alle Möglichkeiten")).click()
    assert phone.page.locator(".qr h2").inner_text() == "Auf einem anderen Smartphone?"


@pytest.mark.parametrize("device", ["android", "iphone", "desktop"])
def test_a_dead_link_looks_like_its_program_and_leads_to_a_fresh_link(  # type: ignore[no-untyped-def]
        server, services, demo, visit, smtp, device) -> None:
    import datetime as dt

    from app.infra.models import LinkToken, utcnow

    token = issue_for(services, demo, "C-1003", "club", campaign="winter")
    with services.db.transaction() as session:
        session.execute(LinkToken.__table__.update().values(
            expires_at=utcnow() - dt.timedelta(minutes=1)))
    visitor = visit(device, locale="en-GB")
    response = visitor.page.goto(f"{server}/l/{token}")
    assert response.status == 410
    page = visitor.page
    assert page.get_attribute("html", "lang") == "de"
    assert page.locator("h1").inner_text() == "Dieser Link ist abgelaufen"
    header = page.locator("header.brand")
    assert header.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(18, 52, 86)"
    assert "Nordhaven Club" in header.inner_text()
    assert page.locator("header.brand img").evaluate("i => i.complete && i.naturalWidth > 0")
    text = page.locator("body").inner_text()
    assert "Lena" not in text and "lena" not in page.content().lower()
    visitor.shot(f"links-expired-{device}-de.png")
    page.get_by_role("button", name="Neuen Link per E-Mail schicken").click()
    page.wait_for_url(re.compile(r"/send$"))
    assert page.locator("h1").inner_text() == "Sehen Sie in Ihrem Posteingang nach"
    assert page.locator("header.brand").evaluate(
        "e => getComputedStyle(e).backgroundColor") == "rgb(18, 52, 86)"
    visitor.shot(f"links-fresh-link-sent-{device}-de.png")
    fresh = mailed_token(smtp, "lena.mueller@example.com")
    assert page.goto(f"{server}/l/{fresh}").status == 200


def test_a_dead_enrollment_link_leads_to_the_enrollment_form(server, services, demo,  # type: ignore[no-untyped-def]
                                                             visit) -> None:
    from app.infra.models import LinkToken

    with services.db.transaction(demo["tenant_id"]) as session:
        program = session.get(Program, demo["program_ids"]["rewards"])
        token = links.issue_token(session, program, None, "enroll", campaign="poster",
                                  max_uses=1)
    with services.db.transaction() as session:
        session.execute(LinkToken.__table__.update().values(uses=1))
    desk = visit("desktop", locale="cs-CZ")
    assert desk.page.goto(f"{server}/l/{token}").status == 410
    assert desk.page.locator("h1").inner_text() == "Tento odkaz už byl použit"
    desk.shot("links-used-up-enroll-cs.png")
    desk.page.get_by_role("link", name=re.compile("Přidejte se")).click()
    desk.page.wait_for_url(re.compile(r"/join/demo/rewards\?campaign=poster$"))
    assert desk.page.get_by_label("E-mailová adresa").count() == 1


def test_an_ipad_is_not_offered_google_when_the_program_has_no_apple(  # type: ignore[no-untyped-def]
        server, settings, services, demo, visit, tmp_path) -> None:
    from app.infra.models import AppleIdentity

    with GoogleStandin() as google:
        settings.google_api_url = google.url
        factories.google_issuer(services, demo["tenant_id"], google, tmp_path)
        with services.db.transaction() as session:
            session.execute(AppleIdentity.__table__.delete())
        token = issue(services, demo, "C-1004")
        tablet = visit("ipados")
        tablet.page.goto(f"{server}/l/{token}")
        assert tablet.page.get_attribute(".page", "data-platform") == "ipad"
        assert tablet.page.locator(".ipad-missing").is_visible()
        assert not tablet.page.locator(".lead").is_visible()  # "add it to your wallet": not here
        assert not tablet.page.locator("a.wallet.google").is_visible()
        assert not tablet.page.locator(".qr").is_visible()
        tablet.shot("links-ipados-no-apple.png")
        mac = visit("mac")  # the same page on a real Mac: Google's button and the QR code
        mac.page.goto(f"{server}/l/{token}")
        assert mac.page.locator("a.wallet.google").is_visible()
        assert mac.page.locator(".qr h2").inner_text() == "On a computer?"


# -- enrollment ---------------------------------------------------------------------------

def fill_enrollment(page, email: str) -> None:  # type: ignore[no-untyped-def]
    page.get_by_label("Email address").fill(email)
    page.get_by_label("First name").fill("Noor")
    page.get_by_label("Last name").fill("Haddad")
    page.get_by_label(re.compile("I accept the terms")).check()


def test_enrollment_end_to_end_in_the_browser(server, services, demo, visit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    phone = visit("iphone")
    phone.page.goto(f"{server}/join/demo/rewards?campaign=poster")
    phone.shot("links-join-iphone.png")
    # Submitting nothing: errors next to their fields, focus on the summary.
    phone.page.click("button[type=submit]")
    assert phone.page.evaluate("document.activeElement.id") == "summary"
    email = phone.page.get_by_label("Email address")
    assert email.get_attribute("aria-invalid") == "true"
    assert phone.page.locator("#f-email-error").inner_text() == "Please fill in this field."
    phone.shot("links-join-errors-iphone.png")
    fill_enrollment(phone.page, "Noor.Haddad@Example.org")
    phone.page.click("button[type=submit]")
    phone.page.wait_for_url(re.compile(r"/l/[A-Za-z0-9_-]{32}\?done=welcome$"))
    assert phone.page.locator(".notice").inner_text() == "Welcome! Your card is ready."
    phone.shot("links-enrolled-iphone.png")
    pass_json = verify_pkpass(download_apple(phone), ca_file(services), tmp_path)
    with services.db.session() as session:
        customer = session.scalar(select(Customer).where(Customer.email == "noor.haddad@example.org"))
        assert customer is not None and pass_json["barcodes"][0]["message"] == customer.external_id
        consent = customer.current_consents()["terms"]
        assert consent.granted and consent.text.startswith("I accept the terms")


def test_a_post_without_the_csrf_token_is_refused(server, services, demo, visit) -> None:  # type: ignore[no-untyped-def]
    phone = visit("iphone", locale="de-DE")
    phone.page.goto(f"{server}/join/demo/rewards")
    phone.page.evaluate("document.querySelector('input[name=csrf_token]').remove()")
    fill = phone.page.get_by_label("E-Mail-Adresse")
    fill.fill("no.token@example.org")
    phone.page.get_by_label(re.compile("Ich akzeptiere")).check()
    with phone.page.expect_navigation() as navigation:
        phone.page.click("button[type=submit]")
    assert navigation.value.status == 400
    assert phone.page.locator("h1").inner_text() == "Dieses Formular ist abgelaufen"
    with services.db.session() as session:
        assert session.scalar(select(Customer).where(Customer.email == "no.token@example.org")) \
            is None


def test_crm_down_during_enrollment_then_delivered_once(server, services, demo, visit,  # type: ignore[no-untyped-def]
                                                        monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(CRM_TOKEN_ENV, "Bearer b")
    with CrmStandin(auth_value="Bearer b") as crm:
        with services.db.transaction(demo["tenant_id"]) as session:
            session.add(CrmConnection(
                tenant_id=demo["tenant_id"], kind="http", base_url=crm.url,
                auth_header="Authorization", auth_value_env=CRM_TOKEN_ENV,
                mapping={"external_id": "id", "email": "contact.email",
                         "first_name": "contact.first_name", "consents.terms": "optins.terms"},
                max_staleness_seconds=3600, timeout_seconds=1))
        crm.down("closed")
        phone = visit("iphone")
        phone.page.goto(f"{server}/join/demo/rewards")
        fill_enrollment(phone.page, "offline.signup@example.org")
        phone.page.click("button[type=submit]")
        phone.page.wait_for_url(re.compile(r"/l/[A-Za-z0-9_-]{32}\?done=welcome$"))
        verify_pkpass(download_apple(phone), ca_file(services), tmp_path)  # the card, anyway
        with services.db.session() as session:
            entry = session.scalar(select(CrmOutboxEntry))
            assert entry.operation == "create" and entry.done_at is None
        assert crm_outbox.attempt(services, entry.id).state == "retry"  # still down: kept
        crm.up()
        assert crm_outbox.flush(services, demo["tenant_id"]) == {"done": 1}
        assert crm_outbox.flush(services, demo["tenant_id"]) == {}
        posts = crm.accepted("POST")
        assert len(posts) == 1
        assert posts[0].body["contact"]["email"] == "offline.signup@example.org"
        with services.db.session() as session:
            assert session.get(CrmOutboxEntry, entry.id).done_at is not None

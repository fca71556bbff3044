"""People's pages through the Flask test client: landings per platform, wallet buttons,
funnel events, link errors, enrollment (no enumeration), details forms, CSRF, honeypot,
rate limits, headers, and no personal data in any URL."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from html import unescape
from urllib.parse import urlencode, urlsplit

import jwt
import pytest
from sqlalchemy import func, select

from app.distribution import links
from app.infra.models import (
    AppleIdentity,
    Customer,
    FunnelEvent,
    LinkToken,
    Program,
    Tenant,
    utcnow,
)
from tests import factories
from tests.distribution.test_platforms import (
    ANDROID_CHROME,
    ANDROID_STOCK,
    ANDROID_TABLET,
    DESKTOP_CHROME,
    DESKTOP_FIREFOX,
    FIREFOX_ANDROID,
    IPAD_OLD,
    IPADOS,
    IPHONE_SAFARI,
    WINDOWS_PHONE,
)
from tests.google_standin import DEFAULT_ISSUER_ID, GoogleStandin
from tests.pkpass_check import verify_pkpass

SAVE_PREFIX = "https://pay.google.com/gp/v/save/"
URL_ATTRIBUTES = re.compile(r'\b(?:href|src|action)="([^"]*)"')
TOKEN_PATH = re.compile(r"^/l/([A-Za-z0-9_-]{32})$")
PERSONAL_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                    "X-Robots-Tag": "noindex, nofollow"}
CAMILLE = ("camille.martin@example.com", "Camille", "Martin", "C-1001")


# -- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture()
def standin() -> Iterator[GoogleStandin]:
    with GoogleStandin() as server:
        yield server


@pytest.fixture()
def google(settings, services, demo, standin, tmp_path):  # type: ignore[no-untyped-def]
    """The demo tenant as a Google issuer against the stand-in; the service-account info."""
    settings.google_api_url = standin.url
    return factories.google_issuer(services, demo["tenant_id"], standin, tmp_path)


def issue(services, demo, external_id: str | None = "C-1001", purpose: str = "download",  # type: ignore[no-untyped-def]
          program: str = "rewards", **options) -> str:
    with services.db.transaction(demo["tenant_id"]) as session:
        row = session.get(Program, demo["program_ids"][program])
        customer = None if external_id is None else session.scalar(
            select(Customer).where(Customer.external_id == external_id))
        return links.issue_token(session, row, customer, purpose, **options)


def get(client, url: str, ua: str = IPHONE_SAFARI, lang: str = "en"):  # type: ignore[no-untyped-def]
    return client.get(url, headers={"User-Agent": ua, "Accept-Language": lang})


def html(response) -> str:  # type: ignore[no-untyped-def]
    return response.get_data(as_text=True)


def wallet_buttons(page: str) -> list[str]:
    return re.findall(r'data-wallet="(apple|google)"', page)


def button_url(page: str, wallet: str) -> str:
    match = re.search(rf'data-wallet="{wallet}" href="([^"]+)"', page)
    assert match, f"no {wallet} button"
    return match.group(1)


def events(services, kind: str | None = None) -> list[FunnelEvent]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        query = select(FunnelEvent).order_by(FunnelEvent.id)
        if kind:
            query = query.where(FunnelEvent.kind == kind)
        return list(session.scalars(query))


def install_states(services) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    from app.infra.models import CardInstallState

    with services.db.session() as session:
        return set(session.execute(select(CardInstallState.platform, CardInstallState.state)))


def csrf_token(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, name
    return match.group(1)


def assert_no_personal_data(text: str, *secrets: str) -> None:
    """No URL in the page (or header) carries an email, a name or an external id."""
    urls = URL_ATTRIBUTES.findall(text) if "<" in text else [text]
    assert urls
    for url in urls:
        for secret in secrets:
            assert secret.lower() not in url.lower(), (secret, url)
        assert "@" not in url and "%40" not in url, url


def assert_personal_headers(response) -> None:  # type: ignore[no-untyped-def]
    for name, value in PERSONAL_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers.get(name))


# -- landing per platform -----------------------------------------------------------------

@pytest.mark.parametrize("ua, platform, buttons, qr", [
    (IPHONE_SAFARI, "apple", ["apple"], False),
    (IPAD_OLD, "apple", ["apple"], False),
    (ANDROID_CHROME, "google", ["google"], False),
    (DESKTOP_CHROME, "desktop", ["apple", "google"], True),
    (IPADOS, "desktop", ["apple", "google"], True),  # the page's script handles touch
])
def test_each_platform_gets_its_buttons(client, services, demo, google, ua, platform, buttons,  # type: ignore[no-untyped-def]
                                        qr) -> None:
    token = issue(services, demo, campaign="spring-24")
    response = get(client, f"/l/{token}", ua)
    assert response.status_code == 200
    assert_personal_headers(response)
    page = html(response)
    assert wallet_buttons(page) == buttons
    assert ("<svg" in page) is qr
    assert_no_personal_data(page, *CAMILLE)
    opened = events(services, "link_opened")
    assert [(e.platform, e.campaign) for e in opened] == [(platform, "spring-24")]
    assert opened[0].customer_id is not None and opened[0].card_id is not None
    if platform != "desktop":
        assert "/card?all=1" in page


def test_ipad_script_only_for_mac_user_agents_and_allowed_by_the_csp(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo)
    mac = get(client, f"/l/{token}", IPADOS)
    nonce = re.search(r"'nonce-([^']+)'", mac.headers["Content-Security-Policy"]).group(1)
    assert f'<script nonce="{nonce}">' in html(mac) and "maxTouchPoints" in html(mac)
    assert "<script" not in html(get(client, f"/l/{token}", DESKTOP_CHROME))


def test_without_google_no_google_button_anywhere(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo)
    assert wallet_buttons(html(get(client, f"/l/{token}", DESKTOP_CHROME))) == ["apple"]
    response = get(client, f"/l/{token}/google", ANDROID_CHROME)
    assert response.status_code == 404
    assert "Google Wallet is not available yet" in html(response)


def test_page_language_follows_customer_then_browser(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    jiri = html(get(client, f"/l/{issue(services, demo, 'C-1002')}", lang="de"))
    assert '<html lang="cs">' in jiri and "Přidat do Apple Wallet" in jiri
    with services.db.transaction(demo["tenant_id"]) as session:
        session.scalar(select(Customer).where(Customer.external_id == "C-1004")).locale = None
    sam = html(get(client, f"/l/{issue(services, demo, 'C-1004')}", lang="de-AT,de;q=0.9"))
    assert '<html lang="de">' in sam and "Zu Apple Wallet hinzufügen" in sam


def test_branding_comes_from_the_template(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    page = html(get(client, f"/l/{issue(services, demo)}"))
    assert "--brand-bg: #3a1c40;" in page and 'src="/google/images/loyalty/logo.png"' in page
    with client.get("/google/images/loyalty/logo.png") as logo:
        assert logo.status_code == 200 and logo.mimetype == "image/png"
    club = html(get(client, f"/l/{issue(services, demo, program='club')}"))
    assert "--brand-bg: #123456;" in club and "Nordhaven Club" in club


# -- wallet buttons -----------------------------------------------------------------------

def test_apple_button_serves_a_verified_pkpass(client, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo, campaign="mail-1")
    page = html(get(client, f"/l/{token}"))
    response = get(client, button_url(page, "apple"))
    assert response.status_code == 200
    assert response.mimetype == "application/vnd.apple.pkpass"
    assert response.headers["Content-Disposition"] == 'attachment; filename="rewards.pkpass"'
    assert_personal_headers(response)
    pass_json = verify_pkpass(response.data, services.settings.certs_path / "dev" / "root-ca.pem",
                              tmp_path)
    assert pass_json["barcodes"][0]["message"] == "C-1001"
    [event] = events(services, "apple_downloaded")
    assert (event.platform, event.campaign) == ("apple", "mail-1") and event.card_id
    assert install_states(services) == {("apple", "downloaded")}  # segments and webhooks see it


def test_google_button_redirects_to_a_save_link_signed_by_the_service_account(  # type: ignore[no-untyped-def]
        client, services, demo, google) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    token = issue(services, demo, campaign="mail-2")
    response = get(client, button_url(html(get(client, f"/l/{token}", ANDROID_CHROME)), "google"),
                   ANDROID_CHROME)
    assert response.status_code == 303
    assert_personal_headers(response)
    location = response.headers["Location"]
    assert location.startswith(SAVE_PREFIX)
    public_key = load_pem_private_key(google["private_key"].encode(), None).public_key()
    claims = jwt.decode(location[len(SAVE_PREFIX):], public_key, algorithms=["RS256"],
                        audience="google")
    assert claims["iss"] == google["client_email"] and claims["typ"] == "savetowallet"
    assert claims["origins"] == ["https://wallet.example.test"]
    [saved] = claims["payload"]["loyaltyObjects"]
    assert saved["id"].startswith(DEFAULT_ISSUER_ID + ".")
    [event] = events(services, "google_opened")
    assert (event.platform, event.campaign) == ("google", "mail-2")
    assert install_states(services) == {("google", "downloaded")}


def test_google_unreachable_is_a_friendly_retry_page(client, services, demo, google,  # type: ignore[no-untyped-def]
                                                     standin) -> None:
    standin.fail_next("/walletobjects/v1/", 503, times=50)
    response = get(client, f"/l/{issue(services, demo)}/google", ANDROID_CHROME, lang="fr")
    assert response.status_code == 503
    assert "Google Wallet est injoignable" in html(response)
    assert events(services, "google_opened") == []


# -- link errors --------------------------------------------------------------------------

def _tampered(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


@pytest.mark.parametrize("case, status, title", [
    ("unknown", 403, "Ce lien ne fonctionne pas"),
    ("tampered", 403, "Ce lien ne fonctionne pas"),
    ("malformed", 403, "Ce lien ne fonctionne pas"),
    ("expired", 410, "Ce lien a expiré"),
    ("revoked", 410, "Ce lien n’est plus actif"),
    ("used_up", 410, "Ce lien a déjà été utilisé"),
])
def test_bad_links_get_friendly_localized_pages(client, services, demo, case, status,  # type: ignore[no-untyped-def]
                                                title) -> None:
    token = issue(services, demo, max_uses=1)
    if case == "unknown":
        token = links.new_token()
    elif case == "tampered":
        token = _tampered(token)
    elif case == "malformed":
        token = "short"
    elif case == "expired":
        with services.db.transaction() as session:
            session.execute(LinkToken.__table__.update().values(
                expires_at=utcnow() - dt.timedelta(seconds=1)))
    elif case == "revoked":
        with services.db.transaction() as session:
            links.revoke_tokens(session, tenant_id=demo["tenant_id"], token=token)
    elif case == "used_up":
        assert get(client, f"/l/{token}").status_code == 200
    for path in ("", "/apple", "/google", "/card"):
        response = get(client, f"/l/{token}{path}", lang="fr-FR,fr;q=0.9")
        assert response.status_code == status, path
        if path == "":
            assert title in html(response) and '<html lang="fr">' in html(response)
            assert_personal_headers(response)


def test_a_use_is_an_opening_and_its_page_keeps_working(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo, max_uses=1)
    page = html(get(client, f"/l/{token}", DESKTOP_CHROME))
    apple_url = button_url(page, "apple")
    continuation = TOKEN_PATH.match(apple_url.rsplit("/", 1)[0]).group(1)
    assert continuation != token
    assert get(client, apple_url).status_code == 200
    assert get(client, apple_url).status_code == 200  # button presses are not uses
    assert get(client, f"/l/{token}").status_code == 410  # the original is used up
    assert get(client, f"/l/{continuation}").status_code == 200  # the QR code's link works
    with services.db.session() as session:
        uses = dict(session.execute(select(LinkToken.max_uses, LinkToken.uses)).all())
    assert uses == {1: 1, None: 1}


def test_unlimited_links_are_not_multiplied(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo)
    page = html(get(client, f"/l/{token}", DESKTOP_CHROME))
    assert button_url(page, "apple") == f"/l/{token}/apple"
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(LinkToken)) == 1


def test_enrollment_links_have_no_card(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo, None, "enroll")
    assert get(client, f"/l/{token}/apple").status_code == 404


# -- what each device is told, for what the program offers (issue 11, item 5) --------------

COMPUTER_HEADING = "On a computer?"
#: Every kind of visitor: device, and the wallet the landing leads with.
VISITORS = {"iphone": IPHONE_SAFARI, "ipad": IPAD_OLD, "android": ANDROID_CHROME,
            "android_firefox": FIREFOX_ANDROID, "android_tablet": ANDROID_TABLET,
            "android_stock": ANDROID_STOCK, "desktop": DESKTOP_CHROME, "linux": DESKTOP_FIREFOX,
            "mac": IPADOS, "windows_phone": WINDOWS_PHONE, "unknown": ""}
APPLE_DEVICES = {"iphone", "ipad"}
GOOGLE_DEVICES = {"android", "android_firefox", "android_tablet", "android_stock"}
COMPUTERS = {"desktop", "linux", "mac"}


def _without_apple(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        session.execute(AppleIdentity.__table__.delete())


def _expected_landing(visitor: str, apple: bool, google: bool) -> tuple[list[str], bool, str | None]:
    """Buttons, QR code, and the "not available" notice a visitor must get: written out."""
    offered = [w for w, on in (("apple", apple), ("google", google)) if on]
    if not offered:
        return [], False, "This card cannot be added to a phone's wallet yet."
    if visitor in APPLE_DEVICES:
        return (["apple"], False, None) if apple else \
            ([], False, "This card is not available for Apple Wallet yet.")
    if visitor in GOOGLE_DEVICES:
        return (["google"], False, None) if google else \
            ([], False, "This card is not available for Google Wallet yet.")
    return offered, True, None


@pytest.mark.parametrize("apple, google_on", [(True, True), (True, False), (False, True),
                                              (False, False)])
@pytest.mark.parametrize("visitor", sorted(VISITORS))
def test_every_device_is_told_the_truth_about_each_wallet(  # type: ignore[no-untyped-def]
        request, client, services, demo, visitor, apple, google_on) -> None:
    """No button for a wallet the program lacks, none a phone cannot use, and only a
    computer is asked whether it is a computer."""
    if google_on:
        request.getfixturevalue("google")
    if not apple:
        _without_apple(services, demo)
    token = issue(services, demo, "C-1004")  # Sam reads English
    page = unescape(html(get(client, f"/l/{token}", VISITORS[visitor])))
    buttons, qr, notice = _expected_landing(visitor, apple, google_on)
    assert wallet_buttons(page) == buttons
    assert ("<svg" in page) is qr
    assert (COMPUTER_HEADING in page) is (qr and visitor in COMPUTERS)
    if qr and visitor not in COMPUTERS:
        assert "On another phone?" in page
    shown = re.sub(r"<p [^>]*\bhidden>.*?</p>", "", page)  # what the iPad script may reveal
    if notice:
        assert notice in shown
    else:
        assert "not available for" not in shown and "cannot be added" not in shown
    assert "Email me my card" not in page  # no mailer set up: nothing offered that cannot work
    if visitor in APPLE_DEVICES | GOOGLE_DEVICES:  # "every option" only if there is one
        assert ("/card?all=1" in page) is (apple or google_on)
    # Every option, asked for on a phone: both wallets the program has, and the QR code is
    # for another phone, never "On a computer?".
    every = html(get(client, f"/l/{token}/card?all=1", VISITORS[visitor]))
    assert wallet_buttons(every) == [w for w, on in (("apple", apple), ("google", google_on))
                                     if on]
    assert (COMPUTER_HEADING in every) is (visitor in COMPUTERS and (apple or google_on))


@pytest.fixture()
def smtp(services):  # type: ignore[no-untyped-def]
    from tests.smtp_standin import SmtpStandin

    with SmtpStandin() as standin:
        services.settings.smtp_url = standin.url
        services.settings.mail_from = "Rewards <cards@brand.example>"
        services.jobs.huey.immediate = True  # queued after commit, sent in-process
        yield standin


def _form_fields(page: str, action_shape: str) -> tuple[str, dict[str, str]]:
    match = re.search(rf'<form method="post" action="({action_shape})" class="send">(.*?)</form>',
                      page, re.S)
    assert match, "no send form"
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">',
                             match.group(2)))
    return match.group(1), fields


def _mailed_link(smtp, address: str) -> str:  # type: ignore[no-untyped-def]
    [(recipients, message)] = smtp.received
    assert recipients == [address]
    text = message.get_body(("plain",)).get_content()
    [token] = re.findall(r"https://wallet\.example\.test/l/([A-Za-z0-9_-]+)", text)
    return token


def test_android_without_google_can_have_its_card_emailed(client, services, demo, smtp) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo, "C-1003")  # Lena reads German
    page = html(get(client, f"/l/{token}", ANDROID_CHROME, lang="en"))
    assert wallet_buttons(page) == [] and "<svg" not in page and "Am Computer?" not in page
    assert "Diese Karte ist für Google Wallet noch nicht verfügbar." in page
    action, fields = _form_fields(page, r"/l/[A-Za-z0-9_-]+/send")
    assert action == f"/l/{token}/send"
    answer = client.post(action, data=fields, headers={"User-Agent": ANDROID_CHROME})
    assert answer.status_code == 200
    assert_personal_headers(answer)
    assert "Sehen Sie in Ihrem Posteingang nach" in html(answer)
    assert "lena" not in html(answer).lower()
    fresh = _mailed_link(smtp, "lena.mueller@example.com")
    [(_, message)] = smtp.received
    assert "Sie haben einen Link zu Ihrer Karte" in message.get_body(("plain",)).get_content()
    assert get(client, f"/l/{fresh}", ANDROID_CHROME).status_code == 200
    [requested] = events(services, "link_requested")
    assert requested.customer_id is not None and requested.platform == "google"
    # "Every option": the Apple button and the QR code, for another phone at hand.
    every = html(get(client, f"/l/{token}/card?all=1", ANDROID_CHROME))
    assert wallet_buttons(every) == ["apple"]
    assert "Auf einem anderen Smartphone?" in every and "Am Computer?" not in every


def test_apple_button_without_apple_wallet_says_so(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo)
    _without_apple(services, demo)
    response = get(client, f"/l/{token}/apple", lang="de")
    assert response.status_code == 404
    assert "Apple Wallet ist noch nicht verfügbar" in html(response)
    assert events(services, "apple_downloaded") == []


# -- expired, revoked and used-up links: brand, language, a way forward (issue 11, item 6) --

LENA = ("lena.mueller@example.com", "Lena", "Müller", "C-1003")


def _kill(services, demo, token: str, case: str, client) -> None:  # type: ignore[no-untyped-def]
    if case == "expired":
        with services.db.transaction() as session:
            session.execute(LinkToken.__table__.update()
                            .where(LinkToken.token_hash == links.hash_token(token))
                            .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    elif case == "revoked":
        with services.db.transaction() as session:
            links.revoke_tokens(session, tenant_id=demo["tenant_id"], token=token)
    else:
        assert get(client, f"/l/{token}").status_code == 200


def _assert_nothing_personal(page: str, *personal: str) -> None:
    """Not in a URL, not in the text: the page names the program, never the member."""
    assert_no_personal_data(page, *personal)
    for value in personal:
        assert value.lower() not in page.lower(), value


@pytest.mark.parametrize("case, title", [
    ("expired", "Dieser Link ist abgelaufen"),
    ("revoked", "Dieser Link ist nicht mehr aktiv"),
    ("used_up", "Dieser Link wurde bereits verwendet"),
])
def test_dead_links_are_branded_in_the_members_language_with_a_fresh_link(  # type: ignore[no-untyped-def]
        client, services, demo, smtp, case, title) -> None:
    token = issue(services, demo, "C-1003", program="club", max_uses=1, campaign="spring")
    _kill(services, demo, token, case, client)
    for path in ("", "/card", "/apple", "/google"):
        response = get(client, f"/l/{token}{path}", ANDROID_CHROME, lang="en-US,en;q=0.9")
        assert response.status_code == 410, path
        page = html(response)
        assert title in page and '<html lang="de">' in page  # Lena's own language
        assert "--brand-bg: #123456;" in page  # the club's colours...
        assert 'src="/google/images/membership/logo.png"' in page  # ...and logo
        assert "Nordhaven Club" in page
        _assert_nothing_personal(page, *LENA)
        assert_personal_headers(response)
    action, fields = _form_fields(page, r"/l/[A-Za-z0-9_-]+/send")
    assert action == f"/l/{token}/send" and "Neuen Link per E-Mail schicken" in page
    answer = client.post(action, data=fields, headers={"User-Agent": ANDROID_CHROME})
    assert answer.status_code == 200 and "Sehen Sie in Ihrem Posteingang nach" in html(answer)
    assert "--brand-bg: #123456;" in html(answer)
    _assert_nothing_personal(html(answer), *LENA)
    fresh = _mailed_link(smtp, "lena.mueller@example.com")
    with services.db.session() as session:
        grant = links.resolve_token(session, fresh)
        lena = session.scalar(select(Customer).where(Customer.external_id == "C-1003"))
        dead_id = session.scalar(select(LinkToken.id).where(
            LinkToken.token_hash == links.hash_token(token)))
    assert (grant.customer_id, grant.program_id, grant.campaign) == \
        (lena.id, demo["program_ids"]["club"], "spring")
    [requested] = events(services, "link_requested")
    assert (requested.link_id, requested.customer_id) == (dead_id, lena.id)
    # Asking again at once sends nothing more (one card mail per quarter hour), same answer.
    again = client.post(action, data=fields, headers={"User-Agent": ANDROID_CHROME})
    assert again.status_code == 200 and len(smtp.received) == 1


def test_a_link_with_the_longest_campaign_can_still_ask_for_a_fresh_link(  # type: ignore[no-untyped-def]
        client, services, demo, smtp) -> None:
    """Links take campaigns of 100 characters; the mail outbox must keep them whole."""
    campaign = "c" * 100
    token = issue(services, demo, "C-1003", campaign=campaign)
    _kill(services, demo, token, "expired", client)
    action, fields = _form_fields(html(get(client, f"/l/{token}")), r"/l/[A-Za-z0-9_-]+/send")
    assert client.post(action, data=fields).status_code == 200
    with services.db.session() as session:
        grant = links.resolve_token(session, _mailed_link(smtp, "lena.mueller@example.com"))
    assert grant.campaign == campaign


def test_the_answer_does_not_tell_whether_an_address_is_on_file(client, services, demo,  # type: ignore[no-untyped-def]
                                                                 smtp) -> None:
    with services.db.transaction(demo["tenant_id"]) as session:
        session.scalar(select(Customer).where(Customer.external_id == "C-1004")).email = None
    answers = []
    for external_id in ("C-1001", "C-1004"):
        token = issue(services, demo, external_id)
        _kill(services, demo, token, "revoked", client)
        page = html(get(client, f"/l/{token}", lang="en"))
        action, fields = _form_fields(page, r"/l/[A-Za-z0-9_-]+/send")
        response = client.post(action, data={**fields, "lang": "en"})
        answers.append((response.status_code, _skeleton(html(response))))
    assert answers[0] == answers[1]
    assert len(smtp.received) == 1  # Camille's; Sam has no address


def test_without_a_mailer_the_page_says_whom_to_ask(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo, "C-1003")
    _kill(services, demo, token, "expired", client)
    page = html(get(client, f"/l/{token}", lang="en"))
    assert "bitten Sie Maison Aurore um einen neuen Link" in page
    assert 'class="send"' not in page
    assert client.post(f"/l/{token}/send", data={}).status_code in (400, 404)


def test_a_dead_enrollment_link_leads_to_the_programs_enrollment_form(client, services,  # type: ignore[no-untyped-def]
                                                                      demo, smtp) -> None:
    token = issue(services, demo, None, "enroll", campaign="poster-7")
    _kill(services, demo, token, "expired", client)
    response = get(client, f"/l/{token}", lang="fr-FR,fr;q=0.9")
    page = html(response)
    assert response.status_code == 410 and '<html lang="fr">' in page
    assert 'href="/join/demo/rewards?campaign=poster-7"' in page
    assert "Rejoignez" in page and 'class="send"' not in page
    assert get(client, "/join/demo/rewards?campaign=poster-7").status_code == 200
    assert client.post(f"/l/{token}/send", data={}).status_code in (400, 404)


def test_unknown_and_tampered_links_stay_anonymous(client, services, demo, smtp) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo, "C-1003", program="club")
    for bad in (links.new_token(), _tampered(token)):
        response = get(client, f"/l/{bad}", lang="de")
        page = html(response)
        assert response.status_code == 403 and "Dieser Link funktioniert nicht" in page
        assert "Nordhaven" not in page and "#123456" not in page and 'class="brand"' not in page
        assert 'class="send"' not in page
    csrf = csrf_token(html(get(client, "/join/demo/rewards")))  # a valid token, from a form
    assert client.post(f"/l/{links.new_token()}/send", data={"csrf_token": csrf}).status_code == 403
    assert client.post(f"/l/{_tampered(token)}/send", data={"csrf_token": csrf}).status_code == 403
    assert smtp.received == []


def test_an_expired_signed_link_gets_its_brand_and_a_fresh_link(client, services, demo,  # type: ignore[no-untyped-def]
                                                               smtp) -> None:
    url = _signed(services, demo, "C-1003", expires=int(utcnow().timestamp()) - 60,
                  force=True)
    response = get(client, url, IPHONE_SAFARI, lang="en")
    page = html(response)
    assert response.status_code == 410 and '<html lang="de">' in page
    assert "Dieser Link ist abgelaufen" in page and 'class="brand"' in page
    action, fields = _form_fields(page, "/s/send")
    assert_no_personal_data(page, *LENA)  # no URL names her; the form echoes the signed link
    answer = client.post(action, data=fields, headers={"User-Agent": IPHONE_SAFARI})
    assert answer.status_code == 200 and "Sehen Sie in Ihrem Posteingang nach" in html(answer)
    fresh = _mailed_link(smtp, "lena.mueller@example.com")
    assert get(client, f"/l/{fresh}").status_code == 200
    forged = {**fields, "customer": "C-1001"}
    assert client.post(action, data=forged).status_code == 403
    assert len(smtp.received) == 1


# -- signed links -------------------------------------------------------------------------

def _signed(services, demo, external_id: str = "C-1001", purpose: str = "download",  # type: ignore[no-untyped-def]
            expires: int | None = None, force: bool = False) -> str:
    """A signed link's path and query; ``force``: sign it even if already expired."""
    with services.db.session() as session:
        tenant = session.get(Tenant, demo["tenant_id"])
        program = session.get(Program, demo["program_ids"]["rewards"])
        expires = expires or int(utcnow().timestamp()) + 3600
        if force:
            canonical = links.canonical_string(tenant.slug, program.slug, external_id, purpose,
                                               expires)
            return "/s?" + urlencode({"tenant": tenant.slug, "program": program.slug,
                                      "customer": external_id, "purpose": purpose,
                                      "expires": expires,
                                      "sig": links.sign(tenant.link_secret, canonical)})
        url = links.signed_url("https://wallet.example.test", tenant, program, external_id,
                               purpose, expires)
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_signed_link_is_exchanged_for_a_token_link(client, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    response = get(client, _signed(services, demo) + "&campaign=klaviyo-may")
    assert response.status_code == 303
    assert_personal_headers(response)
    location = response.headers["Location"]
    assert TOKEN_PATH.match(location) and "C-1001" not in location
    page = get(client, location)
    assert page.status_code == 200 and wallet_buttons(html(page)) == ["apple"]
    assert [e.campaign for e in events(services, "link_opened")] == ["klaviyo-may"]
    direct = get(client, _signed(services, demo).replace("/s?", "/s/apple?"))
    assert direct.status_code == 200 and direct.mimetype == "application/vnd.apple.pkpass"


@pytest.mark.parametrize("case, status", [("tampered", 403), ("expired", 410),
                                          ("unknown_customer", 403), ("missing", 403)])
def test_bad_signed_links(client, services, demo, case, status) -> None:  # type: ignore[no-untyped-def]
    url = _signed(services, demo, "C-9999" if case == "unknown_customer" else "C-1001")
    if case == "tampered":
        url = url.replace("C-1001", "C-1002")
    elif case == "expired":
        url = re.sub(r"expires=\d+", "expires=1000", url)  # also breaks the signature...
        with services.db.session() as session:
            tenant = session.get(Tenant, demo["tenant_id"])
            program = session.get(Program, demo["program_ids"]["rewards"])
            canonical = links.canonical_string(tenant.slug, program.slug, "C-1001", "download",
                                               1000)
            url = re.sub(r"sig=[0-9a-f]+", f"sig={links.sign(tenant.link_secret, canonical)}",
                         url)  # ...so it is signed again, already expired
    elif case == "missing":
        url = url.split("&sig=")[0]
    for path in (url, url.replace("/s?", "/s/apple?"), url.replace("/s?", "/s/google?")):
        response = get(client, path, lang="cs")
        assert response.status_code == status, path
        # A genuine link that expired speaks its member's language (Camille: French).
        assert f'<html lang="{"fr" if case == "expired" else "cs"}">' in html(response)


# -- enrollment ---------------------------------------------------------------------------

def _join_form(client, path: str = "/join/demo/rewards", lang: str = "en") -> dict[str, str]:  # type: ignore[no-untyped-def]
    response = get(client, path, lang=lang)
    assert response.status_code == 200
    assert_personal_headers(response)
    page = html(response)
    return {"csrf_token": csrf_token(page), "lang": hidden(page, "lang"),
            "texts": hidden(page, "texts"), "campaign": hidden(page, "campaign")}


def _enroll(client, email: str, path: str = "/join/demo/rewards", **fields: str):  # type: ignore[no-untyped-def]
    form = _join_form(client, path)
    form.update({"email": email, "first_name": "Noor", "last_name": "Haddad",
                 "consent_terms": "yes", **fields})
    return client.post(path, data=form, headers={"User-Agent": IPHONE_SAFARI})


def _skeleton(page: str) -> str:
    """A page with its random parts (tokens, nonces, CSRF) blanked: its structure."""
    page = re.sub(r"/l/[A-Za-z0-9_-]{32}", "/l/TOKEN", page)
    page = re.sub(r'nonce="[^"]+"', 'nonce="N"', page)
    return re.sub(r'name="csrf_token" value="[^"]+"', "CSRF", page)


def test_enrollment_end_to_end_gives_the_card_buttons(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    get(client, "/join/demo/rewards?campaign=instore-qr")
    form = _join_form(client, "/join/demo/rewards?campaign=instore-qr")
    assert form["campaign"] == "instore-qr"
    response = client.post("/join/demo/rewards", data={
        **form, "email": "Noor.Haddad@Example.org", "first_name": "Noor", "consent_terms": "yes"},
        headers={"User-Agent": IPHONE_SAFARI})
    assert response.status_code == 303
    assert_personal_headers(response)
    location = response.headers["Location"]
    assert re.fullmatch(r"/l/[A-Za-z0-9_-]{32}\?done=welcome", location)
    landing = get(client, location)
    page = html(landing)
    assert "Welcome! Your card is ready." in page and wallet_buttons(page) == ["apple"]
    assert_no_personal_data(page, "noor", "haddad", "px_")
    assert get(client, button_url(page, "apple")).status_code == 200
    with services.db.session() as session:
        customer = session.scalar(select(Customer).where(Customer.email == "noor.haddad@example.org"))
        assert customer is not None and customer.first_name == "Noor"
    kinds = [(e.kind, e.campaign) for e in events(services)]
    assert kinds == [("link_opened", "instore-qr"), ("link_opened", "instore-qr"),
                     ("enrolled", "instore-qr"), ("link_opened", "instore-qr"),
                     ("apple_downloaded", "instore-qr")]


def test_known_and_new_emails_are_indistinguishable(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    new = _enroll(client, "someone.new@example.org")
    known = _enroll(client, "camille.martin@example.com")
    assert new.status_code == known.status_code == 303
    shape = r"/l/[A-Za-z0-9_-]{32}\?done=welcome"
    assert re.fullmatch(shape, new.headers["Location"])
    assert re.fullmatch(shape, known.headers["Location"])
    assert sorted(new.headers.keys()) == sorted(known.headers.keys())
    new_page, known_page = (get(client, r.headers["Location"]) for r in (new, known))
    assert new_page.status_code == known_page.status_code == 200
    assert _skeleton(html(new_page)) == _skeleton(html(known_page))
    # Nothing of Camille's reached the page, and her record is unchanged.
    assert_no_personal_data(html(known_page), *CAMILLE)
    assert "1280" not in html(known_page) and "Gold" not in html(known_page)
    with services.db.session() as session:
        camille = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        assert camille.first_name == "Camille" and camille.last_name == "Martin"
    assert [e.kind for e in events(services) if e.kind in ("enrolled", "link_requested")] == \
        ["enrolled", "link_requested"]


def test_form_errors_are_localized_and_linked_to_their_inputs(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    form = _join_form(client, lang="cs")
    response = client.post("/join/demo/rewards", data={**form, "email": "bad", "first_name": "N"})
    assert response.status_code == 422
    page = html(response)
    assert '<html lang="cs">' in page and "Zadejte e-mailovou adresu" in page
    assert re.search(r'id="f-email"[^>]*aria-invalid="true"', page, re.S)
    assert re.search(r'id="f-email"[^>]*aria-describedby="f-email-hint f-email-error"', page, re.S)
    assert 'id="f-email-error"' in page and 'id="c-terms-error"' in page
    assert 'value="bad"' in page  # what the person typed is kept
    assert '<label for="f-email">' in page and '<label for="c-terms">' in page
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Customer)) == 5


def test_post_without_csrf_token_is_refused(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    _join_form(client)  # a session exists, the token is just not sent
    response = client.post("/join/demo/rewards", headers={"Accept-Language": "de"},
                           data={"email": "a@example.org", "consent_terms": "yes"})
    assert response.status_code == 400
    assert "Dieses Formular ist abgelaufen" in html(response)
    assert_personal_headers(response)
    forged = client.post("/join/demo/rewards", data={
        "email": "a@example.org", "consent_terms": "yes", "csrf_token": "forged"})
    assert forged.status_code == 400
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Customer)) == 5


def test_honeypot_pretends_success_and_stores_nothing(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    response = _enroll(client, "bot@example.org", website="http://spam.example")
    assert response.status_code == 303
    assert re.fullmatch(r"/l/[A-Za-z0-9_-]{32}\?done=welcome", response.headers["Location"])
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Customer)) == 5
        assert session.scalar(select(func.count()).select_from(LinkToken)) == 0


def test_changed_consent_wording_is_shown_again_before_it_is_stored(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    form = _join_form(client)
    with services.db.transaction(demo["tenant_id"]) as session:
        session.get(Program, demo["program_ids"]["rewards"]).forms = {"consents": [
            {"kind": "terms", "required": True, "text": {"en": "New terms, read them."}}]}
    response = client.post("/join/demo/rewards", data={**form, "email": "n@example.org",
                                                       "consent_terms": "yes"})
    assert response.status_code == 409
    assert "This form changed while you were filling it in" in html(response)
    assert "New terms, read them." in html(response)
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Customer)) == 5


def test_enrollment_posts_are_rate_limited(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    form = _join_form(client)
    statuses = [client.post("/join/demo/rewards", data={**form, "email": "x"}).status_code
                for _ in range(11)]
    assert statuses == [422] * 10 + [429]
    limited = client.post("/join/demo/rewards", data=form, headers={"Accept-Language": "fr"})
    assert limited.status_code == 429 and "Trop de tentatives" in html(limited)
    assert get(client, "/join/demo/rewards").status_code == 200  # reading the form is not


def test_unknown_program_or_tenant_is_a_friendly_404(client, demo) -> None:  # type: ignore[no-untyped-def]
    for path in ("/join/demo/nope", "/join/nobody/rewards"):
        response = get(client, path, lang="de")
        assert response.status_code == 404 and "Seite nicht gefunden" in html(response)


def test_enroll_link_carries_its_campaign(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo, None, "enroll", campaign="newsletter-5", max_uses=3)
    page = html(get(client, f"/l/{token}"))
    action = re.search(r'<form method="post" action="([^"]+)"', page).group(1)
    response = client.post(action, data={
        "csrf_token": csrf_token(page), "lang": "en", "texts": hidden(page, "texts"),
        "email": "via.link@example.org", "consent_terms": "yes"})
    assert response.status_code == 303
    assert [(e.kind, e.campaign) for e in events(services) if e.kind == "enrolled"] == \
        [("enrolled", "newsletter-5")]


# -- details and consent ------------------------------------------------------------------

def test_enrich_link_prefills_saves_and_shows_the_card(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        session.get(Program, demo["program_ids"]["rewards"]).forms = {
            "fields": {"phone": "optional"}}
    token = issue(services, demo, purpose="enrich", max_uses=1)
    response = get(client, f"/l/{token}")
    page = html(response)
    assert response.status_code == 200 and 'value="Camille"' in page
    assert_no_personal_data(page, *CAMILLE)
    action = re.search(r'<form method="post" action="([^"]+)"', page).group(1)
    assert hidden(page, "lang") == "fr"  # Camille's own language
    saved = client.post(action, data={
        "csrf_token": csrf_token(page), "lang": "fr", "texts": hidden(page, "texts"),
        "first_name": "Camille", "last_name": "Martin-Roy", "phone": "+33 6 12 34 56 78",
        "consent_marketing_email": "yes", "consent_terms": "yes"})
    assert saved.status_code == 303 and saved.headers["Location"] == f"{action}/card?done=saved"
    card_page = html(get(client, saved.headers["Location"]))
    assert "Merci, vos informations sont enregistrées." in card_page
    assert wallet_buttons(card_page) == ["apple"]
    with services.db.session() as session:
        camille = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        assert (camille.last_name, camille.phone) == ("Martin-Roy", "+33 6 12 34 56 78")
    assert [e.kind for e in events(services)] == ["link_opened", "enriched"]


def test_consent_link_shows_only_consents(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo, "C-1003", purpose="consent")
    page = html(get(client, f"/l/{token}", lang="en"))
    assert "Ihre Einwilligungen" in page and 'name="first_name"' not in page
    bad = client.post(f"/l/{token}", data={"csrf_token": csrf_token(page), "lang": "de",
                                           "texts": hidden(page, "texts")})
    assert bad.status_code == 422 and "Bitte stimmen Sie zu" in html(bad)
    good = client.post(f"/l/{token}", data={"csrf_token": csrf_token(page), "lang": "de",
                                            "texts": hidden(page, "texts"),
                                            "consent_terms": "yes"})
    assert good.status_code == 303
    assert [e.kind for e in events(services)] == ["link_opened", "consented"]


def test_download_links_take_no_form_posts(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    token = issue(services, demo)
    page = html(get(client, "/join/demo/rewards"))
    response = client.post(f"/l/{token}", data={"csrf_token": csrf_token(page)})
    assert response.status_code == 405


# -- CSRF coverage ------------------------------------------------------------------------

def test_people_forms_need_csrf_and_machine_endpoints_do_not(app) -> None:  # type: ignore[no-untyped-def]
    from app.web.csrf import csrf

    forms, machines = set(), set()
    for rule in app.url_map.iter_rules():
        if "POST" not in (rule.methods or ()) or rule.endpoint == "static":
            continue
        blueprint = rule.endpoint.rsplit(".", 1)[0]
        exempt = app.blueprints.get(blueprint) in csrf._exempt_blueprints  # Flask-WTF's own set
        (machines if exempt else forms).add(rule.rule)
    assert {"/join/<tenant_slug>/<program_slug>", "/l/<token>"} <= forms
    assert "/passkit/v1/log" in machines and "/google/callback/<issuer_id>" in machines
    assert not any(rule.startswith(("/passkit/", "/google/", "/api/")) for rule in forms), forms


# -- CRM freshness, logs ------------------------------------------------------------------

def _connect_crm(services, demo, url: str, *, max_staleness_seconds: int,  # type: ignore[no-untyped-def]
                 timeout_seconds: int = 1, **mapping: str) -> None:
    """The demo tenant reads its customers from the CRM stand-in at ``url``."""
    from app.infra.models import CrmConnection

    with services.db.transaction(demo["tenant_id"]) as session:
        session.add(CrmConnection(
            tenant_id=demo["tenant_id"], kind="http", base_url=url,
            auth_header="Authorization", auth_value_env="PASSERELLE_TEST_LANDING_CRM",
            mapping={"external_id": "id", "email": "contact.email", **mapping},
            max_staleness_seconds=max_staleness_seconds, timeout_seconds=timeout_seconds))


def test_crm_down_with_a_stale_copy_is_a_retry_page_and_counts_no_use(  # type: ignore[no-untyped-def]
        client, services, demo, monkeypatch) -> None:
    from tests.crm_standin import CrmStandin

    monkeypatch.setenv("PASSERELLE_TEST_LANDING_CRM", "Bearer t")
    with CrmStandin(auth_value="Bearer t") as crm:
        _connect_crm(services, demo, crm.url, max_staleness_seconds=0)
        crm.down("503")
        token = issue(services, demo, max_uses=1)
        response = get(client, f"/l/{token}", lang="fr")
        assert response.status_code == 503
        assert "Veuillez réessayer dans quelques minutes" in html(response)
        assert_personal_headers(response)
        crm.up()
        crm.add({"id": "C-1001", "contact": {"email": "camille.martin@example.com"}})
        assert get(client, f"/l/{token}").status_code == 200  # the failed open did not count


def test_no_personal_data_or_token_in_log_lines(client, services, demo, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    caplog.set_level(logging.DEBUG)
    token = issue(services, demo, max_uses=1)
    get(client, f"/l/{token}")
    get(client, f"/l/{token}")  # used up: logged
    get(client, f"/l/{_tampered(token)}")
    _enroll(client, "camille.martin@example.com")  # known: logged as held
    _enroll(client, "fresh.person@example.org", website="x")  # honeypot: logged
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "held" in text and "honeypot" in text and "use limit" in text
    for secret in (token, _tampered(token), "camille", "fresh.person", "Martin", "Noor"):
        assert secret.lower() not in text.lower(), secret


def test_a_signed_link_visit_reads_the_crm_once(client, services, demo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tests.crm_standin import CrmStandin

    monkeypatch.setenv("PASSERELLE_TEST_LANDING_CRM", "Bearer t")
    with CrmStandin(auth_value="Bearer t") as crm:
        crm.add({"id": "C-1001", "contact": {"email": "camille.martin@example.com",
                                             "first_name": "Camille"}})
        _connect_crm(services, demo, crm.url, max_staleness_seconds=60,
                     first_name="contact.first_name")
        location = get(client, _signed(services, demo)).headers["Location"]
        assert get(client, location).status_code == 200
        reads = [r for r in crm.log if r.method == "GET" and r.path == "/customers/C-1001"]
        assert len(reads) == 1
        assert get(client, f"/l/{issue(services, demo)}").status_code == 200
        assert len([r for r in crm.log if r.method == "GET"]) == 1  # still fresh: not read again


# -- no transaction open while the network answers ----------------------------------------

def test_no_transaction_is_open_while_the_landing_reads_the_crm(  # type: ignore[no-untyped-def]
        client, services, demo, database_url, monkeypatch) -> None:
    from tests.crm_standin import CrmStandin
    from tests.txn_probe import TransactionProbe

    monkeypatch.setenv("PASSERELLE_TEST_LANDING_CRM", "Bearer t")
    probe = TransactionProbe(database_url)
    with CrmStandin(auth_value="Bearer t", on_request=probe) as crm:
        crm.add({"id": "C-1001", "contact": {"email": "camille.martin@example.com"}})
        _connect_crm(services, demo, crm.url, max_staleness_seconds=0, timeout_seconds=5)
        token = issue(services, demo, max_uses=3)  # its use is counted: a row write
        assert get(client, f"/l/{token}").status_code == 200
        # A signed link for someone only the CRM knows: read, then stored locally.
        crm.add({"id": "C-2001", "contact": {"email": "noor.haddad@example.com"}})
        location = get(client, _signed(services, demo, "C-2001")).headers["Location"]
        assert get(client, location).status_code == 200
    assert probe.calls == 2
    assert probe.held == []
    with services.db.session() as session:
        assert session.scalar(select(LinkToken.uses).where(LinkToken.max_uses == 3)) == 1


def test_no_transaction_is_open_while_an_enrollment_asks_the_crm(  # type: ignore[no-untyped-def]
        client, services, demo, database_url, monkeypatch) -> None:
    """The form's CRM lookups (by email, then the member's record) happen before the post
    writes anything, and the request's transaction is committed before each of them."""
    from tests.crm_standin import CrmStandin
    from tests.txn_probe import TransactionProbe

    monkeypatch.setenv("PASSERELLE_TEST_LANDING_CRM", "Bearer t")
    probe = TransactionProbe(database_url)
    with CrmStandin(auth_value="Bearer t", on_request=probe) as crm:
        _connect_crm(services, demo, crm.url, max_staleness_seconds=0, timeout_seconds=5)
        for email in ("new.member@example.org", "only.in.crm@example.org"):
            if email.startswith("only"):
                crm.add({"id": "C-3001", "contact": {"email": email}})  # held, then imported
            form = _join_form(client)
            form.update({"email": email, "first_name": "Noor", "consent_terms": "yes",
                         # the page's id: this post claims it (a row write) before enrolling
                         "submission": hidden(html(get(client, "/join/demo/rewards")),
                                              "submission")})
            assert client.post("/join/demo/rewards", data=form).status_code == 303
    assert probe.calls >= 3  # two lookups by email, one read of the CRM's member
    assert probe.held == []
    with services.db.session() as session:
        assert session.scalar(select(func.count(Customer.id)).where(
            Customer.email.in_(["new.member@example.org", "only.in.crm@example.org"]))) == 2


def test_no_transaction_is_open_while_the_google_button_calls_google(  # type: ignore[no-untyped-def]
        client, services, demo, google, standin, database_url) -> None:
    from tests.txn_probe import TransactionProbe

    probe = TransactionProbe(database_url)
    standin.on_request = probe
    services.google_client_options = {"backoff": 0.01}
    standin.fail_next("/walletobjects/v1/loyaltyObject", 503, times=1)  # a retry, with its sleep
    response = get(client, f"/l/{issue(services, demo)}/google", ANDROID_CHROME)
    assert response.status_code == 303
    assert probe.calls >= 3  # token, class, object (and the retried call)
    assert probe.held == []
    [event] = events(services, "google_opened")
    assert install_states(services) == {("google", "downloaded")}

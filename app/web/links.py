"""People's pages: personal-link landings, wallet buttons, enrollment and details forms.

Routes (no personal data in any of them):

- ``GET /l/<token>``: open a token link. Counts one use, records ``link_opened``,
  then shows what the link is for: the card buttons (download), the details or
  consent form (enrich, consent), or the enrollment form (enroll). ``POST`` the
  same path to submit those forms.
- ``GET /l/<token>/card``: the card buttons again (after a form); not a new use.
- ``GET /l/<token>/apple``: the signed .pkpass. ``GET /l/<token>/google``: 303 to
  Google's save page.
- ``GET /s?tenant=…&sig=…``: a signed link, exchanged for a short-lived token
  link (303), so the external id in it goes no further than this one request.
  ``/s/apple`` and ``/s/google`` with the same parameters serve the wallets
  directly, for buttons inside an email.
- ``GET|POST /join/<tenant>/<program>``: the public enrollment form.
- ``POST /l/<token>/send`` and ``POST /s/send`` (the signed parameters in the
  form): "email me my card", from the page of an expired, revoked or used-up
  link, or from a landing whose wallet the program does not offer. The email
  goes to the address on file (:mod:`app.distribution.card_mail`); the answer is the same
  page whether one was sent or not.

An expired, revoked or used-up link whose token or signature is genuine gets a
page in its program's colours and logo, in the member's language, with a way
to a fresh link: the email above for personal links (when a mailer is set
up), the program's public enrollment form for enrollment links. Unknown,
tampered and malformed links get a plain page that names nothing.

A *use* is an opening of the landing page, not a button press: that is what a
marketer's "max uses" means. A link with a use limit (and every signed link)
therefore hands its page a *continuation* token (same program, customer,
purpose and campaign, no use limit, at most 24 hours): the buttons, the
form's action and the desktop QR code use it, so a page opened once keeps
working, and a reload of the original link counts again.

Every response carries ``Cache-Control: no-store``, ``Referrer-Policy:
no-referrer`` (the token is in the path), ``X-Robots-Tag: noindex`` and a
strict Content-Security-Policy whose only script is the page's own (nonce).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import qrcode
import qrcode.image.svg
from flask import Blueprint, Response, g, redirect, render_template, request
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from app import crm
from app.cards.cards import CardError, apple_configured, build_pkpass, ensure_card
from app.distribution import card_mail, enrollment, i18n, links, platforms
from app.distribution.branding import branding
from app.infra.models import Customer, LinkToken, Program, Tenant, utcnow
from app.services import Services
from app.tracking import funnel, install_state
from app.updates.google_client import GoogleApiError
from app.updates.google_wallet import (
    GoogleNotConfigured,
    GoogleUnavailable,
    save_url,
    service_account_info,
)
from app.wallet.certs import CertificateError
from app.web import errors, private_page_headers, services
from app.web.limits import limiter

bp = Blueprint("links", __name__)
log = logging.getLogger(__name__)

PKPASS_MIMETYPE = "application/vnd.apple.pkpass"
#: Per client IP, shared by every link page and button: a person needs a handful.
LINK_LIMIT = "60 per minute"
#: Per client IP for form posts: a shop's tablet enrolling customers one after
#: the other stays well under it; a script creating records does not.
FORM_LIMIT = "10 per minute;100 per hour"
#: How long a page's continuation link (buttons, QR code, form) and the link
#: given after enrollment stay valid.
CONTINUATION = dt.timedelta(hours=24)
#: A copy read from the CRM this recently is fresh enough for a landing (a signed
#: link's exchange has just loaded it: one CRM request per visit, not two).
JUST_FETCHED = dt.timedelta(seconds=60)
#: The honeypot input: hidden from people, filled by form-spamming bots.
HONEYPOT = "website"
#: Notices a landing may show after a redirect (query ``?done=``): keys, not text.
NOTICES = {"welcome": "landing.enrolled", "saved": "landing.saved"}
_CAMPAIGN = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_STATUS_KEYS = {400: "bad_request", 404: "not_found", 405: "bad_request", 413: "bad_request",
                429: "rate_limited"}
#: Every friendly page (``page.<key>.title`` and ``.text`` messages in each language).
PAGE_KEYS = ("link_invalid", "link_expired", "link_revoked", "link_used_up", "link_sent",
             "crm_stale", "google_unavailable", "google_missing", "apple_missing",
             "card_unavailable", "csrf", "rate_limited", "not_found", "bad_request", "error")
#: Links that can no longer be used but were genuine: their page may show who sent them.
_DEAD = (links.LinkExpired, links.LinkRevoked, links.LinkUsedUp)
_INPUT_TYPES = {"email": "email", "phone": "tel", "birthday": "date"}
_AUTOCOMPLETE = {"email": "email", "first_name": "given-name", "last_name": "family-name",
                 "phone": "tel", "birthday": "bday", "postal_code": "postal-code"}


class PageError(Exception):
    """A friendly page instead of what was asked: ``key`` names its page.* messages."""

    def __init__(self, status: int, key: str) -> None:
        super().__init__(key)
        self.status, self.key = status, key


# -- headers, language, errors ----------------------------------------------------------

@bp.before_request
def _nonce() -> None:
    g.csp_nonce = secrets.token_urlsafe(16)


@bp.after_request
def _personal_headers(response: Response) -> Response:
    nonce = g.get("csp_nonce", "")
    return private_page_headers(response, referrer="no-referrer", csp=(
        "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
        f"script-src 'nonce-{nonce}'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"))


def _lang(customer_locale: str | None = None) -> str:
    return i18n.negotiate(customer_locale, request.headers.get("Accept-Language"))


def _page(template: str, lang: str, status: int = 200, **context: Any) -> tuple[str, int]:
    html = render_template(template, lang=lang, _=i18n.translator(lang),
                           csp_nonce=g.get("csp_nonce", ""), **context)
    return html, status


def _error_page(status: int, key: str) -> tuple[str, int]:
    return _page("link_error.html", _lang(), status, key=key, brand=None)


@bp.errorhandler(links.LinkError)
def _link_error(exc: links.LinkError) -> ResponseReturnValue:
    log.info("refused a link: %s", exc)  # the message names ids, never the token
    if isinstance(exc, links.LinkInvalid):
        return _error_page(403, "link_invalid")
    key = {links.LinkExpired: "link_expired", links.LinkRevoked: "link_revoked",
           links.LinkUsedUp: "link_used_up"}.get(type(exc), "link_invalid")
    if exc.grant is None:
        return _error_page(410, key)
    return _dead_link_page(exc.grant, key)


def _dead_link_page(grant: links.LinkGrant, key: str) -> tuple[str, int]:
    """A genuine link that cannot be used any more: the program's look, the member's
    language, and the way to a fresh link the program offers. Nothing personal is shown."""
    svc = services()
    with svc.db.transaction(grant.tenant_id) as session:
        program = session.get(Program, grant.program_id)
        if program is None:
            return _error_page(410, key)
        customer = session.get(Customer, grant.customer_id) if grant.customer_id else None
        context: dict[str, Any] = {"brand": branding(svc, program)}
        if grant.purpose == "enroll":
            campaign = _campaign(grant.campaign)
            context["join_url"] = (f"/join/{program.tenant.slug}/{program.slug}"
                                   + (f"?campaign={campaign}" if campaign else ""))
        elif card_mail.enabled(svc):
            context.update(_send_form(grant))
        return _page("link_error.html", _lang(customer.locale if customer else None), 410,
                     key=key, **context)


def _send_form(grant: links.LinkGrant) -> dict[str, Any]:
    """Where the "email me my card" button posts, for the link this request came with."""
    if grant.signed:
        source = request.form if request.method == "POST" else request.args
        return {"send_url": f"{links.SIGNED_PATH}/send",
                "send_fields": {name: source.get(name, "") for name in links.SIGNED_PARAMS}}
    token = (request.view_args or {}).get("token", "")
    return {"send_url": f"{links.token_path(token)}/send", "send_fields": {}}


@bp.errorhandler(PageError)
def _page_error(exc: PageError) -> ResponseReturnValue:
    return _error_page(exc.status, exc.key)


@bp.errorhandler(CSRFError)
def _csrf_error(exc: CSRFError) -> ResponseReturnValue:
    log.info("refused a form post on %s: %s", request.endpoint, exc.description)
    return _error_page(400, "csrf")


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> ResponseReturnValue:
    status = exc.code or 500
    return _error_page(status, _STATUS_KEYS.get(status, "error"))


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> ResponseReturnValue:
    if errors.database_away(exc):  # a database restart: "try again in a moment", 503
        errors.log_database_away(exc)
        html, status = _error_page(503, "error")
        return html, status, {"Retry-After": str(errors.DATABASE_RETRY_AFTER)}
    log.exception("unhandled error on %s %s", request.method, request.endpoint)
    return _error_page(500, "error")


# -- small helpers ----------------------------------------------------------------------

def _platform() -> str:
    touch = request.args.get("touch") == "1"
    return platforms.detect(request.headers.get("User-Agent"), touch_hint=touch)


def _campaign(value: str | None) -> str | None:
    """A campaign label from a query or form (not signed: analytics only)."""
    return value if value and _CAMPAIGN.match(value) else None


def _resolve(token: str) -> links.LinkGrant:
    # The tenant is unknown until the link is read: resolve in a plain session.
    with services().db.session() as session:
        return links.resolve_token(session, token)


def _resolve_signed(params: Mapping[str, str]) -> links.LinkGrant:
    with services().db.session() as session:
        return links.resolve_signed(session, params)


def _transaction(grant: links.LinkGrant) -> AbstractContextManager[Session]:
    """The request's transaction, committed before each outbound call (CRM reads, Google's
    API): no row lock is held while the network answers. Pages read the CRM before
    they write, so a CRM that fails leaves nothing half-recorded."""
    return services().db.transaction(grant.tenant_id, commit_before_calls=True)


def _program(session: Session, grant: links.LinkGrant) -> Program:
    program = session.get(Program, grant.program_id)
    if program is None:
        raise links.LinkInvalid(f"program {grant.program_id} is gone")
    return program


def _customer(session: Session, svc: Services, grant: links.LinkGrant, *,
              refresh: bool) -> Customer:
    """The link's customer, fresh from the CRM when ``refresh`` (landing opens).

    Signed links may name someone only the CRM knows yet: loaded here. A CRM
    that is down with a copy too old to show is a friendly 503.
    """
    try:
        if grant.customer_id is None:
            if grant.external_id is None:
                raise PageError(404, "not_found")  # an enrollment link has no card
            customer = crm.load_customer(session, svc, grant.tenant_id, grant.external_id)
            if customer is None:
                raise links.LinkInvalid(f"signed link for an unknown customer (tenant "
                                        f"{grant.tenant_id})", "customer")
            return customer
        customer = session.get(Customer, grant.customer_id)
        if customer is None:
            raise links.LinkInvalid(f"link {grant.link_id}: customer is gone")
        fetched = customer.crm_fetched_at
        if refresh and (fetched is None or utcnow() - fetched > JUST_FETCHED):
            customer = crm.refresh_customer(session, svc, customer)
        return customer
    except crm.CrmStale as exc:
        log.warning("CRM copy too old for tenant %s: %s", grant.tenant_id, exc)
        raise PageError(503, "crm_stale") from None


def _page_token(session: Session, grant: links.LinkGrant, token: str | None, program: Program,
                customer: Customer | None) -> str:
    """The token the page's buttons, form and QR code use (see the module docstring)."""
    if token is not None and not grant.signed:
        max_uses = session.scalar(select(LinkToken.max_uses).where(LinkToken.id == grant.link_id))
        if max_uses is None:
            return token
    expires = utcnow() + CONTINUATION
    if grant.expires_at is not None:
        expires = min(expires, grant.expires_at)
    return links.issue_token(session, program, customer, grant.purpose, campaign=grant.campaign,
                             expires_at=expires)


def _qr_svg(url: str) -> Markup:
    image = qrcode.make(url, image_factory=qrcode.image.svg.SvgPathImage, border=2)
    return Markup(image.to_string(encoding="unicode"))  # our own URL, drawn by the library


def _google_enabled(svc: Services, tenant: Tenant) -> bool:
    try:
        service_account_info(svc, tenant)
    except GoogleNotConfigured:
        return False
    return True


# -- the landing ------------------------------------------------------------------------

def _landing(session: Session, program: Program, customer: Customer, page_token: str,
             platform: str, *, notice: str | None = None, show_all: bool = False
             ) -> tuple[str, int]:
    """The card buttons for this device and what the program offers (platforms.offer)."""
    svc = services()
    ensure_card(session, program, customer)
    user_agent = request.headers.get("User-Agent")
    device = platforms.device(user_agent, touch_hint=request.args.get("touch") == "1")
    offer = platforms.offer(device, apple=apple_configured(session, program),
                            google=_google_enabled(svc, program.tenant), show_all=show_all)
    base = links.token_path(page_token)
    # A wallet this device takes is missing: the member may have the link emailed, to add
    # the card later or on another phone.
    send = offer.missing is not None and card_mail.enabled(svc)
    context: dict[str, Any] = dict(
        brand=branding(svc, program), platform=offer.layout, offer=offer,
        notice=NOTICES.get(notice or ""), show_apple=offer.apple, show_google=offer.google,
        apple_url=f"{base}/apple", google_url=f"{base}/google", all_url=f"{base}/card?all=1",
        qr_svg=_qr_svg(links.link_url(svc.settings.public_url, page_token))
        if offer.qr else None,
        may_be_ipad=offer.layout == "desktop" and offer.qr and platforms.may_be_ipad(user_agent),
        send_url=f"{base}/send" if send else None, send_fields={},
    )
    return _page("landing.html", _lang(customer.locale), **context)


@bp.get("/l/<token>")
@limiter.shared_limit(LINK_LIMIT, scope="links")
def open_link(token: str) -> ResponseReturnValue:
    grant = _resolve(token)
    svc = services()
    platform = _platform()
    with _transaction(grant) as session:
        program = _program(session, grant)
        if grant.purpose == "enroll":
            links.record_use(session, grant)
            page_token = _page_token(session, grant, token, program, None)
            funnel.record(session, grant, "link_opened", platform=platform)
            return _enroll_form(program, links.token_path(page_token), grant.campaign)
        fresh = _customer(session, svc, grant, refresh=True)  # the CRM before any write
        links.record_use(session, grant)
        page_token = _page_token(session, grant, token, program, fresh)
        card = ensure_card(session, program, fresh)
        funnel.record(session, grant, "link_opened", platform=platform, card=card)
        if grant.purpose in ("enrich", "consent"):
            return _details_form(program, fresh, grant.purpose, links.token_path(page_token))
        return _landing(session, program, fresh, page_token, platform,
                        notice=request.args.get("done"))


@bp.get("/l/<token>/card")
@limiter.shared_limit(LINK_LIMIT, scope="links")
def card_page(token: str) -> ResponseReturnValue:
    grant = _resolve(token)
    svc = services()
    with _transaction(grant) as session:
        program = _program(session, grant)
        customer = _customer(session, svc, grant, refresh=False)
        return _landing(session, program, customer, token, _platform(),
                        notice=request.args.get("done"), show_all=request.args.get("all") == "1")


@bp.get("/s")
@limiter.shared_limit(LINK_LIMIT, scope="links")
def open_signed() -> ResponseReturnValue:
    """Exchange a signed link for a token link: the external id stops at this request."""
    grant = _resolve_signed(request.args)
    svc = services()
    with _transaction(grant) as session:
        program = _program(session, grant)
        customer = _customer(session, svc, grant, refresh=False)
        exchanged = replace(grant, campaign=_campaign(request.args.get("campaign")))
        token = _page_token(session, exchanged, None, program, customer)
    return redirect(links.token_path(token), code=303)


# -- wallet buttons ---------------------------------------------------------------------

def _pkpass(grant: links.LinkGrant) -> Response:
    svc = services()
    with _transaction(grant) as session:
        program = _program(session, grant)
        customer = _customer(session, svc, grant, refresh=False)
        card = ensure_card(session, program, customer)
        if not apple_configured(session, program):
            raise PageError(404, "apple_missing")
        try:
            data = build_pkpass(session, card, svc)
        except (CardError, CertificateError, ValueError) as exc:
            log.error("card %s cannot be built: %s", card.serial_number, exc)
            raise PageError(503, "card_unavailable") from None
        install_state.record(session, card, "apple", "downloaded")
        funnel.record(session, grant, "apple_downloaded", platform=_platform(), card=card)
        last_modified, name = card.last_modified, program.slug
    response = Response(data, mimetype=PKPASS_MIMETYPE)
    response.headers["Content-Disposition"] = f'attachment; filename="{name}.pkpass"'
    response.last_modified = last_modified
    return response


def _google(grant: links.LinkGrant) -> ResponseReturnValue:
    svc = services()
    with _transaction(grant) as session:
        program = _program(session, grant)
        customer = _customer(session, svc, grant, refresh=False)
        card = ensure_card(session, program, customer)
        try:
            url = save_url(session, svc, card, origins=[svc.settings.public_url])
        except GoogleNotConfigured:
            raise PageError(404, "google_missing") from None
        except (GoogleUnavailable, GoogleApiError) as exc:
            log.warning("Google save link for card %s failed: %s", card.serial_number, exc)
            raise PageError(503, "google_unavailable") from None
        install_state.record(session, card, "google", "downloaded")
        funnel.record(session, grant, "google_opened", platform=_platform(), card=card)
    return redirect(url, code=303)


@bp.get("/l/<token>/apple")
@limiter.shared_limit(LINK_LIMIT, scope="links")
def apple(token: str) -> Response:
    return _pkpass(_resolve(token))


@bp.get("/l/<token>/google")
@limiter.shared_limit(LINK_LIMIT, scope="links")
def google(token: str) -> ResponseReturnValue:
    return _google(_resolve(token))


@bp.get("/s/apple")
@limiter.shared_limit(LINK_LIMIT, scope="links")
def signed_apple() -> Response:
    return _pkpass(_resolve_signed(request.args))


@bp.get("/s/google")
@limiter.shared_limit(LINK_LIMIT, scope="links")
def signed_google() -> ResponseReturnValue:
    return _google(_resolve_signed(request.args))


# -- "email me my card" -----------------------------------------------------------------

def _send_card_link(grant: links.LinkGrant) -> tuple[str, int]:
    """Queue the member's card email (cooldown permitting); the same page either way."""
    svc = services()
    if grant.purpose not in links.PERSONAL_PURPOSES or not card_mail.enabled(svc):
        raise PageError(404, "not_found")  # never offered: the page has no such button
    with _transaction(grant) as session:
        program = _program(session, grant)
        member = session.get(Customer, grant.customer_id) if grant.customer_id else None
        if member is None and grant.external_id is not None:
            try:  # a signed link may name someone only the CRM knows yet
                member = crm.load_customer(session, svc, grant.tenant_id, grant.external_id)
            except crm.CrmError as exc:
                log.warning("CRM lookup for a link request failed (tenant %s): %s",
                            grant.tenant_id, exc)
        lang = _posted_lang(member.locale if member else None)
        if member is not None:
            card_mail.member_asked(session, svc, program, grant, member, lang=lang,
                                   platform=_platform())
        return _page("link_error.html", lang, 200, key="link_sent", brand=branding(svc, program))


def _dead_or_alive(resolve: Callable[[Session], links.LinkGrant]) -> links.LinkGrant:
    """The grant of a link that is valid, or genuine but expired, revoked or used up."""
    with services().db.session() as session:
        try:
            grant = resolve(session)
        except _DEAD as exc:
            if exc.grant is None:
                raise
            grant = exc.grant
    return grant


@bp.post("/l/<token>/send")
@limiter.limit(FORM_LIMIT)
def send_link(token: str) -> ResponseReturnValue:
    return _send_card_link(_dead_or_alive(lambda session: links.resolve_token(session, token)))


@bp.post("/s/send")
@limiter.limit(FORM_LIMIT)
def signed_send_link() -> ResponseReturnValue:
    return _send_card_link(_dead_or_alive(
        lambda session: links.resolve_signed(session, request.form)))


# -- forms ------------------------------------------------------------------------------

def _form_context(program: Program, lang: str, values: Mapping[str, str],
                  errors: Mapping[str, str]) -> dict[str, Any]:
    config = enrollment.form_config(program)
    texts = enrollment.consent_texts(config, lang, program)
    # Each error points at its input; the first one is where the summary sends focus.
    return dict(brand=branding(services(), program), config=config, texts=texts,
                digest=enrollment.texts_digest(texts), values=values, errors=errors,
                input_types=_INPUT_TYPES, autocomplete=_AUTOCOMPLETE, honeypot=HONEYPOT,
                # New per page: a second post of this page is recognised (enrollment.py).
                submission_field=enrollment.SUBMISSION_FIELD,
                submission=enrollment.new_submission_id())


def _enroll_form(program: Program, action: str, campaign: str | None, *,
                 values: Mapping[str, str] | None = None, errors: Mapping[str, str] | None = None,
                 status: int = 200, lang: str | None = None) -> tuple[str, int]:
    lang = lang or _lang()
    context = _form_context(program, lang, values or {}, errors or {})
    return _page("enroll.html", lang, status, action=action, campaign=campaign or "",
                 fields=["email", *context["config"].shown()], **context)


def _details_form(program: Program, customer: Customer, purpose: str, action: str, *,
                  values: Mapping[str, str] | None = None,
                  errors: Mapping[str, str] | None = None, status: int = 200,
                  lang: str | None = None) -> tuple[str, int]:
    lang = lang or _lang(customer.locale)
    config = enrollment.form_config(program)
    if values is None:
        values = enrollment.prefill(config, customer)
    context = _form_context(program, lang, values, errors or {})
    fields = config.shown() if purpose == "enrich" else []
    return _page("details.html", lang, status, action=action, purpose=purpose, fields=fields,
                 **context)


def _posted_lang(customer_locale: str | None = None) -> str:
    """The language the form was shown in (sent back with it), so its texts match."""
    posted = request.form.get("lang", "")
    return posted if posted in i18n.SUPPORTED else _lang(customer_locale)


def _form_changed(program: Program, lang: str) -> bool:
    """True if the consent wording is not what the page that was filled in showed."""
    config = enrollment.form_config(program)
    texts = enrollment.consent_texts(config, lang, program)
    return request.form.get("texts") != enrollment.texts_digest(texts)


def _pretend_success() -> ResponseReturnValue:
    """A bot filled the honeypot: answer like a success, store nothing."""
    log.info("honeypot filled on %s; nothing stored", request.endpoint)
    return redirect(f"{links.token_path(links.new_token())}?done=welcome", code=303)


def _submit_enrollment(session: Session, program: Program, source: links.LinkGrant | Program,
                       campaign: str | None, action: str) -> ResponseReturnValue:
    """Enroll from the posted form; 303 to the new card's landing (identical for every email)."""
    lang = _posted_lang()
    if _form_changed(program, lang) and not enrollment.is_repeat(session, program, request.form):
        return _enroll_form(program, action, campaign, values=request.form,
                            errors={"form": "error.form_changed"}, status=409, lang=lang)
    config = enrollment.form_config(program)
    texts = enrollment.consent_texts(config, lang, program)
    try:
        result = enrollment.enroll(session, services(), program, request.form, lang, texts,
                                   source=source, campaign=campaign, platform=_platform())
    except enrollment.FormInvalid as exc:
        session.rollback()
        return _enroll_form(program, action, campaign, values=request.form, errors=exc.errors,
                            status=422, lang=lang)
    token = links.issue_token(session, program, result.customer, "download", campaign=campaign,
                              expires_at=utcnow() + CONTINUATION)
    return redirect(f"{links.token_path(token)}?done=welcome", code=303)


@bp.post("/l/<token>")
@limiter.limit(FORM_LIMIT)
def submit_link_form(token: str) -> ResponseReturnValue:
    grant = _resolve(token)
    if request.form.get(HONEYPOT):
        return _pretend_success()
    svc = services()
    action = links.token_path(token)
    with svc.db.transaction(grant.tenant_id, commit_before_calls=True) as session:
        program = _program(session, grant)
        if grant.purpose == "enroll":
            return _submit_enrollment(session, program, grant, grant.campaign, action)
        customer = _customer(session, svc, grant, refresh=False)
        if grant.purpose not in ("enrich", "consent"):
            raise PageError(405, "bad_request")
        lang = _posted_lang(customer.locale)
        if _form_changed(program, lang):
            return _details_form(program, customer, grant.purpose, action, values=request.form,
                                 errors={"form": "error.form_changed"}, status=409, lang=lang)
        texts = enrollment.consent_texts(enrollment.form_config(program), lang, program)
        try:
            enrollment.enrich(session, svc, customer, request.form, lang, texts, program=program,
                              purpose=grant.purpose, source=grant, platform=_platform())
        except enrollment.FormInvalid as exc:
            session.rollback()
            return _details_form(program, customer, grant.purpose, action, values=request.form,
                                 errors=exc.errors, status=422, lang=lang)
    return redirect(f"{action}/card?done=saved", code=303)


def _join_program(session: Session, program_slug: str) -> Program:
    program = session.scalar(select(Program).where(Program.slug == program_slug))
    if program is None:
        raise PageError(404, "not_found")
    return program


def _join_tenant(tenant_slug: str) -> int:
    with services().db.session() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.slug == tenant_slug))
    if tenant_id is None:
        raise PageError(404, "not_found")
    return tenant_id


@bp.route("/join/<tenant_slug>/<program_slug>", methods=["GET", "POST"])
@limiter.limit(FORM_LIMIT, methods=["POST"])
@limiter.shared_limit(LINK_LIMIT, scope="links", methods=["GET"])
def join(tenant_slug: str, program_slug: str) -> ResponseReturnValue:
    """The public enrollment form of a program (campaign from ``?campaign=``)."""
    tenant_id = _join_tenant(tenant_slug)
    if request.method == "POST" and request.form.get(HONEYPOT):
        return _pretend_success()
    action = request.path
    with services().db.transaction(tenant_id, commit_before_calls=True) as session:
        program = _join_program(session, program_slug)
        if request.method == "POST":
            campaign = _campaign(request.form.get("campaign"))
            return _submit_enrollment(session, program, program, campaign, action)
        campaign = _campaign(request.args.get("campaign"))
        funnel.record(session, program, "link_opened", platform=_platform(), campaign=campaign)
        return _enroll_form(program, action, campaign)


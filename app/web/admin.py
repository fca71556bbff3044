"""The admin dashboard under /admin: server-rendered pages for a tenant's staff.

Sign-in: tenant slug, email and password (``app/admin_users.py``). The login
lives in Flask's signed session cookie (HttpOnly, SameSite=Lax, Secure when
the public URL is https; set in ``app/web/csrf.py``) as the user's id, tenant
id and a fingerprint of the password hash, and is checked against the
database on every request: a disabled user, a changed password or a changed
role takes effect at the next click. A login lasts at most
``SESSION_HOURS``. The cookie holds no email or name.

Every dashboard query runs in ``db.tenant_session(<the user's tenant>)``, so a
user can never read another tenant's rows, whatever id is in the URL.

Roles per route (``requires``): viewer reads, marketer builds and exports
segments, creates customers and issues a customer's card link, admin manages
users and webhooks and reads the audit log. Every form carries the CSRF token
(Flask-WTF's CSRFProtect, enabled app-wide); the live segment count is a GET
(it changes nothing).

Failed sign-ins: at most ``LOGIN_IP_LIMIT`` per client address, and after
``LOCKOUT`` failures for one tenant + email the account is locked for the
rest of that window, whatever the password (counters in the app's rate
limiter storage: memory, or Redis shared by all servers).

No personal data in URLs: customer search is a POST (the query, maybe an
email prefix, travels in the body and never reaches access logs); customer
pages are addressed by internal id; segment filters in query strings are
attributes such as tier or points, never identities.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from limits import parse as parse_limit
from sqlalchemy.orm import Session

from app.admin import dashboard
from app.admin import users as admin_users
from app.admin.audit import record as audit_record
from app.admin.users import AdminUserError
from app.cards import cards
from app.customers.customers import CustomerDataError
from app.distribution.links import PERSONAL_PURPOSES
from app.infra import bounds
from app.infra.models import AdminUser, Tenant, utcnow
from app.segments import segments
from app.wallet.template import TemplateError
from app.web import private_page_headers, services
from app.web.limits import limiter
from app.webhooks import outbound as webhooks_out

bp = Blueprint("admin", __name__, url_prefix="/admin")
log = logging.getLogger(__name__)

SESSION_KEY = "admin"
SESSION_HOURS = 12
#: Per client address, every sign-in attempt.
LOGIN_IP_LIMIT = "20 per minute"
#: Failed sign-ins per tenant + email before the account is locked for the window.
LOCKOUT = parse_limit("5 per 15 minutes")
_LOCKOUT_NAMESPACE = "admin-login-failures"
#: Endpoints reachable without a login.
PUBLIC_ENDPOINTS = frozenset({"admin.login"})
#: Export links expire by default after this many days.
EXPORT_LINK_DAYS = 30

F = TypeVar("F", bound=Callable[..., Any])


# -- who is signed in ------------------------------------------------------------------------

class Admin:
    """The signed-in user, as the pages need it (no ORM object outlives the request)."""

    def __init__(self, user: AdminUser, tenant: Tenant) -> None:
        self.id, self.email, self.role = user.id, user.email, user.role
        self.tenant_id, self.tenant_slug, self.tenant_name = tenant.id, tenant.slug, tenant.name

    @property
    def actor(self) -> str:
        return f"user:{self.id}"

    def can(self, role: str) -> bool:
        return admin_users.role_allows(self.role, role)


def current() -> Admin:
    admin: Admin = g.admin
    return admin


def db() -> Session:
    """This request's tenant session (opened after the login check, closed at teardown)."""
    tenant_db: Session = g.admin_db
    return tenant_db


def requires(role: str) -> Callable[[F], F]:
    """The least role that may use a route; also readable as ``view.admin_role``."""
    admin_users.check_role(role)

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not current().can(role):
                abort(403, description=f"This page needs the {role} role.")
            return view(*args, **kwargs)

        vars(wrapper)["admin_role"] = role  # a function attribute, read as view.admin_role
        return cast(F, wrapper)  # wraps() kept the view's name and signature

    return decorate


def _wants_json() -> bool:
    return request.endpoint == "admin.segment_count"


@bp.before_request
def _load_admin() -> Any:
    g.csp_nonce = secrets.token_urlsafe(16)
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    login_data = _session_data()
    if login_data is not None:
        g.admin_db = services().db.tenant_session(login_data["tid"])
        g.admin = _signed_in(g.admin_db, login_data)
    if g.get("admin") is None:
        session.pop(SESSION_KEY, None)
        if _wants_json():
            return jsonify(error="not signed in"), 401
        target = request.full_path if request.method == "GET" else None
        return redirect(url_for("admin.login", next=_safe_next(target)))
    return None


def _session_data() -> dict[str, Any] | None:
    """The login cookie's content if well formed and not older than ``SESSION_HOURS``."""
    data = session.get(SESSION_KEY)
    if not isinstance(data, dict):
        return None
    try:
        parsed: dict[str, Any] = {"uid": int(data["uid"]), "tid": int(data["tid"]), "fp": str(data["fp"]),
                  "at": float(data["at"])}
    except (KeyError, TypeError, ValueError):
        return None
    if time.time() - parsed["at"] > SESSION_HOURS * 3600:
        return None
    return parsed


def _signed_in(tenant_db: Session, data: dict[str, Any]) -> Admin | None:
    """The user the cookie names, if still enabled and with the same password."""
    user = admin_users.get_user(tenant_db, data["tid"], data["uid"])
    tenant = tenant_db.get(Tenant, data["tid"])
    if (user is None or tenant is None or user.disabled_at is not None
            or admin_users.session_fingerprint(user) != data["fp"]):
        return None
    return Admin(user, tenant)


@bp.teardown_request
def _close_db(_exc: BaseException | None) -> None:
    tenant_db = g.pop("admin_db", None)
    if tenant_db is not None:
        tenant_db.close()


@bp.after_request
def _headers(response: Response) -> Response:
    """Pages show personal data: never cached, never framed, only our own script."""
    nonce = g.get("csp_nonce", "")
    return private_page_headers(response, referrer="same-origin", csp=(
        f"default-src 'none'; img-src 'self' data:; style-src 'nonce-{nonce}'; "
        f"script-src 'nonce-{nonce}'; connect-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"))


def _page(template: str, http_status: int = 200, /, **context: Any) -> tuple[str, int]:
    # Positional-only: a template variable named `status` (the webhooks filter) reaches the
    # template instead of becoming the HTTP status.
    return render_template(f"admin/{template}", admin=g.get("admin"),
                           csp_nonce=g.get("csp_nonce", ""), **context), http_status


def _audit(action: str, target: str | None = None, details: dict[str, Any] | None = None,
           *, session_: Session | None = None) -> None:
    audit_record(session_ or db(), current().actor, action, target, details,
                 tenant_id=current().tenant_id)


def _safe_next(target: str | None) -> str | None:
    """Only paths inside the dashboard: never an open redirect to another site."""
    if not target or not target.startswith("/admin/") or target.startswith("//"):
        return None
    if "\\" in target or target.startswith("/admin/login"):
        return None
    return target.rstrip("?") or None


def _int_arg(name: str, low: int = bounds.ROW_ID_MIN, high: int = bounds.ROW_ID_MAX) -> int | None:
    """A whole number from the query or form within [low, high] (row ids by default);
    None when absent, 400 when it is anything else."""
    raw = request.values.get(name, "").strip()
    if not raw:
        return None
    value = bounds.parse_int(raw, low, high)
    if value is None:
        abort(400, description=f"{name} must be a whole number from {low} to {high}.")
    return value


# -- signing in and out -----------------------------------------------------------------------

def _lockout_key(tenant_slug: str, email: str) -> str:
    """Hashed, so the limiter's storage (maybe Redis) holds no email address."""
    raw = f"{tenant_slug.strip().lower()}\n{admin_users.normalize_email(email)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _strategy() -> Any:
    """The limiter's counting strategy over its storage (memory or Redis)."""
    return limiter.limiter


def _locked_for(key: str) -> int | None:
    """Seconds until the account's lockout ends, or None when it is not locked.

    If the limiter's storage (Redis) is down, sign-in stays possible (each attempt
    still costs a full Argon2 verification) rather than locking everyone out.
    """
    strategy = _strategy()
    try:
        if strategy.test(LOCKOUT, _LOCKOUT_NAMESPACE, key):
            return None
        reset = strategy.get_window_stats(LOCKOUT, _LOCKOUT_NAMESPACE, key).reset_time
    except Exception:  # storage errors must not become 500s on sign-in
        log.warning("sign-in lockout storage unavailable", exc_info=True)
        return None
    return max(int(reset - time.time()), 1)


def _count_failure(key: str, *, clear: bool = False) -> None:
    try:
        if clear:
            _strategy().clear(LOCKOUT, _LOCKOUT_NAMESPACE, key)
        else:
            _strategy().hit(LOCKOUT, _LOCKOUT_NAMESPACE, key)
    except Exception:  # see _locked_for
        log.warning("sign-in lockout storage unavailable", exc_info=True)


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(LOGIN_IP_LIMIT, methods=["POST"])
def login() -> Any:
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        data = _session_data()
        if data is not None:
            with services().db.tenant_session(data["tid"]) as check:
                if _signed_in(check, data) is not None:
                    return redirect(next_url or url_for("admin.programs"))
        return _page("login.html", next_url=next_url, values={})
    tenant_slug = request.form.get("tenant", "")
    email = request.form.get("email", "")
    password = request.form.get("password", "")
    values = {"tenant": tenant_slug, "email": email}
    key = _lockout_key(tenant_slug, email)
    locked = _locked_for(key)
    if locked is not None:
        minutes = (locked + 59) // 60
        html, _status = _page("login.html", next_url=next_url, values=values,
                              error=f"Too many failed sign-ins for this account. "
                                    f"Try again in {minutes} minute{'s' if minutes > 1 else ''}.")
        return Response(html, 429, headers={"Retry-After": str(locked)})
    svc = services()
    with svc.db.session() as system:
        tenant_id = admin_users.tenant_id_for(system, tenant_slug)
    # Without such a tenant, authenticate still runs (a dummy hash): timing tells nothing.
    with svc.db.transaction(tenant_id) as tdb:
        outcome = admin_users.authenticate(tdb, tenant_id, email, password)
        if outcome.user is None:
            _count_failure(key)
            if tenant_id is not None and outcome.account_id is not None:
                actor = f"user:{outcome.account_id}"
                audit_record(tdb, actor, "login.failed", actor, {"reason": outcome.reason},
                             tenant_id=tenant_id)
            log.info("admin sign-in refused (%s)", outcome.reason)  # no email in logs
            return _page("login.html", next_url=next_url, values=values,
                         error="The organisation, email or password is not right, "
                               "or the account is disabled.")
        user = outcome.user
        audit_record(tdb, f"user:{user.id}", "login", f"user:{user.id}", tenant_id=tenant_id)
        fingerprint = admin_users.session_fingerprint(user)
        uid = user.id
    _count_failure(key, clear=True)
    session.clear()  # a fresh session at sign-in: nothing carried over from before
    session[SESSION_KEY] = {"uid": uid, "tid": tenant_id, "fp": fingerprint, "at": time.time()}
    return redirect(next_url or url_for("admin.programs"))


@bp.post("/logout")
@requires("viewer")
def logout() -> Any:
    _audit("logout", f"user:{current().id}")
    db().commit()
    session.clear()
    flash("You are signed out.")
    return redirect(url_for("admin.login"))


@bp.get("/")
@requires("viewer")
def index() -> Any:
    return redirect(url_for("admin.programs"))


@bp.route("/account", methods=["GET", "POST"])
@requires("viewer")
def account() -> Any:
    """Change one's own password (the current one is asked for again)."""
    if request.method == "GET":
        return _page("account.html")
    user = admin_users.get_user(db(), current().tenant_id, current().id)
    assert user is not None
    if not admin_users.verify_password(user.password_hash, request.form.get("current", "")):
        return _page("account.html", 400, error="The current password is not right.")
    new = request.form.get("password", "")
    if new != request.form.get("confirm", ""):
        return _page("account.html", 400, error="The two new passwords differ.")
    try:
        admin_users.set_password(user, new)
    except AdminUserError as exc:
        return _page("account.html", 400, error=str(exc))
    _audit("user.password", f"user:{user.id}")
    db().commit()
    # Other sessions of this user end (their fingerprint no longer matches); keep this one.
    session[SESSION_KEY] = {**session[SESSION_KEY], "fp": admin_users.session_fingerprint(user)}
    flash("Your password was changed.")
    return redirect(url_for("admin.account"))


# -- programs, installs, funnel -------------------------------------------------------------

@bp.get("/programs")
@requires("viewer")
def programs() -> Any:
    return _page("programs.html", programs=dashboard.programs(db(), current().tenant_id))


def _program(slug: str) -> Any:
    program = dashboard.program_by_slug(db(), current().tenant_id, slug)
    if program is None:
        abort(404, description="There is no such program.")
    return program


@bp.get("/programs/<slug>")
@requires("viewer")
def program(slug: str) -> Any:
    found = _program(slug)
    summary = next(p for p in dashboard.programs(db(), current().tenant_id) if p.id == found.id)
    charts = dashboard.funnel(db(), current().tenant_id, found.id)
    return _page("program.html", program=summary, charts=charts)


@bp.get("/programs/<slug>/preview.png")
@requires("viewer")
def program_preview(slug: str) -> Any:
    found = _program(slug)
    try:
        png = cards.preview_png(services(), found)  # sample values, as the API's preview
    except TemplateError as exc:
        log.warning("preview of program %s failed: %s", found.slug, exc)
        abort(422, description="This program's template cannot be drawn.")
    return Response(png, mimetype="image/png", headers={"Cache-Control": "private, max-age=60"})


# -- segments --------------------------------------------------------------------------------

_SEGMENT_FIELDS = ("state", "campaign", "tier", "points_min", "points_max",
                   "include_without_consent", "created_from", "created_to", "installed_from",
                   "installed_to")


def _segment_from(values: Any) -> tuple[Any, segments.Segment | None, str | None]:
    """The program and segment a form or query string names, or the error to show."""
    slug = (values.get("program") or "").strip()
    if not slug:
        return None, None, None
    program = dashboard.program_by_slug(db(), current().tenant_id, slug)
    if program is None:
        return None, None, "There is no such program."
    params = {name: values.get(name, "") for name in _SEGMENT_FIELDS if values.get(name)}
    try:
        return program, segments.Segment.from_params(program.id, params), None
    except ValueError as exc:
        return program, None, str(exc)


@bp.get("/segments")
@requires("marketer")
def segment_builder() -> Any:
    """Works without JavaScript: the form GETs this page, which shows the count."""
    program, segment, error = _segment_from(request.args)
    count = segments.count(db(), segment) if segment is not None else None
    tenant_programs = dashboard.programs(db(), current().tenant_id)
    chosen = program.id if program is not None else (
        tenant_programs[0].id if tenant_programs else None)
    return _page("segments.html", 400 if error else 200, programs=tenant_programs,
                 values=request.args, count=count, error=error, states=segments.STATES,
                 campaigns=dashboard.campaigns(db(), current().tenant_id, chosen)
                 if chosen else [], purposes=PERSONAL_PURPOSES, link_days=EXPORT_LINK_DAYS)


@bp.get("/segments/count")
@requires("marketer")
def segment_count() -> Any:
    """The live count: JSON for the builder's fetch()."""
    program, segment, error = _segment_from(request.args)
    if error or segment is None:
        return jsonify(error=error or "choose a program"), 400
    return jsonify(count=segments.count(db(), segment), program=program.slug,
                   segment=segment.to_dict())


@bp.post("/segments/export")
@requires("marketer")
def segment_export() -> Any:
    """Stream the segment as CSV, a fresh personal link per row (links are issued, so POST)."""
    program, segment, error = _segment_from(request.form)
    if error or segment is None or program is None:
        abort(400, description=error or "Choose a program.")
    purpose = request.form.get("link_purpose", "download")
    if purpose not in PERSONAL_PURPOSES:
        abort(400, description="Unknown link purpose.")
    link_campaign = request.form.get("link_campaign", "").strip() or None
    days = _int_arg("link_days", 1, 400) or EXPORT_LINK_DAYS
    expires_at = utcnow() + dt.timedelta(days=days)
    _audit("segment.export", f"program:{program.slug}",
           {"segment": segment.to_dict(), "link_purpose": purpose, "link_campaign": link_campaign,
            "link_days": days})
    db().commit()
    filename = f"{program.slug}-segment-{utcnow():%Y%m%d-%H%M%S}.csv"
    chunks = _export_stream(current().tenant_id, segment, purpose, link_campaign, expires_at)
    return Response(stream_with_context(chunks), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _export_stream(tenant_id: int, segment: segments.Segment, purpose: str,
                   campaign: str | None, expires_at: dt.datetime) -> Iterator[str]:
    """The CSV as it is made: ``segments.iter_export_csv`` reads a thousand customers,
    commits their links and hands over their rows, so memory stays flat and the
    browser receives rows while later ones are made. If the browser goes away,
    the generator is closed and no further links are issued."""
    svc = services()
    with svc.db.tenant_session(tenant_id) as export_db:
        try:
            for text, _rows in segments.iter_export_csv(
                    export_db, svc, segment, link_purpose=purpose, link_campaign=campaign,
                    link_expires_at=expires_at):
                yield text
            export_db.commit()  # end the last read: hold nothing while the response closes
        except GeneratorExit:
            log.info("segment export stopped: the client went away")
            raise


# -- customers -------------------------------------------------------------------------------

@bp.route("/customers", methods=["GET", "POST"])
@requires("viewer")
def customers() -> Any:
    """Search by POST only: the query may be an email prefix, which must not land in logs."""
    if request.method == "GET":
        return _page("customers.html", query="", page=None)
    query = request.form.get("q", "")[:320]
    found = dashboard.search_customers(db(), current().tenant_id, query,
                                       after_id=_int_arg("after_id") or 0)
    return _page("customers.html", query=query, page=found)


@bp.post("/customers/new")
@requires("marketer")
def customer_create() -> Any:
    """A new customer by hand; a refused form comes back with its values and the reason."""
    values = {name: request.form.get(name, "")[:320]
              for name in ("external_id", *dashboard.NEW_CUSTOMER_FIELDS)}
    try:
        created = dashboard.create_customer(db(), current().tenant_id,
                                            values["external_id"].strip(), values)
    except CustomerDataError as exc:
        db().rollback()
        return _page("customers.html", 400, query="", page=None, values=values,
                     create_error=str(exc))
    # A new customer has no card yet: nothing to refresh (updates.customers_changed).
    _audit("customer.create", f"customer:{created.external_id}",
           {"fields": sorted(name for name in dashboard.NEW_CUSTOMER_FIELDS
                             if getattr(created, name))})
    db().commit()
    flash("The customer was created.")
    return redirect(url_for("admin.customer", customer_id=created.id), 303)


def _customer_page(customer_id: int, status: int = 200, **context: Any) -> Any:
    detail = dashboard.customer_detail(db(), current().tenant_id, customer_id)
    if detail is None:
        abort(404, description="There is no such customer.")
    return _page("customer.html", status, detail=detail,
                 programs=dashboard.programs(db(), current().tenant_id), **context)


@bp.get("/customers/<id:customer_id>")
@requires("viewer")
def customer(customer_id: int) -> Any:
    return _customer_page(customer_id)


@bp.post("/customers/<id:customer_id>/link")
@requires("marketer")
def customer_link(customer_id: int) -> Any:
    """Ensure the card in one program and issue a personal download link for it.

    The URL carries the raw token, a bearer secret: it is shown in this response
    only (never in a redirect, flash cookie, log or the audit details).
    """
    detail = dashboard.customer_detail(db(), current().tenant_id, customer_id)
    if detail is None:
        abort(404, description="There is no such customer.")
    program = dashboard.program_by_slug(db(), current().tenant_id,
                                        request.form.get("program", "").strip())
    if program is None:
        abort(400, description="Choose one of this organisation's programs.")
    campaign = request.form.get("campaign", "").strip() or None
    try:
        issued = dashboard.issue_card_link(db(), services().settings.public_url, program,
                                           detail.customer, campaign=campaign)
    except ValueError as exc:
        db().rollback()
        return _customer_page(customer_id, 400, link_error=str(exc),
                              link_values={"program": program.slug, "campaign": campaign or ""})
    _audit("customer.link", f"customer:{detail.customer.external_id}",
           {"program": issued.program, "serial": issued.serial, "purpose": "download",
            "campaign": campaign, "card_created": issued.card_created})
    db().commit()
    return _customer_page(customer_id, issued=issued)


# -- webhooks --------------------------------------------------------------------------------

@bp.get("/webhooks")
@requires("viewer")
def webhooks() -> Any:
    status = request.args.get("status") or None
    if status is not None and status not in dashboard.DELIVERY_STATUSES:
        abort(400, description="Unknown delivery status.")
    rows, older = dashboard.deliveries(db(), current().tenant_id, status=status,
                                       before_id=_int_arg("before"))
    return _page("webhooks.html", subscriptions=dashboard.subscriptions(db(), current().tenant_id),
                 deliveries=rows, older=older, status=status,
                 statuses=dashboard.DELIVERY_STATUSES, event_types=webhooks_out.EVENT_TYPES,
                 new_secret=None)


@bp.get("/webhooks/deliveries/<id:delivery_id>")
@requires("viewer")
def delivery(delivery_id: int) -> Any:
    detail = dashboard.delivery_detail(db(), current().tenant_id, delivery_id)
    if detail is None:
        abort(404, description="There is no such delivery.")
    return _page("delivery.html", detail=detail)


@bp.post("/webhooks/deliveries/<id:delivery_id>/redeliver")
@requires("admin")
def redeliver(delivery_id: int) -> Any:
    if dashboard.delivery_detail(db(), current().tenant_id, delivery_id) is None:
        abort(404, description="There is no such delivery.")
    copy = webhooks_out.redeliver(db(), delivery_id)
    _audit("webhook.redeliver", f"delivery:{delivery_id}", {"new_delivery": copy.id})
    db().commit()
    flash("The event was queued for delivery again.")
    return redirect(url_for("admin.delivery", delivery_id=copy.id))


@bp.post("/webhooks/subscriptions")
@requires("admin")
def subscription_create() -> Any:
    url = request.form.get("url", "").strip()
    types = request.form.getlist("event_types")
    description = request.form.get("description", "").strip()[:200] or None
    try:
        created = webhooks_out.create_subscription(
            db(), current().tenant_id, url, types, description,
            allow_private=services().settings.webhook_allow_private_networks)
    except ValueError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.webhooks"))
    _audit("webhook.subscription.create", f"subscription:{created.id}",
           {"event_types": created.event_types})
    db().commit()
    rows, older = dashboard.deliveries(db(), current().tenant_id)
    # The signing secret is shown once, in this response only (never in a cookie or URL).
    return _page("webhooks.html", subscriptions=dashboard.subscriptions(db(), current().tenant_id),
                 deliveries=rows, older=older, status=None, statuses=dashboard.DELIVERY_STATUSES,
                 event_types=webhooks_out.EVENT_TYPES, new_secret=(created.id, created.secret))


@bp.post("/webhooks/subscriptions/<id:subscription_id>/active")
@requires("admin")
def subscription_active(subscription_id: int) -> Any:
    found = dashboard.subscription(db(), current().tenant_id, subscription_id)
    if found is None:
        abort(404, description="There is no such subscription.")
    found.active = request.form.get("active") == "yes"
    _audit("webhook.subscription.enable" if found.active else "webhook.subscription.disable",
           f"subscription:{found.id}")
    db().commit()
    flash("The subscription was turned " + ("on." if found.active else "off."))
    return redirect(url_for("admin.webhooks"))


# -- health, audit ---------------------------------------------------------------------------

@bp.get("/health")
@requires("viewer")
def health() -> Any:
    return _page("health.html", health=dashboard.health(db(), services(), current().tenant_id))


@bp.get("/audit")
@requires("admin")
def audit() -> Any:
    entries, older = dashboard.audit_entries(db(), current().tenant_id,
                                             before_id=_int_arg("before"))
    return _page("audit.html", entries=entries, older=older)


# -- users -----------------------------------------------------------------------------------

@bp.get("/users")
@requires("admin")
def users() -> Any:
    return _page("users.html", users=admin_users.list_users(db(), current().tenant_id),
                 roles=admin_users.ROLES, values={})


@bp.post("/users")
@requires("admin")
def user_create() -> Any:
    email, role = request.form.get("email", ""), request.form.get("role", "viewer")
    try:
        created = admin_users.create_user(db(), current().tenant_id, email,
                                          request.form.get("password", ""), role)
    except AdminUserError as exc:
        db().rollback()
        return _page("users.html", 400, users=admin_users.list_users(db(), current().tenant_id),
                     roles=admin_users.ROLES, values={"email": email, "role": role},
                     error=str(exc))
    _audit("user.create", f"user:{created.id}", {"role": role})
    db().commit()
    flash("The user was created. Give them their password by a separate channel.")
    return redirect(url_for("admin.users"))


@bp.post("/users/<id:user_id>")
@requires("admin")
def user_update(user_id: int) -> Any:
    """One form per action: role, disable, enable, or a new password."""
    user = admin_users.get_user(db(), current().tenant_id, user_id)
    if user is None:
        abort(404, description="There is no such user.")
    action = request.form.get("action", "")
    try:
        if action == "role":
            role = request.form.get("role", "")
            changed = admin_users.set_role(db(), user, role)
            details: dict[str, Any] = {"role": role}
        elif action == "disable":
            changed, details = admin_users.disable(db(), user), {}
        elif action == "enable":
            changed, details = admin_users.enable(user), {}
        elif action == "password":
            admin_users.set_password(user, request.form.get("password", ""))
            changed, details = True, {}
        else:
            abort(400, description="Unknown action.")
    except AdminUserError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.users"))
    if changed:
        _audit(f"user.{action}", f"user:{user.id}", details)
        db().commit()
        flash("Saved.")
    return redirect(url_for("admin.users"))

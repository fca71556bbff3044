"""What the admin dashboard shows that no other module already answers.

Every function takes a session and the tenant id, and filters by that id
itself even though dashboard requests run in a ``tenant_session`` (which adds
the same filter to every ORM select): a panel that forgot its filter would
still be safe, and one that has it reads correctly in a system session too.

Panels and where their numbers come from:

- programs: ``programs`` with card counts, installs by platform and state
  from ``card_install_states`` (the per-card fold of the install log), and a
  PNG preview of the card front (``app.cards.cards.preview_png``, sample data);
- funnel per campaign: ``app/funnel_stats.py`` (links issued, opened,
  downloaded and installed per platform), drawn as SVG bars;
- health: Apple certificate expiry per pass type identity (``app/certs.py``),
  APNs failures (``push_attempts`` whose outcome is not ``sent``), Google
  Wallet errors (Google push jobs that needed retries: the only trace Google
  failures leave in the database), and queue depth (undone outbox rows:
  push jobs, webhook deliveries, CRM writes, imports);
- customers: search by external id (exact or prefix) or email prefix,
  keyset-paginated by id, and one customer's cards, install states, consents;
  a new customer from the form (``create_customer``), and a card plus a
  personal token link for one customer and program (``issue_card_link``);
- webhooks: subscriptions, deliveries newest first, one delivery's attempts;
- audit log, newest first.

No Flask here: the blueprint in ``app/web/admin.py`` is a thin shell.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.cards import cards
from app.customers.customers import CustomerChanges, check_external_id, upsert_customer
from app.distribution import links
from app.infra.models import (
    AppleIdentity,
    AuditEntry,
    Card,
    CardInstallState,
    Consent,
    CrmOutboxEntry,
    Customer,
    ImportJob,
    LinkToken,
    Program,
    PushAttempt,
    PushJob,
    Registration,
    Tenant,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from app.segments import funnel_stats
from app.wallet import certs
from app.wallet.certs import identity_password

if TYPE_CHECKING:
    from app.services import Services

PLATFORMS = ("apple", "google")
INSTALL_STATES = ("downloaded", "installed", "removed")
#: How far back the health page looks for push failures.
HEALTH_WINDOW = dt.timedelta(days=7)
RECENT_FAILURES = 20
SEARCH_PAGE = 25
LIST_PAGE = 50
DELIVERY_STATUSES = ("pending", "failing", "delivered", "gave_up")


# -- programs and installs -------------------------------------------------------------------

@dataclass
class PlatformInstalls:
    """Cards of one program on one platform, by install state."""

    downloaded: int = 0
    installed: int = 0
    removed: int = 0

    @property
    def total(self) -> int:
        return self.downloaded + self.installed + self.removed


@dataclass
class ProgramSummary:
    id: int
    slug: str
    name: str
    template: str
    cards: int
    installs: dict[str, PlatformInstalls] = field(default_factory=dict)

    @property
    def installed(self) -> int:
        return sum(p.installed for p in self.installs.values())


def programs(session: Session, tenant_id: int) -> list[ProgramSummary]:
    """The tenant's programs with card counts and installs by platform and state."""
    rows = session.execute(select(Program.id, Program.slug, Program.name, Program.template)
                           .where(Program.tenant_id == tenant_id).order_by(Program.name)).all()
    card_counts = dict(session.execute(
        select(Card.program_id, func.count(Card.id)).where(Card.tenant_id == tenant_id)
        .group_by(Card.program_id)).all())
    summaries = {
        pid: ProgramSummary(id=pid, slug=slug, name=name, template=template,
                            cards=card_counts.get(pid, 0),
                            installs={p: PlatformInstalls() for p in PLATFORMS})
        for pid, slug, name, template in rows}
    for program_id, platform, state, count in installs_by_platform(session, tenant_id):
        summary = summaries.get(program_id)
        if summary is not None and platform in summary.installs and state in INSTALL_STATES:
            setattr(summary.installs[platform], state, count)
    return list(summaries.values())


def installs_by_platform(session: Session, tenant_id: int,
                         program_id: int | None = None) -> list[tuple[int, str, str, int]]:
    """(program id, platform, state, cards), from the install-state rows (one per card
    and platform), which the segment counts also read."""
    query = (select(CardInstallState.program_id, CardInstallState.platform,
                    CardInstallState.state, func.count(CardInstallState.id))
             .where(CardInstallState.tenant_id == tenant_id)
             .group_by(CardInstallState.program_id, CardInstallState.platform,
                       CardInstallState.state))
    if program_id is not None:
        query = query.where(CardInstallState.program_id == program_id)
    return [(pid, platform, state, count) for pid, platform, state, count in session.execute(query)]


def program_by_slug(session: Session, tenant_id: int, slug: str) -> Program | None:
    return session.scalar(select(Program).where(Program.tenant_id == tenant_id,
                                                Program.slug == slug))


def campaigns(session: Session, tenant_id: int, program_id: int) -> list[str]:
    """Campaign names links of this program were issued under (for the segment form)."""

    return list(session.scalars(
        select(LinkToken.campaign).where(LinkToken.tenant_id == tenant_id,
                                         LinkToken.program_id == program_id,
                                         LinkToken.campaign.is_not(None))
        .group_by(LinkToken.campaign).order_by(LinkToken.campaign).limit(200)))


# -- funnel per campaign --------------------------------------------------------------------

@dataclass(frozen=True)
class FunnelStep:
    label: str
    count: int
    kind: str = ""  # css class of the bar: "", apple or google


@dataclass(frozen=True)
class FunnelChart:
    """One campaign's funnel: steps in order, each a count of links or people."""

    campaign: str | None
    steps: list[FunnelStep]

    @property
    def rows(self) -> list[tuple[str, int, str]]:
        """(label, count, css class) for the chart macro."""
        return [(step.label, step.count, step.kind) for step in self.steps]


#: funnel_stats column -> (label, bar class), in funnel order.
FUNNEL_STEPS = (("links_issued", "Links issued", ""), ("opened", "Links opened", ""),
                ("downloaded_apple", "Apple · downloaded", "apple"),
                ("downloaded_google", "Google · save opened", "google"),
                ("installed_apple", "Apple · installed", "apple"),
                ("installed_google", "Google · installed", "google"))


def funnel(session: Session, tenant_id: int, program_id: int) -> list[FunnelChart]:
    """One funnel chart per campaign (links without one grouped together), from
    ``app/segments/funnel_stats.py`` so the dashboard and the API agree on every number."""
    if session.scalar(select(Program.id).where(Program.tenant_id == tenant_id,
                                               Program.id == program_id)) is None:
        return []
    return [FunnelChart(row["campaign"], [FunnelStep(label, int(row[column] or 0), kind)
                                          for column, label, kind in FUNNEL_STEPS])
            for row in funnel_stats.funnel(session, program_id, by="campaign")]


# -- health ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CertificateStatus:
    pass_type_identifier: str
    expires_at: dt.datetime | None
    days_left: int | None
    level: str  # ok | warning | error
    problems: list[str]
    apns_auth: str  # certificate | token (.p8)


@dataclass(frozen=True)
class FailureRow:
    when: dt.datetime
    serial: str | None
    status: int | None
    outcome: str
    reason: str | None


@dataclass(frozen=True)
class QueueDepth:
    apple_pushes: int
    google_updates: int
    webhook_deliveries: int
    crm_writes: int
    imports: int
    oldest: dt.datetime | None

    @property
    def total(self) -> int:
        return (self.apple_pushes + self.google_updates + self.webhook_deliveries
                + self.crm_writes + self.imports)


@dataclass(frozen=True)
class Health:
    certificates: list[CertificateStatus]
    apns_outcomes: dict[str, int]  # outcome -> pushes in the window
    apns_failures: list[FailureRow]
    flagged_devices: int  # registrations APNs refused (bad token): no longer pushed
    google_configured: bool
    google_retrying: int  # Google updates waiting for a retry now
    google_failed: int  # Google updates in the window that needed more than one attempt
    google_failures: list[FailureRow]
    queues: QueueDepth
    window_days: int

    @property
    def level(self) -> str:
        levels = {c.level for c in self.certificates}
        if "error" in levels:
            return "error"
        if "warning" in levels or self.apns_failures or self.google_retrying:
            return "warning"
        return "ok"


def certificate_statuses(session: Session, services: Services, tenant_id: int,
                         now: dt.datetime | None = None) -> list[CertificateStatus]:
    """Each Apple identity of the tenant: expiry and everything `certs check` would say."""

    now = now or utcnow()
    settings = services.settings
    result = []
    for identity in session.scalars(select(AppleIdentity)
                                    .where(AppleIdentity.tenant_id == tenant_id)
                                    .order_by(AppleIdentity.pass_type_identifier)):
        try:
            password = identity_password(identity)
        except certs.CertificateError as exc:
            result.append(CertificateStatus(identity.pass_type_identifier, None, None, "error",
                                            [str(exc)], _apns_auth(identity)))
            continue
        problems = certs.check_identity(
            settings.certs_path, identity.certificate_file, identity.key_file, password,
            identity.pass_type_identifier, identity.team_identifier,
            warn_days=settings.cert_warn_days, now=now)
        expires_at = _not_after(Path(settings.certs_path), identity, password)
        days_left = None if expires_at is None else (expires_at - now).days
        messages = [_relative(p.message, settings.certs_path) for p in problems]
        failing = identity.apns_failing_since is not None
        if failing:  # recorded by the push workers' circuit breaker (app/pushes.py)
            messages.insert(0, f"APNs connections fail since "
                               f"{identity.apns_failing_since:%Y-%m-%d %H:%M} UTC; pushes "
                               f"are paused and retried by themselves: {identity.apns_problem}")
        level = ("error" if failing or any(p.level == "error" for p in problems)
                 else "warning" if problems else "ok")
        result.append(CertificateStatus(
            identity.pass_type_identifier, expires_at, days_left, level, messages,
            _apns_auth(identity)))
    return result


def _apns_auth(identity: AppleIdentity) -> str:
    return "token (.p8)" if identity.apns_key_file and identity.apns_key_id else "certificate"


def _not_after(certs_path: Path, identity: AppleIdentity,
               password: bytes | None) -> dt.datetime | None:
    try:
        return certs.load_identity(certs_path, identity.certificate_file, identity.key_file,
                                   password).not_after
    except Exception:  # noqa: BLE001 - check_identity already says what is wrong
        return None


def _relative(message: str, certs_path: Path) -> str:
    """Messages name files under the certificate folder: the server's layout stays private."""
    return message.replace(f"{Path(certs_path)}/", "")


def queue_depth(session: Session, tenant_id: int) -> QueueDepth:
    """Undone outbox rows of the tenant: what the workers still have to do."""
    push = dict(session.execute(
        select(PushJob.channel, func.count(PushJob.id))
        .where(PushJob.tenant_id == tenant_id, PushJob.done_at.is_(None))
        .group_by(PushJob.channel)).all())
    webhooks = session.scalar(select(func.count(WebhookDelivery.id)).where(
        WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.done_at.is_(None))) or 0
    crm = session.scalar(select(func.count(CrmOutboxEntry.id)).where(
        CrmOutboxEntry.tenant_id == tenant_id, CrmOutboxEntry.done_at.is_(None))) or 0
    imports = session.scalar(select(func.count(ImportJob.id)).where(
        ImportJob.tenant_id == tenant_id, ImportJob.status.in_(("queued", "running")))) or 0
    oldest = [session.scalar(select(func.min(model.created_at)).where(
        model.tenant_id == tenant_id, model.done_at.is_(None)))
        for model in (PushJob, WebhookDelivery, CrmOutboxEntry)]
    known = [moment for moment in oldest if moment is not None]
    return QueueDepth(apple_pushes=push.get("apple", 0), google_updates=push.get("google", 0),
                      webhook_deliveries=webhooks, crm_writes=crm, imports=imports,
                      oldest=min(known) if known else None)


def health(session: Session, services: Services, tenant_id: int,
           now: dt.datetime | None = None) -> Health:
    now = now or utcnow()
    since = now - HEALTH_WINDOW
    outcomes = dict(session.execute(
        select(PushAttempt.outcome, func.count(PushAttempt.id))
        .where(PushAttempt.tenant_id == tenant_id, PushAttempt.attempted_at >= since)
        .group_by(PushAttempt.outcome)).all())
    apns_failures = [
        FailureRow(when, serial, status, outcome, reason)
        for when, serial, status, outcome, reason in session.execute(
            select(PushAttempt.attempted_at, Card.serial_number, PushAttempt.status,
                   PushAttempt.outcome, PushAttempt.reason)
            .outerjoin(Card, Card.id == PushAttempt.card_id)
            .where(PushAttempt.tenant_id == tenant_id, PushAttempt.attempted_at >= since,
                   PushAttempt.outcome != "sent")
            .order_by(PushAttempt.attempted_at.desc(), PushAttempt.id.desc())
            .limit(RECENT_FAILURES))]
    flagged = session.scalar(select(func.count(Registration.id)).where(
        Registration.tenant_id == tenant_id, Registration.push_problem.is_not(None))) or 0
    google_jobs = and_(PushJob.tenant_id == tenant_id, PushJob.channel == "google")
    retrying = session.scalar(select(func.count(PushJob.id)).where(
        google_jobs, PushJob.done_at.is_(None), PushJob.attempts >= 1,
        PushJob.not_before.is_not(None))) or 0
    failed_query = (google_jobs, PushJob.attempts > 1, PushJob.created_at >= since)
    failed = session.scalar(select(func.count(PushJob.id)).where(*failed_query)) or 0
    google_failures = [
        FailureRow(created, serial, None, "retrying" if done is None else "done after retries",
                   f"{attempts} attempts")
        for created, serial, done, attempts in session.execute(
            select(PushJob.created_at, Card.serial_number, PushJob.done_at, PushJob.attempts)
            .outerjoin(Card, Card.id == PushJob.card_id)
            .where(or_(and_(*failed_query),
                       and_(google_jobs, PushJob.done_at.is_(None), PushJob.attempts >= 1,
                            PushJob.not_before.is_not(None))))
            .order_by(PushJob.created_at.desc()).limit(RECENT_FAILURES))]
    configured = session.scalar(select(Tenant.google_issuer_id).where(Tenant.id == tenant_id))
    return Health(certificates=certificate_statuses(session, services, tenant_id, now),
                  apns_outcomes=outcomes, apns_failures=apns_failures, flagged_devices=flagged,
                  google_configured=bool(configured), google_retrying=retrying,
                  google_failed=failed, google_failures=google_failures,
                  queues=queue_depth(session, tenant_id), window_days=HEALTH_WINDOW.days)


# -- customers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CustomerRow:
    id: int
    external_id: str
    email: str | None
    name: str
    created_at: dt.datetime


@dataclass(frozen=True)
class CustomerPage:
    rows: list[CustomerRow]
    next_after: int | None  # give as ``after_id`` for the next page


def _like_prefix(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def search_customers(session: Session, tenant_id: int, query: str, *, after_id: int = 0,
                     limit: int | None = None) -> CustomerPage:
    """Customers whose external id equals or starts with ``query``, or whose email starts
    with it (case-insensitive); all customers when it is empty. By id, ``limit`` a page."""
    limit = limit or SEARCH_PAGE
    text = query.strip()
    where = [Customer.tenant_id == tenant_id, Customer.id > after_id]
    if text:
        prefix = _like_prefix(text)
        where.append(or_(Customer.external_id == text,
                         Customer.external_id.like(prefix, escape="\\"),
                         func.lower(Customer.email).like(_like_prefix(text.lower()),
                                                         escape="\\")))
    customers = list(session.execute(
        select(Customer.id, Customer.external_id, Customer.email, Customer.first_name,
               Customer.last_name, Customer.created_at)
        .where(*where).order_by(Customer.id).limit(limit + 1)))
    rows = [CustomerRow(cid, external_id, email,
                        " ".join(part for part in (first, last) if part), created)
            for cid, external_id, email, first, last, created in customers[:limit]]
    return CustomerPage(rows, rows[-1].id if len(customers) > limit else None)


@dataclass(frozen=True)
class CardRow:
    serial: str
    program: str
    version: int
    voided: bool
    states: dict[str, str]  # platform -> downloaded | installed | removed


@dataclass(frozen=True)
class CustomerDetail:
    customer: Customer
    cards: list[CardRow]
    consents: list[Consent]  # the current decision per kind


def customer_detail(session: Session, tenant_id: int, customer_id: int) -> CustomerDetail | None:
    customer = session.scalar(select(Customer).where(Customer.tenant_id == tenant_id,
                                                     Customer.id == customer_id))
    if customer is None:
        return None
    states: dict[int, dict[str, str]] = {}
    for card_id, platform, state in session.execute(
            select(CardInstallState.card_id, CardInstallState.platform, CardInstallState.state)
            .join(Card, Card.id == CardInstallState.card_id)
            .where(Card.customer_id == customer.id, CardInstallState.tenant_id == tenant_id)):
        states.setdefault(card_id, {})[platform] = state
    rows = [CardRow(serial, slug, version, voided, states.get(card_id, {}))
            for card_id, serial, slug, version, voided in session.execute(
                select(Card.id, Card.serial_number, Program.slug, Card.version, Card.voided)
                .join(Program, Program.id == Card.program_id)
                .where(Card.customer_id == customer.id, Card.tenant_id == tenant_id)
                .order_by(Program.slug))]
    consents = sorted(customer.current_consents().values(), key=lambda c: c.kind)
    return CustomerDetail(customer, rows, consents)


NEW_CUSTOMER_FIELDS = ("email", "first_name", "last_name", "locale")


def create_customer(session: Session, tenant_id: int, external_id: str,
                    values: dict[str, str]) -> Customer:
    """A new customer from the dashboard form; ``CustomerDataError`` names what is wrong.

    Blank fields stay empty; the rest is checked by the one customer upsert. An
    external id or email already used in the tenant is refused, and nothing is
    half saved. Nothing is committed.
    """
    external_id = check_external_id(external_id)
    fields = {name: values[name] for name in NEW_CUSTOMER_FIELDS
              if (values.get(name) or "").strip()}
    result = upsert_customer(session, tenant_id, external_id, CustomerChanges(fields),
                             source="dashboard", only_create=True)
    assert result is not None
    return result.customer


@dataclass(frozen=True)
class IssuedLink:
    url: str  # holds the raw token: show it once, never store or log it
    serial: str
    program: str
    card_created: bool


def issue_card_link(session: Session, public_url: str, program: Program, customer: Customer,
                    *, campaign: str | None = None) -> IssuedLink:
    """Make sure ``customer`` has a card in ``program`` and issue a personal download link.

    ``ValueError`` if the campaign is too long. Nothing is committed.
    """
    if program.tenant_id != customer.tenant_id:
        raise ValueError("the program and the customer belong to different tenants")
    existed = session.scalar(select(Card.id).where(Card.program_id == program.id,
                                                   Card.customer_id == customer.id))
    card = cards.ensure_card(session, program, customer)
    token = links.issue_token(session, program, customer, "download", campaign=campaign)
    return IssuedLink(links.link_url(public_url, token), card.serial_number, program.slug,
                      existed is None)


# -- webhooks --------------------------------------------------------------------------------

def subscriptions(session: Session, tenant_id: int) -> list[WebhookSubscription]:
    return list(session.scalars(select(WebhookSubscription)
                                .where(WebhookSubscription.tenant_id == tenant_id)
                                .order_by(WebhookSubscription.id)))


def subscription(session: Session, tenant_id: int,
                 subscription_id: int) -> WebhookSubscription | None:
    return session.scalar(select(WebhookSubscription).where(
        WebhookSubscription.tenant_id == tenant_id, WebhookSubscription.id == subscription_id))


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    event_type: str
    event_id: str
    url: str
    created_at: dt.datetime
    attempts: int
    last_status: int | None
    last_error: str | None
    status: str  # pending | failing | delivered | gave_up


def _delivery_status(done_at: dt.datetime | None, outcome: str | None, attempts: int) -> str:
    if done_at is None:
        return "failing" if attempts > 0 else "pending"
    return outcome or "delivered"


def _status_filter(status: str) -> Any:
    if status == "pending":
        return and_(WebhookDelivery.done_at.is_(None), WebhookDelivery.attempts == 0)
    if status == "failing":
        return and_(WebhookDelivery.done_at.is_(None), WebhookDelivery.attempts > 0)
    if status == "gave_up":
        return WebhookDelivery.outcome == "gave_up"
    return and_(WebhookDelivery.done_at.is_not(None),
                or_(WebhookDelivery.outcome.is_(None), WebhookDelivery.outcome != "gave_up"))


def deliveries(session: Session, tenant_id: int, *, status: str | None = None,
               before_id: int | None = None,
               limit: int = LIST_PAGE) -> tuple[list[DeliveryRow], int | None]:
    """Newest first; the second value is the ``before_id`` of the next (older) page."""
    if status is not None and status not in DELIVERY_STATUSES:
        raise ValueError(f"status must be one of {', '.join(DELIVERY_STATUSES)}")
    query = (select(WebhookDelivery, WebhookSubscription.url)
             .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
             .where(WebhookDelivery.tenant_id == tenant_id)
             .order_by(WebhookDelivery.id.desc()).limit(limit + 1))
    if status is not None:
        query = query.where(_status_filter(status))
    if before_id is not None:
        query = query.where(WebhookDelivery.id < before_id)
    found = session.execute(query).all()
    rows = [DeliveryRow(d.id, d.event_type, d.event_id, url, d.created_at, d.attempts,
                        d.last_status, d.last_error,
                        _delivery_status(d.done_at, d.outcome, d.attempts))
            for d, url in found[:limit]]
    return rows, rows[-1].id if len(found) > limit else None


@dataclass(frozen=True)
class DeliveryDetail:
    row: DeliveryRow
    payload: dict[str, Any]
    attempts: list[WebhookAttempt]


def delivery_detail(session: Session, tenant_id: int, delivery_id: int) -> DeliveryDetail | None:
    found = session.execute(
        select(WebhookDelivery, WebhookSubscription.url)
        .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
        .where(WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.id == delivery_id)).first()
    if found is None:
        return None
    d, url = found
    attempts = list(session.scalars(select(WebhookAttempt).where(
        WebhookAttempt.tenant_id == tenant_id, WebhookAttempt.delivery_id == d.id)
        .order_by(WebhookAttempt.attempted_at, WebhookAttempt.id)))
    row = DeliveryRow(d.id, d.event_type, d.event_id, url, d.created_at, d.attempts,
                      d.last_status, d.last_error,
                      _delivery_status(d.done_at, d.outcome, d.attempts))
    return DeliveryDetail(row, dict(d.payload or {}), attempts)


# -- audit log -------------------------------------------------------------------------------

def audit_entries(session: Session, tenant_id: int, *, before_id: int | None = None,
                  limit: int = LIST_PAGE) -> tuple[list[AuditEntry], int | None]:
    query = (select(AuditEntry).where(AuditEntry.tenant_id == tenant_id)
             .order_by(AuditEntry.id.desc()).limit(limit + 1))
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    found = list(session.scalars(query))
    return found[:limit], found[limit - 1].id if len(found) > limit else None

"""The domain model: tenants, their Apple identities, programs, customers, consents, cards.

Typed SQLAlchemy 2 declarative models. Every row that belongs to a brand
carries ``tenant_id`` through :class:`TenantOwned`; :mod:`app.infra.db` uses that
marker to scope every query of a tenant session.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column, relationship

# Named constraints make Alembic migrations deterministic across databases.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


JSONDict = MutableDict.as_mutable(JSON().with_variant(JSONB(), "postgresql"))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_serial_number() -> str:
    """128 random bits, URL-safe: unguessable and safe in Apple's URL paths."""
    return secrets.token_urlsafe(16)


def new_authentication_token() -> str:
    """Apple requires >= 16 characters; 43 URL-safe characters carry 256 bits."""
    return secrets.token_urlsafe(32)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dt.datetime: UTCDateTime(),
        dt.date: Date(),
        dict[str, Any]: JSONDict,
    }


class TenantOwned:
    """Marker mixin: the row belongs to one tenant and is invisible to the others."""

    @declared_attr
    def tenant_id(cls) -> Mapped[int]:  # declared_attr takes the class
        return mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)


class OutboxRow:
    """The columns every outbox table shares (push jobs, CRM writes, card mails, webhook
    deliveries), which app/outbox.py leases, retries and sweeps: queued at
    ``created_at``; ``attempts`` so far; not before ``not_before`` (a retry's backoff);
    leased by a worker until ``claimed_until``; finished at ``done_at``."""

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime | None]
    claimed_until: Mapped[dt.datetime | None]
    done_at: Mapped[dt.datetime | None]


class Tenant(Base):
    """A brand running one or more loyalty programs."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    # Key for links an email tool computes itself (HMAC-SHA256). Two are kept
    # so a secret can be rotated without breaking emails already sent.
    link_secret: Mapped[str] = mapped_column(String(128), default=lambda: secrets.token_urlsafe(32))
    link_secret_previous: Mapped[str | None] = mapped_column(String(128))
    google_issuer_id: Mapped[str | None] = mapped_column(String(64))
    google_service_account_file: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    apple_identities: Mapped[list[AppleIdentity]] = relationship(back_populates="tenant")
    programs: Mapped[list[Program]] = relationship(back_populates="tenant")

    def __repr__(self) -> str:
        return f"<Tenant {self.slug}>"


class AppleIdentity(TenantOwned, Base):
    """A Pass Type ID certificate a tenant signs with (files live under certs_path)."""

    __tablename__ = "apple_identities"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Globally unique: Apple issues each pass type identifier to one team.
    pass_type_identifier: Mapped[str] = mapped_column(String(255), unique=True)
    team_identifier: Mapped[str] = mapped_column(String(32))
    # Paths relative to certs_path. Either a PEM certificate + PEM key, or a .p12.
    certificate_file: Mapped[str] = mapped_column(String(500))
    key_file: Mapped[str | None] = mapped_column(String(500))
    # Name of the environment variable holding the key/.p12 password: never the password.
    password_env: Mapped[str | None] = mapped_column(String(128))
    # Optional APNs token authentication (.p8 key of the same team), instead of the
    # certificate: path relative to certs_path, and the key's id from Apple.
    apns_key_file: Mapped[str | None] = mapped_column(String(500))
    apns_key_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Written by the push workers while connecting to APNs with this identity fails (a
    # refused certificate, APNs unreachable), cleared once a connection works again:
    # what `certs check`, /healthz and the dashboard report (app/pushes.py).
    apns_failing_since: Mapped[dt.datetime | None]
    apns_problem: Mapped[str | None] = mapped_column(String(200))
    apns_next_attempt_at: Mapped[dt.datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="apple_identities")


class Program(TenantOwned, Base):
    """A card a tenant issues, e.g. "Gold Club loyalty card"."""

    __tablename__ = "programs"
    __table_args__ = (UniqueConstraint("tenant_id", "slug"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    template: Mapped[str] = mapped_column(String(64))
    pass_type_identifier: Mapped[str] = mapped_column(String(255))
    team_identifier: Mapped[str] = mapped_column(String(32))
    # Template variable -> customer attribute name, e.g. {"points": "loyalty_points"}.
    field_mapping: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Template option overrides, e.g. {"barcode_format": "pdf417", "colors": {...}}.
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Enrollment/enrichment form: {"fields": {"first_name": "optional", ...},
    # "consents": [{"kind": "marketing_email", "required": false, "text": {...}}]}.
    forms: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    tenant: Mapped[Tenant] = relationship(back_populates="programs")

    def __repr__(self) -> str:
        return f"<Program {self.slug}>"


class Customer(TenantOwned, Base):
    """A loyalty member as the brand's CRM knows them."""

    __tablename__ = "customers"
    __table_args__ = (
        UniqueConstraint("tenant_id", "external_id"),
        UniqueConstraint("tenant_id", "email"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128))
    email: Mapped[str | None] = mapped_column(String(320))
    first_name: Mapped[str | None] = mapped_column(String(200))
    last_name: Mapped[str | None] = mapped_column(String(200))
    locale: Mapped[str | None] = mapped_column(String(35))
    phone: Mapped[str | None] = mapped_column(String(40))
    birthday: Mapped[dt.date | None]
    # Free CRM attributes: points, tier, referral id, ...
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # When the record was last read fresh from an external CRM (None: never, or built-in).
    crm_fetched_at: Mapped[dt.datetime | None]

    consents: Mapped[list[Consent]] = relationship(
        back_populates="customer", order_by="Consent.recorded_at", cascade="all, delete-orphan"
    )
    cards: Mapped[list[Card]] = relationship(back_populates="customer", cascade="all, delete-orphan")

    @property
    def full_name(self) -> str:
        return " ".join(part for part in (self.first_name, self.last_name) if part)

    def current_consents(self) -> dict[str, Consent]:
        """The latest consent record per kind (records are append-only history)."""
        latest: dict[str, Consent] = {}
        for consent in self.consents:  # in time order once loaded; appended ones last
            held = latest.get(consent.kind)
            if (held is None or consent.recorded_at is None or held.recorded_at is None
                    or consent.recorded_at >= held.recorded_at):
                latest[consent.kind] = consent
        return latest

    def __repr__(self) -> str:
        return f"<Customer {self.id}>"  # no personal data in logs


class Consent(TenantOwned, Base):
    """One consent decision. Append-only, so the history is the proof."""

    __tablename__ = "consents"
    __table_args__ = (
        Index("ix_consents_customer_kind", "customer_id", "kind", "recorded_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))  # marketing_email, sms, terms, ...
    granted: Mapped[bool] = mapped_column(Boolean)
    recorded_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    source: Mapped[str] = mapped_column(String(64))  # import, form, api, webhook, ...
    text: Mapped[str | None] = mapped_column(Text)  # the exact wording shown, if any

    customer: Mapped[Customer] = relationship(back_populates="consents")


class CurrentConsent(TenantOwned, Base):
    """Each customer's latest decision per consent kind, kept by ``customers.record_consent``.

    Derived from the history in ``consents`` (migration 0008 backfills it), so that a
    segment over a million customers filters on one row per customer instead of
    working out "latest record is a grant" from the whole history.
    """

    __tablename__ = "current_consents"
    __table_args__ = (
        # The consented audience of a tenant, in customer order, from the index alone.
        Index("ix_current_consents_granted", "tenant_id", "kind", "customer_id",
              postgresql_where=text("granted"), sqlite_where=text("granted")),
    )

    customer_id: Mapped[int] = mapped_column(
        ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    granted: Mapped[bool] = mapped_column(Boolean)
    recorded_at: Mapped[dt.datetime]
    consent_id: Mapped[int] = mapped_column(ForeignKey("consents.id", ondelete="CASCADE"))


class Card(TenantOwned, Base):
    """One wallet card: a customer's membership in one program."""

    __tablename__ = "cards"
    __table_args__ = (UniqueConstraint("program_id", "customer_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    serial_number: Mapped[str] = mapped_column(String(64), unique=True, default=new_serial_number)
    # Kept in clear on purpose: it must be written into every re-served pass and
    # Apple forbids changing it for an installed card. Compared in constant time.
    authentication_token: Mapped[str] = mapped_column(String(128), default=new_authentication_token)
    version: Mapped[int] = mapped_column(Integer, default=0)
    last_modified: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # SHA-256 of the last rendered pass content: unchanged data makes no new version.
    content_hash: Mapped[str | None] = mapped_column(String(64))
    voided: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Position in the global update order (see app/updates.py): what Apple's
    # passesUpdatedSince compares against. 0 = never changed since issue.
    update_tag: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0", index=True)

    program: Mapped[Program] = relationship()
    customer: Mapped[Customer] = relationship(back_populates="cards")
    registrations: Mapped[list[Registration]] = relationship(
        back_populates="card", cascade="all, delete-orphan")

    def __repr__(self) -> str:
        return f"<Card {self.serial_number}>"


class SignedVersion(Base):
    """A card version signed once: its pass.json and the detached signature of its
    manifest. The latest-pass endpoint assembles the .pkpass from these and the
    template's static files instead of rendering and signing per request. One row
    per card (replaced when the content changes, deleted with the card): a few KB
    each. Valid only while ``content_hash`` equals the card's."""

    __tablename__ = "signed_versions"

    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="CASCADE"),
                                         primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    pass_json: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    signed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Counter(Base):
    """Named monotonic counters, incremented under a row lock inside transactions."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class Registration(TenantOwned, Base):
    """An Apple device that installed a card and wants its updates."""

    __tablename__ = "registrations"
    __table_args__ = (
        UniqueConstraint("device_library_identifier", "card_id"),
        Index("ix_registrations_device_pass_type", "device_library_identifier",
              "pass_type_identifier"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="CASCADE"), index=True)
    device_library_identifier: Mapped[str] = mapped_column(String(128))
    pass_type_identifier: Mapped[str] = mapped_column(String(255))
    push_token: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Set when APNs rejects the token (BadDeviceToken...): pushes stop, operators see why.
    push_problem: Mapped[str | None] = mapped_column(String(64))

    card: Mapped[Card] = relationship(back_populates="registrations")


class InstallEvent(TenantOwned, Base):
    """Append-only log of installs and removals, per card, device and platform."""

    __tablename__ = "install_events"
    __table_args__ = (Index("ix_install_events_card_time", "card_id", "occurred_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="CASCADE"))
    platform: Mapped[str] = mapped_column(String(16))  # apple | google
    kind: Mapped[str] = mapped_column(String(32))  # registered | unregistered | push_gone
    device: Mapped[str | None] = mapped_column(String(128))
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class PushJob(OutboxRow, TenantOwned, Base):
    """Outbox row: this card changed and its devices must be told. Survives crashes;
    a sweeper re-queues rows whose worker died (at-least-once delivery)."""

    __tablename__ = "push_jobs"
    __table_args__ = (Index("ix_push_jobs_pending", "done_at", "claimed_until"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="CASCADE"), index=True)
    # apple: push the registered devices; google: patch the Google Wallet object.
    channel: Mapped[str] = mapped_column(String(16), default="apple", server_default="apple")
    update_tag: Mapped[int] = mapped_column(BigInteger)
    # None = every registered device; else only these registration ids (a retry).
    registration_ids: Mapped[list[int] | None] = mapped_column(JSON)


class PushAttempt(TenantOwned, Base):
    """The outcome of one push to one device, for the card's diagnostic timeline."""

    __tablename__ = "push_attempts"
    __table_args__ = (Index("ix_push_attempts_card_time", "card_id", "attempted_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="CASCADE"))
    device: Mapped[str] = mapped_column(String(128))
    status: Mapped[int | None]
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(200))
    apns_id: Mapped[str | None] = mapped_column(String(64))
    attempted_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DeviceLog(Base):
    """A message Wallet posted to /v1/log. Unauthenticated, so linked to a card only
    when the message names a serial number we know."""

    __tablename__ = "device_logs"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    card_id: Mapped[int | None] = mapped_column(
        ForeignKey("cards.id", ondelete="SET NULL"), index=True)
    message: Mapped[str] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class GoogleClass(TenantOwned, Base):
    """A program's Google Wallet class as last sent, so it is patched only on change."""

    __tablename__ = "google_classes"

    id: Mapped[int] = mapped_column(primary_key=True)
    program_id: Mapped[int] = mapped_column(
        ForeignKey("programs.id", ondelete="CASCADE"), unique=True)
    class_id: Mapped[str] = mapped_column(String(255), unique=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    synced_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class GoogleObject(TenantOwned, Base):
    """A card's Google Wallet object: what was last sent, and whether it is saved."""

    __tablename__ = "google_objects"

    id: Mapped[int] = mapped_column(primary_key=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="CASCADE"), unique=True)
    object_id: Mapped[str] = mapped_column(String(255), unique=True)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    # Values of the "notify" variables last sent, to tell a notifying change from others.
    notified_values: Mapped[dict[str, Any]] = mapped_column(default=dict)
    synced_at: Mapped[dt.datetime | None]
    # From save/del callbacks; their expTimeMillis orders them (a late save cannot undo a
    # del; at equal expTimeMillis the del wins).
    saved: Mapped[bool] = mapped_column(Boolean, default=False)
    saved_state_at_ms: Mapped[int] = mapped_column(BigInteger, default=0)


class GoogleNotification(TenantOwned, Base):
    """A TEXT_AND_NOTIFY message sent for an object: Google allows 3 per 24 hours.

    When Google refuses one over its limit although fewer rows are counted here, rows
    are added (sent now) up to the budget: Google's count is the one that holds."""

    __tablename__ = "google_notifications"
    __table_args__ = (Index("ix_google_notifications_object_time", "google_object_id", "sent_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    google_object_id: Mapped[int] = mapped_column(
        ForeignKey("google_objects.id", ondelete="CASCADE"))
    sent_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class GoogleCallbackNonce(Base):
    """Nonces of verified Google callbacks: the unique index makes replays no-ops."""

    __tablename__ = "google_callback_nonces"

    nonce: Mapped[str] = mapped_column(String(255), primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# -- distribution: personal links, funnel, enrollment forms, CRM (issue 5) ----------------

class LinkToken(TenantOwned, Base):
    """An opaque personal link: only the SHA-256 of the token is kept (a bearer secret)."""

    __tablename__ = "link_tokens"
    __table_args__ = (Index("ix_link_tokens_program_customer", "program_id", "customer_id",
                            "purpose"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"))
    # None for enrollment links: the person is not known yet.
    customer_id: Mapped[int | None] = mapped_column(
        ForeignKey("customers.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(16))  # download | enrich | consent | enroll
    campaign: Mapped[str | None] = mapped_column(String(100), index=True)
    expires_at: Mapped[dt.datetime | None]
    max_uses: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    revoked_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None]


class FunnelEvent(TenantOwned, Base):
    """Append-only: one step a person took from a link (opened, downloaded, enrolled...)."""

    __tablename__ = "funnel_events"
    __table_args__ = (
        Index("ix_funnel_events_program_campaign_time", "program_id", "campaign", "occurred_at"),
        Index("ix_funnel_events_card", "card_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"))
    customer_id: Mapped[int | None] = mapped_column(
        ForeignKey("customers.id", ondelete="SET NULL"))
    card_id: Mapped[int | None] = mapped_column(ForeignKey("cards.id", ondelete="SET NULL"))
    link_id: Mapped[int | None] = mapped_column(
        ForeignKey("link_tokens.id", ondelete="SET NULL"))
    # link_opened | apple_downloaded | google_opened | enrolled | enriched | consented
    kind: Mapped[str] = mapped_column(String(32))
    platform: Mapped[str | None] = mapped_column(String(16))  # apple | google | desktop
    campaign: Mapped[str | None] = mapped_column(String(100))
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class FormSubmission(TenantOwned, Base):
    """A posted enrollment, details or consent form, known by the random id its page
    carried (only the SHA-256 of it is kept). A repeated post of the same page (back
    button, double tap, two requests at once) gets what the first one did instead of
    doing it again; the unique key makes the race safe. Kept a day (pages' CSRF
    tokens last 8 hours, so no older page can be posted)."""

    __tablename__ = "form_submissions"
    __table_args__ = (UniqueConstraint("tenant_id", "key_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(16))  # enroll | enrich | consent
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"))
    # Whose card the page gave (enroll) or whose record it changed (enrich, consent);
    # set in the transaction that claimed the key.
    customer_id: Mapped[int | None] = mapped_column(
        ForeignKey("customers.id", ondelete="CASCADE"))
    # SHA-256 of the values applied: a details form sent again with other values is applied.
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class CrmConnection(TenantOwned, Base):
    """How a tenant's CRM is reached. No row (or kind "builtin"): Passerelle is the CRM."""

    __tablename__ = "crm_connections"
    __table_args__ = (UniqueConstraint("tenant_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="builtin")  # builtin | http
    base_url: Mapped[str | None] = mapped_column(String(500))
    auth_header: Mapped[str | None] = mapped_column(String(100))  # e.g. "Authorization"
    # Name of the environment variable holding the header's value: never the secret.
    auth_value_env: Mapped[str | None] = mapped_column(String(128))
    # Customer field -> JSON path in the CRM's record, e.g. {"email": "contact.email"}.
    mapping: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Reads fall back to the last known copy if it is at most this old.
    max_staleness_seconds: Mapped[int] = mapped_column(Integer, default=86400)
    timeout_seconds: Mapped[int] = mapped_column(Integer, default=5)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class CrmOutboxEntry(OutboxRow, TenantOwned, Base):
    """A write to the external CRM that must not be lost: kept until it is delivered."""

    __tablename__ = "crm_outbox"
    __table_args__ = (Index("ix_crm_outbox_pending", "done_at", "not_before"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"),
                                             index=True)
    operation: Mapped[str] = mapped_column(String(16))  # create | update
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_error: Mapped[str | None] = mapped_column(String(500))


class MailOutboxEntry(OutboxRow, TenantOwned, Base):
    """An email to send a customer (their card link), kept until it is sent or given up.

    It holds no link: the worker issues the personal link when it sends, so the
    bearer token exists only in the email and, hashed, in ``link_tokens``.
    """

    __tablename__ = "mail_outbox"
    __table_args__ = (
        Index("ix_mail_outbox_pending", "done_at", "not_before"),
        Index("ix_mail_outbox_recent", "customer_id", "program_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))  # card_link | requested_link
    locale: Mapped[str | None] = mapped_column(String(35))  # the page's language when asked
    campaign: Mapped[str | None] = mapped_column(String(100))  # as long as LinkToken.campaign
    last_error: Mapped[str | None] = mapped_column(String(500))
    outcome: Mapped[str | None] = mapped_column(String(16))  # sent | gave_up | skipped


# -- install tracking and webhooks (issue 6) ------------------------------------------------

class CardInstallState(TenantOwned, Base):
    """Per card and platform, what the install log adds up to (rebuildable from the log)."""

    __tablename__ = "card_install_states"
    __table_args__ = (
        UniqueConstraint("card_id", "platform"),
        Index("ix_card_install_states_program_state", "program_id", "platform", "state"),
        # Segments: "customers with (or without) such a state in this program", probed per
        # customer or read whole in customer order from the index alone.
        Index("ix_card_install_states_program_customer", "program_id", "customer_id"),
        Index("ix_card_install_states_program_state_customer", "program_id", "state",
              "customer_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id", ondelete="CASCADE"))
    # Both copied from the card (which never changes hands) so segment counts need no
    # join through cards on millions of rows.
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    platform: Mapped[str] = mapped_column(String(16))  # apple | google
    state: Mapped[str] = mapped_column(String(16))  # downloaded | installed | removed
    device_count: Mapped[int] = mapped_column(Integer, default=0)
    first_downloaded_at: Mapped[dt.datetime | None]
    first_installed_at: Mapped[dt.datetime | None]
    last_installed_at: Mapped[dt.datetime | None]
    removed_at: Mapped[dt.datetime | None]
    # The newest log entry folded in, so replays and rebuilds are idempotent.
    last_event_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookSubscription(TenantOwned, Base):
    """Where a tenant wants events sent (its email tool, its CRM...)."""

    __tablename__ = "webhook_subscriptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(String(1000))
    # HMAC key the receiver verifies with; we sign with it, so it is kept as is.
    secret: Mapped[str] = mapped_column(String(128), default=lambda: secrets.token_urlsafe(32))
    event_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WebhookDelivery(OutboxRow, TenantOwned, Base):
    """One event for one subscription: an outbox row retried with backoff for 24 hours."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_pending", "done_at", "not_before"),
        Index("ix_webhook_deliveries_subscription_time", "subscription_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(64))  # the same for redeliveries
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    outcome: Mapped[str | None] = mapped_column(String(16))  # delivered | gave_up


class WebhookAttempt(TenantOwned, Base):
    """One HTTP attempt of a delivery: the log marketers read when a hook misbehaves."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    status: Mapped[int | None] = mapped_column(Integer)  # None: no HTTP answer
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    attempted_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class InboundHook(TenantOwned, Base):
    """A tenant's endpoint for loyalty-engine events: how it authenticates and maps fields."""

    __tablename__ = "inbound_hooks"
    __table_args__ = (UniqueConstraint("tenant_id", "slug"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64))  # e.g. "loyalty-engine"
    auth: Mapped[str] = mapped_column(String(16), default="header")  # header | hmac
    header_name: Mapped[str] = mapped_column(String(100), default="X-Secret-Key")
    # header: SHA-256 of the shared secret (a bearer secret). hmac: the key itself.
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    hmac_secret: Mapped[str | None] = mapped_column(String(128))
    # Event field paths -> our names (event id, type, customer id, points, tier...).
    mapping: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class InboundEvent(TenantOwned, Base):
    """Every event received, applied or not: nothing is silently dropped."""

    __tablename__ = "inbound_events"
    __table_args__ = (
        UniqueConstraint("hook_id", "event_id"),
        Index("ix_inbound_events_status", "tenant_id", "status", "received_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    hook_id: Mapped[int] = mapped_column(ForeignKey("inbound_hooks.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(200))
    event_type: Mapped[str | None] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16))  # applied | ignored | failed
    error: Mapped[str | None] = mapped_column(String(500))
    customer_id: Mapped[int | None] = mapped_column(
        ForeignKey("customers.id", ondelete="SET NULL"))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    applied_at: Mapped[dt.datetime | None]


# -- marketer API, dashboard users, audit (issue 7) -----------------------------------------

class ApiKey(TenantOwned, Base):
    """A tenant's API key. Shown once; only its SHA-256 is kept (a bearer secret)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The first characters of the key, stored clear so people can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(16))  # read | write | admin
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]


class AdminUser(TenantOwned, Base):
    """A person using the dashboard for one tenant."""

    __tablename__ = "admin_users"
    __table_args__ = (UniqueConstraint("tenant_id", "email"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # viewer | marketer | admin
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[dt.datetime | None]
    disabled_at: Mapped[dt.datetime | None]


class AuditEntry(TenantOwned, Base):
    """Who did what through the API or dashboard: append-only."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant_time", "tenant_id", "occurred_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    actor: Mapped[str] = mapped_column(String(120))  # "key:<prefix>" or "user:<id>"
    action: Mapped[str] = mapped_column(String(64))  # e.g. "program.create", "key.revoke"
    target: Mapped[str | None] = mapped_column(String(200))  # ids, never personal data
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ImportJob(TenantOwned, Base):
    """A bulk customer upsert run in the background: status and per-row errors."""

    __tablename__ = "import_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed
    format: Mapped[str] = mapped_column(String(8))  # csv | ndjson
    source_path: Mapped[str] = mapped_column(String(500))  # uploaded file in the instance folder
    total_rows: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    # Running: the worker's lease, renewed while it works (a dead worker's runs out).
    # Queued: when the sweeper may queue it again if no worker has taken it.
    claimed_until: Mapped[dt.datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

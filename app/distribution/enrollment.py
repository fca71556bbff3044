"""Enrollment and enrichment forms: what they ask, what they accept, what they change.

Domain code (no Flask). The pages in app/web/links.py render the fields and
consents :func:`form_config` returns and hand the posted values here.

**Form settings** (``Program.forms``), merged over :data:`DEFAULT_FORMS`::

    {"fields": {"first_name": "required", "phone": "optional", "birthday": "hidden"},
     "consents": [{"kind": "marketing_email", "required": false,
                   "text": {"en": "Send me offers by email", "fr": "..."}},
                  {"kind": "terms", "required": true}]}

The email is always asked and required at enrollment (it is how the CRM knows
the person). Field modes: ``required``, ``optional``, ``hidden``. A consent
without its own ``text`` shows Passerelle's wording for that kind
(marketing_email, sms, terms); the exact sentence shown is stored with the
decision and its time, so the record proves what the person agreed to.

**Known emails and enumeration.** Enrollment is public, so its answer must not
tell whether an email belongs to a member, and must not hand anyone a
member's card (the card shows their name, points and member barcode). So an
email we (or the CRM) already know gets a *held* enrollment: a new customer
without email, holding only what the person typed, with their own fresh card;
the member's record is left untouched, a ``link_requested`` funnel event is
recorded, and :mod:`app.distribution.card_mail` emails the member a link to their real card
at their own address (when a mailer is configured). The
person on the page sees exactly what a new member sees (same redirect shape,
same page, same work done, a CRM lookup either way), and nobody learns or
receives anything they did not type. Held customers carry the attribute
``enrollment_held = "email_known"`` and are not written to the CRM.

**Repeated posts.** Each form page carries a random submission id; a second
post of the same page (back button, double tap, two at the same instant) gets
the first post's outcome instead of a second enrollment (see the section at the
end of this module).

**New customers** get an external id ``px_`` + 16 hex characters (64 random
bits; Passerelle-made, so the CRM can tell them apart), are written to the CRM
through the outbox in the same transaction (:func:`app.crm.record_write`), and
get their card at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app import crm
from app.cards.cards import ensure_card
from app.customers.customers import (
    CustomerChanges,
    CustomerConflict,
    CustomerDataError,
    find_by_email,
    normalize_email,
    parse_birthday,
    update_customer,
    upsert_customer,
)
from app.distribution import card_mail, i18n
from app.infra import events
from app.infra.models import Card, Customer, FormSubmission, Program, utcnow
from app.tracking import funnel
from app.updates import refresh as updates

if TYPE_CHECKING:
    from app.distribution.links import LinkGrant
    from app.services import Services

log = logging.getLogger(__name__)

#: Optional fields a form may ask, in page order (the email always comes first).
FIELDS = ("first_name", "last_name", "phone", "birthday", "postal_code")
MODES = ("required", "optional", "hidden")
#: Consent kinds with a built-in wording in every language (``consent.<kind>`` messages).
KNOWN_CONSENTS = ("marketing_email", "sms", "terms")
DEFAULT_FORMS: dict[str, Any] = {
    "fields": {"first_name": "optional", "last_name": "optional", "phone": "hidden",
               "birthday": "hidden", "postal_code": "hidden"},
    "consents": [{"kind": "marketing_email", "required": False},
                 {"kind": "terms", "required": True}],
}
#: Stored in Customer.attributes, not a standard column.
ATTRIBUTE_FIELDS = ("postal_code",)
HELD_ATTRIBUTE = "enrollment_held"
EXTERNAL_ID_PREFIX = "px_"
CONSENT_PREFIX = "consent_"
TRUE_VALUES = {"yes", "on", "1", "true"}
MAX_RAW = 1000  # no form value is longer; anything beyond is refused before parsing
#: The hidden input carrying the random id of the form page (see "repeated posts").
SUBMISSION_FIELD = "submission"
#: How long a submission is remembered: longer than a form page's CSRF token (8 hours).
SUBMISSION_KEPT = dt.timedelta(days=1)

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_PHONE = re.compile(r"^\+?[0-9 ().\-/]{4,40}$")
_POSTAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 \-]{1,11}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LIMITS = {"first_name": 200, "last_name": 200}
_SUBMISSION = re.compile(r"^[A-Za-z0-9_-]{22,64}$")


class FormInvalid(ValueError):
    """The submission has errors: ``errors`` maps a form field name to a message key."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__(", ".join(sorted(errors)))  # field names only, never values
        self.errors = errors


# -- settings -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ConsentSpec:
    kind: str
    required: bool
    text: Mapping[str, str] = field(default_factory=dict)  # language -> configured wording

    @property
    def input_name(self) -> str:
        return CONSENT_PREFIX + self.kind


@dataclass(frozen=True)
class FormConfig:
    fields: Mapping[str, str]
    consents: tuple[ConsentSpec, ...]

    def shown(self) -> list[str]:
        return [name for name in FIELDS if self.fields.get(name, "hidden") != "hidden"]

    def required(self, name: str) -> bool:
        return name == "email" or self.fields.get(name) == "required"


def form_config(program: Program) -> FormConfig:
    """The program's form settings over the defaults.

    Public pages must not fail on a settings typo, so unknown fields, modes and
    consents without any wording are left out here; :func:`check_forms` names them.
    """
    forms = program.forms if isinstance(program.forms, dict) else {}
    fields = dict(DEFAULT_FORMS["fields"])
    for name, mode in (forms.get("fields") or {}).items():
        if name in FIELDS and mode in MODES:
            fields[name] = mode
    consents: list[ConsentSpec] = []
    for item in forms.get("consents", DEFAULT_FORMS["consents"]) or []:
        spec = _consent_spec(item)
        if spec is not None and spec.kind not in {c.kind for c in consents}:
            consents.append(spec)
    return FormConfig(fields, tuple(consents))


def _consent_spec(item: Any) -> ConsentSpec | None:
    if not isinstance(item, dict) or not _KIND.match(str(item.get("kind", ""))):
        return None
    text = item.get("text") or {}
    if isinstance(text, str):
        text = {i18n.DEFAULT: text}
    text = {str(k): str(v) for k, v in text.items() if isinstance(v, str) and v.strip()}
    if not text and item["kind"] not in KNOWN_CONSENTS:
        return None  # nothing to show: a consent needs words
    return ConsentSpec(item["kind"], bool(item.get("required", False)), text)


def check_forms(forms: Any) -> list[str]:
    """Problems in a program's form settings, one sentence each (for operators)."""
    if not isinstance(forms, dict):
        return ["forms must be an object"]
    problems = []
    for name, mode in (forms.get("fields") or {}).items():
        if name not in FIELDS:
            problems.append(f"fields: unknown field {name!r} (known: {', '.join(FIELDS)})")
        elif mode not in MODES:
            problems.append(f"fields.{name}: {mode!r} is not one of {', '.join(MODES)}")
    for index, item in enumerate(forms.get("consents") or []):
        if _consent_spec(item) is None:
            problems.append(f"consents[{index}]: needs a kind (a-z, 0-9, _) and, unless it is "
                            f"one of {', '.join(KNOWN_CONSENTS)}, a text")
    return problems


def consent_text(spec: ConsentSpec, lang: str, *, brand: str, program: str) -> str:
    """The exact sentence shown for a consent in ``lang``.

    Configured wording wins, in the page language if given, else in any
    language it has (one sentence must mean one thing); else Passerelle's own.
    """
    if spec.text:
        return spec.text.get(lang) or spec.text.get(i18n.DEFAULT) or next(iter(spec.text.values()))
    return i18n.translate(lang, f"consent.{spec.kind}", brand=brand, program=program)


def consent_texts(config: FormConfig, lang: str, program: Program) -> dict[str, str]:
    return {spec.kind: consent_text(spec, lang, brand=program.tenant.name, program=program.name)
            for spec in config.consents}


def texts_digest(texts: Mapping[str, str]) -> str:
    """A short fingerprint of the consent wording a page showed (sent back with the form)."""
    canonical = json.dumps(sorted(texts.items()), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# -- validation ---------------------------------------------------------------------------

@dataclass
class Submission:
    values: dict[str, Any] = field(default_factory=dict)  # Customer columns
    attributes: dict[str, Any] = field(default_factory=dict)
    consents: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def validate(config: FormConfig, data: Mapping[str, str], *, email: bool, fields: bool,
             consents: bool = True) -> Submission:
    """Clean a posted form; every problem becomes ``errors[name] = message key``.

    An optional field left empty means "no value" (the details form is
    prefilled, so emptying a field is how a person removes it).
    """
    result = Submission()
    names = (["email"] if email else []) + (config.shown() if fields else [])
    for name in names:
        raw = str(data.get(name, "") or "")
        if len(raw) > MAX_RAW:
            result.errors[name] = "error.too_long"
            continue
        raw = _CONTROL.sub("", raw).strip()
        if not raw:
            if config.required(name):
                result.errors[name] = "error.required"
            elif name in ATTRIBUTE_FIELDS:
                result.attributes[name] = None
            else:
                result.values[name] = None
            continue
        try:
            value = _clean(name, raw)
        except FormInvalid as exc:
            result.errors[name] = exc.errors[name]
            continue
        (result.attributes if name in ATTRIBUTE_FIELDS else result.values)[name] = value
    if consents:
        for spec in config.consents:
            granted = str(data.get(spec.input_name, "")).lower() in TRUE_VALUES
            if spec.required and not granted:
                result.errors[spec.input_name] = "error.consent_required"
            result.consents[spec.kind] = granted
    return result


def _clean(name: str, raw: str) -> Any:
    if name == "email":
        try:
            return normalize_email(raw)
        except CustomerDataError:
            raise FormInvalid({name: "error.email"}) from None
    if name == "birthday":
        try:
            return parse_birthday(raw)
        except CustomerDataError:
            raise FormInvalid({name: "error.birthday"}) from None
    if name == "phone":
        if not _PHONE.match(raw) or sum(c.isdigit() for c in raw) < 4:
            raise FormInvalid({name: "error.phone"})
        return raw
    if name == "postal_code":
        if not _POSTAL.match(raw):
            raise FormInvalid({name: "error.postal_code"})
        return raw.upper()
    if len(raw) > _LIMITS[name]:
        raise FormInvalid({name: "error.too_long"})
    return raw


def prefill(config: FormConfig, customer: Customer) -> dict[str, str]:
    """Form values from the customer's current record (the CRM's copy, refreshed by the page)."""
    values = {}
    for name in config.shown():
        raw = (customer.attributes or {}).get(name) if name in ATTRIBUTE_FIELDS \
            else getattr(customer, name)
        values[name] = raw.isoformat() if isinstance(raw, dt.date) else str(raw or "")
    current = customer.current_consents()
    for spec in config.consents:
        if current.get(spec.kind) is not None and current[spec.kind].granted:
            values[spec.input_name] = "yes"
    return values


# -- enrollment ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Enrollment:
    """Whose card the page shows next. ``held`` is for logs and tests, never for the page."""

    customer: Customer
    card: Card
    held: bool
    repeated: bool = False  # the same form page was posted before: its outcome, again


def new_external_id() -> str:
    return EXTERNAL_ID_PREFIX + secrets.token_hex(8)


def enroll(session: Session, services: Services, program: Program, form_data: Mapping[str, str],
           locale: str, consent_texts_shown: Mapping[str, str], *,
           source: LinkGrant | Program | None = None, campaign: str | None = None,
           platform: str | None = None) -> Enrollment:
    """Enroll the person who filled the form; raise FormInvalid with per-field keys.

    New email: a customer, their consents, a CRM create (outbox), a card and a
    ``customer.enrolled`` webhook (for the tenant's subscriptions).
    Known email: a held enrollment (see the module docstring). Both do the same
    work in the same order, so neither content nor timing tells them apart.
    The same page posted again (its ``submission`` id, see "repeated posts"
    below): the first post's customer and card, ``repeated=True``, nothing done
    again. Does not commit.
    """
    # The CRM is asked before this post writes anything: with the entry point's
    # ``commit_before_calls`` no transaction is open while it answers (see
    # docs/architecture.md, "Transactions"), and a refused post still rolls back whole.
    asked = _ask_crm(session, services, program.tenant_id, _posted_email(form_data))
    # A repeat gets the first post's outcome whatever the settings say now; a refused
    # post is rolled back by the caller, claim included.
    claim = _claim(session, program, "enroll", form_data)
    if claim is not None and not claim.new:
        earlier = _earlier_enrollment(session, program, claim.row)
        if earlier is not None:
            return earlier
        claim = None  # an id from another form: this post is not a repeat of it
    config = form_config(program)
    submission = validate(config, form_data, email=True, fields=True)
    if submission.errors:
        raise FormInvalid(submission.errors)
    email = submission.values["email"]
    member = _known_member(session, program.tenant_id, email, asked)
    customer = _create(session, program, submission, locale) if member is None else None
    if customer is None and member is None:  # someone enrolled this email a moment ago
        member = _local_member(session, program.tenant_id, email)
    held = customer is None
    if customer is None:
        customer = _create(session, program, submission, locale, held=True)
        assert customer is not None  # held: a conflict raises, never None
    _record_consents(session, customer, submission.consents, consent_texts_shown, "enrollment")
    if not held:
        crm.record_write(session, customer, "create")
    card = ensure_card(session, program, customer)
    updates.refresh_cards(session, services, [card])  # render now: the page offers it at once
    if claim is not None:
        claim.row.customer_id = customer.id
    source = source if source is not None else program
    if held:
        if isinstance(member, Customer):
            funnel.record(session, source, "link_requested", customer=member,
                          campaign=campaign)
            card_mail.request_card_link(session, services, program, member,
                                        lang=i18n.primary(locale) or i18n.DEFAULT,
                                        campaign=campaign)
        log.info("enrollment held for program %s: the email belongs to a member", program.id)
    else:
        funnel.record(session, source, "enrolled", customer=customer, card=card,
                      platform=platform, campaign=campaign)
        events.publish(session, events.Announced(
            program.tenant_id, "customer.enrolled",
            {"customer_id": customer.id, "program": program.slug}))
    return Enrollment(customer, card, held)


_KNOWN_REMOTELY = object()


def _posted_email(form_data: Mapping[str, str]) -> str | None:
    """The posted email as it will be stored, or None if it is not a valid address
    (the form's validation then says so)."""
    try:
        return normalize_email(form_data.get("email") or "")
    except CustomerDataError:
        return None


def _ask_crm(session: Session, services: Services, tenant_id: int,
             email: str | None) -> Customer | object | None:
    """What the CRM knows of this email: our copy of its member (loaded now), a marker if
    only the CRM knows them and they cannot be loaded, or None.

    The CRM is asked even when our copy already knows the email, so both answers
    take one CRM round trip. An unreachable CRM counts as "not known": the
    person is enrolled and the outbox's create reaches the CRM later.
    """
    if email is None:
        return None
    try:
        connector = crm.connector_for(session, services, tenant_id)
        record = connector.find_by_email(email) if connector.kind != "builtin" else None
    except crm.CrmError as exc:
        log.warning("CRM lookup by email failed for tenant %s: %s", tenant_id, exc)
        record = None
    if record is None or _local_member(session, tenant_id, email) is not None:
        return None
    try:
        loaded = crm.load_customer(session, services, tenant_id, record.external_id)
    except crm.CrmError as exc:
        log.warning("CRM customer could not be loaded for tenant %s: %s", tenant_id, exc)
        loaded = None
    return loaded if loaded is not None else _KNOWN_REMOTELY


def _known_member(session: Session, tenant_id: int, email: str,
                  asked: Customer | object | None) -> Customer | object | None:
    """The member holding this email: ours, else what the CRM said (:func:`_ask_crm`)."""
    local = _local_member(session, tenant_id, email)
    return local if local is not None else asked


def _local_member(session: Session, tenant_id: int, email: str) -> Customer | None:
    return find_by_email(session, tenant_id, email)


def _create(session: Session, program: Program, submission: Submission, locale: str, *,
            held: bool = False) -> Customer | None:
    """A new customer from the form; None if the email was taken meanwhile (a race)."""
    fields = {k: v for k, v in submission.values.items() if v is not None}
    attributes = {k: v for k, v in submission.attributes.items() if v is not None}
    if held:
        fields.pop("email")
        attributes[HELD_ATTRIBUTE] = "email_known"
    fields.setdefault("locale", i18n.primary(locale) or i18n.DEFAULT)
    try:
        result = upsert_customer(session, program.tenant_id, new_external_id(),
                                 CustomerChanges(fields, attributes), source="enrollment",
                                 only_create=True)
    except CustomerConflict:
        if held:
            raise
        return None
    assert result is not None
    return result.customer


def _record_consents(session: Session, customer: Customer, decisions: Mapping[str, bool],
                     texts: Mapping[str, str], source: str) -> set[str]:
    """Append each decision with the exact sentence shown; the kinds that changed."""
    result = update_customer(session, customer, CustomerChanges(
        consents=dict(decisions), consent_texts=texts), source=source)
    return {name.removeprefix("consents.") for name in result.changed_fields}


# -- enrichment ---------------------------------------------------------------------------

def enrich(session: Session, services: Services, customer: Customer, form_data: Mapping[str, str],
           locale: str, consent_texts_shown: Mapping[str, str], *, program: Program,
           purpose: str = "enrich", source: LinkGrant | None = None,
           platform: str | None = None) -> set[str]:
    """Apply a details (``enrich``) or consent (``consent``) form; the changed field names.

    Names follow the CRM record's: ``first_name``, ``attributes.postal_code``,
    ``consents.marketing_email``. Changes go to the CRM through the outbox and
    re-render the customer's cards, in the caller's transaction (no commit).
    The email is not on these forms: a forwarded link must not be able to move
    the account to another address.
    """
    config = form_config(program)
    submission = validate(config, form_data, email=False, fields=purpose == "enrich")
    if submission.errors:
        raise FormInvalid(submission.errors)
    fingerprint = _fingerprint(submission)
    claim = _claim(session, program, purpose, form_data, customer=customer,
                   fingerprint=fingerprint)
    if claim is not None and not claim.new:
        row = claim.row
        if (row.purpose, row.program_id, row.customer_id) == (purpose, program.id, customer.id):
            if row.fingerprint == fingerprint:
                log.info("%s form of program %s posted again: already applied", purpose,
                         program.id)
                return set()
            row.fingerprint = fingerprint  # sent again with other values: a new edit
    fields = dict(submission.values)
    if customer.locale is None and i18n.primary(locale):
        fields["locale"] = i18n.primary(locale)
    result = update_customer(session, customer, CustomerChanges(
        fields, submission.attributes, consents=submission.consents,
        consent_texts=consent_texts_shown), source="form")
    changed = result.changed_fields
    if changed:
        crm.record_write(session, customer, "update", sorted(changed))
    if result.data_changed:
        updates.customers_changed(session, services, [customer])
    if source is not None:
        funnel.record(session, source, "enriched" if purpose == "enrich" else "consented",
                      customer=customer, platform=platform)
    return changed


# -- repeated posts -----------------------------------------------------------------------
#
# Every form page carries a random submission id (hidden input ``submission``, new
# per page). The first post of a page claims it (a unique row keyed by its SHA-256,
# written in the post's transaction); a later post of the same page (back button and
# send again, a double tap, a retrying browser) finds the claim and gets the first
# post's outcome instead of doing the work again: the same person's card after an
# enrollment, nothing re-applied after a details form sent with the same values.
# Two posts at the same instant: the second one's insert waits for the first
# transaction (PostgreSQL's unique index, SQLite's single writer), then finds its
# row. A post without an id (a page rendered before this existed, a script) is
# handled as before.

@dataclass
class _Claim:
    row: FormSubmission
    new: bool  # claimed by this post (False: an earlier post of the same page has it)


def new_submission_id() -> str:
    """The random id a form page carries (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def _key_hash(form_data: Mapping[str, str]) -> str | None:
    """SHA-256 of the posted page's submission id; None without a well-formed one."""
    raw = str(form_data.get(SUBMISSION_FIELD, "") or "")
    return hashlib.sha256(raw.encode("ascii")).hexdigest() if _SUBMISSION.match(raw) else None


def _claim(session: Session, program: Program, purpose: str, form_data: Mapping[str, str], *,
           customer: Customer | None = None, fingerprint: str | None = None) -> _Claim | None:
    """Claim the posted page's submission id, or find the earlier post that did (locked
    until this transaction ends). None when the post carries no usable id."""
    key_hash = _key_hash(form_data)
    if key_hash is None:
        return None
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    claimed = session.execute(
        insert(FormSubmission)
        .values(tenant_id=program.tenant_id, key_hash=key_hash, purpose=purpose,
                program_id=program.id, customer_id=customer.id if customer else None,
                fingerprint=fingerprint, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["tenant_id", "key_hash"])
        .returning(FormSubmission.id)).scalar()
    if claimed is not None:
        return _Claim(session.get_one(FormSubmission, claimed), new=True)
    row = session.scalar(select(FormSubmission).where(
        FormSubmission.tenant_id == program.tenant_id,
        FormSubmission.key_hash == key_hash).with_for_update().execution_options(
            populate_existing=True))
    return _Claim(row, new=False) if row is not None else None


def is_repeat(session: Session, program: Program, form_data: Mapping[str, str]) -> bool:
    """True if this enrollment page was posted (and enrolled someone) before: the page
    then skips checks meant for first posts (e.g. changed consent wording)."""
    key_hash = _key_hash(form_data)
    if key_hash is None:
        return False
    row = session.scalar(select(FormSubmission).where(
        FormSubmission.tenant_id == program.tenant_id, FormSubmission.key_hash == key_hash))
    return row is not None and (row.purpose, row.program_id) == ("enroll", program.id) \
        and row.customer_id is not None


def _earlier_enrollment(session: Session, program: Program,
                        row: FormSubmission) -> Enrollment | None:
    """What the first post of this enrollment page gave: the same customer and card."""
    if row.purpose != "enroll" or row.program_id != program.id or row.customer_id is None:
        return None
    customer = session.get(Customer, row.customer_id)
    if customer is None:
        return None
    log.info("enrollment form of program %s posted again: the first post's card is given",
             program.id)
    held = HELD_ATTRIBUTE in (customer.attributes or {})
    return Enrollment(customer, ensure_card(session, program, customer), held, repeated=True)


def _fingerprint(submission: Submission) -> str:
    """SHA-256 of what a form would apply (to tell a double post from a changed one)."""
    canonical = json.dumps([submission.values, submission.attributes, submission.consents],
                           sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def forget_submissions(services: Services, now: dt.datetime | None = None) -> int:
    """Delete submissions older than :data:`SUBMISSION_KEPT` (their pages can no longer
    be posted); the number deleted. Run hourly by the worker."""
    cutoff = (now or utcnow()) - SUBMISSION_KEPT
    with services.db.transaction() as session:
        result = session.execute(delete(FormSubmission).where(FormSubmission.created_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)

"""Customers: validation, the one upsert every writer uses, consents, and CSV import.

Every customer write (CSV and NDJSON imports, the API, forms, CRM reads,
inbound hooks, the dashboard and the demo) goes through :func:`upsert_customer`
(or :func:`update_customer` for a customer already loaded): the same field
and attribute rules, the same email ownership check (an address belongs to one
customer per tenant), consents appended with their source, and one answer to
"did anything change". It only flushes; the caller owns the transaction.
``customer.updated`` events follow from the flushed changes (app/webhooks/outbound.py,
wired by Services; consents are published as app.infra.events).

CSV import rules (also in README):
- ``external_id`` is required; rows are upserted by it within the tenant.
- Known columns update the matching customer field: email, first_name,
  last_name, locale, phone, birthday (YYYY-MM-DD).
- ``consent_<kind>`` columns (yes/no, true/false, 1/0) record a consent
  decision with source ``import``.
- Any other column becomes a free attribute (points, tier, referral_id ...); the
  upsert's rules apply (a cell at most 1000 characters, at most 100 attributes).
- Columns absent from the file, and blank cells, leave stored values alone.
- A bad row is reported with its line number and skipped; good rows are kept.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from babel import Locale, UnknownLocaleError
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.infra import events
from app.infra.models import Consent, CurrentConsent, Customer, utcnow

STANDARD_FIELDS = ("email", "first_name", "last_name", "locale", "phone", "birthday")
CONSENT_PREFIX = "consent_"
BATCH_SIZE = 500
#: Longer input is refused before parsing (RFC 5321 allows 254 characters once normalized).
MAX_EMAIL_INPUT = 320
_TRUE = {"1", "true", "yes", "y", "oui", "ano", "ja"}
_FALSE = {"0", "false", "no", "n", "non", "ne", "nein"}
ATTRIBUTE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
#: Any consent kind stored (inbound hooks make ``list_<name>`` kinds with capitals, dots, dashes).
STORED_CONSENT_KIND = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
#: Consent kinds the API and NDJSON imports accept (stricter: their callers name kinds).
CONSENT_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_EXTERNAL_ID = 128
MAX_ATTRIBUTE_TEXT = 1000
MAX_ATTRIBUTES = 100
#: JSON numbers beyond this lose precision in JavaScript clients and mean nothing on a card.
MAX_ATTRIBUTE_NUMBER = 10**15
EMAIL_TAKEN = "email is already used by another customer"
ID_OR_EMAIL_TAKEN = "external_id or email is already used by another customer"


class CustomerDataError(ValueError):
    """A value a customer record cannot take; the message names the field."""


class CustomerConflict(CustomerDataError):
    """The write would give a customer another customer's email (or external id)."""


class ImportFileError(ValueError):
    """The file as a whole cannot be imported (encoding, header)."""


def normalize_email(value: str) -> str:
    """The one check for every email address that enters Passerelle; the form to store.

    Forms, CSV and NDJSON imports, the API, CRM reads, inbound hooks, the
    dashboard and the demo all come here (through :func:`clean_standard` or
    directly), so an address is accepted or refused the same way everywhere.

    Syntax only, with ``email-validator`` (no DNS lookup: a request must not
    wait on, or leak through, a resolver): one plain address (no display name,
    angle brackets, quoted local part or ``[IP]`` domain), local part at most
    64 characters and the whole at most 254 (RFC 5321), a domain with a dot
    that is not reserved for special use (``.test``, ``.local``, ``.invalid``,
    ``.localhost``...). Internationalized addresses are accepted: an IDN domain
    is stored in its Unicode form, whichever form it came in (``xn--bcher-kva.de``
    and ``bücher.de`` are one address).

    Stored form: trimmed, Unicode NFC and lower-cased as a whole (as before the
    validator came: real mailboxes ignore case, and the per-tenant uniqueness of
    emails relies on one spelling per address).
    """
    if not isinstance(value, str):
        raise CustomerDataError("email: not text")
    text = value.strip()
    if len(text) > MAX_EMAIL_INPUT:
        raise CustomerDataError(f"email: longer than {MAX_EMAIL_INPUT} characters")
    try:
        checked = validate_email(text, check_deliverability=False, strict=True,
                                 allow_display_name=False, allow_quoted_local=False,
                                 allow_domain_literal=False, allow_empty_local=False,
                                 globally_deliverable=True)
    except EmailNotValidError as exc:
        shown = text if len(text) <= 80 else text[:80] + "…"
        raise CustomerDataError(f"email: {shown!r} is not an email address ({exc})") from None
    return unicodedata.normalize("NFC", checked.normalized.lower())


def smtp_address(email: str) -> str:
    """A stored address as an SMTP envelope and ``To:`` header take it: an IDN domain in
    its ASCII form (``xn--…``), so any relay accepts it. A non-ASCII local part stays
    as it is (only relays offering SMTPUTF8 can deliver it)."""
    try:
        checked = validate_email(email, check_deliverability=False, strict=True)
    except EmailNotValidError:
        return email
    return f"{checked.local_part}@{checked.ascii_domain}"


def normalize_locale(value: str) -> str:
    tag = value.strip().replace("_", "-")
    try:
        Locale.parse(tag.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        raise CustomerDataError(f"locale: {value!r} is not a known language tag (e.g. fr-FR)") from None
    return tag


def parse_birthday(value: str) -> dt.date:
    try:
        day = dt.date.fromisoformat(value.strip())
    except ValueError:
        raise CustomerDataError(f"birthday: {value!r} is not a date (use YYYY-MM-DD)") from None
    if not dt.date(1900, 1, 1) <= day <= dt.datetime.now(dt.UTC).date():
        raise CustomerDataError(f"birthday: {value!r} is out of range")
    return day


def parse_consent(kind: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise CustomerDataError(f"{CONSENT_PREFIX}{kind}: {value!r} is not yes/no")


def clean_standard(name: str, value: str | dt.date) -> Any:
    """A standard field's stored form; idempotent, so a cleaned value passes again."""
    if name == "birthday" and isinstance(value, dt.date):
        return parse_birthday(value.isoformat())
    if name not in STANDARD_FIELDS:
        raise CustomerDataError(f"{name}: not a customer field")
    if not isinstance(value, str):
        raise CustomerDataError(f"{name}: must be text")
    value = value.strip()
    if name == "email":
        return normalize_email(value)
    if name == "locale":
        return normalize_locale(value)
    if name == "birthday":
        return parse_birthday(value)
    limit = {"first_name": 200, "last_name": 200, "phone": 40}[name]
    if len(value) > limit:
        raise CustomerDataError(f"{name}: longer than {limit} characters")
    return value


def check_external_id(value: str) -> str:
    """External ids are the caller's keys: 1-128 printable characters, no surrounding space."""
    if not isinstance(value, str) or not value or len(value) > MAX_EXTERNAL_ID \
            or value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise CustomerDataError("external_id must be 1 to 128 printable characters "
                                "without surrounding spaces")
    return value


def clean_attribute(name: str, value: Any) -> Any:
    """An attribute value as stored: text, number, boolean, or None (= remove)."""
    if not isinstance(name, str) or not ATTRIBUTE_NAME.match(name):
        raise CustomerDataError(f"attribute name {name!r} is not usable (letters, digits, "
                                f"_ . -; at most 64)")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_ATTRIBUTE_NUMBER:
            raise CustomerDataError(f"attribute {name}: number out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_ATTRIBUTE_NUMBER:
            raise CustomerDataError(f"attribute {name}: number out of range")
        return value
    if isinstance(value, str):
        if len(value) > MAX_ATTRIBUTE_TEXT or "\x00" in value:
            raise CustomerDataError(f"attribute {name}: text longer than {MAX_ATTRIBUTE_TEXT} "
                                    f"characters or containing NUL")
        return value
    raise CustomerDataError(f"attribute {name}: must be text, a number, true/false or null")


def check_consent_kind(kind: str) -> str:
    """A consent kind named by an API or NDJSON caller."""
    if not isinstance(kind, str) or not CONSENT_KIND.match(kind):
        raise CustomerDataError(f"consent kind {kind!r}: lowercase letters, digits and _")
    return kind


def apply_changes(customer: Customer, values: dict[str, Any], attributes: dict[str, Any]) -> bool:
    """Set fields and merge attributes; return True if anything changed."""
    changed = False
    for name, value in values.items():
        if getattr(customer, name) != value:
            setattr(customer, name, value)
            changed = True
    current = dict(customer.attributes or {})
    merged = {**current, **attributes}
    if merged != current:
        customer.attributes = merged
        changed = True
    return changed


def record_consent(session: Session, customer: Customer, kind: str, granted: bool, source: str,
                   text: str | None = None, *, recorded_at: dt.datetime | None = None) -> bool:
    """Append a consent decision unless it repeats the current one.

    ``recorded_at``: when the decision was made, if not now (e.g. a migrated history).
    """
    current = customer.current_consents().get(kind)
    if current is not None and current.granted == granted:
        return False
    consent = Consent(tenant_id=customer.tenant_id, kind=kind, granted=granted, source=source,
                      text=text, recorded_at=recorded_at or utcnow())
    customer.consents.append(consent)
    session.add(consent)
    session.flush()
    _keep_current(session, consent)
    events.publish(session, events.ConsentRecorded(customer, consent))
    return True


def _keep_current(session: Session, consent: Consent) -> None:
    """Make ``consent`` the customer's current decision of its kind, unless a later one
    is already there (two requests deciding at once: the later decision stays)."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(CurrentConsent).values(
        tenant_id=consent.tenant_id, customer_id=consent.customer_id, kind=consent.kind,
        granted=consent.granted, recorded_at=consent.recorded_at, consent_id=consent.id)
    session.execute(statement.on_conflict_do_update(
        index_elements=[CurrentConsent.customer_id, CurrentConsent.kind],
        set_={"granted": statement.excluded.granted,
              "recorded_at": statement.excluded.recorded_at,
              "consent_id": statement.excluded.consent_id},
        where=CurrentConsent.recorded_at <= statement.excluded.recorded_at))


# -- the one write path ---------------------------------------------------------------

@dataclass
class CustomerChanges:
    """A change to one customer, as any writer asks for it; :func:`upsert_customer` checks it.

    ``fields``: standard field -> value (text as received, or already cleaned), None clears.
    ``attributes``: merged into the stored ones; a None value removes that attribute.
    ``replace_attributes``: drop every attribute not named in ``attributes`` first.
    ``consents``: kind -> granted, appended with the write's source unless it repeats the
    current decision; ``consent_texts``: the sentence shown per kind, when a form showed one.
    """

    fields: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    replace_attributes: bool = False
    consents: dict[str, bool] = field(default_factory=dict)
    consent_texts: Mapping[str, str] | None = None


@dataclass
class UpsertResult:
    customer: Customer
    created: bool
    #: What changed, named as CRM records name it: ``first_name``, ``attributes.points``,
    #: ``consents.marketing_email``. Empty: nothing written (no ``customer.updated`` follows).
    changed_fields: set[str]

    @property
    def changed(self) -> bool:
        return bool(self.changed_fields)

    @property
    def data_changed(self) -> bool:
        """Fields or attributes changed (what cards show), consents aside."""
        return any(not name.startswith("consents.") for name in self.changed_fields)


@dataclass
class UpsertBatch:
    """One import batch's customers and email owners, read in two queries instead of two
    per row. Rows are written without savepoint or flush: the caller flushes the batch and
    redoes it row by row (without a batch) if the database still refuses it."""

    customers: dict[str, Customer]
    email_owners: dict[str, str]  # email -> external_id

    @classmethod
    def load(cls, session: Session, tenant_id: int, external_ids: set[str],
             emails: set[str]) -> UpsertBatch:
        customers = {c.external_id: c for c in session.scalars(select(Customer).where(
            Customer.tenant_id == tenant_id, Customer.external_id.in_(external_ids)))}
        owners = {email: external_id for email, external_id in session.execute(
            select(Customer.email, Customer.external_id)
            .where(Customer.tenant_id == tenant_id, Customer.email.in_(emails)))
            if email is not None} if emails else {}
        return cls(customers, owners)


def find_customer(session: Session, tenant_id: int, external_id: str) -> Customer | None:
    return session.scalar(select(Customer).where(Customer.tenant_id == tenant_id,
                                                 Customer.external_id == external_id))


def find_by_email(session: Session, tenant_id: int, email: str) -> Customer | None:
    """The customer holding this (normalized) address in the tenant, if any."""
    return session.scalar(select(Customer).where(Customer.tenant_id == tenant_id,
                                                 Customer.email == email))


def email_owner(session: Session, tenant_id: int, email: str) -> str | None:
    """The external id of the customer holding this (normalized) address, if any."""
    return session.scalar(select(Customer.external_id).where(Customer.tenant_id == tenant_id,
                                                             Customer.email == email))


def upsert_customer(session: Session, tenant_id: int, external_id: str,
                    changes: CustomerChanges, *, source: str, create: bool = True,
                    only_create: bool = False,
                    batch: UpsertBatch | None = None) -> UpsertResult | None:
    """Create or change the tenant's customer with this external id; flushes, never commits.

    None if the customer is absent and ``create`` is False. Raises CustomerDataError
    for a value no customer can take, and CustomerConflict when the email belongs to
    another customer (or, with ``only_create``, the external id is taken); both are
    raised before anything is written, so the session stays usable.
    """
    check_external_id(external_id)
    checked = check_changes(changes)
    if batch is not None:
        customer = batch.customers.get(external_id)
    else:
        customer = find_customer(session, tenant_id, external_id)
    if customer is None and not create:
        return None
    if customer is not None and only_create:
        raise CustomerConflict(f"external_id: {external_id!r} is already used by another customer")
    return _write(session, tenant_id, external_id, customer, checked, source, batch)


def update_customer(session: Session, customer: Customer, changes: CustomerChanges, *,
                    source: str) -> UpsertResult:
    """:func:`upsert_customer` for a customer already loaded."""
    return _write(session, customer.tenant_id, customer.external_id, customer,
                  check_changes(changes), source, None)


def check_consent(kind: str, granted: bool) -> bool:
    """A consent decision any writer may store (API and NDJSON callers: check_consent_kind)."""
    if not isinstance(kind, str) or not STORED_CONSENT_KIND.match(kind):
        raise CustomerDataError(f"consent kind {kind!r}: letters, digits, _ . -; at most 64")
    if not isinstance(granted, bool):
        raise CustomerDataError(f"{CONSENT_PREFIX}{kind}: must be true or false")
    return granted


def check_changes(changes: CustomerChanges) -> CustomerChanges:
    """The change with every value in its stored form, or CustomerDataError (the upsert
    calls it; a caller may too, to answer a bad value before looking the customer up)."""
    fields = {name: None if value is None else clean_standard(name, value)
              for name, value in changes.fields.items()}
    attributes = {name: clean_attribute(name, value) for name, value in changes.attributes.items()}
    for kind, granted in changes.consents.items():
        check_consent(kind, granted)
        if changes.consent_texts is not None and kind not in changes.consent_texts:
            raise ValueError(f"consent {kind!r} was decided but its text was not given")
    return CustomerChanges(fields, attributes, changes.replace_attributes,
                           dict(changes.consents), changes.consent_texts)


def _write(session: Session, tenant_id: int, external_id: str, customer: Customer | None,
           changes: CustomerChanges, source: str, batch: UpsertBatch | None) -> UpsertResult:
    email = changes.fields.get("email")
    if email is not None:
        owner = batch.email_owners.get(email) if batch is not None \
            else email_owner(session, tenant_id, email)
        if owner is not None and owner != external_id:
            raise CustomerConflict(EMAIL_TAKEN)
    current = dict(customer.attributes or {}) if customer is not None else {}
    merged = {} if changes.replace_attributes else dict(current)
    for name, value in changes.attributes.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    if len(merged) > MAX_ATTRIBUTES and len(merged) > len(current):
        raise CustomerDataError(f"a customer has at most {MAX_ATTRIBUTES} attributes")
    if batch is not None:  # the caller flushes the batch and handles the database's refusal
        result = _apply(session, tenant_id, external_id, customer, changes, merged, source)
        batch.customers[external_id] = result.customer
    else:
        try:
            with session.begin_nested():  # a concurrent writer's row: nothing half written
                result = _apply(session, tenant_id, external_id, customer, changes, merged,
                                source)
                session.flush()
        except IntegrityError:
            raise CustomerConflict(ID_OR_EMAIL_TAKEN) from None
    if email is not None and batch is not None:
        batch.email_owners[email] = external_id
    return result


def _apply(session: Session, tenant_id: int, external_id: str, customer: Customer | None,
           changes: CustomerChanges, merged: dict[str, Any], source: str) -> UpsertResult:
    created = customer is None
    if customer is None:
        customer = Customer(tenant_id=tenant_id, external_id=external_id, attributes={})
        session.add(customer)
    changed: set[str] = set()
    for name, value in changes.fields.items():
        if getattr(customer, name) != value:
            setattr(customer, name, value)
            changed.add(name)
    current = dict(customer.attributes or {})
    if merged != current:
        changed.update(f"attributes.{name}" for name in set(current) | set(merged)
                       if current.get(name, _ABSENT) != merged.get(name, _ABSENT))
        customer.attributes = merged
    texts = changes.consent_texts or {}
    for kind, granted in changes.consents.items():
        if record_consent(session, customer, kind, granted, source, texts.get(kind)):
            changed.add(f"consents.{kind}")
    return UpsertResult(customer, created, changed)


_ABSENT = object()


# -- CSV import -----------------------------------------------------------------------

@dataclass
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class UpsertCounts:
    """An import's tally of upserts."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0

    def count(self, result: UpsertResult, changed: list[Customer]) -> None:
        """Count one upsert; an existing customer that changed joins ``changed`` (their
        cards are re-rendered)."""
        if result.created:
            self.created += 1
        elif result.changed:
            self.updated += 1
            changed.append(result.customer)
        else:
            self.unchanged += 1


@dataclass
class ImportReport(UpsertCounts):
    errors: list[RowError] = field(default_factory=list)
    card_problems: list[str] = field(default_factory=list)

    @property
    def imported(self) -> int:
        return self.created + self.updated + self.unchanged


@dataclass
class _Row:
    line: int
    external_id: str
    values: dict[str, Any]
    attributes: dict[str, Any]
    consents: dict[str, bool]


def read_csv_text(path: Path) -> str:
    """UTF-8 (with or without BOM), or UTF-16 with a BOM (Excel's "Unicode text")."""
    raw = path.read_bytes()
    encoding = "utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ImportFileError(
            f"{path}: line {line} is not valid {'UTF-16' if encoding == 'utf-16' else 'UTF-8'}; "
            f"save the file as UTF-8 (in Excel: 'CSV UTF-8')"
        ) from None


def parse_rows(text: str, source: str) -> tuple[list[str], Iterator[_Row | RowError]]:
    # The header decides the delimiter: French and German Excel write ";".
    first_line = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=first_line.count)
    reader = csv.reader(io.StringIO(text), csv.excel, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ImportFileError(f"{source}: the file is empty") from None
    header = [h.lower() for h in header]
    if "external_id" not in header:
        raise ImportFileError(
            f"{source}: no external_id column (found: {', '.join(header) or 'nothing'}); "
            f"the first line must name the columns"
        )
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise ImportFileError(f"{source}: column(s) named twice: {', '.join(duplicates)}")
    bad = [h for h in header if h not in STANDARD_FIELDS and h != "external_id"
           and not (STORED_CONSENT_KIND.match(h[len(CONSENT_PREFIX):])
                    if h.startswith(CONSENT_PREFIX) else ATTRIBUTE_NAME.match(h))]
    if bad:
        raise ImportFileError(f"{source}: column name(s) not usable as attributes: "
                              f"{', '.join(map(repr, bad))}")
    return header, _iter_rows(reader, header)


class _CsvReader(Protocol):
    """csv.reader's object: rows, and the source line it read last."""

    line_num: int

    def __iter__(self) -> Iterator[list[str]]: ...


def _iter_rows(reader: _CsvReader, header: list[str]) -> Iterator[_Row | RowError]:
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield RowError(line, f"{len(cells)} cells but the header has {len(header)} columns")
            continue
        try:
            yield _parse_row(line, dict(zip(header, cells)))
        except CustomerDataError as exc:
            yield RowError(line, str(exc))


def _parse_row(line: int, record: dict[str, str]) -> _Row:
    external_id = record.pop("external_id").strip()
    if not external_id:
        raise CustomerDataError("external_id is empty")
    if len(external_id) > 128:
        raise CustomerDataError("external_id is longer than 128 characters")
    values: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    consents: dict[str, bool] = {}
    for name, cell in record.items():
        if not cell.strip():
            continue  # blank cell: leave the stored value alone
        if name in STANDARD_FIELDS:
            values[name] = clean_standard(name, cell)
        elif name.startswith(CONSENT_PREFIX):
            kind = name[len(CONSENT_PREFIX):]
            consents[kind] = parse_consent(kind, cell)
        else:
            attributes[name] = cell.strip()
    return _Row(line, external_id, values, attributes, consents)


ChangeHook = Callable[[Session, list[Customer]], list[str]]


def import_csv(session: Session, tenant_id: int, path: Path,
               progress: Callable[[int], object] | None = None,
               on_changed: ChangeHook | None = None) -> ImportReport:
    """Upsert customers from a CSV file; commits every batch so good rows are never lost.

    ``on_changed`` runs in each batch's transaction with the customers that
    changed (the update pipeline re-renders their cards); it returns problems
    to report, which never undo the import.
    """
    text = read_csv_text(path)
    _, rows = parse_rows(text, str(path))
    report = ImportReport()
    batch: list[_Row] = []
    for item in rows:
        if isinstance(item, RowError):
            report.errors.append(item)
            if progress:
                progress(1)
            continue
        batch.append(item)
        if len(batch) >= BATCH_SIZE:
            _import_batch(session, tenant_id, batch, report, on_changed)
            if progress:
                progress(len(batch))
            batch = []
    if batch:
        _import_batch(session, tenant_id, batch, report, on_changed)
        if progress:
            progress(len(batch))
    report.errors.sort(key=lambda e: e.line)
    return report


def _import_batch(session: Session, tenant_id: int, batch: list[_Row], report: ImportReport,
                  on_changed: ChangeHook | None) -> None:
    try:
        changed = _apply_batch(session, tenant_id, batch, report, per_row=False)
    except IntegrityError:
        # A conflict we could not foresee (e.g. a concurrent writer): redo row by row.
        session.rollback()
        changed = _apply_batch(session, tenant_id, batch, report, per_row=True)
    session.commit()  # the data is safe before any card work
    if on_changed and changed:
        report.card_problems.extend(on_changed(session, changed))
        session.commit()


def _apply_batch(session: Session, tenant_id: int, batch: list[_Row], report: ImportReport,
                 *, per_row: bool) -> list[Customer]:
    # Fast path: one read for the batch, one flush at the end. Row by row (after the
    # database refused the batch): each row in its own savepoint, read fresh.
    cache = None if per_row else UpsertBatch.load(
        session, tenant_id, {row.external_id for row in batch},
        {row.values["email"] for row in batch if "email" in row.values})
    counts = ImportReport()
    changed_customers: list[Customer] = []
    for row in batch:
        changes = CustomerChanges(row.values, row.attributes, consents=row.consents)
        try:
            result = upsert_customer(session, tenant_id, row.external_id, changes,
                                     source="import", batch=cache)
        except CustomerDataError as exc:
            counts.errors.append(RowError(row.line, str(exc)))
            continue
        assert result is not None
        counts.count(result, changed_customers)
    session.flush()
    report.created += counts.created
    report.updated += counts.updated
    report.unchanged += counts.unchanged
    report.errors.extend(counts.errors)
    return changed_customers

"""Customers: validation, upsert by external id, and CSV import.

CSV import rules (also in README):
- ``external_id`` is required; rows are upserted by it within the tenant.
- Known columns update the matching customer field: email, first_name,
  last_name, locale, phone, birthday (YYYY-MM-DD).
- ``consent_<kind>`` columns (yes/no, true/false, 1/0) record a consent
  decision with source ``import``.
- Any other column becomes a free attribute (points, tier, referral_id ...).
- Columns absent from the file, and blank cells, leave stored values alone.
- A bad row is reported with its line number and skipped; good rows are kept.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from babel import Locale, UnknownLocaleError
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import webhooks_out
from app.models import Consent, CurrentConsent, Customer, utcnow

STANDARD_FIELDS = ("email", "first_name", "last_name", "locale", "phone", "birthday")
CONSENT_PREFIX = "consent_"
BATCH_SIZE = 500
#: Longer input is refused before parsing (RFC 5321 allows 254 characters once normalized).
MAX_EMAIL_INPUT = 320
_TRUE = {"1", "true", "yes", "y", "oui", "ano", "ja"}
_FALSE = {"0", "false", "no", "n", "non", "ne", "nein"}
_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class CustomerDataError(ValueError):
    """A value a customer record cannot take; the message names the field."""


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
    if not dt.date(1900, 1, 1) <= day <= dt.date.today():
        raise CustomerDataError(f"birthday: {value!r} is out of range")
    return day


def parse_consent(kind: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise CustomerDataError(f"{CONSENT_PREFIX}{kind}: {value!r} is not yes/no")


def clean_standard(name: str, value: str) -> Any:
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
    webhooks_out.consent_recorded(session, customer, consent)  # no-op without subscribers
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


# -- CSV import -----------------------------------------------------------------------

@dataclass
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ImportReport:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
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
           and not h.startswith(CONSENT_PREFIX) and not _ATTRIBUTE_NAME.match(h)]
    if bad:
        raise ImportFileError(f"{source}: column name(s) not usable as attributes: "
                              f"{', '.join(map(repr, bad))}")
    return header, _iter_rows(reader, header)


def _iter_rows(reader: Iterable[list[str]], header: list[str]) -> Iterator[_Row | RowError]:
    for cells in reader:
        line = reader.line_num  # type: ignore[attr-defined]
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
               progress: Callable[[int], None] | None = None,
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
    ids = {row.external_id for row in batch}
    emails = {row.values["email"] for row in batch if "email" in row.values}
    existing = {c.external_id: c for c in session.scalars(
        select(Customer).where(Customer.tenant_id == tenant_id, Customer.external_id.in_(ids)))}
    email_owner = dict(session.execute(
        select(Customer.email, Customer.external_id)
        .where(Customer.tenant_id == tenant_id, Customer.email.in_(emails))).all()) if emails else {}
    counts = ImportReport()
    changed_customers: list[Customer] = []
    for row in batch:
        owner = email_owner.get(row.values.get("email"))
        if owner is not None and owner != row.external_id:
            counts.errors.append(RowError(row.line, "email is already used by another customer"))
            continue
        savepoint = session.begin_nested() if per_row else None
        try:
            customer = existing.get(row.external_id)
            created = customer is None
            if customer is None:
                customer = Customer(tenant_id=tenant_id, external_id=row.external_id, attributes={})
                session.add(customer)
                existing[row.external_id] = customer
            changed = apply_changes(customer, row.values, row.attributes)
            for kind, granted in row.consents.items():
                changed = record_consent(session, customer, kind, granted, "import") or changed
            if per_row:
                session.flush()
                savepoint.commit()  # type: ignore[union-attr]
        except IntegrityError:
            savepoint.rollback()  # type: ignore[union-attr]
            existing.pop(row.external_id, None)
            counts.errors.append(RowError(row.line, "conflicts with another customer"))
            continue
        if "email" in row.values:
            email_owner[row.values["email"]] = row.external_id
        if created:
            counts.created += 1
        elif changed:
            counts.updated += 1
            changed_customers.append(customer)
        else:
            counts.unchanged += 1
    session.flush()
    report.created += counts.created
    report.updated += counts.updated
    report.unchanged += counts.unchanged
    report.errors.extend(counts.errors)
    return changed_customers

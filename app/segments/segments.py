"""Segments for marketers: a program's customers filtered by install state and data.

A segment is a typed filter (:class:`Segment`) turned into one SQL query with
``EXISTS`` / ``NOT EXISTS`` probes into ``card_install_states`` (by program and
customer), ``link_tokens`` and ``current_consents``. Counts draw from the
consented audience (``current_consents``) or the tenant's customers, so
PostgreSQL can pick hash or merge semi/anti joins over a million rows; pages
list ``customers`` by keyset (``id > cursor ORDER BY id LIMIT n``) with index
probes per customer, which is how exports stream in constant memory.

A program's audience is its tenant's customers: cards are issued on first
download, so "never downloaded" includes customers without a card.

Install states partition the audience per customer, over both platforms:

- ``installed-any``: a card installed on Apple or Google (``installed-apple``,
  ``installed-google`` narrow it to one platform);
- ``removed``: installed once, installed nowhere now;
- ``downloaded-not-installed``: downloaded (or a link opened to Google), never installed;
- ``never-downloaded``: no install event at all;
- ``not-installed``: everything but ``installed-any``: the "resend" audience.

Consent: unless ``include_without_consent``, only customers whose *current*
``marketing_email`` consent (the latest record of that kind, kept in
``current_consents``) is granted are counted, listed and exported, so a count
is the number of rows an export gives.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy import (
    ColumnElement,
    Float,
    Select,
    SQLColumnExpression,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.orm import Session, load_only

from app.customers.imports import MAX_ATTRIBUTE_NUMBER
from app.distribution import links
from app.infra.models import CardInstallState, CurrentConsent, Customer, LinkToken, Program
from app.tracking import install_state

if TYPE_CHECKING:
    from app.services import Services

STATES = ("never-downloaded", "downloaded-not-installed", "installed-apple", "installed-google",
          "installed-any", "removed", "not-installed")
DEFAULT_CONSENT = "marketing_email"
CHUNK = 1000
MAX_PAGE = 1000
#: Points are attributes: numbers beyond what an attribute may hold match nobody.
MAX_POINTS = MAX_ATTRIBUTE_NUMBER
EXPORT_HEADER = ("external_id", "email", "first_name", "last_name", "locale", "tier", "points",
                 "wallet_apple_installed", "wallet_google_installed", "url")


@dataclass(frozen=True)
class Segment:
    """Which customers of a program. Every filter given must hold (AND).

    Date bounds are aware datetimes, ``*_from`` inclusive and ``*_to``
    exclusive. ``installed_from/to`` bound when a card of the program was first
    installed (on either platform). ``campaign``: customers who were issued a
    link of that campaign in this program.
    """

    program_id: int
    state: str | None = None
    campaign: str | None = None
    tier: str | None = None
    points_min: float | None = None
    points_max: float | None = None
    consent: str = DEFAULT_CONSENT
    include_without_consent: bool = False
    created_from: dt.datetime | None = None
    created_to: dt.datetime | None = None
    installed_from: dt.datetime | None = None
    installed_to: dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        for name in ("created_from", "created_to", "installed_from", "installed_to"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} must be an aware datetime")
        for name in ("points_min", "points_max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not math.isfinite(value)
                                      or abs(value) > MAX_POINTS):
                raise ValueError(f"{name} must be a number from {-MAX_POINTS} to {MAX_POINTS}")
        if (self.points_min is not None and self.points_max is not None
                and self.points_min > self.points_max):
            raise ValueError("points_min is greater than points_max")
        if not self.consent:
            raise ValueError("consent names a consent kind, e.g. marketing_email")

    @classmethod
    def from_params(cls, program_id: int, params: Mapping[str, str]) -> Segment:
        """From query-string-like text (API, forms): ValueError names the bad parameter."""
        known = {"state", "campaign", "tier", "points_min", "points_max", "consent",
                 "include_without_consent", "created_from", "created_to", "installed_from",
                 "installed_to"}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown segment parameter(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, raw in params.items():
            given = str(raw).strip()
            if given == "":
                continue
            if name in ("points_min", "points_max"):
                values[name] = _number(name, given)
            elif name == "include_without_consent":
                values[name] = given.lower() in ("1", "true", "yes", "on")
            elif name.endswith(("_from", "_to")):
                values[name] = parse_bound(name, given)
            else:
                values[name] = given
        return cls(program_id=program_id, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what a count or page answers with, so the filter is visible."""
        return {key: value.isoformat() if isinstance(value, dt.datetime) else value
                for key, value in asdict(self).items()}


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number") from None
    if not math.isfinite(value) or abs(value) > MAX_POINTS:
        raise ValueError(f"{name} must be a number from {-MAX_POINTS} to {MAX_POINTS}")
    return int(value) if value.is_integer() else value


def parse_bound(name: str, text: str) -> dt.datetime:
    """``YYYY-MM-DD`` (midnight UTC; a ``*_to`` date means through that day) or ISO 8601."""
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            if name.endswith("_to"):
                day += dt.timedelta(days=1)
            return dt.datetime.combine(day, dt.time(), dt.UTC)
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        # In UTC, as stored: a time near year 1 or 9999 may not exist there.
        return (value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
                ).astimezone(dt.UTC)
    except ValueError:
        raise ValueError(f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 time") from None
    except OverflowError:
        raise ValueError(f"{name} is out of range (years 1 to 9999, in UTC)") from None


# -- the query -------------------------------------------------------------------------------

def _program(session: Session, segment: Segment) -> Program:
    program = session.get(Program, segment.program_id)
    if program is None:
        raise LookupError(f"no program {segment.program_id}")
    return program


def attribute_names(program: Program) -> tuple[str, str]:
    """The customer attributes holding tier and points, per the program's field mapping."""
    mapping = program.field_mapping or {}
    return str(mapping.get("tier", "tier")), str(mapping.get("points", "points"))


def _has_state(customer_id: SQLColumnExpression[int], program_id: int,
               *conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    """The customer has an install state row in this program matching ``conditions``."""
    return exists().where(CardInstallState.customer_id == customer_id,
                          CardInstallState.program_id == program_id, *conditions)


def _state_conditions(state: str | None, customer_id: SQLColumnExpression[int],
                      program_id: int) -> list[ColumnElement[bool]]:
    if state is None:
        return []

    def has(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
        return _has_state(customer_id, program_id, *conditions)

    installed = has(CardInstallState.state == "installed")
    if state in ("installed-apple", "installed-google"):
        return [has(CardInstallState.platform == state.removeprefix("installed-"),
                    CardInstallState.state == "installed")]
    if state == "installed-any":
        return [installed]
    if state == "not-installed":
        return [~installed]
    if state == "never-downloaded":
        return [~has()]
    if state == "removed":
        return [has(CardInstallState.state == "removed"), ~installed]
    # downloaded-not-installed: some state row, none installed or removed
    return [has(), ~has(CardInstallState.state.in_(("installed", "removed")))]


def _consented(customer_id: SQLColumnExpression[int], kind: str,
               after: int | None = None) -> ColumnElement[bool]:
    """The customer's current decision of this kind is a grant (``current_consents``,
    kept by ``customers.record_consent``). ``after`` repeats a keyset page's lower bound
    on customer ids, so a merge join starts there instead of at the first customer."""
    where = [CurrentConsent.customer_id == customer_id, CurrentConsent.kind == kind,
             CurrentConsent.granted.is_(True)]
    if after is not None:
        where.append(CurrentConsent.customer_id > after)
    return exists().where(*where)


def attribute_text(name: str) -> ColumnElement[Any]:
    expr: ColumnElement[Any] = Customer.attributes[name].as_string()  # JSON subscript: Any
    return expr


def attribute_in_range(dialect: str, name: str, low: float | None,
                       high: float | None) -> ColumnElement[bool]:
    """A numeric attribute within [low, high], whether stored as a JSON number or as text
    ("1280" from a CSV import); anything else is out of range, never a cast error
    aborting the query."""
    if dialect == "postgresql":
        # One jsonpath pass per row: .double() reads numbers and numeric strings, and
        # silent mode turns "abc" into no match. Twice as fast as a regex guard and a
        # cast, which matters on a million customers.
        bounds = [f"@ {op} ${var}" for op, var, value in ((">=", "low", low), ("<=", "high", high))
                  if value is not None]
        variables = {var: value for var, value in (("low", low), ("high", high))
                     if value is not None}
        path = f'$."{_jsonpath_key(name)}".double() ? ({" && ".join(bounds)})'
        return func.jsonb_path_exists(Customer.attributes, cast(literal(path), JSONPATH),
                                      cast(literal(json.dumps(variables)), JSONB), True)
    path = '$."' + name.replace('"', '""') + '"'
    kind = func.json_type(Customer.attributes, path)
    raw = func.json_extract(Customer.attributes, path)
    digits = func.ltrim(func.trim(raw), "-")
    number = case((kind.in_(("integer", "real")), raw),
                  (and_(kind == "text", digits.op("GLOB")("[0-9]*"),
                        digits.op("NOT GLOB")("*[^0-9.]*")), cast(func.trim(raw), Float)),
                  else_=None)
    checks = [number >= literal(low)] if low is not None else []
    if high is not None:
        checks.append(number <= literal(high))
    return and_(*checks)


def _jsonpath_key(name: str) -> str:
    """An attribute name as a quoted jsonpath key (the name comes from the program's
    field mapping, written by its administrators, but is escaped all the same)."""
    return name.replace("\\", "\\\\").replace('"', '\\"')


def _uses_customer_columns(segment: Segment) -> bool:
    return any(value is not None for value in (segment.tier, segment.points_min,
                                               segment.points_max, segment.created_from,
                                               segment.created_to))


def _filters(session: Session, segment: Segment, program: Program,
             customer_id: SQLColumnExpression[int], after: int | None = None, *,
             consent: bool = True) -> list[ColumnElement[bool]]:
    """Everything but the install state, for the customer whose id is ``customer_id``
    (``after``: the keyset page's bound, see :func:`_consented`; ``consent=False``:
    the query already draws from the consented audience)."""
    dialect = session.get_bind().dialect.name
    tier_name, points_name = attribute_names(program)
    where: list[ColumnElement[bool]] = []
    if segment.campaign is not None:
        sent = [LinkToken.customer_id == customer_id, LinkToken.program_id == program.id,
                LinkToken.campaign == segment.campaign]
        if after is not None:
            sent.append(LinkToken.customer_id > after)
        where.append(exists().where(*sent))
    if segment.tier is not None:
        where.append(func.lower(attribute_text(tier_name)) == segment.tier.lower())
    if segment.points_min is not None or segment.points_max is not None:
        where.append(attribute_in_range(dialect, points_name, segment.points_min,
                                        segment.points_max))
    if consent and not segment.include_without_consent:
        where.append(_consented(customer_id, segment.consent, after))
    if segment.created_from is not None:
        where.append(Customer.created_at >= segment.created_from)
    if segment.created_to is not None:
        where.append(Customer.created_at < segment.created_to)
    return where


def _installed_between(segment: Segment, customer_id: SQLColumnExpression[int],
                       program_id: int) -> list[ColumnElement[bool]]:
    bounds: list[ColumnElement[bool]] = []
    if segment.installed_from is not None:
        bounds.append(CardInstallState.first_installed_at >= segment.installed_from)
    if segment.installed_to is not None:
        bounds.append(CardInstallState.first_installed_at < segment.installed_to)
    return [_has_state(customer_id, program_id, *bounds)] if bounds else []


def conditions(session: Session, segment: Segment, program: Program | None = None,
               after_id: int | None = None) -> list[ColumnElement[bool]]:
    """The WHERE clauses over ``customers`` (a query listing customers by id, from
    ``after_id`` on if given)."""
    program = program or _program(session, segment)
    where: list[ColumnElement[bool]] = [Customer.tenant_id == program.tenant_id]
    if after_id is not None:
        where.append(Customer.id > after_id)
    where += _state_conditions(segment.state, Customer.id, program.id)
    where += _installed_between(segment, Customer.id, program.id)
    return where + _filters(session, segment, program, Customer.id, after_id)


def count_query(session: Session, segment: Segment, program: Program) -> Select[int]:
    """The count, drawn from the smallest table that holds the audience.

    With the consent filter (the default), the audience is the tenant's rows of
    ``current_consents`` granting that kind, read from a partial index in
    customer order; the customers table joins in only when one of its columns is
    filtered. Install states are probed by (program, customer): hash or merge
    semi/anti joins, one pass each, no hop through cards.
    """
    if segment.include_without_consent:
        return select(func.count(Customer.id)).where(*conditions(session, segment, program))
    audience = CurrentConsent.customer_id
    query = select(func.count(audience)).select_from(CurrentConsent)
    if _uses_customer_columns(segment):
        query = query.join(Customer, Customer.id == audience)
    where = [CurrentConsent.tenant_id == program.tenant_id,
             CurrentConsent.kind == segment.consent, CurrentConsent.granted.is_(True)]
    where += _state_conditions(segment.state, audience, program.id)
    where += _installed_between(segment, audience, program.id)
    return query.where(*where, *_filters(session, segment, program, audience, consent=False))


def _tune(session: Session) -> None:
    """PostgreSQL: these are analytical queries over a million rows. JIT compiling them
    costs more than it saves, and 4 MB of work_mem sends the hash joins to disk."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL jit = off"))
        session.execute(text("SET LOCAL work_mem = '32MB'"))


def count(session: Session, segment: Segment) -> int:
    """How many customers the segment holds (what an export would write)."""
    program = _program(session, segment)
    _tune(session)
    return session.scalar(count_query(session, segment, program)) or 0


def _customers(session: Session, segment: Segment, program: Program, after_id: int,
               limit: int) -> list[Customer]:
    return list(session.scalars(
        select(Customer)
        .options(load_only(Customer.id, Customer.tenant_id, Customer.external_id,
                           Customer.email, Customer.first_name, Customer.last_name,
                           Customer.locale, Customer.attributes))
        .where(*conditions(session, segment, program, after_id))
        .order_by(Customer.id).limit(limit)))


def _item(customer: Customer, names: tuple[str, str], status: dict[str, Any]) -> dict[str, Any]:
    attributes = customer.attributes or {}
    return {"external_id": customer.external_id, "email": customer.email,
            "first_name": customer.first_name, "last_name": customer.last_name,
            "locale": customer.locale, "tier": attributes.get(names[0]),
            "points": attributes.get(names[1]), **status}


def page(session: Session, segment: Segment, *, after_id: int | None = None,
         limit: int = 100) -> dict[str, Any]:
    """One page by customer id (keyset): ``next_cursor`` goes in ``after_id`` next time."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    program = _program(session, segment)
    _tune(session)
    customers = _customers(session, segment, program, after_id or 0, limit)
    statuses = install_state.wallet_status(session, [c.id for c in customers],
                                           program_id=program.id)
    names = attribute_names(program)
    return {"items": [_item(c, names, statuses[c.id]) for c in customers],
            "next_cursor": customers[-1].id if len(customers) == limit else None}


# -- export -----------------------------------------------------------------------------------

def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def export_csv(session: Session, services: Services, segment: Segment, out: TextIO, *,
               link_purpose: str = "download", link_campaign: str | None = None,
               link_expires_at: dt.datetime | None = None,
               progress: Callable[[int], object] | None = None, limit: int | None = None) -> int:
    """Write the segment as CSV with a fresh personal link per row; the row count.

    A thousand customers at a time: read by keyset, links issued in one INSERT,
    committed, then written, so memory stays flat and the file only ever holds
    links that exist. ``limit`` caps the rows (e.g. a test send).
    """
    written = 0
    for chunk, rows in iter_export_csv(session, services, segment, link_purpose=link_purpose,
                                       link_campaign=link_campaign,
                                       link_expires_at=link_expires_at, limit=limit):
        out.write(chunk)
        written += rows
        if progress and rows:
            progress(rows)
    return written


def iter_export_csv(session: Session, services: Services, segment: Segment, *,
                    link_purpose: str = "download", link_campaign: str | None = None,
                    link_expires_at: dt.datetime | None = None,
                    limit: int | None = None) -> Iterator[tuple[str, int]]:
    """The export as (CSV text, rows in it) chunks: the header, then one per thousand
    customers, each yielded after its links are committed (for streamed HTTP answers)."""

    program = _program(session, segment)
    names = attribute_names(program)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_HEADER)
    yield _drain(buffer), 0
    written, after = 0, 0
    while limit is None or written < limit:
        size = CHUNK if limit is None else min(CHUNK, limit - written)
        _tune(session)  # per chunk: SET LOCAL ends with each commit
        customers = _customers(session, segment, program, after, size)
        if not customers:
            break
        statuses = install_state.wallet_status(session, [c.id for c in customers],
                                               program_id=program.id)
        lines = [_export_line(customer, names, statuses[customer.id],
                              links.link_url(services.settings.public_url, token))
                 for customer, token in links.issue_tokens(
                     session, program, customers, link_purpose, campaign=link_campaign,
                     expires_at=link_expires_at)]
        session.commit()  # only committed links reach the file
        writer.writerows(lines)
        written += len(lines)
        after = customers[-1].id
        for customer in customers:  # keep the identity map at one chunk
            session.expunge(customer)
        yield _drain(buffer), len(lines)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _export_line(customer: Customer, names: tuple[str, str], status: dict[str, Any],
                 url: str) -> list[str]:
    item = _item(customer, names, status)
    return [_csv_value(item[column]) for column in EXPORT_HEADER[:-1]] + [url]

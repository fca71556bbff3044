"""Request and response models of the API (pydantic), which spectree turns into the
OpenAPI 3.1 document. Patterns here are also what fuzzers generate from, so they
say exactly what the domain accepts: no control characters (PostgreSQL refuses
NUL, and nothing a card shows needs them), bounded lengths and numbers.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
)

# One line of printable text.
LINE = r"^[^\x00-\x1f\x7f]*$"
Line = Annotated[str, StringConstraints(pattern=LINE)]
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
AttributeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
ConsentKind = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=128,
                                              pattern=r"^[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?$")]
Email = Annotated[str, StringConstraints(max_length=320,
                                         pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$")]
Locale = Annotated[str, StringConstraints(max_length=35, pattern=r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")]
AttributeNumber = Annotated[int, Field(ge=-(10**15), le=10**15)]
AttributeFloat = Annotated[float, Field(ge=-1e15, le=1e15, allow_inf_nan=False)]
AttributeText = Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\x00]*$")]
AttributeValue = StrictBool | AttributeNumber | AttributeFloat | AttributeText
Scope = Literal["read", "write", "admin"]


# -- strict request values -----------------------------------------------------------------
#
# A request field takes its own type and nothing that would convert to it: no 0 for a
# date (1970-01-01), no false for a number, no "1" for an integer. JSON bodies validate in
# pydantic's strict mode; dates are ISO text only (strict mode would refuse text, lax
# mode takes numbers and numeric strings); query strings, which are text by nature, go
# through parsers that accept one spelling per value.

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"
                       r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?")
_QUERY_INT = re.compile(r"-?[0-9]{1,19}")
_QUERY_NUMBER = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][+-]?[0-9]{1,3})?")


def _iso_date(value: Any) -> dt.date:
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise ValueError("must be a date as text, YYYY-MM-DD")
    return dt.date.fromisoformat(value)  # ValueError for 2026-02-30


def _iso_datetime(value: Any) -> dt.datetime:
    if not isinstance(value, str) or not _DATETIME.fullmatch(value):
        raise ValueError("must be an ISO 8601 time as text, e.g. 2026-05-01T12:00:00Z")
    parsed = dt.datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    if parsed.tzinfo is None:
        return parsed  # the domain says whether a naive time will do
    try:
        return parsed.astimezone(dt.UTC)  # as stored; near year 1 or 9999 it may not exist
    except OverflowError:
        raise ValueError("is out of range (years 1 to 9999, in UTC)") from None


def _query_int(value: Any) -> Any:
    if isinstance(value, str):
        if not _QUERY_INT.fullmatch(value):
            raise ValueError("must be a whole number in decimal digits")
        return int(value)
    return value


def _query_number(value: Any) -> Any:
    if isinstance(value, str):
        if not _QUERY_NUMBER.fullmatch(value):
            raise ValueError("must be a decimal number")
        return float(value)
    return value


def _query_bool(value: Any) -> Any:
    if isinstance(value, str):
        if value not in ("true", "false"):
            raise ValueError("must be true or false")
        return value == "true"
    return value


IsoDate = Annotated[dt.date, PlainValidator(_iso_date, json_schema_input_type=str),
                    WithJsonSchema({"type": "string", "format": "date"})]
IsoDateTime = Annotated[dt.datetime, PlainValidator(_iso_datetime, json_schema_input_type=str),
                        WithJsonSchema({"type": "string", "format": "date-time"})]
QueryInt = Annotated[int, BeforeValidator(_query_int)]
QueryNumber = Annotated[float, BeforeValidator(_query_number)]
QueryBool = Annotated[bool, BeforeValidator(_query_bool)]


class Strict(BaseModel):
    """Request bodies: unknown keys are an error, not silently dropped, and every value
    has its field's JSON type (no conversions)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    """Query strings: every value is text, parsed by the field's one spelling."""

    model_config = ConfigDict(strict=True)


# -- problems and pages ---------------------------------------------------------------

class FieldError(BaseModel):
    loc: str
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details (media type application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldError] | None = Field(
        default=None, description="Per-field problems of an invalid request.")


class PageQuery(Query):
    limit: QueryInt = Field(50, ge=1, le=200, description="Items per page.")
    cursor: str = Field("", max_length=200, pattern=r"^[A-Za-z0-9_-]*$",
                        description="`next_cursor` of the previous page; empty for the first.")


# -- programs ---------------------------------------------------------------------------

class ProgramOptions(Strict):
    barcode_format: Literal["qr", "pdf417", "aztec", "code128"] | None = None


class ProgramCreate(Strict):
    slug: Slug
    name: Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=LINE)]
    template: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    pass_type_identifier: Annotated[str, StringConstraints(max_length=255, pattern=LINE)] | None = Field(
        default=None, description="Apple pass type; default: the tenant's only one.")
    field_mapping: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")],
                        AttributeName] = Field(default_factory=dict, max_length=50)
    options: ProgramOptions = Field(default_factory=ProgramOptions)


class ProgramPatch(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=LINE)] | None = None
    template: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    field_mapping: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")],
                        AttributeName] | None = Field(default=None, max_length=50)
    options: ProgramOptions | None = None


class ProgramOut(BaseModel):
    slug: str
    name: str
    template: str
    pass_type_identifier: str
    team_identifier: str
    field_mapping: dict[str, Any]
    options: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime


class ProgramChanged(ProgramOut):
    cards_updated: int = Field(description="Cards whose content changed (pushed).")
    card_problems: list[str] = Field(description="Cards whose data no longer renders.")


class ProgramPage(BaseModel):
    items: list[ProgramOut]
    next_cursor: str | None


class ProgramDeleteQuery(Query):
    cascade: QueryBool = Field(False, description="Also delete the program's cards (installed "
                                             "cards stop updating).")


class PreviewQuery(Query):
    customer: str = Field("", max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$",
                          description="External id of the customer to show; "
                                      "empty: template sample values.")


class TemplateOut(BaseModel):
    name: str
    title: str
    style: str
    variables: list[str]


class TemplateList(BaseModel):
    items: list[TemplateOut]


# -- customers ------------------------------------------------------------------------

class CustomerWrite(Strict):
    """Standard fields: absent = unchanged, null = cleared."""

    email: Email | None = None
    first_name: Annotated[str, StringConstraints(max_length=200, pattern=LINE)] | None = None
    last_name: Annotated[str, StringConstraints(max_length=200, pattern=LINE)] | None = None
    locale: Locale | None = None
    phone: Annotated[str, StringConstraints(max_length=40, pattern=LINE)] | None = None
    birthday: IsoDate | None = None
    consents: dict[ConsentKind, StrictBool] = Field(default_factory=dict, max_length=20,
                                              description="kind -> granted; appended to the "
                                                          "consent history (source api).")


class CustomerPut(CustomerWrite):
    attributes: dict[AttributeName, AttributeValue] | None = Field(
        default=None, max_length=100,
        description="Replaces all attributes when given; absent = unchanged.")


class CustomerPatch(CustomerWrite):
    attributes: dict[AttributeName, AttributeValue | None] = Field(
        default_factory=dict, max_length=100,
        description="Merged into the stored attributes; null removes one.")


class ConsentOut(BaseModel):
    granted: bool
    source: str
    recorded_at: dt.datetime


class CustomerCard(BaseModel):
    program: str
    serial_number: str


class CustomerOut(BaseModel):
    external_id: str
    email: str | None
    first_name: str | None
    last_name: str | None
    locale: str | None
    phone: str | None
    birthday: dt.date | None
    attributes: dict[str, Any]
    consents: dict[str, ConsentOut]
    cards: list[CustomerCard]
    created_at: dt.datetime
    updated_at: dt.datetime


class CustomerChanged(CustomerOut):
    card_problems: list[str] = Field(description="Cards whose new data does not render "
                                                 "(the data is saved).")


class CustomerPage(BaseModel):
    items: list[CustomerOut]
    next_cursor: str | None


class RowError(BaseModel):
    line: int = Field(description="Line number in the file (0: the file as a whole).")
    message: str


class ImportJobOut(BaseModel):
    id: int
    status: Literal["queued", "running", "done", "failed"]
    format: Literal["csv", "ndjson"]
    total_rows: int
    created: int
    updated: int
    unchanged: int
    errors: list[RowError]
    created_at: dt.datetime
    finished_at: dt.datetime | None
    attempts: int = Field(description="Runs started; a job whose worker stopped is run "
                                      "again, up to 3 times")


class ImportQuery(Query):
    format: Literal["", "csv", "ndjson"] = Field(
        "", description="Overrides the Content-Type (text/csv or application/x-ndjson).")


# -- cards --------------------------------------------------------------------------------

class CardCreate(Strict):
    program: Slug
    customer: ExternalId


class CardOut(BaseModel):
    serial_number: str
    program: str
    customer: str = Field(description="The customer's external id.")
    version: int
    voided: bool
    last_modified: dt.datetime
    update_tag: int
    apple_devices: int
    google_saved: bool
    expires_at: dt.datetime | None
    created_at: dt.datetime


class CardAction(CardOut):
    queued_pushes: int = Field(description="Push jobs queued (one per channel with devices).")
    card_problems: list[str]


class DeviceLogQuery(PageQuery):
    serial: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_-]*$",
                        description="Only lines about this card.")


class DeviceLogOut(BaseModel):
    id: int
    serial_number: str | None
    message: str
    received_at: dt.datetime


class DeviceLogPage(BaseModel):
    items: list[DeviceLogOut]
    next_cursor: str | None


# -- admin ----------------------------------------------------------------------------

class KeyCreate(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100,
                                           pattern=r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*$")]
    scope: Scope


class KeyOut(BaseModel):
    id: int
    name: str
    prefix: str
    scope: Scope
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself. Shown once: store it now.")


class KeyPage(BaseModel):
    items: list[KeyOut]
    next_cursor: str | None


class AuditOut(BaseModel):
    id: int
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]
    occurred_at: dt.datetime


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None


class TenantOut(BaseModel):
    slug: str
    name: str
    google_issuer_id: str | None
    created_at: dt.datetime


class TenantPatch(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200,
                                           pattern=r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*$")]


# -- distribution: links, segments, funnel --------------------------------------------------

Campaign = Annotated[str, StringConstraints(max_length=100, pattern=LINE)]
LinkPurpose = Literal["download", "enrich", "consent", "enroll"]


class LinkOptions(Strict):
    purpose: LinkPurpose
    campaign: Campaign | None = None
    expires_at: IsoDateTime | None = Field(default=None, description="Aware time in the future.")
    max_uses: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


class LinkCreate(LinkOptions):
    customer: ExternalId | None = Field(default=None, description="External id; none for "
                                                                  "purpose enroll.")


class LinkOut(BaseModel):
    url: str = Field(description="The personal link: a bearer credential, shown once.")
    purpose: str
    customer: str | None
    campaign: str | None
    expires_at: dt.datetime | None
    max_uses: int | None


class LinkBulkCreate(LinkOptions):
    purpose: Literal["download", "enrich", "consent"]
    customers: list[ExternalId] = Field(min_length=1, max_length=1000)


class LinkBulkItem(BaseModel):
    customer: str
    url: str


class LinkBulkOut(BaseModel):
    items: list[LinkBulkItem]
    unknown: list[str] = Field(description="External ids not found (no link issued).")


SegmentState = Literal["never-downloaded", "downloaded-not-installed", "installed-apple",
                       "installed-google", "installed-any", "removed", "not-installed"]
Bound = Annotated[str, StringConstraints(max_length=40, pattern=r"^[0-9T:.+Z-]*$")]


Points = Annotated[float, Field(ge=-1e15, le=1e15, allow_inf_nan=False)]
QueryPoints = Annotated[float, Field(ge=-1e15, le=1e15, allow_inf_nan=False),
                        BeforeValidator(_query_number)]


class SegmentText(Query):
    """The filters that are text alike in a query string and a JSON body."""

    state: SegmentState | Literal[""] = ""
    campaign: Annotated[str, StringConstraints(max_length=100, pattern=LINE)] = ""
    tier: Annotated[str, StringConstraints(max_length=200, pattern=LINE)] = ""
    consent: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = \
        "marketing_email"
    created_from: Bound = ""
    created_to: Bound = ""
    installed_from: Bound = ""
    installed_to: Bound = ""


class SegmentFilter(SegmentText):
    """Every filter given must hold. Dates: YYYY-MM-DD (a *_to date includes that day)
    or ISO 8601."""

    points_min: QueryPoints | None = None
    points_max: QueryPoints | None = None
    include_without_consent: QueryBool = False


class SegmentPageQuery(SegmentFilter):
    limit: QueryInt = Field(50, ge=1, le=200)
    cursor: str = Field("", max_length=200, pattern=r"^[A-Za-z0-9_-]*$")


class SegmentExport(SegmentText, Strict):
    """The filters of SegmentFilter as JSON values, and the links to issue."""

    points_min: Points | None = None
    points_max: Points | None = None
    include_without_consent: bool = False
    link_purpose: Literal["download", "enrich", "consent"] = "download"
    link_campaign: Campaign | None = None
    link_expires_at: IsoDateTime | None = None
    limit: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None, description="At most this many rows (e.g. a test send).")


class SegmentCount(BaseModel):
    segment: dict[str, Any]
    count: int


class SegmentMember(BaseModel):
    external_id: str
    email: str | None
    first_name: str | None
    last_name: str | None
    locale: str | None
    tier: Any = None
    points: Any = None
    wallet_status: str
    wallet_installed: bool
    wallet_apple_installed: bool
    wallet_google_installed: bool
    wallet_apple_state: str | None
    wallet_google_state: str | None
    wallet_apple_devices: int
    wallet_apple_installed_at: dt.datetime | None
    wallet_google_installed_at: dt.datetime | None


class SegmentPage(BaseModel):
    items: list[SegmentMember]
    next_cursor: str | None


class FunnelQuery(Query):
    by: Literal["day", "campaign"] = "day"
    campaign: Annotated[str, StringConstraints(max_length=100, pattern=LINE)] = ""
    date_from: Bound = Field("", alias="from")
    date_to: Bound = Field("", alias="to")


class FunnelRow(BaseModel):
    day: str | None
    campaign: str | None
    links_issued: int
    opened: int
    downloaded_apple: int
    downloaded_google: int
    installed_apple: int
    installed_google: int


class FunnelOut(BaseModel):
    rows: list[FunnelRow]


# -- webhooks -----------------------------------------------------------------------------

EventType = Literal["card.downloaded", "card.installed", "card.removed", "customer.enrolled",
                    "customer.updated", "consent.changed"]


class WebhookCreate(Strict):
    url: Annotated[str, StringConstraints(max_length=1000, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")]
    event_types: list[EventType] = Field(min_length=1, max_length=6)
    description: Annotated[str, StringConstraints(max_length=200, pattern=LINE)] | None = None


class WebhookPatch(Strict):
    active: bool | None = None
    description: Annotated[str, StringConstraints(max_length=200, pattern=LINE)] | None = None


class WebhookOut(BaseModel):
    id: int
    url: str
    event_types: list[str]
    active: bool
    description: str | None
    created_at: dt.datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="HMAC key to verify our signatures. Shown once.")


class WebhookPage(BaseModel):
    items: list[WebhookOut]
    next_cursor: str | None


class DeliveryOut(BaseModel):
    id: int
    subscription_id: int
    event_id: str
    event_type: str
    created_at: dt.datetime
    attempts: int
    last_status: int | None
    last_error: str | None
    done_at: dt.datetime | None
    outcome: str | None


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None

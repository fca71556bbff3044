"""Distribution: personal links (one or bulk), segments (count, pages, CSV export with a
fresh link per row) and the campaign funnel, per program."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import stream_with_context
from sqlalchemy import select

from app.api.core import (
    ApiProblem,
    bp,
    db,
    decode_cursor,
    encode_cursor,
    not_found,
    query,
    record,
    reply,
    require,
    responses,
    services,
    spec,
)
from app.api.core import body as json_body
from app.api.programs import load_program
from app.api.schemas import (
    FunnelOut,
    FunnelQuery,
    FunnelRow,
    LinkBulkCreate,
    LinkBulkItem,
    LinkBulkOut,
    LinkCreate,
    LinkOut,
    SegmentCount,
    SegmentExport,
    SegmentFilter,
    SegmentMember,
    SegmentPage,
    SegmentPageQuery,
)
from app.customers.imports import find_customer
from app.distribution import links
from app.infra.models import Customer, Program
from app.segments import funnel_stats, segments
from app.segments.segments import Segment

TAG = "distribution"
_FILTERS = tuple(SegmentFilter.model_fields)


def _unprocessable(exc: Exception) -> ApiProblem:
    return ApiProblem(422, "Unprocessable Content", str(exc))


# -- links --------------------------------------------------------------------------------

@bp.post("/programs/<slug>/links")
@require("write")
@spec.validate(json=LinkCreate, resp=responses({201: LinkOut}, 400, 403, 404, 413, 422),
               tags=[TAG], operation_id="issueLink")
def issue_link(slug: str) -> Any:
    """Issue one personal token link (`/l/<token>`): a bearer credential for that customer
    and purpose, shown once (only its hash is stored)."""
    data = json_body(LinkCreate)
    session = db()
    program = load_program(slug)
    customer = None
    if data.customer is not None:
        customer = find_customer(session, data.customer)
        if customer is None:
            raise not_found("customer")
    try:
        token = links.issue_token(session, program, customer, data.purpose,
                                  campaign=data.campaign, expires_at=data.expires_at,
                                  max_uses=data.max_uses)
    except ValueError as exc:
        raise _unprocessable(exc) from None
    record("link.issue", f"program:{slug}", {"purpose": data.purpose, "campaign": data.campaign,
                                              "customer": data.customer})
    session.commit()
    return reply(LinkOut(url=links.link_url(services().settings.public_url, token),
                         purpose=data.purpose, customer=data.customer,
                         campaign=(data.campaign or "").strip() or None,
                         expires_at=data.expires_at, max_uses=data.max_uses), 201)


@bp.post("/programs/<slug>/links/bulk")
@require("write")
@spec.validate(json=LinkBulkCreate, resp=responses({201: LinkBulkOut}, 400, 403, 404, 413, 422),
               tags=[TAG], operation_id="issueLinks")
def issue_links(slug: str) -> Any:
    """Issue a link for each of up to 1,000 customers at once (one INSERT per 1,000).
    External ids not found are listed in ``unknown`` and get no link."""
    data = json_body(LinkBulkCreate)
    session = db()
    program = load_program(slug)
    wanted = list(dict.fromkeys(data.customers))
    found = {c.external_id: c for c in session.scalars(
        select(Customer).where(Customer.external_id.in_(wanted)))}
    try:
        issued = list(links.issue_tokens(
            session, program, [found[e] for e in wanted if e in found], data.purpose,
            campaign=data.campaign, expires_at=data.expires_at, max_uses=data.max_uses))
    except ValueError as exc:
        raise _unprocessable(exc) from None
    record("link.issue_bulk", f"program:{slug}",
           {"purpose": data.purpose, "campaign": data.campaign, "count": len(issued)})
    session.commit()
    public = services().settings.public_url
    return reply(LinkBulkOut(
        items=[LinkBulkItem(customer=c.external_id, url=links.link_url(public, token))
               for c, token in issued],
        unknown=[e for e in wanted if e not in found]), 201)


# -- segments -----------------------------------------------------------------------------

def _segment(program: Program, params: SegmentFilter | SegmentExport) -> Segment:
    raw = {name: getattr(params, name) for name in _FILTERS}
    # Identity, not equality: 0 == False, and points_min=0 is a filter, not an absent one.
    text = {name: ("true" if value is True else "" if value is None or value is False
                   else str(value)) for name, value in raw.items()}
    try:
        return Segment.from_params(program.id, text)
    except ValueError as exc:
        raise _unprocessable(exc) from None


@bp.get("/programs/<slug>/segment")
@require("read")
@spec.validate(query=SegmentFilter, resp=responses({200: SegmentCount}, 404), tags=[TAG],
               operation_id="countSegment")
def count_segment(slug: str) -> Any:
    """How many of the program's customers match the filters (= rows an export writes)."""
    program = load_program(slug)
    segment = _segment(program, query(SegmentFilter))
    return reply(SegmentCount(segment=segment.to_dict(), count=segments.count(db(), segment)))


@bp.get("/programs/<slug>/segment/customers")
@require("read")
@spec.validate(query=SegmentPageQuery, resp=responses({200: SegmentPage}, 400, 404),
               tags=[TAG], operation_id="listSegment")
def list_segment(slug: str) -> Any:
    """The matching customers with their wallet status, a page at a time."""
    program = load_program(slug)
    params = query(SegmentPageQuery)
    segment = _segment(program, params)
    result = segments.page(db(), segment, after_id=decode_cursor(params.cursor),
                           limit=params.limit)
    after = result["next_cursor"]
    return reply(SegmentPage(items=[SegmentMember(**item) for item in result["items"]],
                             next_cursor=encode_cursor(after) if after else None))


@bp.post("/programs/<slug>/segment/export")
@require("write")
@spec.validate(json=SegmentExport, resp=responses({200: None}, 400, 403, 404, 413), tags=[TAG],
               operation_id="exportSegment")
def export_segment(slug: str) -> Any:
    """The segment as CSV for an email tool, with a fresh personal link per row (links
    are issued, hence POST and the write scope)."""
    data = json_body(SegmentExport)
    session = db()
    program = load_program(slug)
    segment = _segment(program, data)
    chunks = segments.iter_export_csv(session, services(), segment,
                                      link_purpose=data.link_purpose,
                                      link_campaign=data.link_campaign,
                                      link_expires_at=data.link_expires_at, limit=data.limit)
    try:  # the header and the first thousand rows: bad options fail here, as a 422
        first = [next(chunks, ("", 0)), next(chunks, ("", 0))]
    except ValueError as exc:
        raise _unprocessable(exc) from None
    record("segment.export", f"program:{slug}", segment.to_dict())
    session.commit()

    def body() -> Iterator[str]:
        yield from (text for text, _ in first)
        yield from (text for text, _ in chunks)
        session.commit()  # end the last (read-only) transaction: hold no locks while idle

    # A (generator, status, headers) tuple: spectree passes it through unbuffered,
    # so millions of rows stream in constant memory.
    return stream_with_context(body()), 200, {
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{slug}-segment.csv"',
        "Cache-Control": "no-store",  # the file holds bearer links
    }


# -- funnel -----------------------------------------------------------------------------

@bp.get("/programs/<slug>/funnel")
@require("read")
@spec.validate(query=FunnelQuery, resp=responses({200: FunnelOut}, 404), tags=[TAG],
               operation_id="getFunnel")
def get_funnel(slug: str) -> Any:
    """Links issued -> opened -> downloaded -> installed, per day of issue or campaign."""
    program = load_program(slug)
    params = query(FunnelQuery)
    try:
        date_from = (segments.parse_bound("date_from", params.date_from)
                     if params.date_from else None)
        date_to = segments.parse_bound("date_to", params.date_to) if params.date_to else None
        rows = funnel_stats.funnel(db(), program.id, campaign=params.campaign or None,
                                   date_from=date_from, date_to=date_to, by=params.by)
    except ValueError as exc:
        raise _unprocessable(exc) from None
    return reply(FunnelOut(rows=[FunnelRow(**row) for row in rows]))

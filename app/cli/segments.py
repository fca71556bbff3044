"""``passerelle segments`` and ``passerelle funnel``: who to write to, and what came of it."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from tqdm import tqdm

from app.cli.common import DAYS, ROWS, fail, needs_database, services, tenant_program
from app.infra.models import Program, utcnow
from app.segments import funnel_stats, segments
from app.segments.segments import STATES, Segment, parse_bound

F = TypeVar("F", bound=Callable[..., Any])


def _text(options: dict[str, object], name: str) -> str | None:
    return cast("str | None", options.get(name))


def _day(options: dict[str, object], name: str) -> dt.datetime | None:
    """A --*-from/--*-to day as its bound (``*_to`` days are inclusive)."""
    value = options.get(name)
    return None if value is None else parse_bound(name, f"{value:%Y-%m-%d}")


def _number(options: dict[str, object], name: str) -> float | None:
    return cast("float | None", options.get(name))


def _segment_options(func: F) -> F:
    """The filters `segments count` and `segments export` share."""
    day = click.DateTime(["%Y-%m-%d"])
    for option in reversed([
        click.option("--tenant", "tenant_slug", required=True),
        click.option("--program", "program_slug", required=True),
        click.option("--state", type=click.Choice(STATES), default=None,
                     help="Install state (not-installed = anything but installed)."),
        click.option("--campaign", default=None, help="Customers sent a link of this campaign."),
        click.option("--tier", default=None, help="Tier attribute (case-insensitive)."),
        click.option("--points-min", type=float, default=None),
        click.option("--points-max", type=float, default=None),
        click.option("--include-without-consent", is_flag=True,
                     help="Also customers without current marketing_email consent."),
        click.option("--created-from", type=day, default=None, help="Customer created on/after."),
        click.option("--created-to", type=day, default=None, help="Customer created through."),
        click.option("--installed-from", type=day, default=None, help="First installed on/after."),
        click.option("--installed-to", type=day, default=None, help="First installed through."),
    ]):
        func = option(func)
    return func


def _segment(program: Program, options: dict[str, object]) -> Segment:
    """A Segment from the shared options (dates are UTC days, `--*-to` inclusive)."""
    try:
        return Segment(program_id=program.id, state=_text(options, "state"),
                       campaign=_text(options, "campaign"), tier=_text(options, "tier"),
                       points_min=_number(options, "points_min"),
                       points_max=_number(options, "points_max"),
                       include_without_consent=bool(options.get("include_without_consent")),
                       created_from=_day(options, "created_from"),
                       created_to=_day(options, "created_to"),
                       installed_from=_day(options, "installed_from"),
                       installed_to=_day(options, "installed_to"))
    except ValueError as exc:
        fail(str(exc))


@click.group("segments")
def segments_group() -> None:
    """Customers by install state, campaign, attributes and consent."""


@segments_group.command("count")
@_segment_options
@click.option("--json", "as_json", is_flag=True, help="Print the count and filters as JSON.")
@needs_database
def segments_count(tenant_slug: str, program_slug: str, as_json: bool, **options: object) -> None:
    """Count a segment's customers."""
    svc = services()
    with svc.db.session() as session:
        tenant_id = tenant_program(session, tenant_slug, program_slug).tenant_id
    with svc.db.tenant_session(tenant_id) as session:
        segment = _segment(tenant_program(session, tenant_slug, program_slug), options)
        total = segments.count(session, segment)
    if as_json:
        click.echo(json.dumps({"count": total, "segment": segment.to_dict()}))
    else:
        click.echo(total)


@segments_group.command("export")
@_segment_options
@click.option("--out", "out_path", required=True, help="CSV file to write, or - for stdout.")
@click.option("--link-purpose", type=click.Choice(["download", "enrich", "consent"]),
              default="download", show_default=True)
@click.option("--link-campaign", default=None, help="Campaign of the links issued.")
@click.option("--link-expires-in-days", type=DAYS, default=None)
@click.option("--limit", type=ROWS, default=None, help="At most this many rows.")
@needs_database
def segments_export(tenant_slug: str, program_slug: str, out_path: str, link_purpose: str,
                    link_campaign: str | None, link_expires_in_days: int | None,
                    limit: int | None, **options: object) -> None:
    """Write a segment as CSV with a fresh personal link per row."""
    svc = services()
    expires = (utcnow() + dt.timedelta(days=link_expires_in_days)
               if link_expires_in_days else None)
    with svc.db.session() as session:
        tenant_id = tenant_program(session, tenant_slug, program_slug).tenant_id
    to_stdout = out_path == "-"
    target = Path(out_path)
    partial = target.with_name(target.name + ".part")  # renamed once complete
    try:
        with svc.db.tenant_session(tenant_id) as session:
            segment = _segment(tenant_program(session, tenant_slug, program_slug), options)
            total = segments.count(session, segment)
            with (nullcontext(sys.stdout) if to_stdout
                  else partial.open("w", encoding="utf-8", newline="")) as out, \
                    tqdm(total=min(total, limit or total), unit="row", desc="export",
                         disable=None) as bar:
                try:
                    rows = segments.export_csv(
                        session, svc, segment, out, link_purpose=link_purpose,
                        link_campaign=link_campaign, link_expires_at=expires,
                        progress=bar.update, limit=limit)
                except ValueError as exc:
                    fail(str(exc))
        if not to_stdout:
            partial.replace(target)
    finally:
        if not to_stdout:
            partial.unlink(missing_ok=True)
    click.echo(f"{rows} rows written to {'stdout' if to_stdout else target}", err=to_stdout)


@click.command("funnel")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--program", "program_slug", required=True)
@click.option("--campaign", default=None)
@click.option("--from", "date_from", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Links issued on/after this day (UTC).")
@click.option("--to", "date_to", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Links issued through this day (UTC).")
@click.option("--by", type=click.Choice(["day", "campaign"]), default="day", show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@needs_database
def funnel_command(tenant_slug: str, program_slug: str, campaign: str | None,
                   date_from: dt.datetime | None, date_to: dt.datetime | None, by: str,
                   as_csv: bool, as_json: bool) -> None:
    """Links issued -> opened -> downloaded -> installed, per day of issue or campaign."""
    svc = services()
    start = dt.datetime.combine(date_from.date(), dt.time(), dt.UTC) if date_from else None
    end = (dt.datetime.combine(date_to.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
           if date_to else None)
    with svc.db.session() as session:
        tenant_id = tenant_program(session, tenant_slug, program_slug).tenant_id
    with svc.db.tenant_session(tenant_id) as session:
        program = tenant_program(session, tenant_slug, program_slug)
        rows = funnel_stats.funnel(session, program.id, campaign=campaign, date_from=start,
                                   date_to=end, by=by)
    if as_csv:
        funnel_stats.funnel_csv(rows, sys.stdout)
    elif as_json:
        click.echo(json.dumps(rows))
    else:
        widths = [10, 16, 8, 8, 10, 10, 10, 10]
        heads = ["day", "campaign", "issued", "opened", "dl apple", "dl google", "in apple",
                 "in google"]
        click.echo("".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
        for row in rows:
            values = [row[c] if row[c] is not None else "-" for c in funnel_stats.COLUMNS]
            click.echo("".join(f"{str(v):>{w}}" for v, w in zip(values, widths)))


COMMANDS = [segments_group, funnel_command]

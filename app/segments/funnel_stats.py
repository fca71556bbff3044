"""Campaign funnel: links issued -> opened -> downloaded -> installed, by platform.

Each row is a cohort of personal links (a day of issue, or a campaign), and
every column counts within that cohort, so a row reads as a conversion
funnel even when people click days after the email:

- ``links_issued``: token links created for the program (``link_tokens.created_at``);
- ``opened``: of those links, how many had their page opened (a ``link_opened``
  funnel event carrying the link);
- ``downloaded_apple`` / ``downloaded_google``: distinct customers who, through
  one of those links, were served the .pkpass (``apple_downloaded``) or sent to
  Google's save page (``google_opened``);
- ``installed_apple`` / ``installed_google``: distinct customers of those links
  (the link's customer; for enrollment links, who enrolled through it) whose
  card in the program was installed on that platform at or after the link was
  issued (``card_install_states.last_installed_at``). A later removal does not
  undo the conversion.

Days are UTC calendar days of the link's issue.
"""

from __future__ import annotations

import csv
import datetime as dt
from typing import Any, TextIO

from sqlalchemy import ColumnElement, SQLColumnExpression, and_, func, literal, select, union_all
from sqlalchemy.orm import Session

from app.infra.models import Card, CardInstallState, FunnelEvent, LinkToken

COLUMNS = ("day", "campaign", "links_issued", "opened", "downloaded_apple", "downloaded_google",
           "installed_apple", "installed_google")
_DOWNLOAD_KINDS = {"apple_downloaded": "downloaded_apple", "google_opened": "downloaded_google"}


def _day(session: Session, column: SQLColumnExpression[dt.datetime]) -> ColumnElement[str]:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)  # SQLite keeps UTC text


def funnel(session: Session, program_id: int, *, campaign: str | None = None,
           date_from: dt.datetime | None = None, date_to: dt.datetime | None = None,
           by: str = "day") -> list[dict[str, Any]]:
    """Funnel rows for a program, per day of issue or per campaign, oldest/first first.

    ``date_from`` (inclusive) and ``date_to`` (exclusive) bound the links' issue
    time. With ``by="day"`` and no ``campaign``, a row sums all campaigns
    (``campaign`` is None in it).
    """
    if by not in ("day", "campaign"):
        raise ValueError('by must be "day" or "campaign"')
    key = (_day(session, LinkToken.created_at) if by == "day"
           else func.coalesce(LinkToken.campaign, literal("")))
    where = [LinkToken.program_id == program_id]
    if campaign is not None:
        where.append(LinkToken.campaign == campaign)
    if date_from is not None:
        where.append(LinkToken.created_at >= date_from)
    if date_to is not None:
        where.append(LinkToken.created_at < date_to)
    links = (select(LinkToken.id.label("link_id"), LinkToken.customer_id, LinkToken.created_at,
                    key.label("key")).where(*where).subquery("links"))
    rows: dict[str, dict[str, Any]] = {}

    def row(value: str) -> dict[str, Any]:
        if value not in rows:
            rows[value] = {name: 0 for name in COLUMNS}
            rows[value]["day"] = value if by == "day" else None
            rows[value]["campaign"] = campaign if by == "day" else (value or None)
        return rows[value]

    for value, n in session.execute(select(links.c.key, func.count()).group_by(links.c.key)):
        row(value)["links_issued"] = n
    for value, n in session.execute(
            select(links.c.key, func.count(func.distinct(links.c.link_id)))
            .join(FunnelEvent, FunnelEvent.link_id == links.c.link_id)
            .where(FunnelEvent.kind == "link_opened").group_by(links.c.key)):
        row(value)["opened"] = n
    for value, kind, n in session.execute(
            select(links.c.key, FunnelEvent.kind, func.count(func.distinct(FunnelEvent.customer_id)))
            .join(FunnelEvent, FunnelEvent.link_id == links.c.link_id)
            .where(FunnelEvent.kind.in_(tuple(_DOWNLOAD_KINDS)))
            .group_by(links.c.key, FunnelEvent.kind)):
        row(value)[_DOWNLOAD_KINDS[kind]] = n
    for value, platform, n in session.execute(_installed(links, program_id)):
        row(value)[f"installed_{platform}"] = n
    return [rows[value] for value in sorted(rows)]


def _installed(links: Any, program_id: int) -> Any:
    """Per cohort and platform: distinct customers installed at or after their link."""
    people = union_all(
        select(links.c.key, links.c.customer_id, links.c.created_at)
        .where(links.c.customer_id.is_not(None)),
        # enrollment links name nobody: who enrolled (or acted) through them
        select(links.c.key, FunnelEvent.customer_id, links.c.created_at)
        .join(FunnelEvent, FunnelEvent.link_id == links.c.link_id)
        .where(links.c.customer_id.is_(None), FunnelEvent.customer_id.is_not(None)),
    ).subquery("people")
    return (select(people.c.key, CardInstallState.platform,
                   func.count(func.distinct(people.c.customer_id)))
            .join(Card, and_(Card.customer_id == people.c.customer_id,
                             Card.program_id == program_id))
            .join(CardInstallState, CardInstallState.card_id == Card.id)
            .where(CardInstallState.last_installed_at >= people.c.created_at)
            .group_by(people.c.key, CardInstallState.platform))


def funnel_csv(rows: list[dict[str, Any]], out: TextIO) -> int:
    """The rows as CSV (header first, empty cells for None); the number of rows."""
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for item in rows:
        writer.writerow(["" if item[name] is None else item[name] for name in COLUMNS])
    return len(rows)

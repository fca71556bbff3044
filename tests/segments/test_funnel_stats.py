"""Campaign funnel: links issued -> opened -> downloaded -> installed, per day and campaign."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest
from sqlalchemy import select, update

from app.distribution import links
from app.infra.models import Card, Customer, FunnelEvent, LinkToken, Program
from app.segments import funnel_stats
from app.tracking import install_state


def day(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


@pytest.fixture()
def world(services, demo):  # type: ignore[no-untyped-def]
    """spring (issued 1 March): C-1001 opens twice, downloads on Apple and installs;
    C-1002 opens, goes to Google, but had saved the card before the link; C-1003 ignores it.
    summer (issued 2 March): C-1004 opens, installs, later removes; C-1005 ignores it;
    an enrollment link brings a new customer who downloads and installs."""
    program_id = demo["program_ids"]["rewards"]
    with services.db.transaction() as session:
        program = session.get(Program, program_id)
        people = {c.external_id: c for c in session.scalars(select(Customer))}
        newcomer = Customer(tenant_id=program.tenant_id, external_id="C-2000", attributes={})
        session.add(newcomer)
        session.flush()
        link_ids = {}
        for external_id, campaign in (("C-1001", "spring"), ("C-1002", "spring"),
                                      ("C-1003", "spring"), ("C-1004", "summer"),
                                      ("C-1005", "summer"), (None, "summer")):
            customer = people[external_id] if external_id else None
            links.issue_token(session, program, customer,
                              "download" if customer else "enroll", campaign=campaign)
            link_ids[external_id] = session.scalar(
                select(LinkToken.id).order_by(LinkToken.id.desc()).limit(1))
            issued = day("2026-03-01T09:00") if campaign == "spring" else day("2026-03-02T09:00")
            session.execute(update(LinkToken).where(LinkToken.id == link_ids[external_id])
                            .values(created_at=issued))
        # links issued for another program do not count
        club = session.get(Program, demo["program_ids"]["club"])
        links.issue_token(session, club, people["C-1001"], "download", campaign="spring")

        def event(link_of: str | None, kind: str, customer: Customer | None,
                  platform: str | None = None) -> None:
            session.add(FunnelEvent(tenant_id=program.tenant_id, program_id=program_id,
                                    customer_id=customer.id if customer else None,
                                    link_id=link_ids[link_of], kind=kind, platform=platform,
                                    campaign=None, occurred_at=day("2026-03-03")))

        event("C-1001", "link_opened", people["C-1001"], "apple")
        event("C-1001", "link_opened", people["C-1001"], "apple")
        event("C-1001", "apple_downloaded", people["C-1001"], "apple")
        event("C-1002", "link_opened", people["C-1002"], "google")
        event("C-1002", "google_opened", people["C-1002"], "google")
        event("C-1004", "link_opened", people["C-1004"], "apple")
        event(None, "link_opened", None, "apple")
        event(None, "enrolled", newcomer, "apple")
        event(None, "apple_downloaded", newcomer, "apple")

        def card(customer: Customer) -> Card:
            from app.cards.cards import ensure_card

            return ensure_card(session, program, customer)

        install_state.record(session, card(people["C-1001"]), "apple", "registered",
                             device="p1", occurred_at=day("2026-03-01T10:00"))
        install_state.record(session, card(people["C-1002"]), "google", "saved",
                             occurred_at=day("2026-02-01"))
        install_state.record(session, card(people["C-1004"]), "apple", "registered",
                             device="p4", occurred_at=day("2026-03-02T11:00"))
        install_state.record(session, card(people["C-1004"]), "apple", "unregistered",
                             device="p4", occurred_at=day("2026-03-04"))
        install_state.record(session, card(newcomer), "apple", "registered", device="p9",
                             occurred_at=day("2026-03-03"))
    return program_id


def test_by_campaign(services, world) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        rows = funnel_stats.funnel(session, world, by="campaign")
    assert rows == [
        {"day": None, "campaign": "spring", "links_issued": 3, "opened": 2,
         "downloaded_apple": 1, "downloaded_google": 1, "installed_apple": 1,
         "installed_google": 0},
        {"day": None, "campaign": "summer", "links_issued": 3, "opened": 2,
         "downloaded_apple": 1, "downloaded_google": 0, "installed_apple": 2,
         "installed_google": 0},
    ]
    json.dumps(rows)


def test_by_day_with_filters(services, world) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        rows = funnel_stats.funnel(session, world)
        assert [(r["day"], r["campaign"], r["links_issued"], r["installed_apple"])
                for r in rows] == [("2026-03-01", None, 3, 1), ("2026-03-02", None, 3, 2)]
        summer = funnel_stats.funnel(session, world, campaign="summer")
        assert [(r["day"], r["campaign"], r["opened"]) for r in summer] == [
            ("2026-03-02", "summer", 2)]
        late = funnel_stats.funnel(session, world, date_from=day("2026-03-02"))
        assert [r["day"] for r in late] == ["2026-03-02"]
        assert funnel_stats.funnel(session, world, date_to=day("2026-03-01")) == []
        with pytest.raises(ValueError):
            funnel_stats.funnel(session, world, by="week")


def test_csv_and_cli(runner, services, world) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        rows = funnel_stats.funnel(session, world, by="campaign")
    out = io.StringIO()
    assert funnel_stats.funnel_csv(rows, out) == 2
    assert out.getvalue().splitlines() == [
        "day,campaign,links_issued,opened,downloaded_apple,downloaded_google,installed_apple,"
        "installed_google", ",spring,3,2,1,1,1,0", ",summer,3,2,1,0,2,0"]
    base = ["funnel", "--tenant", "demo", "--program", "rewards"]
    result = runner.invoke(args=[*base, "--by", "campaign", "--csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == out.getvalue().splitlines()
    result = runner.invoke(args=[*base, "--from", "2026-03-01", "--to", "2026-03-01", "--json"])
    assert [r["day"] for r in json.loads(result.stdout)] == ["2026-03-01"]
    result = runner.invoke(args=base)
    assert result.exit_code == 0 and "2026-03-02" in result.stdout

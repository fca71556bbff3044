"""Segments: install-state filters, campaign, attributes, consent, dates, pages, CSV export."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app.customers.customers import record_consent
from app.distribution import links
from app.infra.models import Card, Consent, CurrentConsent, Customer, LinkToken, Program
from app.segments import segments
from app.segments.segments import Segment
from app.tracking import install_state

UTC = dt.UTC


def day(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture()
def world(services, demo):  # type: ignore[no-untyped-def]
    """The demo's five customers (all consented) in five install states, plus three
    more with odd consents: who is where is spelled out in each test."""
    rewards = demo["program_ids"]["rewards"]
    with services.db.transaction() as session:
        program = session.get(Program, rewards)
        for external_id, granted in (("C-1006", [True, False]), ("C-1007", []),
                                     ("C-1008", [False, True])):
            customer = Customer(tenant_id=demo["tenant_id"], external_id=external_id,
                                attributes={"points": "abc", "tier": "Gold"})
            session.add(customer)
            session.flush()
            for i, value in enumerate(granted):
                record_consent(session, customer, "marketing_email", value, "test",
                               recorded_at=day("2026-01-01") + dt.timedelta(days=i))
        cards = {c.customer.external_id: c for c in session.scalars(
            select(Card).where(Card.program_id == rewards))}

        def rec(external_id: str, platform: str, kind: str, when: str,
                device: str | None = None) -> None:
            install_state.record(session, cards[external_id], platform, kind, device=device,
                                 occurred_at=day(when))

        rec("C-1001", "apple", "downloaded", "2026-02-28")
        rec("C-1001", "apple", "registered", "2026-03-01", "phone")
        rec("C-1002", "google", "downloaded", "2026-04-09")
        rec("C-1002", "google", "saved", "2026-04-10")
        rec("C-1003", "apple", "downloaded", "2026-03-05")
        rec("C-1004", "apple", "registered", "2026-02-01", "phone")
        rec("C-1004", "apple", "unregistered", "2026-02-03", "phone")
        c1005 = session.scalar(select(Customer).where(Customer.external_id == "C-1005"))
        c1005.attributes = {**c1005.attributes, "points": "500"}  # text, as a CSV import stores it
        session.execute(update(Customer).where(Customer.external_id == "C-1001")
                        .values(created_at=day("2025-01-01")))
        # Another program's state must not leak into rewards' segments.
        club = session.scalar(select(Card).join(Customer).where(
            Card.program_id == demo["program_ids"]["club"], Customer.external_id == "C-1005"))
        install_state.record(session, club, "apple", "registered", device="pad")
        for external_id in ("C-1001", "C-1003"):
            customer = session.scalar(select(Customer).where(Customer.external_id == external_id))
            links.issue_token(session, program, customer, "download", campaign="spring")
    return {"program_id": rewards, "tenant_id": demo["tenant_id"]}


def ids(services, segment: Segment) -> set[str]:  # type: ignore[no-untyped-def]
    """Every external id of the segment, paged, checked against the count."""
    found: list[str] = []
    after = None
    with services.db.session() as session:
        while True:
            result = segments.page(session, segment, after_id=after, limit=2)
            found += [item["external_id"] for item in result["items"]]
            if result["next_cursor"] is None:
                break
            after = result["next_cursor"]
        assert segments.count(session, segment) == len(found) == len(set(found))
    return set(found)


@pytest.mark.parametrize(("state", "expected"), [
    (None, {"C-1001", "C-1002", "C-1003", "C-1004", "C-1005", "C-1008"}),
    ("installed-apple", {"C-1001"}),
    ("installed-google", {"C-1002"}),
    ("installed-any", {"C-1001", "C-1002"}),
    ("removed", {"C-1004"}),
    ("downloaded-not-installed", {"C-1003"}),
    ("never-downloaded", {"C-1005", "C-1008"}),
    ("not-installed", {"C-1003", "C-1004", "C-1005", "C-1008"}),
])
def test_each_state(services, world, state, expected) -> None:  # type: ignore[no-untyped-def]
    assert ids(services, Segment(world["program_id"], state=state)) == expected


def test_consent_is_required_unless_asked_otherwise(services, world) -> None:  # type: ignore[no-untyped-def]
    everyone = ids(services, Segment(world["program_id"], state="never-downloaded",
                                     include_without_consent=True))
    assert everyone == {"C-1005", "C-1006", "C-1007", "C-1008"}  # 1006 withdrew, 1007 never said
    with services.db.transaction() as session:  # C-1005 withdraws today
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1005"))
        record_consent(session, customer, "marketing_email", False, "form")
    assert ids(services, Segment(world["program_id"], state="never-downloaded")) == {"C-1008"}
    sms = Segment(world["program_id"], consent="sms")
    assert ids(services, sms) == set()


def test_points_read_numbers_and_numeric_text_under_any_attribute_name(services, world) -> None:  # type: ignore[no-untyped-def]
    odd = "solde.fidélité (pts)"  # a dot, an accent, a space: quoted, not a nested path
    values = {"C-1001": 12, "C-1002": " 40 ", "C-1003": "4O", "C-1004": True, "C-1005": 40.5}
    with services.db.transaction() as session:
        program = session.get(Program, world["program_id"])
        program.field_mapping = {**program.field_mapping, "points": odd}
        for external_id, value in values.items():
            customer = session.scalar(select(Customer).where(Customer.external_id == external_id))
            customer.attributes = {**customer.attributes, odd: value}
    program_id = world["program_id"]
    assert ids(services, Segment(program_id, points_min=12)) == {"C-1001", "C-1002", "C-1005"}
    assert ids(services, Segment(program_id, points_min=13, points_max=40)) == {"C-1002"}
    assert ids(services, Segment(program_id, points_max=11)) == set()


def test_current_consent_follows_the_latest_decision_whatever_the_arrival_order(  # type: ignore[no-untyped-def]
        services, world) -> None:
    """current_consents (what segments read) always equals the history's latest record."""
    def current(external_id: str) -> tuple[bool, str] | None:
        with services.db.session() as session:
            row = session.execute(
                select(CurrentConsent.granted, Consent.source)
                .join(Consent, Consent.id == CurrentConsent.consent_id)
                .join(Customer, Customer.id == CurrentConsent.customer_id)
                .where(Customer.external_id == external_id,
                       CurrentConsent.kind == "marketing_email")).one_or_none()
        return None if row is None else (row[0], row[1])

    assert current("C-1006") == (False, "test") and current("C-1008") == (True, "test")
    assert current("C-1007") is None
    with services.db.transaction() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1007"))
        # A newer decision, then an older one arriving late (a migrated history)
        record_consent(session, customer, "marketing_email", True, "form",
                       recorded_at=day("2026-05-02"))
        record_consent(session, customer, "marketing_email", False, "late-import",
                       recorded_at=day("2026-05-01"))
    assert current("C-1007") == (True, "form")
    assert "C-1007" in ids(services, Segment(world["program_id"]))
    with services.db.session() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1007"))
        assert customer.current_consents()["marketing_email"].granted is True  # same answer


def test_campaign_tier_points_and_dates(services, world) -> None:  # type: ignore[no-untyped-def]
    program_id = world["program_id"]
    assert ids(services, Segment(program_id, campaign="spring")) == {"C-1001", "C-1003"}
    assert ids(services, Segment(program_id, campaign="spring", state="not-installed")) == {
        "C-1003"}
    assert ids(services, Segment(program_id, campaign="autumn")) == set()
    assert ids(services, Segment(program_id, tier="member")) == {"C-1004", "C-1005"}
    assert ids(services, Segment(program_id, points_min=300, points_max=2000)) == {
        "C-1001", "C-1002", "C-1005"}  # C-1005's "500" is text; C-1008's "abc" is no number
    assert ids(services, Segment(program_id, points_min=10000)) == {"C-1003"}
    assert ids(services, Segment(program_id, points_max=0, state="removed")) == {"C-1004"}
    assert ids(services, Segment(program_id, created_to=day("2025-06-01"))) == {"C-1001"}
    assert "C-1001" not in ids(services, Segment(program_id, created_from=day("2025-06-01")))
    assert ids(services, Segment(program_id, installed_from=day("2026-04-01"))) == {"C-1002"}
    assert ids(services, Segment(program_id, installed_from=day("2026-01-01"),
                                 installed_to=day("2026-03-02"))) == {"C-1001", "C-1004"}
    assert ids(services, Segment(program_id, state="installed-any",
                                 installed_to=day("2026-03-02"))) == {"C-1001"}


def test_page_items_carry_data_and_wallet_status(services, world) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        result = segments.page(session, Segment(world["program_id"], state="installed-any"))
    assert result["next_cursor"] is None
    first = result["items"][0]
    assert first["external_id"] == "C-1001" and first["email"] == "camille.martin@example.com"
    assert (first["tier"], first["points"]) == ("Gold", 1280)
    assert first["wallet_apple_installed"] is True and first["wallet_google_installed"] is False
    assert first["wallet_status"] == "apple" and first["wallet_apple_devices"] == 1
    json.dumps(result)  # JSON-ready as it is
    with pytest.raises(ValueError):
        segments.page(session, Segment(world["program_id"]), limit=0)


def test_segment_validation_and_params(world) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="state"):
        Segment(1, state="installed")
    with pytest.raises(ValueError, match="points_min"):
        Segment(1, points_min=5, points_max=1)
    with pytest.raises(ValueError, match="aware"):
        Segment(1, created_from=dt.datetime(2026, 1, 1))  # noqa: DTZ001 - naive on purpose
    segment = Segment.from_params(7, {"state": "not-installed", "points_min": "10",
                                      "created_to": "2026-03-01", "tier": " ",
                                      "include_without_consent": "true"})
    assert segment == Segment(7, state="not-installed", points_min=10,
                              created_to=day("2026-03-02"), include_without_consent=True)
    assert segment.to_dict()["created_to"] == "2026-03-02T00:00:00+00:00"
    for bad in ({"colour": "red"}, {"points_max": "many"}, {"created_from": "yesterday"}):
        with pytest.raises(ValueError):
            Segment.from_params(7, bad)


def test_export_has_a_working_personal_link_per_row(services, world) -> None:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    segment = Segment(world["program_id"], state="not-installed")
    expires = dt.datetime.now(UTC) + dt.timedelta(days=30)
    with services.db.session() as session:
        written = segments.export_csv(session, services, segment, out, link_campaign="resend",
                                      link_expires_at=expires)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert written == len(rows) == 4
    assert list(rows[0]) == list(segments.EXPORT_HEADER)
    assert [r["external_id"] for r in rows] == ["C-1003", "C-1004", "C-1005", "C-1008"]
    by_id = {r["external_id"]: r for r in rows}
    assert by_id["C-1005"]["points"] == "500" and by_id["C-1003"]["tier"] == "Platinum"
    assert by_id["C-1004"]["wallet_apple_installed"] == "false"
    with services.db.session() as session:
        for row in rows:
            assert row["url"].startswith("https://wallet.example.test/l/")
            grant = links.resolve_token(session, row["url"].rsplit("/", 1)[1])
            customer = session.get(Customer, grant.customer_id)
            assert customer.external_id == row["external_id"]
            assert (grant.purpose, grant.campaign, grant.program_id) == (
                "download", "resend", world["program_id"])
        assert len(session.scalars(select(LinkToken).where(
            LinkToken.campaign == "resend")).all()) == 4


def test_export_in_chunks_and_with_a_limit(services, world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(segments, "CHUNK", 2)
    progress: list[int] = []
    out = io.StringIO()
    with services.db.session() as session:
        written = segments.export_csv(session, services, Segment(world["program_id"]), out,
                                      progress=progress.append, limit=5)
    assert written == 5 and progress == [2, 2, 1]
    assert len(out.getvalue().splitlines()) == 6


def test_segments_cli(runner, services, world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = ["--tenant", "demo", "--program", "rewards"]
    result = runner.invoke(args=["segments", "count", *base, "--state", "not-installed"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "4"
    result = runner.invoke(args=["segments", "count", *base, "--state", "never-downloaded",
                                 "--include-without-consent", "--tier", "gold", "--json"])
    assert json.loads(result.output)["count"] == 3  # C-1006, C-1007, C-1008
    result = runner.invoke(args=["segments", "count", *base, "--installed-from", "2026-03-01",
                                 "--installed-to", "2026-03-01"])
    assert result.output.strip() == "1"  # through that day: C-1001
    target = tmp_path / "resend.csv"
    result = runner.invoke(args=["segments", "export", *base, "--state", "not-installed",
                                 "--out", str(target), "--link-campaign", "resend",
                                 "--link-expires-in-days", "30"])
    assert result.exit_code == 0, result.output
    assert "4 rows written" in result.output
    with target.open(encoding="utf-8") as written:
        assert len(list(csv.DictReader(written))) == 4
    assert not (tmp_path / "resend.csv.part").exists()
    result = runner.invoke(args=["segments", "export", *base, "--out", "-", "--limit", "1"])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2 and result.stdout.startswith("external_id,")
    result = runner.invoke(args=["segments", "count", "--tenant", "demo", "--program", "nope"])
    assert result.exit_code == 1
    result = runner.invoke(args=["segments", "count", *base, "--points-min", "9",
                                 "--points-max", "1"])
    assert result.exit_code == 1

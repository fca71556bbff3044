"""Members who enroll again are emailed their own card, through a real SMTP server."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import func, select, update

from app.distribution import card_mail, enrollment, links
from app.distribution.mailer import SmtpConfig
from app.infra.db import MAIL_DISPATCH_KEY
from app.infra.models import Customer, LinkToken, MailOutboxEntry, Program, utcnow
from tests.smtp_standin import SmtpStandin

MEMBER_EMAIL = "jiri.novak@example.com"  # the demo's C-1002
LINK = re.compile(r"https://wallet\.example\.test/l/([A-Za-z0-9_-]+)")


@pytest.fixture()
def smtp(services):  # type: ignore[no-untyped-def]
    with SmtpStandin() as standin:
        services.settings.smtp_url = standin.url
        services.settings.mail_from = "Rewards <cards@brand.example>"
        yield standin


def _enroll_as_member(services, demo, lang: str = "fr", campaign: str | None = "spring"):  # type: ignore[no-untyped-def]
    form = {"email": MEMBER_EMAIL.upper(), "first_name": "Mallory", "last_name": "X",
            "consent_terms": "yes"}
    with services.db.transaction(demo["tenant_id"]) as session:
        program = session.get(Program, demo["program_ids"]["rewards"])
        texts = enrollment.consent_texts(enrollment.form_config(program), lang, program)
        result = enrollment.enroll(session, services, program, form, lang, texts,
                                   campaign=campaign)
        assert result.held


def _entries(services) -> list[MailOutboxEntry]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return list(session.scalars(select(MailOutboxEntry).order_by(MailOutboxEntry.id)))


def _program_name(services, demo) -> str:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.get(Program, demo["program_ids"]["rewards"]).name


def _member(services) -> Customer:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.scalar(select(Customer).where(Customer.email == MEMBER_EMAIL))


def test_the_member_gets_their_own_card_at_their_own_address(services, demo, smtp, client) -> None:  # type: ignore[no-untyped-def]
    services.jobs.huey.immediate = True  # queued after commit, sent in-process
    _enroll_as_member(services, demo)
    [(recipients, message)] = smtp.received
    member = _member(services)
    assert recipients == [MEMBER_EMAIL]  # never the address typed in the form's casing
    assert message["Subject"] == f"Votre carte {_program_name(services, demo)}"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["From"] == "Rewards <cards@brand.example>"
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert text.startswith(f"Bonjour {member.first_name},")
    assert "7 jours" in text and "Mallory" not in text + html  # nothing of the form's typist
    [token] = LINK.findall(text)
    assert f"/l/{token}" in html
    with services.db.session() as session:
        grant = links.resolve_token(session, token)
        row = session.scalar(select(LinkToken).where(
            LinkToken.token_hash == links.hash_token(token)))
    assert grant.customer_id == member.id and row.campaign == "spring"
    assert dt.timedelta(days=6, hours=23) < row.expires_at - utcnow() <= dt.timedelta(days=7)
    assert client.get(f"/l/{token}").status_code == 200  # the member's landing page
    [entry] = _entries(services)
    assert (entry.outcome, entry.attempts, entry.last_error) == ("sent", 1, None)


def test_one_mail_per_member_per_quarter_hour_whatever_the_form_receives(services, demo, smtp) -> None:  # type: ignore[no-untyped-def]
    services.jobs.huey.immediate = True
    for _ in range(3):
        _enroll_as_member(services, demo)
    assert len(smtp.received) == 1 and len(_entries(services)) == 1
    with services.db.transaction() as session:  # a quarter of an hour later
        session.execute(update(MailOutboxEntry).values(
            created_at=utcnow() - card_mail.COOLDOWN - dt.timedelta(seconds=1)))
    _enroll_as_member(services, demo, lang="de")
    assert len(smtp.received) == 2
    assert smtp.received[1][1]["Subject"] == f"Ihre Karte für {_program_name(services, demo)}"


def test_a_relay_that_says_later_gets_the_mail_later_and_only_once(services, demo, smtp) -> None:  # type: ignore[no-untyped-def]
    services.db.dispatchers[MAIL_DISPATCH_KEY] = None  # delivered by hand below
    smtp.script = ["451 4.3.0 try again later"]
    _enroll_as_member(services, demo)
    [entry] = _entries(services)
    assert card_mail.deliver(services, entry.id) == "retry"
    assert smtp.received == [] and smtp.refused == 1
    assert card_mail.deliver(services, entry.id) == "skipped"  # not due yet
    with services.db.session() as session:
        first_link = session.scalar(select(LinkToken).order_by(LinkToken.id.desc()))
        assert first_link.revoked_at is not None  # never delivered, so never usable
    with services.db.transaction() as session:
        session.execute(update(MailOutboxEntry).values(not_before=utcnow()))
    assert card_mail.deliver(services, entry.id) == "sent"
    assert card_mail.deliver(services, entry.id) == "skipped"  # done is done
    assert len(smtp.received) == 1
    [entry] = _entries(services)
    assert (entry.outcome, entry.attempts) == ("sent", 2)


def test_a_refused_recipient_ends_the_mail(services, demo, smtp) -> None:  # type: ignore[no-untyped-def]
    services.db.dispatchers[MAIL_DISPATCH_KEY] = None
    smtp.refuse_recipients = "550 5.1.1 no such mailbox"
    _enroll_as_member(services, demo)
    [entry] = _entries(services)
    assert card_mail.deliver(services, entry.id) == "gave_up"
    [entry] = _entries(services)
    assert entry.last_error == "recipient refused (550)" and entry.done_at is not None


def test_a_password_never_goes_out_in_clear(services, demo, smtp) -> None:  # type: ignore[no-untyped-def]
    """smtp:// requires STARTTLS: a server without it (this plain stand-in) is an error."""
    services.db.dispatchers[MAIL_DISPATCH_KEY] = None
    services.settings.smtp_url = f"smtp://user:secret@127.0.0.1:{smtp.port}"
    _enroll_as_member(services, demo)
    [entry] = _entries(services)
    assert card_mail.deliver(services, entry.id) == "retry"
    [entry] = _entries(services)
    assert "does not offer STARTTLS" in entry.last_error and smtp.received == []


def test_without_a_mailer_nothing_is_queued(services, demo) -> None:  # type: ignore[no-untyped-def]
    assert services.settings.smtp_url == ""
    _enroll_as_member(services, demo)
    assert _entries(services) == []


def test_the_sweeper_sends_what_the_queue_never_got(services, demo, smtp, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def queue_down(entry_id: int) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(services.jobs, "send_card_mail", queue_down)
    _enroll_as_member(services, demo)
    monkeypatch.undo()
    assert smtp.received == [] and len(_entries(services)) == 1
    assert services.jobs.sweep_card_mail.call_local() == 0  # too recent to be lost
    with services.db.transaction() as session:
        session.execute(update(MailOutboxEntry).values(
            created_at=utcnow() - dt.timedelta(minutes=1)))
    services.jobs.huey.immediate = True
    assert services.jobs.sweep_card_mail.call_local() == 1
    assert len(smtp.received) == 1


@pytest.mark.parametrize("url, expected", [
    ("smtp://u%40x:p%2Fw@mail.example:2525", ("mail.example", 2525, False, True, "u@x", "p/w")),
    ("smtps://mail.example", ("mail.example", 465, True, False, None, None)),
    ("smtp://relay?tls=none", ("relay", 587, False, False, None, None)),
])
def test_smtp_urls(url: str, expected: tuple[object, ...]) -> None:
    config = SmtpConfig.from_url(url)
    assert (config.host, config.port, config.implicit_tls, config.starttls, config.username,
            config.password) == expected


@pytest.mark.parametrize("url", ["http://mail.example", "smtp://", "smtps://h?tls=none",
                                 "smtp://h?tls=maybe", "smtp://h:99999"])
def test_bad_smtp_urls_say_what_is_wrong(url: str) -> None:
    with pytest.raises(ValueError):
        SmtpConfig.from_url(url)


def test_no_address_leaks_into_the_logs(services, demo, smtp, caplog) -> None:  # type: ignore[no-untyped-def]
    services.jobs.huey.immediate = True
    with caplog.at_level("DEBUG"):
        _enroll_as_member(services, demo)
    assert len(smtp.received) == 1
    ours = "\n".join(record.getMessage() for record in caplog.records
                      if not record.name.startswith("mail.log"))  # the stand-in's own log
    assert "card link mail" in ours and MEMBER_EMAIL not in ours.lower()
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(MailOutboxEntry)) == 1

"""Emailing members their own card: the mailer behind held enrollments and link requests.

When someone enrolls with an email that belongs to a member, the page cannot
say so (see :mod:`app.distribution.enrollment`). Instead the member is emailed a fresh
personal link to their own card, at the address we already hold: only the
owner of that mailbox gets the card (kind ``card_link``).

The same email answers a member who asks for it from a page of their own
link (kind ``requested_link``): an expired, revoked or used-up link's page
("email me a new link"), or a landing whose wallet the program does not offer
yet ("email me my card", to add it later or on another phone). The page never
shows or takes an address: the link names the member, the email goes to the
address on file, and the page says the same whether one was sent or not.

Durable like the other outboxes (:mod:`app.infra.outbox`): a ``mail_outbox`` row is
written in the enrollment's transaction and queued once it commits; a worker
claims it, issues the link, commits it, and hands the message to the SMTP
relay; transient failures are retried with backoff for a day, a refused
recipient ends it. The row holds no link, so no bearer secret waits in the
database: the link is made when the email is sent.

One email per member and program per ``COOLDOWN``, whatever the number of
attempts: the form cannot be used to flood a member's inbox.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formataddr, make_msgid
from html import escape
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.customers.customers import smtp_address
from app.distribution import i18n, links
from app.distribution.mailer import MailError, SmtpConfig, send
from app.infra import outbox
from app.infra.db import MAIL_DISPATCH_KEY
from app.infra.models import Customer, LinkToken, MailOutboxEntry, Program, utcnow
from app.tracking import funnel

if TYPE_CHECKING:
    from app.distribution.links import LinkGrant
    from app.services import Services

log = logging.getLogger(__name__)

#: What an email says, by ``MailOutboxEntry.kind`` (``mail.<kind>.*`` messages).
KINDS = ("card_link", "requested_link")
COOLDOWN = dt.timedelta(minutes=15)
LINK_LIFETIME = dt.timedelta(days=7)
LEASE = dt.timedelta(minutes=2)
GIVE_UP_AFTER = dt.timedelta(hours=24)
FIRST_RETRY = dt.timedelta(seconds=30)
MAX_RETRY = dt.timedelta(hours=1)


def enabled(services: Services) -> bool:
    return bool(services.settings.smtp_url and services.settings.mail_from)


def request_card_link(session: Session, services: Services, program: Program,
                      member: Customer, *, lang: str, campaign: str | None = None,
                      kind: str = "card_link") -> MailOutboxEntry | None:
    """Queue "here is your card" for a member, in the caller's transaction.

    None (and nothing queued) without a mailer, without an address, or when
    the member was sent one for this program less than ``COOLDOWN`` ago
    (whatever its kind).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown card mail kind {kind!r}")
    if not enabled(services) or not member.email:
        return None
    now = utcnow()
    recent = session.scalar(select(MailOutboxEntry.id).where(
        MailOutboxEntry.customer_id == member.id, MailOutboxEntry.program_id == program.id,
        MailOutboxEntry.created_at > now - COOLDOWN).limit(1))
    if recent is not None:
        return None
    entry = MailOutboxEntry(tenant_id=member.tenant_id, program_id=program.id,
                            customer_id=member.id, kind=kind, locale=lang,
                            campaign=campaign, created_at=now, attempts=0)
    session.add(entry)
    session.flush()
    outbox.queue_after_commit(session, MAIL_DISPATCH_KEY, [entry.id])
    return entry


def member_asked(session: Session, services: Services, program: Program, source: LinkGrant,
                 member: Customer, *, lang: str, platform: str | None = None) -> None:
    """A member asked for their card from a page of their own link (see the module docstring).

    Records ``link_requested`` and queues a ``requested_link`` email, within the
    cooldown shared with every card mail. The caller answers the same page
    whatever happened here. Does not commit.
    """
    funnel.record(session, source, "link_requested", customer=member, platform=platform)
    request_card_link(session, services, program, member, lang=lang, campaign=source.campaign,
                      kind="requested_link")


# -- the message ------------------------------------------------------------------------------

def compose(services: Services, program: Program, customer: Customer, url: str,
            lang: str, kind: str = "card_link") -> EmailMessage:
    """The email in the member's language: plain text and a simple HTML alternative."""
    _ = i18n.translator(lang)
    name = program.name
    days = LINK_LIFETIME.days
    greeting = (_("mail.greeting_name", name=customer.first_name) if customer.first_name
                else _("mail.greeting"))
    body = "mail.requested_link.body" if kind == "requested_link" else "mail.card_link.body"
    paragraphs = [_(body, program=name),
                  _.ngettext("mail.card_link.expiry", "mail.card_link.expiry", days, days=days),
                  _("mail.card_link.ignore")]
    message = EmailMessage()
    message["Subject"] = _("mail.card_link.subject", program=name)
    message["From"] = services.settings.mail_from
    message["To"] = formataddr((customer.full_name, smtp_address(customer.email or "")))
    message["Message-ID"] = make_msgid(domain=_domain(services.settings.mail_from))
    message["Auto-Submitted"] = "auto-generated"  # no vacation replies to a robot
    message.set_content("\n\n".join([greeting, paragraphs[0], url, *paragraphs[1:]]) + "\n")
    label = _("mail.card_link.button")  # outside the f-string, where `pybabel extract` sees it
    button = (f'<p><a href="{escape(url)}" style="display:inline-block;padding:12px 20px;'
              f'background:#111;color:#fff;border-radius:8px;text-decoration:none">'
              f'{escape(label)}</a></p>')
    html = "".join([f"<p>{escape(greeting)}</p>", f"<p>{escape(paragraphs[0])}</p>", button,
                    *(f"<p>{escape(text)}</p>" for text in paragraphs[1:])])
    message.add_alternative(f'<!doctype html><html lang="{lang}"><body>{html}</body></html>',
                            subtype="html")
    return message


def _domain(sender: str) -> str | None:
    address = sender.rsplit("<", 1)[-1].rstrip(">").strip()
    try:
        return Address(addr_spec=address).domain or None
    except (ValueError, IndexError):
        return None


# -- delivery ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sent:
    state: str  # sent | retry | gave_up | skipped
    retry_in: float | None = None  # seconds, when state == "retry"


def deliver(services: Services, entry_id: int) -> str:
    """One attempt: claim, issue the link, send. The outcome, or ``retry``/``skipped``."""
    return attempt(services, entry_id).state


def attempt(services: Services, entry_id: int) -> Sent:
    """:func:`deliver`, with the retry delay (for the worker)."""
    now = utcnow()
    with services.db.session() as session:
        if not outbox.claim(session, MailOutboxEntry, entry_id, now, LEASE):
            return Sent("skipped")
        entry = session.get(MailOutboxEntry, entry_id)
        assert entry is not None
        customer = session.get(Customer, entry.customer_id)
        program = session.get(Program, entry.program_id)
        if customer is None or program is None or not customer.email:
            return _finish(session, entry, "skipped", "no address to send to")
        if not enabled(services):
            return _retry_or_give_up(session, entry, "no mailer configured (PASSERELLE_SMTP_URL)")
        try:
            config = SmtpConfig.from_url(services.settings.smtp_url)
        except ValueError as exc:
            return _retry_or_give_up(session, entry, f"PASSERELLE_SMTP_URL: {exc}")
        token = links.issue_token(session, program, customer, "download",
                                  campaign=entry.campaign, expires_at=now + LINK_LIFETIME)
        message = compose(services, program, customer,
                          links.link_url(services.settings.public_url, token),
                          i18n.primary(entry.locale) or i18n.primary(customer.locale) or "en",
                          entry.kind)
        session.commit()  # the link exists before anyone can click it
        try:
            send(config, message)
        except MailError as exc:
            _revoke(session, token)  # never delivered: nobody holds it
            if exc.permanent:
                return _finish(session, entry, "gave_up", str(exc))
            return _retry_or_give_up(session, entry, str(exc))
        log.info("card link mail %s sent (program %s)", entry.id, program.id)  # no address
        return _finish(session, entry, "sent", None)


def _revoke(session: Session, token: str) -> None:
    session.execute(update(LinkToken).where(LinkToken.token_hash == links.hash_token(token))
                    .values(revoked_at=utcnow()))


def _finish(session: Session, entry: MailOutboxEntry, outcome: str, error: str | None) -> Sent:
    entry.done_at, entry.claimed_until, entry.outcome = utcnow(), None, outcome
    entry.last_error = error[:500] if error else None
    session.commit()
    return Sent(outcome)


def _retry_or_give_up(session: Session, entry: MailOutboxEntry, error: str) -> Sent:
    now = utcnow()
    if now - entry.created_at >= GIVE_UP_AFTER:
        log.warning("card link mail %s given up after %d attempts: %s", entry.id,
                    entry.attempts, error)
        return _finish(session, entry, "gave_up", error)
    delay = outbox.backoff(entry.attempts, FIRST_RETRY, MAX_RETRY) * random.uniform(0.8, 1.2)
    entry.not_before = now + delay
    entry.claimed_until, entry.last_error = None, error[:500]
    session.commit()
    return Sent("retry", delay.total_seconds())


def due_entries(services: Services, quiet_for: dt.timedelta = dt.timedelta(seconds=30),
                limit: int = 1000) -> list[int]:
    """Entries nobody is working on: never tried after ``quiet_for``, dead leases, retries due."""
    with services.db.session() as session:
        return outbox.due_ids(session, MailOutboxEntry, utcnow(), quiet_for, limit)

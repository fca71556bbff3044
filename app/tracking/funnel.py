"""The distribution funnel: one append-only row per step a person takes from a link.

Marketers read it per program and campaign: links opened, Apple cards
downloaded, Google save links opened, people enrolled, details enriched,
consents given. Rows carry ids only (program, customer, card, link) and the
platform the page was shown for, never an address, name or token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from app.infra.models import Card, Customer, FunnelEvent, Program

if TYPE_CHECKING:
    from app.distribution.links import LinkGrant

KINDS = (
    "link_opened",      # a personal or enrollment link's page was opened
    "apple_downloaded",  # the .pkpass was served
    "google_opened",    # the browser was sent to Google's save page
    "enrolled",         # a new customer joined through the form
    "enriched",         # a customer saved the details form
    "consented",        # a customer saved the consent form
    "link_requested",   # a fresh link was issued for a known customer (the mailer sends it)
)
PLATFORMS = ("apple", "google", "desktop")


def record(session: Session, source: LinkGrant | Program, kind: str, *,
           platform: str | None = None, card: Card | None = None,
           customer: Customer | None = None, campaign: str | None = None) -> FunnelEvent:
    """Add one event in the caller's transaction (it commits with the step it records).

    ``source`` is the link's grant (program, customer, campaign and link come
    from it) or, for pages reached without a personal link, the program.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown funnel event kind {kind!r}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}")
    if isinstance(source, Program):
        tenant_id, program_id, link_id = source.tenant_id, source.id, None
        customer_id = None
    else:
        tenant_id, program_id, link_id = source.tenant_id, source.program_id, source.link_id
        customer_id = source.customer_id
        campaign = campaign if campaign is not None else source.campaign
    if customer is not None:
        customer_id = customer.id
    if card is not None:
        customer_id = customer_id or card.customer_id
    event = FunnelEvent(tenant_id=tenant_id, program_id=program_id, customer_id=customer_id,
                        card_id=card.id if card is not None else None, link_id=link_id,
                        kind=kind, platform=platform, campaign=campaign)
    session.add(event)
    return event

"""Cards: issuing them, rendering them from customer data, keeping their version.

The rule that keeps installed cards stable: a card's ``version`` and
``last_modified`` move only when its rendered content hash changes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.models import AppleIdentity, Card, Customer, Program, Tenant, utcnow
from app.wallet import preview
from app.wallet.builder import CardInput, PassBuilder

if TYPE_CHECKING:
    from app.services import Services


class CardError(LookupError):
    """A card cannot be built for a reason its owner can fix (message says which)."""


def member_id(customer: Customer) -> str:
    """What the barcode carries: the CRM's member id, never the email."""
    value = customer.attributes.get("member_id") if customer.attributes else None
    return str(value) if value not in (None, "") else customer.external_id


def builtin_values(customer: Customer, program: Program, tenant: Tenant) -> dict[str, object]:
    return {
        "member_id": member_id(customer),
        "external_id": customer.external_id,
        "first_name": customer.first_name or "",
        "last_name": customer.last_name or "",
        "full_name": customer.full_name,
        "locale": customer.locale or "",
        "program_name": program.name,
        "organization_name": tenant.name,
    }


def ensure_card(session: Session, program: Program, customer: Customer) -> Card:
    card = session.scalar(
        select(Card).where(Card.program_id == program.id, Card.customer_id == customer.id)
    )
    if card is None:
        card = Card(tenant_id=program.tenant_id, program=program, customer=customer)
        session.add(card)
        session.flush()
    return card


def apple_configured(session: Session, program: Program) -> bool:
    """True if the tenant registered the certificate of the program's pass type (Apple Wallet
    is offered); the pages show no Apple button otherwise."""
    return session.scalar(select(AppleIdentity.id).where(
        AppleIdentity.tenant_id == program.tenant_id,
        AppleIdentity.pass_type_identifier == program.pass_type_identifier)) is not None


def apple_identity(session: Session, program: Program) -> AppleIdentity:
    identity = session.scalar(
        select(AppleIdentity).where(
            AppleIdentity.tenant_id == program.tenant_id,
            AppleIdentity.pass_type_identifier == program.pass_type_identifier,
        )
    )
    if identity is None:
        raise CardError(
            f"program {program.slug!r}: no Apple certificate is registered for pass type "
            f"{program.pass_type_identifier!r} (see `passerelle certs check`)"
        )
    return identity


def card_input(card: Card, services: Services) -> CardInput:
    program, customer = card.program, card.customer
    template = services.templates.get(program.template)
    values = template.resolve(
        builtin_values(customer, program, program.tenant),
        dict(customer.attributes or {}),
        {k: str(v) for k, v in (program.field_mapping or {}).items()},
    )
    return CardInput(
        serial_number=card.serial_number,
        authentication_token=card.authentication_token,
        pass_type_identifier=program.pass_type_identifier,
        team_identifier=program.team_identifier,
        organization_name=program.tenant.name,
        member_id=member_id(customer),
        locale=customer.locale,
        values=values,
        web_service_url=services.web_service_url,
        voided=card.voided,
        expiration_date=card.expires_at.isoformat() if card.expires_at else None,
        barcode_format=(program.options or {}).get("barcode_format"),
    )


@dataclass(frozen=True)
class RenderedCard:
    pass_json: bytes
    content_hash: str
    changed: bool


def next_last_modified(previous: dt.datetime | None) -> dt.datetime:
    """Now, but always at least one whole second after the previous version.

    HTTP dates have one-second resolution: two versions in the same second would
    share a Last-Modified, and a device holding the first would get 304 for the
    second. So each version's Last-Modified is a distinct second. After quick
    updates it can be ahead of the clock: it orders versions, and is never sent
    as such (``passkit.latest_pass`` sends at most the current time).
    """
    now = utcnow()
    if previous is None:
        return now
    return max(now, previous.replace(microsecond=0) + dt.timedelta(seconds=1))


def record_content(card: Card, content_hash: str) -> bool:
    """Store a freshly rendered hash; move version and Last-Modified only if it changed."""
    if card.content_hash == content_hash:
        return False
    card.content_hash = content_hash
    card.version += 1
    card.last_modified = next_last_modified(card.last_modified if card.version > 1 else None)
    return True


def render(card: Card, services: Services, builder: PassBuilder) -> RenderedCard:
    pass_json = builder.pass_json(card_input(card, services))
    content_hash = builder.content_hash(pass_json)
    changed = record_content(card, content_hash)
    return RenderedCard(pass_json, content_hash, changed)


def build_pkpass(session: Session, card: Card, services: Services) -> bytes:
    """Render, record the content version, sign and zip one card."""
    builder = services.pass_builder(card.program, apple_identity(session, card.program))
    rendered = render(card, services, builder)
    return builder.packager.build(rendered.pass_json, builder.signer)


def preview_png(services: Services, program: Program, customer: Customer | None = None) -> bytes:
    """The card front as a PNG: ``customer``'s data, or sample values when None.

    The dashboard and the API draw the same picture from here. Raises
    ``app.wallet.template.TemplateError`` when the template cannot render.
    """
    if customer is None:  # transient, never added to a session: sample values only
        customer = Customer(external_id="PREVIEW", first_name="Alex", last_name="Sample",
                            attributes={})
    values = builtin_values(customer, program, program.tenant)
    template = services.templates.get(program.template)
    resolved = template.resolve(values, dict(customer.attributes or {}),
                                {k: str(v) for k, v in (program.field_mapping or {}).items()})
    card_input = CardInput(
        serial_number="PREVIEW", authentication_token="PREVIEW" * 3,
        pass_type_identifier=program.pass_type_identifier,
        team_identifier=program.team_identifier, organization_name=program.tenant.name,
        member_id=member_id(customer), locale=customer.locale, values=resolved,
        web_service_url=None, barcode_format=(program.options or {}).get("barcode_format"))
    return preview.render_front(template, card_input)

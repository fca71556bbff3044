"""Shared test data: look up the demo's customers and cards, put a card on a device,
make a tenant a Google issuer. One way to write each, instead of a helper per file.

The demo (``demo`` fixture, app/demo.py) seeds tenant ``demo`` with programs
``rewards`` and ``club`` and customers C-1001 to C-1004.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.models import Card, Customer, Program, Registration, Tenant
from app.services import Services
from tests.google_standin import DEFAULT_ISSUER_ID, GoogleStandin

#: An APNs device token of the right shape (64 hex digits).
PUSH_TOKEN = "ab" * 32


def customer(session: Session, external_id: str = "C-1002") -> Customer | None:
    """The customer with this external id (the demo has one tenant, ids are unique)."""
    return session.scalar(select(Customer).where(Customer.external_id == external_id))


def card(session: Session, external_id: str = "C-1001", program: str = "rewards") -> Card | None:
    """This customer's card of the program with this slug."""
    return session.scalar(select(Card).join(Program).join(Customer).where(
        Program.slug == program, Customer.external_id == external_id))


def device(session: Session, card: Card, device_id: str = "dev-1",
           push_token: str = PUSH_TOKEN, pass_type: str | None = None) -> Registration:
    """Register ``card`` on an Apple device (as the device's web-service call would)."""
    registration = Registration(
        tenant_id=card.tenant_id, card_id=card.id, device_library_identifier=device_id,
        pass_type_identifier=pass_type or card.program.pass_type_identifier,
        push_token=push_token)
    session.add(registration)
    return registration


def google_issuer(services: Services, tenant_id: int, standin: GoogleStandin, folder: Path,
                  issuer_id: str = DEFAULT_ISSUER_ID) -> dict[str, Any]:
    """Make the tenant a Google Wallet issuer whose service account the stand-in knows.

    Returns the service-account info (its private key signs the save JWTs)."""
    info, _ = standin.new_service_account()
    path = folder / "google-sa.json"
    path.write_text(json.dumps(info))
    with services.db.transaction() as session:
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        tenant.google_issuer_id, tenant.google_service_account_file = issuer_id, str(path)
    return info

"""The demo tenant: a brand, two programs and a few customers, seeded idempotently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.cards.cards import ensure_card
from app.customers.customers import CustomerChanges, find_customer, upsert_customer
from app.infra.models import AppleIdentity, Customer, Program, Tenant
from app.wallet import certs

if TYPE_CHECKING:
    from app.services import Services

DEMO_TENANT = "demo"
DEMO_PASS_TYPE = "pass.dev.passerelle.demo"
DEMO_TEAM = "DEVTEAM123"

DEMO_CUSTOMERS = [
    # external_id, email, first, last, locale, attributes
    ("C-1001", "camille.martin@example.com", "Camille", "Martin", "fr-FR",
     {"points": 1280, "tier": "Gold", "points_to_next_tier": 720, "membership_level": "Gold"}),
    ("C-1002", "jiri.novak@example.com", "Jiří", "Novák", "cs-CZ",
     {"points": 340, "tier": "Silver", "points_to_next_tier": 160}),
    ("C-1003", "lena.mueller@example.com", "Lena", "Müller", "de-DE",
     {"points": 15420, "tier": "Platinum", "membership_level": "Platinum"}),
    ("C-1004", "sam.taylor@example.com", "Sam", "Taylor", "en-GB",
     {"points": 0, "tier": "Member", "points_to_next_tier": 500}),
    ("C-1005", "zoe.oconnor@example.com", "Zoë", "O'Connor", "en-IE",
     {"points": 75, "tier": "Member", "points_to_next_tier": 425}),
]


@dataclass
class DemoSeed:
    tenant: Tenant
    programs: list[Program]
    customers: list[Customer]


def ensure_dev_certificates(services: Services) -> certs.DevCertPaths:
    return certs.make_dev_certs(services.settings.certs_path, DEMO_PASS_TYPE, DEMO_TEAM,
                                organization="Passerelle Demo")


def seed(session: Session, services: Services) -> DemoSeed:
    """Create or complete the demo data; running it twice changes nothing."""
    paths = ensure_dev_certificates(services)
    tenant = session.scalar(select(Tenant).where(Tenant.slug == DEMO_TENANT))
    if tenant is None:
        tenant = Tenant(slug=DEMO_TENANT, name="Maison Aurore")
        session.add(tenant)
        session.flush()
    identity = session.scalar(
        select(AppleIdentity).where(AppleIdentity.pass_type_identifier == DEMO_PASS_TYPE))
    if identity is None:
        identity = AppleIdentity(tenant_id=tenant.id, pass_type_identifier=DEMO_PASS_TYPE,
                                 team_identifier=DEMO_TEAM)
        session.add(identity)
    identity.certificate_file = paths.certificate_file
    identity.key_file = paths.key_file

    programs = [
        _program(session, tenant, "rewards", "Aurore Rewards", "loyalty"),
        _program(session, tenant, "club", "Nordhaven Club", "membership"),
    ]
    customers = []
    for external_id, email, first, last, locale, attributes in DEMO_CUSTOMERS:
        customer = find_customer(session, tenant.id, external_id)
        if customer is None:  # seeded once: a demo customer changed since is left as it is
            written = upsert_customer(session, tenant.id, external_id, CustomerChanges(
                {"email": email, "first_name": first, "last_name": last, "locale": locale},
                attributes, consents={"marketing_email": True}), source="demo")
            assert written is not None
            customer = written.customer
        customers.append(customer)
    session.flush()
    for program in programs:
        for customer in customers:
            ensure_card(session, program, customer)
    return DemoSeed(tenant, programs, customers)


def _program(session: Session, tenant: Tenant, slug: str, name: str, template: str) -> Program:
    program = session.scalar(select(Program).where(Program.tenant_id == tenant.id,
                                                   Program.slug == slug))
    if program is None:
        program = Program(tenant_id=tenant.id, slug=slug, name=name, template=template,
                          pass_type_identifier=DEMO_PASS_TYPE, team_identifier=DEMO_TEAM,
                          field_mapping={}, options={})
        session.add(program)
        session.flush()
    return program

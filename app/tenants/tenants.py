"""Setting up a brand: tenants, their Apple identities and their programs."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.models import AppleIdentity, Program, Tenant
from app.updates.apns import ApnsError, ApnsTokenKey
from app.wallet import certs
from app.wallet.certs import identity_password

if TYPE_CHECKING:
    from app.services import Services  # passed in by the entry point

_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class SetupError(ValueError):
    """A setup request that cannot be carried out; the message says why."""


def check_slug(slug: str) -> str:
    if not _SLUG.match(slug):
        raise SetupError(f"{slug!r} is not a valid slug (lowercase letters, digits, dashes)")
    return slug


def create_tenant(session: Session, slug: str, name: str) -> Tenant:
    check_slug(slug)
    if session.scalar(select(Tenant).where(Tenant.slug == slug)) is not None:
        raise SetupError(f"tenant {slug!r} already exists")
    tenant = Tenant(slug=slug, name=name.strip() or slug)
    session.add(tenant)
    session.flush()
    return tenant


def register_identity(session: Session, services: Services, tenant: Tenant, *,
                      certificate_file: str, key_file: str | None, password_env: str | None,
                      pass_type_identifier: str | None = None,
                      apns_key_file: str | None = None,
                      apns_key_id: str | None = None) -> AppleIdentity:
    """Register a Pass Type ID certificate after checking it; refuse a broken one.

    ``apns_key_file``/``apns_key_id``: optional .p8 key for token-based APNs."""
    if bool(apns_key_file) != bool(apns_key_id):
        raise SetupError("an APNs .p8 key needs both the file and its key id")
    if apns_key_file:

        try:
            ApnsTokenKey.from_file(services.settings.certs_path / apns_key_file,
                                   apns_key_id or "", "")
        except ApnsError as exc:
            raise SetupError(str(exc)) from None
    probe = AppleIdentity(pass_type_identifier=pass_type_identifier or "", team_identifier="",
                          certificate_file=certificate_file, key_file=key_file,
                          password_env=password_env)
    identity = certs.load_identity(services.settings.certs_path, certificate_file, key_file,
                                   identity_password(probe))
    if pass_type_identifier and pass_type_identifier != identity.pass_type_identifier:
        raise SetupError(f"the certificate is for {identity.pass_type_identifier!r}, "
                         f"not {pass_type_identifier!r}")
    problems = certs.check_identity(
        services.settings.certs_path, certificate_file, key_file, identity_password(probe),
        identity.pass_type_identifier, identity.team_identifier,
        warn_days=services.settings.cert_warn_days)
    errors = [p.message for p in problems if p.level == "error"]
    if errors:
        raise SetupError("; ".join(errors))
    existing = session.scalar(select(AppleIdentity).where(
        AppleIdentity.pass_type_identifier == identity.pass_type_identifier))
    if existing is not None and existing.tenant_id != tenant.id:
        raise SetupError(f"{identity.pass_type_identifier!r} belongs to another tenant")
    row = existing or AppleIdentity(tenant_id=tenant.id)
    row.pass_type_identifier = identity.pass_type_identifier
    row.team_identifier = identity.team_identifier
    row.certificate_file = certificate_file
    row.key_file = key_file
    row.password_env = password_env
    row.apns_key_file = apns_key_file
    row.apns_key_id = apns_key_id
    session.add(row)
    session.flush()
    return row


def create_program(session: Session, services: Services, tenant: Tenant, *, slug: str, name: str,
                   template: str, pass_type_identifier: str) -> Program:
    check_slug(slug)
    services.templates.get(template)  # raises TemplateError naming the problem
    identity = session.scalar(select(AppleIdentity).where(
        AppleIdentity.tenant_id == tenant.id,
        AppleIdentity.pass_type_identifier == pass_type_identifier))
    if identity is None:
        raise SetupError(f"tenant {tenant.slug!r} has no certificate for {pass_type_identifier!r}; "
                         f"register one with `passerelle certs register`")
    if session.scalar(select(Program).where(Program.tenant_id == tenant.id,
                                            Program.slug == slug)) is not None:
        raise SetupError(f"program {slug!r} already exists for tenant {tenant.slug!r}")
    program = Program(tenant_id=tenant.id, slug=slug, name=name, template=template,
                      pass_type_identifier=pass_type_identifier,
                      team_identifier=identity.team_identifier, field_mapping={}, options={})
    session.add(program)
    session.flush()
    return program


def find_tenant(session: Session, slug: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.slug == slug))


def find_program(session: Session, tenant_slug: str, program_slug: str) -> Program | None:
    return session.scalar(select(Program).join(Tenant).where(
        Tenant.slug == tenant_slug, Program.slug == program_slug))


def find_programs(session: Session, program_slug: str,
                  tenant_slug: str | None = None) -> list[Program]:
    """Every program with this slug (one per tenant at most), or only the named tenant's."""
    query = select(Program).where(Program.slug == program_slug)
    if tenant_slug:
        query = query.join(Tenant).where(Tenant.slug == tenant_slug)
    return list(session.scalars(query).all())

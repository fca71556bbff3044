"""``passerelle tenants`` and ``passerelle programs``: brands and their cards."""

from __future__ import annotations

import click

from app.cli.common import fail, needs_database, services, tenant
from app.tenants import tenants
from app.wallet.template import TemplateError


@click.group("tenants")
def tenants_group() -> None:
    """Brands."""


@tenants_group.command("create")
@click.argument("slug")
@click.option("--name", required=True)
@needs_database
def tenants_create(slug: str, name: str) -> None:
    """Create a tenant."""
    try:
        with services().db.transaction() as session:
            created = tenants.create_tenant(session, slug, name)
            click.echo(f"tenant {created.slug!r} created")
    except tenants.SetupError as exc:
        fail(str(exc))


@click.group("programs")
def programs_group() -> None:
    """Card programs."""


@programs_group.command("create")
@click.argument("slug")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--name", required=True)
@click.option("--template", required=True, help="A folder name under pass_templates/.")
@click.option("--pass-type-identifier", required=True)
@needs_database
def programs_create(slug: str, tenant_slug: str, name: str, template: str,
                    pass_type_identifier: str) -> None:
    """Create a program (a card) for a tenant."""
    svc = services()
    try:
        with svc.db.transaction() as session:
            program = tenants.create_program(
                session, svc, tenant(session, tenant_slug), slug=slug, name=name,
                template=template, pass_type_identifier=pass_type_identifier)
            click.echo(f"program {program.slug!r} created with template {program.template!r}")
    except (tenants.SetupError, TemplateError) as exc:
        fail(str(exc))


COMMANDS = [tenants_group, programs_group]

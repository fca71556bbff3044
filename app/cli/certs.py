"""``passerelle certs``: Apple pass certificates."""

from __future__ import annotations

import sys

import click
from flask.cli import with_appcontext

from app.cli.common import fail, needs_database, services, tenant, warn
from app.ops import readiness
from app.tenants import demo as demo_data
from app.tenants import tenants
from app.wallet import certs


@click.group("certs")
def certs_group() -> None:
    """Apple pass certificates."""


@certs_group.command("dev")
@click.option("--pass-type-identifier", default=demo_data.DEMO_PASS_TYPE, show_default=True)
@click.option("--team-identifier", default=demo_data.DEMO_TEAM, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing development certificate.")
@with_appcontext
def certs_dev(pass_type_identifier: str, team_identifier: str, overwrite: bool) -> None:
    """Make a local development CA, a WWDR stand-in and a pass certificate."""
    paths = certs.make_dev_certs(services().settings.certs_path, pass_type_identifier,
                                 team_identifier, overwrite=overwrite)
    click.echo(f"development root CA: {paths.root_ca}")
    click.echo(f"WWDR stand-in:       {paths.wwdr}")
    click.echo(f"pass certificate:    {paths.certificate}")
    click.echo(f"private key:         {paths.key}")


@certs_group.command("check")
@needs_database
def certs_check() -> None:
    """Verify key/certificate pairs, pass type ids, chains and expiry."""
    errors, warnings = readiness.check_certificates(services(), apns=True)
    warn(warnings)
    for line in errors:
        click.secho(f"error: {line}", fg="red", err=True)
    if errors:
        sys.exit(1)
    click.echo("certificates OK")


@certs_group.command("register")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--certificate", required=True, help="PEM or .p12 file, relative to certs_path.")
@click.option("--key", default=None, help="PEM private key (not needed for a .p12).")
@click.option("--password-env", default=None,
              help="NAME of the environment variable holding the key/.p12 password.")
@click.option("--pass-type-identifier", default=None, help="Expected pass type (checked).")
@click.option("--apns-key", default=None,
              help="Optional .p8 key (relative to certs_path) for token-based APNs pushes.")
@click.option("--apns-key-id", default=None, help="The .p8 key's id (10 characters).")
@needs_database
def certs_register(tenant_slug: str, certificate: str, key: str | None, password_env: str | None,
                   pass_type_identifier: str | None, apns_key: str | None,
                   apns_key_id: str | None) -> None:
    """Register a Pass Type ID certificate for a tenant (checked first)."""
    svc = services()
    try:
        with svc.db.transaction() as session:
            row = tenants.register_identity(
                session, svc, tenant(session, tenant_slug), certificate_file=certificate,
                key_file=key, password_env=password_env, pass_type_identifier=pass_type_identifier,
                apns_key_file=apns_key, apns_key_id=apns_key_id)
            click.echo(f"registered {row.pass_type_identifier} (team {row.team_identifier})")
    except (tenants.SetupError, certs.CertificateError) as exc:
        fail(str(exc))


COMMANDS = [certs_group]

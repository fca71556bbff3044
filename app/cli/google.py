"""``passerelle google``: a tenant's Google Wallet issuer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from app.cli.common import fail, needs_database, services, tenant
from app.updates.google_client import GoogleApiError, GoogleWalletClient
from app.updates.google_wallet import GoogleNotConfigured

if TYPE_CHECKING:
    from app.infra.models import Tenant


@click.group("google")
def google_group() -> None:
    """Google Wallet issuer settings."""


@google_group.command("configure")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--issuer-id", required=True, help="The numeric Google Wallet issuer id.")
@click.option("--service-account", required=True,
              help="Service-account JSON, relative to certs_path or absolute.")
@needs_database
def google_configure(tenant_slug: str, issuer_id: str, service_account: str) -> None:
    """Set a tenant's Google Wallet issuer and service account."""
    if not issuer_id.isdigit():
        fail(f"issuer id {issuer_id!r} must be the number shown in the Pay & Wallet console")
    with services().db.transaction() as session:
        row = tenant(session, tenant_slug)
        row.google_issuer_id, row.google_service_account_file = issuer_id, service_account
    click.echo(f"tenant {tenant_slug!r}: Google issuer {issuer_id}; run `passerelle google check`")


@google_group.command("check")
@click.option("--tenant", "tenant_slug", required=True)
@needs_database
def google_check(tenant_slug: str) -> None:
    """Verify the service account's credentials and its access to the issuer."""

    svc = services()
    # Typed here while Services.google_client is not annotated (app/services.py).
    google_client: Callable[[Tenant], GoogleWalletClient] = svc.google_client
    with svc.db.session() as session:
        row = tenant(session, tenant_slug)
        try:
            client = google_client(row)
            client.check_issuer(str(row.google_issuer_id))
        except (GoogleNotConfigured, GoogleApiError) as exc:
            fail(str(exc))
        click.echo(f"Google Wallet OK: {client.service_account_email} can issue for "
                   f"{row.google_issuer_id}")


COMMANDS = [google_group]

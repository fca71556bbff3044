"""``passerelle hooks``: inbound webhooks from a loyalty engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from app.cli.common import ROWS, fail, needs_database, services, tenant
from app.webhooks import inbound as webhooks_in


@click.group("hooks")
def hooks_group() -> None:
    """Inbound webhooks from a loyalty engine (docs/webhooks.md)."""


@hooks_group.command("create")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--slug", required=True, help="Endpoint name, e.g. loyalty-engine.")
@click.option("--auth", type=click.Choice(["header", "hmac"]), default="header",
              show_default=True, help="A secret header, or an HMAC-SHA256 of the body.")
@click.option("--header-name", default=None,
              help="Default X-Secret-Key (header) or X-Signature (hmac).")
@click.option("--mapping-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="JSON overriding the default field mapping.")
@needs_database
def hooks_create(tenant_slug: str, slug: str, auth: str, header_name: str | None,
                 mapping_file: Path | None) -> None:
    """Create an endpoint; prints its URL and secret once."""
    import json

    from sqlalchemy.exc import IntegrityError

    mapping: dict[str, Any] | None = None
    if mapping_file is not None:
        try:
            parsed = json.loads(mapping_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            fail(f"{mapping_file}: not JSON ({exc})")
        if not isinstance(parsed, dict):
            fail(f"{mapping_file}: the mapping must be a JSON object")
        mapping = parsed
    svc = services()
    try:
        with svc.db.transaction() as session:
            owner = tenant(session, tenant_slug)
            hook, secret = webhooks_in.create_hook(session, owner, slug, auth, mapping,
                                                   header_name)
            url = svc.settings.public_url + webhooks_in.url_path(owner.slug, hook.slug)
    except ValueError as exc:
        fail(str(exc))
    except IntegrityError:
        fail(f"tenant {tenant_slug!r} already has a hook {slug!r}")
    click.echo(f"URL:    {url}")
    if auth == "header":
        click.echo(f"header: {hook.header_name}: {secret}")
    else:
        click.echo(f"HMAC-SHA256 key for the {hook.header_name} header: {secret}")
    click.echo("The secret is shown once; only a hash (header) or the key (hmac) is kept.")


@hooks_group.command("events")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--status", type=click.Choice(["applied", "ignored", "failed"]), default=None)
@click.option("--limit", default=50, show_default=True, type=ROWS)
@needs_database
def hooks_events(tenant_slug: str, status: str | None, limit: int) -> None:
    """Received events, newest first, with why they failed or were ignored."""
    svc = services()
    with svc.db.session() as session:
        tenant_id = tenant(session, tenant_slug).id
    with svc.db.tenant_session(tenant_id) as session:
        for item, hook_slug in webhooks_in.recent_events(session, status=status, limit=limit):
            click.echo(f"{item.id:>6}  {item.received_at:%Y-%m-%d %H:%M:%S}  {hook_slug:<16} "
                       f"{item.status:<8} {item.event_type or '-':<20} {item.event_id}"
                       + (f"  ({item.error})" if item.error else ""))


COMMANDS = [hooks_group]

"""``passerelle crm``: the tenant's CRM connection and its outbox."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click
from sqlalchemy import inspect
from sqlalchemy.orm import Session
from tqdm import tqdm

from app.cli.common import fail, needs_database, services, tenant
from app.crm import CrmError, connector_for, outbox
from app.crm.connections import connection_for_update
from app.crm.connector import Connector
from app.crm.http import Mapping
from app.infra.bounds import column_max
from app.infra.models import CrmConnection, Tenant

if TYPE_CHECKING:
    from app.crm.http import HttpConnector


def _finite(value: float | None) -> float | None:
    """Click's FloatRange lets NaN through (every comparison with it is false)."""
    if value is not None and value != value:
        raise click.BadParameter("must be a number")
    return value


@click.group("crm")
def crm_group() -> None:
    """The tenant's CRM: built-in store or an HTTP JSON connector (docs/crm.md)."""


@crm_group.command("configure")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--kind", type=click.Choice(["http", "builtin"]), default="http", show_default=True)
@click.option("--base-url", default=None, help="e.g. https://crm.example.com/api")
@click.option("--auth-header", default=None, help="Header carrying the credential, e.g. "
                                                  "Authorization.")
@click.option("--auth-env", default=None,
              help="NAME of the environment variable holding that header's value.")
@click.option("--mapping-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="JSON object: customer field -> dotted path in the CRM record.")
@click.option("--max-staleness-hours", type=click.FloatRange(
                  0, column_max(inspect(CrmConnection).columns.max_staleness_seconds) // 3600),
              default=None, callback=lambda _ctx, _param, value: _finite(value),
              help="Serve the local copy this long when the CRM is down (default 24).")
@click.option("--timeout-seconds", type=click.IntRange(1, 60), default=None,
              help="Per-request timeout (default 5).")
@needs_database
def crm_configure(tenant_slug: str, kind: str, base_url: str | None, auth_header: str | None,
                  auth_env: str | None, mapping_file: Path | None,
                  max_staleness_hours: float | None, timeout_seconds: int | None) -> None:
    """Connect a tenant to its CRM (options not given keep their current value)."""
    import json
    import os


    mapping = None
    if mapping_file is not None:
        try:
            mapping = json.loads(mapping_file.read_text(encoding="utf-8"))
            Mapping.parse(mapping)
        except (ValueError, UnicodeDecodeError) as exc:
            fail(f"{mapping_file}: {exc}")
    with services().db.transaction() as session:
        row = connection_for_update(session, tenant(session, tenant_slug).id)
        row.kind = kind
        for name, value in (("base_url", base_url), ("auth_header", auth_header),
                            ("auth_value_env", auth_env), ("mapping", mapping),
                            ("timeout_seconds", timeout_seconds)):
            if value is not None:
                setattr(row, name, value)
        if max_staleness_hours is not None:
            row.max_staleness_seconds = round(max_staleness_hours * 3600)
        if kind == "http":
            _check_http_connection(row)
        summary = (f"tenant {tenant_slug!r}: built-in CRM store" if kind == "builtin" else
                   f"tenant {tenant_slug!r}: CRM at {row.base_url}, "
                   f"{len(Mapping.parse(dict(row.mapping or {})).mapped_fields())} mapped fields, "
                   f"copies served up to {row.max_staleness_seconds / 3600:g} h when it is down")
    if kind == "http" and row.auth_value_env and row.auth_value_env not in os.environ:
        click.secho(f"warning: {row.auth_value_env} is not set here; the server and the worker "
                    f"need it", fg="yellow", err=True)
    click.echo(summary)
    if kind == "http":
        click.echo(f"check it with: passerelle crm check --tenant {tenant_slug} "
                   f"--external-id <a known id>")


def _check_http_connection(row: CrmConnection) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(row.base_url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail("--base-url must be an http(s) URL, e.g. https://crm.example.com/api")
    if parts.query or parts.fragment:
        fail("--base-url takes no query or fragment")
    if bool(row.auth_header) != bool(row.auth_value_env):
        fail("give --auth-header and --auth-env together")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        click.secho("warning: plain http: customer data and the credential travel unencrypted",
                    fg="yellow", err=True)


def _crm_connector(session: Session, tenant_slug: str) -> tuple[Tenant, Connector]:

    row = tenant(session, tenant_slug)
    try:
        return row, connector_for(session, services(), row.id)
    except CrmError as exc:
        fail(str(exc))
@crm_group.command("check")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--external-id", default=None, help="Fetch this customer and list the mapped "
                                                  "fields that came back (names only).")
@needs_database
def crm_check(tenant_slug: str, external_id: str | None) -> None:
    """Reach the CRM with the stored settings; with --external-id, fetch one record."""

    with services().db.session() as session:
        _row, connector = _crm_connector(session, tenant_slug)
        if connector.kind == "builtin":
            click.echo(f"tenant {tenant_slug!r} uses the built-in store: nothing to reach")
            return
        http = cast("HttpConnector", connector)  # the other kind
        try:
            if external_id is None:
                connector.find_by_email("passerelle-check@example.invalid")
                click.echo(f"CRM OK: {http.base_url} answered a search")
                return
            record = connector.fetch(external_id)
        except CrmError as exc:
            fail(str(exc))
    if record is None:
        fail(f"the CRM does not know customer {external_id!r}")
    returned = sorted(record.provided())
    missing = [name for name in http.mapping.mapped_fields()
               if name not in returned and name != "external_id"]
    click.echo(f"customer {record.external_id}: {len(returned)} mapped fields returned: "
               f"{', '.join(returned) or 'none'}")
    if missing:
        click.secho(f"mapped but not in the record: {', '.join(missing)}", fg="yellow")


@crm_group.command("outbox")
@click.option("--tenant", "tenant_slug", required=True)
@needs_database
def crm_outbox(tenant_slug: str) -> None:
    """Writes waiting for the CRM, and the last errors."""

    with services().db.session() as session:
        report = outbox.summary(session, tenant(session, tenant_slug).id)
    click.echo(f"pending: {report.pending} ({report.retrying} retrying), "
               f"delivered: {report.delivered}, failed: {report.failed}")
    for entry in report.problems:
        state = "pending" if entry.done_at is None else "failed"
        click.echo(f"#{entry.id} {entry.operation} customer {entry.customer_id} "
                   f"({state}, {entry.attempts} attempts): {entry.last_error}")


@crm_group.command("flush")
@click.option("--tenant", "tenant_slug", required=True)
@needs_database
def crm_flush(tenant_slug: str) -> None:
    """Deliver the tenant's waiting writes now (e.g. once the CRM is back)."""

    svc = services()
    with svc.db.session() as session:
        tenant_id = tenant(session, tenant_slug).id
        total = outbox.summary(session, tenant_id).pending
    with tqdm(total=total, unit="write", desc="flush", disable=None) as bar:
        states = outbox.flush(svc, tenant_id, progress=bar.update)
    click.echo(", ".join(f"{count} {state}" for state, count in sorted(states.items()))
               or "nothing to deliver")
    left = sum(count for state, count in states.items() if state != "done")
    if left:
        click.secho(f"{left} writes not delivered: see `passerelle crm outbox --tenant "
                    f"{tenant_slug}`", fg="red", err=True)
        sys.exit(2)


COMMANDS = [crm_group]

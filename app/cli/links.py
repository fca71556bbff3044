"""``passerelle links``: personal links for emails (token links and signed links)."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import click
from tqdm import tqdm

from app.cli.common import DAYS, fail, needs_database, program, services, tenant
from app.customers.customers import find_customer
from app.distribution import links
from app.infra.models import utcnow
from app.segments import links_export

F = TypeVar("F", bound=Callable[..., Any])


@click.group("links")
def links_group() -> None:
    """Personal links for emails: token links and signed links."""


def _link_expiry(expires_in_days: int | None, expires: dt.datetime | None) -> dt.datetime | None:
    """--expires-in-days N or --expires YYYY-MM-DD (valid through that day, UTC)."""
    if expires_in_days is not None and expires is not None:
        fail("give --expires-in-days or --expires, not both")
    if expires_in_days is not None:
        return utcnow() + dt.timedelta(days=expires_in_days)
    if expires is not None:
        end = dt.datetime.combine(expires.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        if end <= utcnow():
            fail(f"--expires {expires:%Y-%m-%d} is in the past")
        return end
    return None


def _link_options(func: F) -> F:
    """Program, tenant, campaign and expiry options shared by `issue` and `export`."""
    for option in reversed([
        click.option("--program", "program_slug", required=True),
        click.option("--tenant", "tenant_slug", help="Tenant slug (needed if several have "
                                                     "the program)."),
        click.option("--campaign", default=None, help="Label for revoking and statistics."),
        click.option("--expires-in-days", type=DAYS, default=None),
        click.option("--expires", type=click.DateTime(["%Y-%m-%d"]), default=None,
                     help="Last valid day (UTC)."),
        click.option("--max-uses", type=click.IntRange(1, 1_000_000), default=None,
                     help="Uses before the link stops working (default: unlimited)."),
    ]):
        func = option(func)
    return func


@links_group.command("issue")
@_link_options
@click.option("--purpose", type=click.Choice(links.PURPOSES), required=True)
@click.option("--customer", "external_id", default=None,
              help="The customer's external id (not for --purpose enroll).")
@needs_database
def links_issue(program_slug: str, tenant_slug: str | None, campaign: str | None,
                expires_in_days: int | None, expires: dt.datetime | None,
                max_uses: int | None, purpose: str, external_id: str | None) -> None:
    """Issue one token link and print its URL."""
    svc = services()
    expires_at = _link_expiry(expires_in_days, expires)
    if (purpose == "enroll") != (external_id is None):
        fail("--purpose enroll takes no --customer" if external_id
             else f"--purpose {purpose} needs --customer EXTERNAL_ID")
    with svc.db.session() as session:
        tenant_id = program(session, program_slug, tenant_slug).tenant_id
    with svc.db.transaction(tenant_id) as session:
        chosen = program(session, program_slug, tenant_slug)
        customer = None
        if external_id is not None:
            customer = find_customer(session, tenant_id, external_id)
            if customer is None:
                fail(f"no customer {external_id!r} in this tenant")
        try:
            token = links.issue_token(session, chosen, customer, purpose, campaign=campaign,
                                      expires_at=expires_at, max_uses=max_uses)
        except ValueError as exc:
            fail(str(exc))
    click.echo(links.link_url(svc.settings.public_url, token))


@links_group.command("export")
@_link_options
@click.option("--purpose", type=click.Choice(links.PERSONAL_PURPOSES), required=True)
@click.option("--out", "out_path", required=True, help="CSV file to write, or - for stdout.")
@needs_database
def links_export_command(program_slug: str, tenant_slug: str | None, campaign: str | None,
                         expires_in_days: int | None, expires: dt.datetime | None,
                         max_uses: int | None, purpose: str, out_path: str) -> None:
    """Issue a link for every customer and write external_id,email,url as CSV."""
    svc = services()
    expires_at = _link_expiry(expires_in_days, expires)
    with svc.db.session() as session:
        tenant_id = program(session, program_slug, tenant_slug).tenant_id
    to_stdout = out_path == "-"
    target = Path(out_path)
    # Written beside the target and renamed when complete: never half a list in an email tool.
    partial = target.with_name(target.name + ".part")
    try:
        with svc.db.tenant_session(tenant_id) as session:
            chosen = program(session, program_slug, tenant_slug)
            total = links_export.count_customers(session, chosen)
            with (nullcontext(sys.stdout) if to_stdout
                  else partial.open("w", encoding="utf-8", newline="")) as out, \
                    tqdm(total=total, unit="link", desc="export", disable=None) as bar:
                try:
                    report = links_export.export_links(
                        session, chosen, purpose, out, public_url=svc.settings.public_url,
                        campaign=campaign, expires_at=expires_at, max_uses=max_uses,
                        progress=bar.update)
                except ValueError as exc:
                    fail(str(exc))
        if not to_stdout:
            partial.replace(target)
    finally:
        if not to_stdout:
            partial.unlink(missing_ok=True)
    where = "stdout" if to_stdout else str(target)
    click.echo(f"{report.rows} links written to {where} "
               f"({report.without_email} customers without email)", err=to_stdout)


@links_group.command("revoke")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--program", "program_slug", default=None)
@click.option("--campaign", default=None)
@click.option("--token", default=None, help="One link: its token or its URL.")
@click.option("--all", "revoke_all", is_flag=True, help="Every live token link of the tenant.")
@needs_database
def links_revoke(tenant_slug: str, program_slug: str | None, campaign: str | None,
                 token: str | None, revoke_all: bool) -> None:
    """Revoke token links (signed links die by expiry or `rotate-secret`)."""
    if not (program_slug or campaign or token or revoke_all):
        fail("say what to revoke: --program, --campaign, --token, or --all")
    with services().db.transaction() as session:
        tenant_id = tenant(session, tenant_slug).id
        program_id = program(session, program_slug, tenant_slug).id if program_slug else None
        if token is not None:
            token = token.rstrip("/").rsplit(links.TOKEN_PREFIX, 1)[-1]
        count = links.revoke_tokens(session, tenant_id=tenant_id, program_id=program_id,
                                    campaign=campaign, token=token)
    click.echo(f"{count} links revoked")


@links_group.command("sign")
@click.option("--program", "program_slug", required=True)
@click.option("--tenant", "tenant_slug", help="Tenant slug (needed if several have the program).")
@click.option("--customer", "external_id", required=True, help="The customer's external id.")
@click.option("--purpose", type=click.Choice(links.SIGNED_PURPOSES), required=True)
@click.option("--expires-in-days", required=True,
              type=click.IntRange(1, links.MAX_SIGNED_LIFETIME.days))
@needs_database
def links_sign(program_slug: str, tenant_slug: str | None, external_id: str, purpose: str,
               expires_in_days: int) -> None:
    """Print a signed link, as an email tool would compute it (see README)."""
    svc = services()
    expires = int((utcnow() + dt.timedelta(days=expires_in_days)).timestamp())
    with svc.db.session() as session:
        chosen = program(session, program_slug, tenant_slug)
        try:
            url = links.signed_url(svc.settings.public_url, chosen.tenant, chosen,
                                   external_id, purpose, expires)
        except ValueError as exc:
            fail(str(exc))
    click.echo(url)


@links_group.command("rotate-secret")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--forget-previous", is_flag=True,
              help="Stop accepting the current secret at once (it leaked).")
@needs_database
def links_rotate_secret(tenant_slug: str, forget_previous: bool) -> None:
    """Make a new link secret; the old one keeps verifying until the next rotation."""
    with services().db.transaction() as session:
        secret = links.rotate_link_secret(session, tenant(session, tenant_slug),
                                          keep_previous=not forget_previous)
    click.echo(secret)
    click.echo("previous secret dropped" if forget_previous
               else "the previous secret still verifies links until the next rotation", err=True)


@links_group.command("show-secret")
@click.option("--tenant", "tenant_slug", required=True)
@needs_database
def links_show_secret(tenant_slug: str) -> None:
    """Print the tenant's current link secret, to configure an email tool."""
    with services().db.session() as session:
        click.echo(tenant(session, tenant_slug).link_secret)


COMMANDS = [links_group]

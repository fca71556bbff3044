"""``passerelle cards``: a card's timeline, and building a program's cards as files."""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from app.cli.common import exit_on_item_errors, fail, needs_database, program, services
from app.infra.models import Program
from app.ops import retention
from app.tracking import diagnostics
from app.updates import bulk
from app.wallet import certs


@click.group("cards")
def cards() -> None:
    """Wallet cards."""


@cards.command("timeline")
@click.argument("serial")
@needs_database
def cards_timeline(serial: str) -> None:
    """A card's diagnostic timeline: versions, devices, pushes and Wallet's log lines."""
    keep_days = retention.effective_days(services().settings.retention)["push_attempts"]
    with services().db.session() as session:
        try:
            entries = diagnostics.timeline(session, serial, keep_days)
        except LookupError as exc:
            fail(str(exc))
    for entry in entries:
        click.echo(f"{entry.at:%Y-%m-%d %H:%M:%S}  {entry.kind:<12} {entry.text}")


@cards.command("build")
@click.option("--program", "program_slug", required=True)
@click.option("--tenant", "tenant_slug", help="Tenant slug (needed if several have the program).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", type=int, default=None, help="Worker processes (default: all cores).")
@click.option("--issue-missing", is_flag=True, help="First give a card to customers without one.")
@needs_database
def cards_build(program_slug: str, tenant_slug: str | None, out_dir: Path, workers: int | None,
                issue_missing: bool) -> None:
    """Write every card of a program as a signed .pkpass file."""
    svc = services()
    with svc.db.session() as session:
        found = program(session, program_slug, tenant_slug, name_tenant=False)
        tenant_id, program_id = found.tenant_id, found.id
    with svc.db.tenant_session(tenant_id) as session:
        chosen = session.get(Program, program_id)
        assert chosen is not None
        if issue_missing:
            click.echo(f"issued {bulk.issue_missing_cards(session, chosen)} new cards")
        total = bulk.count_cards(session, chosen)
        try:
            with tqdm(total=total, unit="card", desc="build", disable=None) as bar:
                report = bulk.build_program(session, svc, chosen, out_dir, workers, bar.update)
        except (certs.CertificateError, LookupError, ValueError) as exc:
            fail(str(exc))  # certificates, template and image errors name their file
    click.echo(f"{report.written} cards written to {out_dir} "
               f"({report.changed} with new content)")
    exit_on_item_errors([f"error: {error}" for error in report.errors])


COMMANDS = [cards]

"""``passerelle customers``: customer records (CSV imports)."""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from app.cli.common import exit_on_item_errors, fail, needs_database, services, tenant
from app.customers.customers import ImportFileError, import_csv
from app.updates import refresh as updates
from app.updates.rendering import RenderPool


@click.group("customers")
def customers() -> None:
    """Customer records."""


@customers.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tenant", "tenant_slug", required=True, help="Tenant slug.")
@needs_database
def customers_import(file: Path, tenant_slug: str) -> None:
    """Upsert customers from a CSV file by external_id."""
    svc = services()
    with svc.db.session() as session:
        tenant_id = tenant(session, tenant_slug).id
    total = _count_lines(file)
    with svc.db.tenant_session(tenant_id) as session, \
            tqdm(total=total, unit="row", desc="import", disable=None) as bar, \
            updates.CardRefresher(svc, RenderPool()) as refresher:
        try:
            report = import_csv(session, tenant_id, file, progress=bar.update,
                                on_changed=refresher.on_changed)
        except ImportFileError as exc:
            fail(str(exc))
    click.echo(f"{report.created} created, {report.updated} updated, "
               f"{report.unchanged} unchanged, {len(report.errors)} rejected")
    if report.card_problems:
        click.secho(f"{len(report.card_problems)} cards could not be updated "
                    f"(the data is imported):", fg="yellow", err=True)
    exit_on_item_errors([f"{file}: {error}" for error in report.errors]
                        + [f"warning: {problem}" for problem in report.card_problems])


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return max(sum(1 for _ in fh) - 1, 0)


COMMANDS = [customers]

"""``passerelle installs rebuild`` and ``passerelle prune``: upkeep."""

from __future__ import annotations

import click
from tqdm import tqdm

from app.cli.common import fail, needs_database, services, tenant
from app.ops import retention
from app.tracking import install_state


@click.group("installs")
def installs_group() -> None:
    """Install state per card and platform."""


@installs_group.command("rebuild")
@click.option("--tenant", "tenant_slug", default=None, help="Only this tenant's cards.")
@needs_database
def installs_rebuild(tenant_slug: str | None) -> None:
    """Recompute every card's install state from the install log; print the counts."""
    svc = services()
    with svc.db.session() as session:
        tenant_id = tenant(session, tenant_slug).id if tenant_slug else None
        total = install_state.cards_to_rebuild(session, tenant_id)
    with tqdm(total=total, unit="card", desc="rebuild", disable=None) as bar:
        written = install_state.rebuild(svc, tenant_id=tenant_id, progress=bar.update)
    with svc.db.session() as session:
        counts = install_state.state_counts(session, tenant_id=tenant_id)
    click.echo(f"{written} card states rebuilt")
    click.echo(f"{'tenant':<16}{'program':<16}{'platform':<10}{'state':<12}{'cards':>10}")
    for (slug, program, platform, state), n in counts.items():
        click.echo(f"{slug:<16}{program:<16}{platform:<10}{state:<12}{n:>10}")


@click.command("prune")
@click.option("--table", "tables", multiple=True,
              type=click.Choice([p.name for p in retention.POLICIES]),
              help="Only these tables (repeatable). Default: every table.")
@click.option("--batch", default=retention.BATCH, show_default=True,
              type=click.IntRange(1, 100_000), help="Rows deleted per transaction.")
@needs_database
def prune_command(tables: tuple[str, ...], batch: int) -> None:
    """Delete logs and finished outbox rows past their retention (PASSERELLE_RETENTION)."""
    svc = services()
    try:
        days = retention.effective_days(svc.settings.retention)
    except ValueError as exc:
        fail(str(exc))
    with tqdm(unit="row", desc="prune", disable=None) as bar:
        deleted = retention.prune(svc.db, svc.settings.retention, batch=batch,
                                  only=set(tables) or None,
                                  progress=lambda _table, count: bar.update(count))
    for table, count in deleted.items():
        click.echo(f"{table}: {count} rows deleted (older than {days[table]} days)")
    for table in sorted(set(tables or days) - set(deleted)):
        click.echo(f"{table}: kept forever (retention 0)")


COMMANDS = [installs_group, prune_command]

"""``passerelle db``: the schema."""

from __future__ import annotations

import click
from flask.cli import with_appcontext

from app.cli.common import services
from app.infra import migrate


@click.group("db")
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@with_appcontext
def db_upgrade() -> None:
    """Apply all Alembic migrations."""
    migrate.upgrade(services().settings.database_url)
    click.echo("database is up to date")


COMMANDS = [db]

"""The ``passerelle`` command (a Flask CLI group, so ``flask --app app ...`` works too).

One module per command group; each parses its options, calls the stage module owning the
data and prints. Shared helpers live in ``app.cli.common``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from flask.cli import FlaskGroup

if TYPE_CHECKING:
    from flask import Flask


def _create_app() -> Flask:
    from app import create_app  # app imports this module (register_commands): no cycle at load

    return create_app()


@click.group(cls=FlaskGroup, create_app=_create_app, add_default_commands=True)
def main() -> None:
    """Passerelle: signed wallet cards from your CRM."""


def register_commands(app: Flask) -> None:
    """Make the same commands available as `flask --app app <command>`."""
    for name, command in main.commands.items():
        app.cli.add_command(command, name)


def _register() -> None:
    # The command modules import app.cli.common, so they load once this package exists.
    from app.cli import (
        admin,
        cards,
        certs,
        crm,
        customers,
        db,
        google,
        hooks,
        links,
        ops,
        segments,
        server,
        tenants,
        webhooks,
    )

    for module in (db, certs, tenants, server, google, links, crm, admin, webhooks, hooks,
                   segments, ops, customers, cards):
        for command in module.COMMANDS:
            main.add_command(command)


_register()

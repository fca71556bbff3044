"""What every command group shares: the services, failing, tenant and program lookups, and
the one place that checks the database schema before a command runs."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy.orm import Session

from app.infra import migrate
from app.infra.bounds import ROW_ID_MAX, ROW_ID_MIN
from app.infra.models import Program, Tenant
from app.services import Services
from app.tenants import tenants

#: Row ids on the command line: the id columns' range, refused by Click before any query.
ROW_ID = click.IntRange(ROW_ID_MIN, ROW_ID_MAX)
#: Row counts (--limit): more rows than ids cannot exist.
ROWS = click.IntRange(1, ROW_ID_MAX)
#: Link lifetimes in days: a century, well inside what a date can hold.
DAYS = click.IntRange(1, 36_500)

P = ParamSpec("P")
R = TypeVar("R")


def services() -> Services:
    svc: Services = current_app.extensions["passerelle"]
    return svc


def fail(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def exit_on_item_errors(lines: list[str]) -> None:
    """Print one line per rejected row or card; exit 2 (partial success) if any."""
    for line in lines:
        click.secho(line, fg="red", err=True)
    if lines:
        sys.exit(2)


def warn(lines: list[str]) -> None:
    for line in lines:
        click.secho(f"warning: {line}", fg="yellow", err=True)


def ensure_migrated() -> None:
    from sqlalchemy.exc import OperationalError

    try:
        current = migrate.is_current(services().db.engine)
    except OperationalError as exc:  # restarting, wrong address: say so, exit 1
        fail(f"the database cannot be reached ({type(exc.orig or exc).__name__}); "
             "check PASSERELLE_DATABASE_URL")
    if not current:
        fail("the database schema is not up to date: run `passerelle db upgrade`")


def needs_database(func: Callable[P, R]) -> Callable[P, R]:
    """In place of ``with_appcontext`` for commands reading or writing the database: the
    schema is checked once, before the command body (``db upgrade`` and ``up`` migrate)."""
    @functools.wraps(func)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        ensure_migrated()
        return func(*args, **kwargs)

    return with_appcontext(checked)


def tenant(session: Session, slug: str) -> Tenant:
    """The tenant named on the command line, or exit 1."""
    found = tenants.find_tenant(session, slug)
    if found is None:
        fail(f"no tenant {slug!r}")
    return found


def tenant_program(session: Session, tenant_slug: str, program_slug: str) -> Program:
    """A program named by --tenant and --program, both required."""
    program = tenants.find_program(session, tenant_slug, program_slug)
    if program is None:
        fail(f"no program {program_slug!r} in tenant {tenant_slug!r}")
    return program


def program(session: Session, program_slug: str, tenant_slug: str | None, *,
            name_tenant: bool = True) -> Program:
    """The program named on the command line; --tenant only needed if the slug is shared."""
    found = tenants.find_programs(session, program_slug, tenant_slug)
    if not found:
        fail(f"no program {program_slug!r}"
             + (f" in tenant {tenant_slug!r}" if tenant_slug and name_tenant else ""))
    if len(found) > 1:
        fail(f"several tenants have a program {program_slug!r}: add --tenant")
    return found[0]

"""The ``passerelle`` command (a Flask CLI group, so ``flask --app app ...`` works too)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from flask import current_app
from flask.cli import FlaskGroup, with_appcontext
from sqlalchemy import select
from tqdm import tqdm

from app import bulk, certs, diagnostics, migrate, tenants, updates
from app import demo as demo_data
from app.customers import ImportFileError, import_csv
from app.models import AppleIdentity, Program, Tenant
from app.passes.template import TemplateError
from app.services import Services, identity_password


def _create_app():  # type: ignore[no-untyped-def]
    from app import create_app

    return create_app()


@click.group(cls=FlaskGroup, create_app=_create_app, add_default_commands=True)
def main() -> None:
    """Passerelle: signed wallet cards from your CRM."""


def register_commands(app) -> None:  # type: ignore[no-untyped-def]
    """Make the same commands available as `flask --app app <command>`."""
    for name, command in main.commands.items():
        app.cli.add_command(command, name)


def services() -> Services:
    svc: Services = current_app.extensions["passerelle"]
    return svc


def fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def exit_on_item_errors(lines: list[str]) -> None:
    """Print one line per rejected row or card; exit 2 (partial success) if any."""
    for line in lines:
        click.secho(line, fg="red", err=True)
    if lines:
        sys.exit(2)


# -- database ------------------------------------------------------------------------

@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@with_appcontext
def db_upgrade() -> None:
    """Apply all Alembic migrations."""
    migrate.upgrade(services().settings.database_url)
    click.echo("database is up to date")


# -- certificates --------------------------------------------------------------------

@main.group("certs")
def certs_group() -> None:
    """Apple pass certificates."""


@certs_group.command("dev")
@click.option("--pass-type-identifier", default=demo_data.DEMO_PASS_TYPE, show_default=True)
@click.option("--team-identifier", default=demo_data.DEMO_TEAM, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing development certificate.")
@with_appcontext
def certs_dev(pass_type_identifier: str, team_identifier: str, overwrite: bool) -> None:
    """Make a local development CA, a WWDR stand-in and a pass certificate."""
    paths = certs.make_dev_certs(services().settings.certs_path, pass_type_identifier,
                                 team_identifier, overwrite=overwrite)
    click.echo(f"development root CA: {paths.root_ca}")
    click.echo(f"WWDR stand-in:       {paths.wwdr}")
    click.echo(f"pass certificate:    {paths.certificate}")
    click.echo(f"private key:         {paths.key}")


def check_all_certificates(svc: Services) -> tuple[list[str], list[str]]:
    """Check every registered identity and every program's pass type. (errors, warnings)"""
    errors: list[str] = []
    warnings: list[str] = []
    with svc.db.session() as session:
        identities = session.scalars(select(AppleIdentity)).all()
        programs = session.scalars(select(Program)).all()
        known = {i.pass_type_identifier for i in identities}
        for identity in identities:
            try:
                password = identity_password(identity)
            except certs.CertificateError as exc:
                errors.append(str(exc))
                continue
            for problem in certs.check_identity(
                    svc.settings.certs_path, identity.certificate_file, identity.key_file,
                    password, identity.pass_type_identifier, identity.team_identifier,
                    warn_days=svc.settings.cert_warn_days):
                line = f"{identity.pass_type_identifier}: {problem.message}"
                (errors if problem.level == "error" else warnings).append(line)
        for program in programs:
            if program.pass_type_identifier not in known:
                errors.append(f"program {program.slug!r}: no certificate registered for "
                              f"{program.pass_type_identifier!r}")
    return errors, warnings


@certs_group.command("check")
@with_appcontext
def certs_check() -> None:
    """Verify key/certificate pairs, pass type ids, chains and expiry."""
    _ensure_migrated()
    errors, warnings = check_all_certificates(services())
    for line in warnings:
        click.secho(f"warning: {line}", fg="yellow", err=True)
    for line in errors:
        click.secho(f"error: {line}", fg="red", err=True)
    if errors:
        sys.exit(1)
    click.echo("certificates OK")


@certs_group.command("register")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--certificate", required=True, help="PEM or .p12 file, relative to certs_path.")
@click.option("--key", default=None, help="PEM private key (not needed for a .p12).")
@click.option("--password-env", default=None,
              help="NAME of the environment variable holding the key/.p12 password.")
@click.option("--pass-type-identifier", default=None, help="Expected pass type (checked).")
@click.option("--apns-key", default=None,
              help="Optional .p8 key (relative to certs_path) for token-based APNs pushes.")
@click.option("--apns-key-id", default=None, help="The .p8 key's id (10 characters).")
@with_appcontext
def certs_register(tenant_slug: str, certificate: str, key: str | None, password_env: str | None,
                   pass_type_identifier: str | None, apns_key: str | None,
                   apns_key_id: str | None) -> None:
    """Register a Pass Type ID certificate for a tenant (checked first)."""
    _ensure_migrated()
    svc = services()
    try:
        with svc.db.transaction() as session:
            row = tenants.register_identity(
                session, svc, _tenant(session, tenant_slug), certificate_file=certificate,
                key_file=key, password_env=password_env, pass_type_identifier=pass_type_identifier,
                apns_key_file=apns_key, apns_key_id=apns_key_id)
            click.echo(f"registered {row.pass_type_identifier} (team {row.team_identifier})")
    except (tenants.SetupError, certs.CertificateError) as exc:
        fail(str(exc))


# -- tenants and programs ------------------------------------------------------------

@main.group("tenants")
def tenants_group() -> None:
    """Brands."""


@tenants_group.command("create")
@click.argument("slug")
@click.option("--name", required=True)
@with_appcontext
def tenants_create(slug: str, name: str) -> None:
    """Create a tenant."""
    _ensure_migrated()
    try:
        with services().db.transaction() as session:
            tenant = tenants.create_tenant(session, slug, name)
            click.echo(f"tenant {tenant.slug!r} created")
    except tenants.SetupError as exc:
        fail(str(exc))


@main.group("programs")
def programs_group() -> None:
    """Card programs."""


@programs_group.command("create")
@click.argument("slug")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--name", required=True)
@click.option("--template", required=True, help="A folder name under pass_templates/.")
@click.option("--pass-type-identifier", required=True)
@with_appcontext
def programs_create(slug: str, tenant_slug: str, name: str, template: str,
                    pass_type_identifier: str) -> None:
    """Create a program (a card) for a tenant."""
    _ensure_migrated()
    svc = services()
    try:
        with svc.db.transaction() as session:
            program = tenants.create_program(
                session, svc, _tenant(session, tenant_slug), slug=slug, name=name,
                template=template, pass_type_identifier=pass_type_identifier)
            click.echo(f"program {program.slug!r} created with template {program.template!r}")
    except (tenants.SetupError, TemplateError) as exc:
        fail(str(exc))


# -- demo and serving ----------------------------------------------------------------

@main.command("demo")
@with_appcontext
def demo_command() -> None:
    """Seed the demo tenant, programs and customers (idempotent)."""
    _ensure_migrated()
    svc = services()
    with svc.db.transaction() as session:
        seeded = demo_data.seed(session, svc)
        click.echo(f"demo tenant {seeded.tenant.slug!r}: {len(seeded.programs)} programs, "
                   f"{len(seeded.customers)} customers")


@main.command("up")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@with_appcontext
def up(host: str, port: int) -> None:
    """Migrate, make dev certificates if none, seed the demo and serve."""
    svc = services()
    migrate.upgrade(svc.settings.database_url)
    with svc.db.transaction() as session:
        demo_data.seed(session, svc)
    _refuse_bad_certificates(svc)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    svc.settings.demo = True
    public = svc.settings.public_url
    click.echo(f"Passerelle is serving on http://{host}:{port}")
    click.echo(f"Demo: {public}/demo/")
    from waitress import serve

    serve(app, host=host, port=port, threads=8)


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--threads", default=8, show_default=True, type=int)
@with_appcontext
def serve_command(host: str, port: int, threads: int) -> None:
    """Serve in production (no seeding, no certificate generation)."""
    svc = services()
    _ensure_migrated()
    _refuse_bad_certificates(svc)
    from waitress import serve

    click.echo(f"Passerelle is serving on http://{host}:{port}")
    serve(current_app._get_current_object(), host=host, port=port, threads=threads)  # type: ignore[attr-defined]


def _refuse_bad_certificates(svc: Services) -> None:
    errors, warnings = check_all_certificates(svc)
    for line in warnings:
        click.secho(f"warning: {line}", fg="yellow", err=True)
    if errors and svc.settings.strict_certs:
        for line in errors:
            click.secho(f"error: {line}", fg="red", err=True)
        fail("refusing to start with broken certificates (see `passerelle certs check`)")


def _ensure_migrated() -> None:
    if not migrate.is_current(services().db.engine):
        fail("the database schema is not up to date: run `passerelle db upgrade`")


# -- background jobs ----------------------------------------------------------------

@main.command("worker")
@click.option("--workers", default=4, show_default=True, type=int,
              help="Threads delivering jobs (pushes are I/O bound).")
@with_appcontext
def worker(workers: int) -> None:
    """Run the job worker: push delivery and the outbox sweeper (Ctrl-C to stop)."""
    _ensure_migrated()
    svc = services()
    where = svc.settings.redis_url or str(svc.settings.instance_path / "jobs.sqlite3")
    click.echo(f"worker: {workers} threads, queue {where}")
    svc.jobs.consumer(workers).run()


# -- customers -----------------------------------------------------------------------

def _tenant(session, slug: str) -> Tenant:  # type: ignore[no-untyped-def]
    tenant = session.scalar(select(Tenant).where(Tenant.slug == slug))
    if tenant is None:
        fail(f"no tenant {slug!r}")
    return tenant


@main.group()
def customers() -> None:
    """Customer records."""


@customers.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tenant", "tenant_slug", required=True, help="Tenant slug.")
@with_appcontext
def customers_import(file: Path, tenant_slug: str) -> None:
    """Upsert customers from a CSV file by external_id."""
    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        tenant_id = _tenant(session, tenant_slug).id
    total = _count_lines(file)
    with svc.db.tenant_session(tenant_id) as session, \
            tqdm(total=total, unit="row", desc="import", disable=None) as bar:
        try:
            report = import_csv(session, tenant_id, file, progress=bar.update,
                                on_changed=lambda s, changed: updates.customers_changed(
                                    s, svc, changed).errors)
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


# -- cards ---------------------------------------------------------------------------

@main.group()
def cards() -> None:
    """Wallet cards."""


@cards.command("timeline")
@click.argument("serial")
@with_appcontext
def cards_timeline(serial: str) -> None:
    """A card's diagnostic timeline: versions, devices, pushes and Wallet's log lines."""
    _ensure_migrated()
    with services().db.session() as session:
        try:
            entries = diagnostics.timeline(session, serial)
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
@with_appcontext
def cards_build(program_slug: str, tenant_slug: str | None, out_dir: Path, workers: int | None,
                issue_missing: bool) -> None:
    """Write every card of a program as a signed .pkpass file."""
    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        query = select(Program).where(Program.slug == program_slug)
        if tenant_slug:
            query = query.join(Tenant).where(Tenant.slug == tenant_slug)
        found = session.scalars(query).all()
        if not found:
            fail(f"no program {program_slug!r}")
        if len(found) > 1:
            fail(f"several tenants have a program {program_slug!r}: add --tenant")
        tenant_id = found[0].tenant_id
        program_id = found[0].id
    with svc.db.tenant_session(tenant_id) as session:
        program = session.get(Program, program_id)
        assert program is not None
        if issue_missing:
            click.echo(f"issued {bulk.issue_missing_cards(session, program)} new cards")
        total = bulk.count_cards(session, program)
        try:
            with tqdm(total=total, unit="card", desc="build", disable=None) as bar:
                report = bulk.build_program(session, svc, program, out_dir, workers, bar.update)
        except (certs.CertificateError, LookupError, ValueError) as exc:
            fail(str(exc))  # certificates, template and image errors name their file
    click.echo(f"{report.written} cards written to {out_dir} "
               f"({report.changed} with new content)")
    exit_on_item_errors([f"error: {error}" for error in report.errors])


if __name__ == "__main__":  # python -m app.cli
    main()

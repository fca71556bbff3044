"""The ``passerelle`` command (a Flask CLI group, so ``flask --app app ...`` works too)."""

from __future__ import annotations

import datetime as dt
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click
from flask import current_app
from flask.cli import FlaskGroup, with_appcontext
from sqlalchemy import select
from tqdm import tqdm

from app.customers.customers import ImportFileError, import_csv
from app.distribution import links
from app.infra import logs, migrate
from app.infra.bounds import ROW_ID_MAX, ROW_ID_MIN, column_max
from app.infra.models import CrmConnection, Customer, Program, Tenant, utcnow
from app.ops import readiness, retention
from app.segments import links_export
from app.services import Services
from app.tenants import demo as demo_data
from app.tenants import tenants
from app.tracking import diagnostics
from app.updates import bulk, pushes
from app.updates import refresh as updates
from app.wallet import certs
from app.wallet.template import TemplateError

#: Row ids on the command line: the id columns' range, refused by Click before any query.
ROW_ID = click.IntRange(ROW_ID_MIN, ROW_ID_MAX)
#: Row counts (--limit): more rows than ids cannot exist.
ROWS = click.IntRange(1, ROW_ID_MAX)
#: Link lifetimes in days: a century, well inside what a date can hold.
DAYS = click.IntRange(1, 36_500)


def _finite(value: float | None) -> float | None:
    """Click's FloatRange lets NaN through (every comparison with it is false)."""
    if value is not None and value != value:
        raise click.BadParameter("must be a number")
    return value


def scalar_defaults(model: type) -> dict[str, object]:
    """A model's plain column defaults (not callables), which SQLAlchemy only applies at
    INSERT: a new row read before its flush would show None instead."""
    return {column.key: column.default.arg for column in model.__table__.columns  # type: ignore[attr-defined]
            if column.default is not None and column.default.is_scalar}


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


@certs_group.command("check")
@with_appcontext
def certs_check() -> None:
    """Verify key/certificate pairs, pass type ids, chains and expiry."""
    _ensure_migrated()
    errors, warnings = readiness.check_certificates(services(), apns=True)
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
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65_535))
@with_appcontext
def up(host: str, port: int) -> None:
    """Migrate, make dev certificates if none, seed the demo and serve."""
    svc = services()
    _configure_logs(svc)
    migrate.upgrade(svc.settings.database_url)
    with svc.db.transaction() as session:
        demo_data.seed(session, svc)
    _refuse_bad_certificates(svc)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    svc.settings.demo = True
    public = svc.settings.public_url
    click.echo(f"Passerelle is serving on http://{host}:{port}")
    click.echo(f"Demo: {public}/demo/")
    _serve(app, svc, host, port, threads=8)


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65_535))
@click.option("--workers", type=int, default=None,
              help="Server processes (default: one per CPU core, at least 2).")
@click.option("--threads", default=8, show_default=True, type=int,
              help="Threads per server process.")
@with_appcontext
def serve_command(host: str, port: int, workers: int | None, threads: int) -> None:
    """Serve in production (gunicorn, gthread workers; no seeding, no certificates made)."""
    from app import server

    svc = services()
    _configure_logs(svc)
    _ensure_migrated()
    _refuse_bad_certificates(svc)
    svc.db.dispose()  # each server process opens its own connections after the fork
    click.echo(f"Passerelle is serving on http://{host}:{port}")
    server.serve(host, port, workers or server.default_workers(), threads)


def _serve(app: Any, svc: Services, host: str, port: int, threads: int) -> None:
    """``passerelle up``'s server: waitress, one process (``serve`` runs gunicorn, app/server.py).

    Proxy headers are read by the application, whatever the server: ProxyFix
    (app/__init__.py) turns the ``PASSERELLE_TRUSTED_PROXIES`` last hops of
    ``X-Forwarded-For/-Proto/-Host`` into the client address, scheme and host. The
    server's only job is to hand those headers over. Waitress deletes every
    ``X-Forwarded-*`` it was not told to trust before the application sees it, so
    behind nginx all clients shared the proxy's rate limits; with trusted proxies
    configured it now passes them through. Without, it keeps deleting them (and
    nothing in the application would read them).
    """
    from waitress import serve

    serve(app, host=host, port=port, threads=threads,
          clear_untrusted_proxy_headers=svc.settings.trusted_proxies <= 0)


def _configure_logs(svc: Services) -> None:
    try:
        logs.configure(svc.settings.log_format, svc.settings.log_level)
    except ValueError as exc:
        fail(str(exc))


def _refuse_bad_certificates(svc: Services) -> None:
    errors, warnings = readiness.check_certificates(svc)
    for line in warnings:
        click.secho(f"warning: {line}", fg="yellow", err=True)
    if errors and svc.settings.strict_certs:
        for line in errors:
            click.secho(f"error: {line}", fg="red", err=True)
        fail("refusing to start with broken certificates (see `passerelle certs check`)")


def _ensure_migrated() -> None:
    from sqlalchemy.exc import OperationalError

    try:
        current = migrate.is_current(services().db.engine)
    except OperationalError as exc:  # restarting, wrong address: say so, exit 1
        fail(f"the database cannot be reached ({type(exc.orig or exc).__name__}); "
             "check PASSERELLE_DATABASE_URL")
    if not current:
        fail("the database schema is not up to date: run `passerelle db upgrade`")


# -- Google Wallet -------------------------------------------------------------------

@main.group("google")
def google_group() -> None:
    """Google Wallet issuer settings."""


@google_group.command("configure")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--issuer-id", required=True, help="The numeric Google Wallet issuer id.")
@click.option("--service-account", required=True,
              help="Service-account JSON, relative to certs_path or absolute.")
@with_appcontext
def google_configure(tenant_slug: str, issuer_id: str, service_account: str) -> None:
    """Set a tenant's Google Wallet issuer and service account."""
    _ensure_migrated()
    if not issuer_id.isdigit():
        fail(f"issuer id {issuer_id!r} must be the number shown in the Pay & Wallet console")
    with services().db.transaction() as session:
        tenant = _tenant(session, tenant_slug)
        tenant.google_issuer_id, tenant.google_service_account_file = issuer_id, service_account
    click.echo(f"tenant {tenant_slug!r}: Google issuer {issuer_id}; run `passerelle google check`")


@google_group.command("check")
@click.option("--tenant", "tenant_slug", required=True)
@with_appcontext
def google_check(tenant_slug: str) -> None:
    """Verify the service account's credentials and its access to the issuer."""
    from app.updates.google_client import GoogleApiError
    from app.updates.google_wallet import GoogleNotConfigured

    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        tenant = _tenant(session, tenant_slug)
        try:
            client = svc.google_client(tenant)
            client.check_issuer(str(tenant.google_issuer_id))
        except (GoogleNotConfigured, GoogleApiError) as exc:
            fail(str(exc))
        click.echo(f"Google Wallet OK: {client.service_account_email} can issue for "
                   f"{tenant.google_issuer_id}")


# -- personal links ------------------------------------------------------------------

@main.group("links")
def links_group() -> None:
    """Personal links for emails: token links and signed links."""


def _link_program(session, program_slug: str, tenant_slug: str | None) -> Program:  # type: ignore[no-untyped-def]
    """The program named on the command line; --tenant only needed if the slug is shared."""
    query = select(Program).where(Program.slug == program_slug)
    if tenant_slug:
        query = query.join(Tenant).where(Tenant.slug == tenant_slug)
    found = session.scalars(query).all()
    if not found:
        fail(f"no program {program_slug!r}" + (f" in tenant {tenant_slug!r}" if tenant_slug else ""))
    if len(found) > 1:
        fail(f"several tenants have a program {program_slug!r}: add --tenant")
    return found[0]


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


def _link_options(func):  # type: ignore[no-untyped-def]
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
@with_appcontext
def links_issue(program_slug: str, tenant_slug: str | None, campaign: str | None,
                expires_in_days: int | None, expires: dt.datetime | None,
                max_uses: int | None, purpose: str, external_id: str | None) -> None:
    """Issue one token link and print its URL."""
    _ensure_migrated()
    svc = services()
    expires_at = _link_expiry(expires_in_days, expires)
    if (purpose == "enroll") != (external_id is None):
        fail("--purpose enroll takes no --customer" if external_id
             else f"--purpose {purpose} needs --customer EXTERNAL_ID")
    with svc.db.session() as session:
        tenant_id = _link_program(session, program_slug, tenant_slug).tenant_id
    with svc.db.transaction(tenant_id) as session:
        program = _link_program(session, program_slug, tenant_slug)
        customer = None
        if external_id is not None:
            customer = session.scalar(select(Customer).where(Customer.external_id == external_id))
            if customer is None:
                fail(f"no customer {external_id!r} in this tenant")
        try:
            token = links.issue_token(session, program, customer, purpose, campaign=campaign,
                                      expires_at=expires_at, max_uses=max_uses)
        except ValueError as exc:
            fail(str(exc))
    click.echo(links.link_url(svc.settings.public_url, token))


@links_group.command("export")
@_link_options
@click.option("--purpose", type=click.Choice(links.PERSONAL_PURPOSES), required=True)
@click.option("--out", "out_path", required=True, help="CSV file to write, or - for stdout.")
@with_appcontext
def links_export_command(program_slug: str, tenant_slug: str | None, campaign: str | None,
                         expires_in_days: int | None, expires: dt.datetime | None,
                         max_uses: int | None, purpose: str, out_path: str) -> None:
    """Issue a link for every customer and write external_id,email,url as CSV."""
    _ensure_migrated()
    svc = services()
    expires_at = _link_expiry(expires_in_days, expires)
    with svc.db.session() as session:
        tenant_id = _link_program(session, program_slug, tenant_slug).tenant_id
    to_stdout = out_path == "-"
    target = Path(out_path)
    # Written beside the target and renamed when complete: never half a list in an email tool.
    partial = target.with_name(target.name + ".part")
    try:
        with svc.db.tenant_session(tenant_id) as session:
            program = _link_program(session, program_slug, tenant_slug)
            total = links_export.count_customers(session, program)
            with (nullcontext(sys.stdout) if to_stdout
                  else partial.open("w", encoding="utf-8", newline="")) as out, \
                    tqdm(total=total, unit="link", desc="export", disable=None) as bar:
                try:
                    report = links_export.export_links(
                        session, program, purpose, out, public_url=svc.settings.public_url,
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
@with_appcontext
def links_revoke(tenant_slug: str, program_slug: str | None, campaign: str | None,
                 token: str | None, revoke_all: bool) -> None:
    """Revoke token links (signed links die by expiry or `rotate-secret`)."""
    _ensure_migrated()
    if not (program_slug or campaign or token or revoke_all):
        fail("say what to revoke: --program, --campaign, --token, or --all")
    with services().db.transaction() as session:
        tenant = _tenant(session, tenant_slug)
        program_id = _link_program(session, program_slug, tenant_slug).id if program_slug else None
        if token is not None:
            token = token.rstrip("/").rsplit(links.TOKEN_PREFIX, 1)[-1]
        count = links.revoke_tokens(session, tenant_id=tenant.id, program_id=program_id,
                                    campaign=campaign, token=token)
    click.echo(f"{count} links revoked")


@links_group.command("sign")
@click.option("--program", "program_slug", required=True)
@click.option("--tenant", "tenant_slug", help="Tenant slug (needed if several have the program).")
@click.option("--customer", "external_id", required=True, help="The customer's external id.")
@click.option("--purpose", type=click.Choice(links.SIGNED_PURPOSES), required=True)
@click.option("--expires-in-days", required=True,
              type=click.IntRange(1, links.MAX_SIGNED_LIFETIME.days))
@with_appcontext
def links_sign(program_slug: str, tenant_slug: str | None, external_id: str, purpose: str,
               expires_in_days: int) -> None:
    """Print a signed link, as an email tool would compute it (see README)."""
    _ensure_migrated()
    svc = services()
    expires = int((utcnow() + dt.timedelta(days=expires_in_days)).timestamp())
    with svc.db.session() as session:
        program = _link_program(session, program_slug, tenant_slug)
        try:
            url = links.signed_url(svc.settings.public_url, program.tenant, program,
                                   external_id, purpose, expires)
        except ValueError as exc:
            fail(str(exc))
    click.echo(url)


@links_group.command("rotate-secret")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--forget-previous", is_flag=True,
              help="Stop accepting the current secret at once (it leaked).")
@with_appcontext
def links_rotate_secret(tenant_slug: str, forget_previous: bool) -> None:
    """Make a new link secret; the old one keeps verifying until the next rotation."""
    _ensure_migrated()
    with services().db.transaction() as session:
        secret = links.rotate_link_secret(session, _tenant(session, tenant_slug),
                                          keep_previous=not forget_previous)
    click.echo(secret)
    click.echo("previous secret dropped" if forget_previous
               else "the previous secret still verifies links until the next rotation", err=True)


@links_group.command("show-secret")
@click.option("--tenant", "tenant_slug", required=True)
@with_appcontext
def links_show_secret(tenant_slug: str) -> None:
    """Print the tenant's current link secret, to configure an email tool."""
    _ensure_migrated()
    with services().db.session() as session:
        click.echo(_tenant(session, tenant_slug).link_secret)


# -- CRM connector -------------------------------------------------------------------

@main.group("crm")
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
                  0, column_max(CrmConnection.__table__.c.max_staleness_seconds) // 3600),
              default=None, callback=lambda _ctx, _param, value: _finite(value),
              help="Serve the local copy this long when the CRM is down (default 24).")
@click.option("--timeout-seconds", type=click.IntRange(1, 60), default=None,
              help="Per-request timeout (default 5).")
@with_appcontext
def crm_configure(tenant_slug: str, kind: str, base_url: str | None, auth_header: str | None,
                  auth_env: str | None, mapping_file: Path | None,
                  max_staleness_hours: float | None, timeout_seconds: int | None) -> None:
    """Connect a tenant to its CRM (options not given keep their current value)."""
    import json
    import os

    from app.crm.http import Mapping

    _ensure_migrated()
    mapping = None
    if mapping_file is not None:
        try:
            mapping = json.loads(mapping_file.read_text(encoding="utf-8"))
            Mapping.parse(mapping)
        except (ValueError, UnicodeDecodeError) as exc:
            fail(f"{mapping_file}: {exc}")
    with services().db.transaction() as session:
        tenant = _tenant(session, tenant_slug)
        row = session.scalar(select(CrmConnection).where(CrmConnection.tenant_id == tenant.id))
        if row is None:
            # The columns' defaults now, not at INSERT: the summary below reads them.
            row = CrmConnection(tenant_id=tenant.id, mapping={}, **scalar_defaults(CrmConnection))
            session.add(row)
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


def _check_http_connection(row) -> None:  # type: ignore[no-untyped-def]
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


def _crm_connector(session, tenant_slug: str):  # type: ignore[no-untyped-def]
    from app.crm import CrmError, connector_for

    tenant = _tenant(session, tenant_slug)
    try:
        return tenant, connector_for(session, services(), tenant.id)
    except CrmError as exc:
        fail(str(exc))


@crm_group.command("check")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--external-id", default=None, help="Fetch this customer and list the mapped "
                                                  "fields that came back (names only).")
@with_appcontext
def crm_check(tenant_slug: str, external_id: str | None) -> None:
    """Reach the CRM with the stored settings; with --external-id, fetch one record."""
    from app.crm import CrmError

    _ensure_migrated()
    with services().db.session() as session:
        tenant, connector = _crm_connector(session, tenant_slug)
        if connector.kind == "builtin":
            click.echo(f"tenant {tenant_slug!r} uses the built-in store: nothing to reach")
            return
        try:
            if external_id is None:
                connector.find_by_email("passerelle-check@example.invalid")
                click.echo(f"CRM OK: {connector.base_url} answered a search")
                return
            record = connector.fetch(external_id)
        except CrmError as exc:
            fail(str(exc))
    if record is None:
        fail(f"the CRM does not know customer {external_id!r}")
    returned = sorted(record.provided())
    missing = [name for name in connector.mapping.mapped_fields()
               if name not in returned and name != "external_id"]
    click.echo(f"customer {record.external_id}: {len(returned)} mapped fields returned: "
               f"{', '.join(returned) or 'none'}")
    if missing:
        click.secho(f"mapped but not in the record: {', '.join(missing)}", fg="yellow")


@crm_group.command("outbox")
@click.option("--tenant", "tenant_slug", required=True)
@with_appcontext
def crm_outbox(tenant_slug: str) -> None:
    """Writes waiting for the CRM, and the last errors."""
    from app.crm import outbox

    _ensure_migrated()
    with services().db.session() as session:
        tenant = _tenant(session, tenant_slug)
        report = outbox.summary(session, tenant.id)
    click.echo(f"pending: {report.pending} ({report.retrying} retrying), "
               f"delivered: {report.delivered}, failed: {report.failed}")
    for entry in report.problems:
        state = "pending" if entry.done_at is None else "failed"
        click.echo(f"#{entry.id} {entry.operation} customer {entry.customer_id} "
                   f"({state}, {entry.attempts} attempts): {entry.last_error}")


@crm_group.command("flush")
@click.option("--tenant", "tenant_slug", required=True)
@with_appcontext
def crm_flush(tenant_slug: str) -> None:
    """Deliver the tenant's waiting writes now (e.g. once the CRM is back)."""
    from app.crm import outbox

    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        tenant = _tenant(session, tenant_slug)
        total = outbox.summary(session, tenant.id).pending
    with tqdm(total=total, unit="write", desc="flush", disable=None) as bar:
        states = outbox.flush(svc, tenant.id, progress=bar.update)
    click.echo(", ".join(f"{count} {state}" for state, count in sorted(states.items()))
               or "nothing to deliver")
    left = sum(count for state, count in states.items() if state != "done")
    if left:
        click.secho(f"{left} writes not delivered: see `passerelle crm outbox --tenant "
                    f"{tenant_slug}`", fg="red", err=True)
        sys.exit(2)


# -- API keys ----------------------------------------------------------------------

@main.group("apikeys")
def apikeys_group() -> None:
    """Keys for the REST API (/api/v1): shown once, stored hashed."""


@apikeys_group.command("create")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), required=True,
              help="read < write < admin; admin also manages keys and reads the audit log.")
@click.option("--name", default="cli", show_default=True, help="A label to tell keys apart.")
@with_appcontext
def apikeys_create(tenant_slug: str, scope: str, name: str) -> None:
    """Create a key and print it (it cannot be shown again)."""
    from app.admin import apikeys, audit

    _ensure_migrated()
    with services().db.transaction() as session:
        tenant = _tenant(session, tenant_slug)
        try:
            row, raw = apikeys.create_key(session, tenant.id, name, scope)
        except apikeys.ApiKeyError as exc:
            fail(str(exc))
        audit.record(session, "cli", "key.create", f"key:{row.prefix}", {"scope": scope},
                     tenant_id=tenant.id)
    click.echo(raw)
    click.echo(f"key {apikeys.display(row.prefix)} ({scope}) for tenant {tenant_slug!r}: "
               f"store it now, it is not shown again", err=True)


@apikeys_group.command("list")
@click.option("--tenant", "tenant_slug", required=True)
@with_appcontext
def apikeys_list(tenant_slug: str) -> None:
    """List a tenant's keys: prefix, scope, name, last use, revocation."""
    from app.admin import apikeys

    _ensure_migrated()
    with services().db.session() as session:
        tenant = _tenant(session, tenant_slug)
        for row in apikeys.list_keys(session, tenant.id):
            used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "live"
            click.echo(f"{row.id:>5}  {apikeys.display(row.prefix):<16} {row.scope:<6} "
                       f"{state:<18} used {used:<17} {row.name}")


@apikeys_group.command("revoke")
@click.option("--tenant", "tenant_slug", required=True)
@click.argument("key")
@with_appcontext
def apikeys_revoke(tenant_slug: str, key: str) -> None:
    """Revoke a key, named by its id or prefix (pk_xxxxxxxx)."""
    from app.admin import apikeys, audit

    _ensure_migrated()
    with services().db.transaction() as session:
        tenant = _tenant(session, tenant_slug)
        row = apikeys.find_key(session, tenant.id, key)
        if row is None:
            fail(f"no key {key!r} in tenant {tenant_slug!r}")
        if apikeys.revoke(row):
            audit.record(session, "cli", "key.revoke", f"key:{row.prefix}", {},
                         tenant_id=tenant.id)
            click.echo(f"key {apikeys.display(row.prefix)} revoked")
        else:
            click.echo(f"key {apikeys.display(row.prefix)} was already revoked")


# -- webhooks ------------------------------------------------------------------------

@main.group("webhooks")
def webhooks_group() -> None:
    """Outbound webhooks: subscriptions, the delivery log, redelivery (docs/webhooks.md)."""


@webhooks_group.command("add")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--url", required=True, help="Where to POST events (https://...).")
@click.option("--events", required=True, help="Comma-separated, e.g. card.installed,card.removed")
@click.option("--description", default=None)
@with_appcontext
def webhooks_add(tenant_slug: str, url: str, events: str, description: str | None) -> None:
    """Subscribe a URL to event types; prints the signing secret once."""
    from app.webhooks import outbound as webhooks_out

    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        tenant_id = _tenant(session, tenant_slug).id
    try:
        with svc.db.transaction(tenant_id) as session:
            sub = webhooks_out.create_subscription(
                session, tenant_id, url, [e.strip() for e in events.split(",") if e.strip()],
                description, allow_private=svc.settings.webhook_allow_private_networks)
            click.echo(f"subscription {sub.id}: {', '.join(sub.event_types)} -> {sub.url}")
            click.echo(f"signing secret (shown once, keep it in the receiver): {sub.secret}")
    except ValueError as exc:
        fail(str(exc))


@webhooks_group.command("list")
@click.option("--tenant", "tenant_slug", default=None)
@with_appcontext
def webhooks_list(tenant_slug: str | None) -> None:
    """Subscriptions (never their secrets)."""
    from app.infra.models import WebhookSubscription

    _ensure_migrated()
    with services().db.session() as session:
        query = (select(WebhookSubscription, Tenant.slug)
                 .join(Tenant, Tenant.id == WebhookSubscription.tenant_id)
                 .order_by(WebhookSubscription.id))
        if tenant_slug:
            query = query.where(Tenant.slug == tenant_slug)
        for sub, slug in session.execute(query):
            state = "active" if sub.active else "disabled"
            click.echo(f"{sub.id:>5}  {slug:<16} {state:<8} {','.join(sub.event_types)}  {sub.url}")


@webhooks_group.command("deliveries")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--failed", is_flag=True, help="Only given-up, cancelled or failing deliveries.")
@click.option("--limit", default=50, show_default=True, type=ROWS)
@with_appcontext
def webhooks_deliveries(tenant_slug: str, failed: bool, limit: int) -> None:
    """The delivery log, newest first, with each attempt's HTTP status."""
    from sqlalchemy import or_

    from app.infra.models import WebhookAttempt, WebhookDelivery

    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        tenant_id = _tenant(session, tenant_slug).id
    with svc.db.tenant_session(tenant_id) as session:
        query = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
        if failed:
            query = query.where(or_(WebhookDelivery.outcome.in_(("gave_up", "cancelled")),
                                    WebhookDelivery.last_error.is_not(None)
                                    & WebhookDelivery.done_at.is_(None)))
        for delivery in session.scalars(query):
            codes = session.scalars(select(WebhookAttempt.status).where(
                WebhookAttempt.delivery_id == delivery.id).order_by(WebhookAttempt.id)).all()
            click.echo(f"{delivery.id:>6}  {delivery.created_at:%Y-%m-%d %H:%M:%S}  "
                       f"{delivery.event_type:<17} {delivery.outcome or 'pending':<9} "
                       f"attempts [{', '.join(str(c) if c else '-' for c in codes)}]  "
                       f"sub {delivery.subscription_id}  event {delivery.event_id}"
                       + (f"  ({delivery.last_error})" if delivery.last_error else ""))


@webhooks_group.command("redeliver")
@click.argument("delivery_id", type=ROW_ID)
@with_appcontext
def webhooks_redeliver(delivery_id: int) -> None:
    """Send a delivery's event again (same event id and body) as a new delivery."""
    from app.infra.models import WebhookDelivery
    from app.webhooks import outbound as webhooks_out

    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        original = session.get(WebhookDelivery, delivery_id)
        if original is None:
            fail(f"no webhook delivery {delivery_id}")
        tenant_id = original.tenant_id
    with svc.db.transaction(tenant_id) as session:
        copy = webhooks_out.redeliver(session, delivery_id)
        click.echo(f"delivery {copy.id} queued (event {copy.event_id}); "
                   f"run `passerelle worker` if none is running")


def _set_subscription_active(subscription_id: int, active: bool) -> None:
    from app.infra.models import WebhookSubscription

    _ensure_migrated()
    with services().db.transaction() as session:
        sub = session.get(WebhookSubscription, subscription_id)
        if sub is None:
            fail(f"no webhook subscription {subscription_id}")
        sub.active = active
    click.echo(f"subscription {subscription_id} {'enabled' if active else 'disabled'}")


@webhooks_group.command("disable")
@click.argument("subscription_id", type=ROW_ID)
@with_appcontext
def webhooks_disable(subscription_id: int) -> None:
    """Stop sending to a subscription (pending deliveries are cancelled)."""
    _set_subscription_active(subscription_id, False)


@webhooks_group.command("enable")
@click.argument("subscription_id", type=ROW_ID)
@with_appcontext
def webhooks_enable(subscription_id: int) -> None:
    """Send to a subscription again (e.g. after a 410 disabled it)."""
    _set_subscription_active(subscription_id, True)


@main.group("hooks")
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
@with_appcontext
def hooks_create(tenant_slug: str, slug: str, auth: str, header_name: str | None,
                 mapping_file: Path | None) -> None:
    """Create an endpoint; prints its URL and secret once."""
    import json

    from sqlalchemy.exc import IntegrityError

    from app.webhooks import inbound as webhooks_in

    _ensure_migrated()
    mapping = None
    if mapping_file is not None:
        try:
            mapping = json.loads(mapping_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            fail(f"{mapping_file}: not JSON ({exc})")
        if not isinstance(mapping, dict):
            fail(f"{mapping_file}: the mapping must be a JSON object")
    svc = services()
    try:
        with svc.db.transaction() as session:
            tenant = _tenant(session, tenant_slug)
            hook, secret = webhooks_in.create_hook(session, tenant, slug, auth, mapping,
                                                   header_name)
            url = svc.settings.public_url + webhooks_in.url_path(tenant.slug, hook.slug)
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
@with_appcontext
def hooks_events(tenant_slug: str, status: str | None, limit: int) -> None:
    """Received events, newest first, with why they failed or were ignored."""
    from app.infra.models import InboundEvent, InboundHook

    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        tenant_id = _tenant(session, tenant_slug).id
    with svc.db.tenant_session(tenant_id) as session:
        query = (select(InboundEvent, InboundHook.slug)
                 .join(InboundHook, InboundHook.id == InboundEvent.hook_id)
                 .order_by(InboundEvent.id.desc()).limit(limit))
        if status:
            query = query.where(InboundEvent.status == status)
        for item, hook_slug in session.execute(query):
            click.echo(f"{item.id:>6}  {item.received_at:%Y-%m-%d %H:%M:%S}  {hook_slug:<16} "
                       f"{item.status:<8} {item.event_type or '-':<20} {item.event_id}"
                       + (f"  ({item.error})" if item.error else ""))


# -- dashboard users ---------------------------------------------------------------

ADMIN_PASSWORD_ENV = "PASSERELLE_ADMIN_PASSWORD"


@main.group("admins")
def admins_group() -> None:
    """People who sign in to the dashboard at /admin (viewer, marketer, admin)."""


def _dashboard_tenant(session, slug: str) -> Tenant:  # type: ignore[no-untyped-def]
    tenant = session.scalar(select(Tenant).where(Tenant.slug == slug))
    if tenant is None:
        fail(f"no tenant {slug!r}")
    return tenant  # type: ignore[no-any-return]


@admins_group.command("create")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--email", required=True)
@click.option("--role", type=click.Choice(["viewer", "marketer", "admin"]), default="admin",
              show_default=True)
@with_appcontext
def admins_create(tenant_slug: str, email: str, role: str) -> None:
    """Create a dashboard user. The password comes from PASSERELLE_ADMIN_PASSWORD or a
    prompt (never an option: options land in shell history and process lists)."""
    import os

    from app.admin import users as admin_users
    from app.admin.audit import record as audit_record

    password = os.environ.get(ADMIN_PASSWORD_ENV)
    if password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with services().db.transaction() as session:
        tenant = _dashboard_tenant(session, tenant_slug)
        try:
            user = admin_users.create_user(session, tenant.id, email, password, role)
        except admin_users.AdminUserError as exc:
            fail(str(exc))
        audit_record(session, "cli", "user.create", f"user:{user.id}", {"role": role},
                     tenant_id=tenant.id)
        click.echo(f"created {role} user:{user.id} for tenant {tenant.slug}; "
                   f"sign in at {services().settings.public_url}/admin/login")


@admins_group.command("list")
@click.option("--tenant", "tenant_slug", required=True)
@with_appcontext
def admins_list(tenant_slug: str) -> None:
    """List a tenant's dashboard users."""
    from app.admin import users as admin_users

    with services().db.transaction() as session:
        tenant = _dashboard_tenant(session, tenant_slug)
        for user in admin_users.list_users(session, tenant.id):
            state = "disabled" if user.disabled_at else "active"
            click.echo(f"{user.id}\t{user.email}\t{user.role}\t{state}")


@admins_group.command("disable")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--email", required=True)
@with_appcontext
def admins_disable(tenant_slug: str, email: str) -> None:
    """Disable a dashboard user (their sessions end at their next click)."""
    from app.admin import users as admin_users
    from app.admin.audit import record as audit_record

    with services().db.transaction() as session:
        tenant = _dashboard_tenant(session, tenant_slug)
        user = admin_users.find_user(session, tenant.id, email)
        if user is None:
            fail("no such user in this tenant")
        try:
            changed = admin_users.disable(session, user)  # type: ignore[arg-type]
        except admin_users.AdminUserError as exc:
            fail(str(exc))
        if changed:
            audit_record(session, "cli", "user.disable", f"user:{user.id}",  # type: ignore[union-attr]
                         tenant_id=tenant.id)
        click.echo("disabled" if changed else "already disabled")


# -- segments and funnel ---------------------------------------------------------------

def _tenant_program(session, tenant_slug: str, program_slug: str) -> Program:  # type: ignore[no-untyped-def]
    program = session.scalar(select(Program).join(Tenant).where(
        Tenant.slug == tenant_slug, Program.slug == program_slug))
    if program is None:
        fail(f"no program {program_slug!r} in tenant {tenant_slug!r}")
    return program


def _segment_options(func):  # type: ignore[no-untyped-def]
    """The filters `segments count` and `segments export` share."""
    from app.segments.segments import STATES

    day = click.DateTime(["%Y-%m-%d"])
    for option in reversed([
        click.option("--tenant", "tenant_slug", required=True),
        click.option("--program", "program_slug", required=True),
        click.option("--state", type=click.Choice(STATES), default=None,
                     help="Install state (not-installed = anything but installed)."),
        click.option("--campaign", default=None, help="Customers sent a link of this campaign."),
        click.option("--tier", default=None, help="Tier attribute (case-insensitive)."),
        click.option("--points-min", type=float, default=None),
        click.option("--points-max", type=float, default=None),
        click.option("--include-without-consent", is_flag=True,
                     help="Also customers without current marketing_email consent."),
        click.option("--created-from", type=day, default=None, help="Customer created on/after."),
        click.option("--created-to", type=day, default=None, help="Customer created through."),
        click.option("--installed-from", type=day, default=None, help="First installed on/after."),
        click.option("--installed-to", type=day, default=None, help="First installed through."),
    ]):
        func = option(func)
    return func


def _segment(program: Program, options: dict[str, object]):  # type: ignore[no-untyped-def]
    """A Segment from the shared options (dates are UTC days, `--*-to` inclusive)."""
    from app.segments.segments import Segment, parse_bound

    bounds = {name: parse_bound(name, f"{value:%Y-%m-%d}")
              for name in ("created_from", "created_to", "installed_from", "installed_to")
              if (value := options.get(name)) is not None}
    try:
        return Segment(program_id=program.id, state=options.get("state"),  # type: ignore[arg-type]
                       campaign=options.get("campaign"), tier=options.get("tier"),  # type: ignore[arg-type]
                       points_min=options.get("points_min"),  # type: ignore[arg-type]
                       points_max=options.get("points_max"),  # type: ignore[arg-type]
                       include_without_consent=bool(options.get("include_without_consent")),
                       **bounds)
    except ValueError as exc:
        fail(str(exc))


@main.group("segments")
def segments_group() -> None:
    """Customers by install state, campaign, attributes and consent."""


@segments_group.command("count")
@_segment_options
@click.option("--json", "as_json", is_flag=True, help="Print the count and filters as JSON.")
@with_appcontext
def segments_count(tenant_slug: str, program_slug: str, as_json: bool, **options: object) -> None:
    """Count a segment's customers."""
    import json

    from app.segments import segments

    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        tenant_id = _tenant_program(session, tenant_slug, program_slug).tenant_id
    with svc.db.tenant_session(tenant_id) as session:
        segment = _segment(_tenant_program(session, tenant_slug, program_slug), options)
        total = segments.count(session, segment)
    if as_json:
        click.echo(json.dumps({"count": total, "segment": segment.to_dict()}))
    else:
        click.echo(total)


@segments_group.command("export")
@_segment_options
@click.option("--out", "out_path", required=True, help="CSV file to write, or - for stdout.")
@click.option("--link-purpose", type=click.Choice(["download", "enrich", "consent"]),
              default="download", show_default=True)
@click.option("--link-campaign", default=None, help="Campaign of the links issued.")
@click.option("--link-expires-in-days", type=DAYS, default=None)
@click.option("--limit", type=ROWS, default=None, help="At most this many rows.")
@with_appcontext
def segments_export(tenant_slug: str, program_slug: str, out_path: str, link_purpose: str,
                    link_campaign: str | None, link_expires_in_days: int | None,
                    limit: int | None, **options: object) -> None:
    """Write a segment as CSV with a fresh personal link per row."""
    from app.segments import segments

    _ensure_migrated()
    svc = services()
    expires = (utcnow() + dt.timedelta(days=link_expires_in_days)
               if link_expires_in_days else None)
    with svc.db.session() as session:
        tenant_id = _tenant_program(session, tenant_slug, program_slug).tenant_id
    to_stdout = out_path == "-"
    target = Path(out_path)
    partial = target.with_name(target.name + ".part")  # renamed once complete
    try:
        with svc.db.tenant_session(tenant_id) as session:
            segment = _segment(_tenant_program(session, tenant_slug, program_slug), options)
            total = segments.count(session, segment)
            with (nullcontext(sys.stdout) if to_stdout
                  else partial.open("w", encoding="utf-8", newline="")) as out, \
                    tqdm(total=min(total, limit or total), unit="row", desc="export",
                         disable=None) as bar:
                try:
                    rows = segments.export_csv(
                        session, svc, segment, out, link_purpose=link_purpose,
                        link_campaign=link_campaign, link_expires_at=expires,
                        progress=bar.update, limit=limit)
                except ValueError as exc:
                    fail(str(exc))
        if not to_stdout:
            partial.replace(target)
    finally:
        if not to_stdout:
            partial.unlink(missing_ok=True)
    click.echo(f"{rows} rows written to {'stdout' if to_stdout else target}", err=to_stdout)


@main.command("funnel")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--program", "program_slug", required=True)
@click.option("--campaign", default=None)
@click.option("--from", "date_from", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Links issued on/after this day (UTC).")
@click.option("--to", "date_to", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Links issued through this day (UTC).")
@click.option("--by", type=click.Choice(["day", "campaign"]), default="day", show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@with_appcontext
def funnel_command(tenant_slug: str, program_slug: str, campaign: str | None,
                   date_from: dt.datetime | None, date_to: dt.datetime | None, by: str,
                   as_csv: bool, as_json: bool) -> None:
    """Links issued -> opened -> downloaded -> installed, per day of issue or campaign."""
    import json

    from app.segments import funnel_stats

    _ensure_migrated()
    svc = services()
    start = dt.datetime.combine(date_from.date(), dt.time(), dt.UTC) if date_from else None
    end = (dt.datetime.combine(date_to.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
           if date_to else None)
    with svc.db.session() as session:
        tenant_id = _tenant_program(session, tenant_slug, program_slug).tenant_id
    with svc.db.tenant_session(tenant_id) as session:
        program = _tenant_program(session, tenant_slug, program_slug)
        rows = funnel_stats.funnel(session, program.id, campaign=campaign, date_from=start,
                                   date_to=end, by=by)
    if as_csv:
        funnel_stats.funnel_csv(rows, sys.stdout)
    elif as_json:
        click.echo(json.dumps(rows))
    else:
        widths = [10, 16, 8, 8, 10, 10, 10, 10]
        heads = ["day", "campaign", "issued", "opened", "dl apple", "dl google", "in apple",
                 "in google"]
        click.echo("".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
        for row in rows:
            values = [row[c] if row[c] is not None else "-" for c in funnel_stats.COLUMNS]
            click.echo("".join(f"{str(v):>{w}}" for v, w in zip(values, widths)))


@main.group("installs")
def installs_group() -> None:
    """Install state per card and platform."""


@installs_group.command("rebuild")
@click.option("--tenant", "tenant_slug", default=None, help="Only this tenant's cards.")
@with_appcontext
def installs_rebuild(tenant_slug: str | None) -> None:
    """Recompute every card's install state from the install log; print the counts."""
    from app.tracking import install_state

    _ensure_migrated()
    svc = services()
    with svc.db.session() as session:
        tenant_id = _tenant(session, tenant_slug).id if tenant_slug else None
        total = install_state.cards_to_rebuild(session, tenant_id)
    with tqdm(total=total, unit="card", desc="rebuild", disable=None) as bar:
        written = install_state.rebuild(svc, tenant_id=tenant_id, progress=bar.update)
    with svc.db.session() as session:
        counts = install_state.state_counts(session, tenant_id=tenant_id)
    click.echo(f"{written} card states rebuilt")
    click.echo(f"{'tenant':<16}{'program':<16}{'platform':<10}{'state':<12}{'cards':>10}")
    for (tenant, program, platform, state), n in counts.items():
        click.echo(f"{tenant:<16}{program:<16}{platform:<10}{state:<12}{n:>10}")


# -- background jobs ----------------------------------------------------------------

@main.command("worker")
@click.option("--workers", default=4, show_default=True, type=int,
              help="Threads delivering jobs (pushes are I/O bound).")
@with_appcontext
def worker(workers: int) -> None:
    """Run the job worker: push delivery and the outbox sweeper.

    SIGTERM or Ctrl-C: stop taking jobs, let running ones finish (at most
    PASSERELLE_WORKER_SHUTDOWN_SECONDS), hand back what is still in flight, exit."""
    _ensure_migrated()
    svc = services()
    _configure_logs(svc)
    where = svc.settings.redis_url or str(svc.settings.instance_path / "jobs.sqlite3")
    click.echo(f"worker: {workers} threads, queue {where}")
    svc.jobs.consumer(workers, svc.settings.worker_shutdown_seconds).run()
    pushes.release_held(svc)  # only what outlived the shutdown timeout is left here
    click.echo("worker: stopped")


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
            tqdm(total=total, unit="row", desc="import", disable=None) as bar, \
            updates.CardRefresher(svc, bulk.RenderPool()) as refresher:
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


# -- retention -----------------------------------------------------------------------

@main.command("prune")
@click.option("--table", "tables", multiple=True,
              type=click.Choice([p.name for p in retention.POLICIES]),
              help="Only these tables (repeatable). Default: every table.")
@click.option("--batch", default=retention.BATCH, show_default=True,
              type=click.IntRange(1, 100_000), help="Rows deleted per transaction.")
@with_appcontext
def prune_command(tables: tuple[str, ...], batch: int) -> None:
    """Delete logs and finished outbox rows past their retention (PASSERELLE_RETENTION)."""
    _ensure_migrated()
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


if __name__ == "__main__":  # python -m app.cli
    main()

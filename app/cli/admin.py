"""``passerelle apikeys`` and ``passerelle admins``: REST API keys and dashboard users."""

from __future__ import annotations

import click

from app.admin import apikeys, audit
from app.admin import users as admin_users
from app.admin.audit import record as audit_record
from app.cli.common import fail, needs_database, services, tenant


@click.group("apikeys")
def apikeys_group() -> None:
    """Keys for the REST API (/api/v1): shown once, stored hashed."""


@apikeys_group.command("create")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), required=True,
              help="read < write < admin; admin also manages keys and reads the audit log.")
@click.option("--name", default="cli", show_default=True, help="A label to tell keys apart.")
@needs_database
def apikeys_create(tenant_slug: str, scope: str, name: str) -> None:
    """Create a key and print it (it cannot be shown again)."""

    with services().db.transaction() as session:
        owner = tenant(session, tenant_slug)
        try:
            row, raw = apikeys.create_key(session, owner.id, name, scope)
        except apikeys.ApiKeyError as exc:
            fail(str(exc))
        audit.record(session, "cli", "key.create", f"key:{row.prefix}", {"scope": scope},
                     tenant_id=owner.id)
    click.echo(raw)
    click.echo(f"key {apikeys.display(row.prefix)} ({scope}) for tenant {tenant_slug!r}: "
               f"store it now, it is not shown again", err=True)


@apikeys_group.command("list")
@click.option("--tenant", "tenant_slug", required=True)
@needs_database
def apikeys_list(tenant_slug: str) -> None:
    """List a tenant's keys: prefix, scope, name, last use, revocation."""

    with services().db.session() as session:
        owner = tenant(session, tenant_slug)
        for row in apikeys.list_keys(session, owner.id):
            used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "live"
            click.echo(f"{row.id:>5}  {apikeys.display(row.prefix):<16} {row.scope:<6} "
                       f"{state:<18} used {used:<17} {row.name}")


@apikeys_group.command("revoke")
@click.option("--tenant", "tenant_slug", required=True)
@click.argument("key")
@needs_database
def apikeys_revoke(tenant_slug: str, key: str) -> None:
    """Revoke a key, named by its id or prefix (pk_xxxxxxxx)."""

    with services().db.transaction() as session:
        owner = tenant(session, tenant_slug)
        row = apikeys.find_key(session, owner.id, key)
        if row is None:
            fail(f"no key {key!r} in tenant {tenant_slug!r}")
        if apikeys.revoke(row):
            audit.record(session, "cli", "key.revoke", f"key:{row.prefix}", {},
                         tenant_id=owner.id)
            click.echo(f"key {apikeys.display(row.prefix)} revoked")
        else:
            click.echo(f"key {apikeys.display(row.prefix)} was already revoked")


ADMIN_PASSWORD_ENV = "PASSERELLE_ADMIN_PASSWORD"


@click.group("admins")
def admins_group() -> None:
    """People who sign in to the dashboard at /admin (viewer, marketer, admin)."""


@admins_group.command("create")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--email", required=True)
@click.option("--role", type=click.Choice(["viewer", "marketer", "admin"]), default="admin",
              show_default=True)
@needs_database
def admins_create(tenant_slug: str, email: str, role: str) -> None:
    """Create a dashboard user. The password comes from PASSERELLE_ADMIN_PASSWORD or a
    prompt (never an option: options land in shell history and process lists)."""
    import os


    password = os.environ.get(ADMIN_PASSWORD_ENV)
    if password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with services().db.transaction() as session:
        owner = tenant(session, tenant_slug)
        try:
            user = admin_users.create_user(session, owner.id, email, password, role)
        except admin_users.AdminUserError as exc:
            fail(str(exc))
        audit_record(session, "cli", "user.create", f"user:{user.id}", {"role": role},
                     tenant_id=owner.id)
        click.echo(f"created {role} user:{user.id} for tenant {owner.slug}; "
                   f"sign in at {services().settings.public_url}/admin/login")


@admins_group.command("list")
@click.option("--tenant", "tenant_slug", required=True)
@needs_database
def admins_list(tenant_slug: str) -> None:
    """List a tenant's dashboard users."""

    with services().db.transaction() as session:
        owner = tenant(session, tenant_slug)
        for user in admin_users.list_users(session, owner.id):
            state = "disabled" if user.disabled_at else "active"
            click.echo(f"{user.id}\t{user.email}\t{user.role}\t{state}")


@admins_group.command("disable")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--email", required=True)
@needs_database
def admins_disable(tenant_slug: str, email: str) -> None:
    """Disable a dashboard user (their sessions end at their next click)."""

    with services().db.transaction() as session:
        owner = tenant(session, tenant_slug)
        user = admin_users.find_user(session, owner.id, email)
        if user is None:
            fail("no such user in this tenant")
        try:
            changed = admin_users.disable(session, user)
        except admin_users.AdminUserError as exc:
            fail(str(exc))
        if changed:
            audit_record(session, "cli", "user.disable", f"user:{user.id}",
                         tenant_id=owner.id)
        click.echo("disabled" if changed else "already disabled")


COMMANDS = [apikeys_group, admins_group]

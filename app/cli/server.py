"""``passerelle demo``, ``up``, ``serve`` and ``worker``: running Passerelle."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import click
from flask import current_app
from flask.cli import with_appcontext

from app import server
from app.cli.common import fail, needs_database, services, warn
from app.infra import logs, migrate
from app.ops import readiness
from app.services import Services
from app.tenants import demo as demo_data
from app.updates import pushes

if TYPE_CHECKING:
    from flask import Flask
    from werkzeug.local import LocalProxy


@click.command("demo")
@needs_database
def demo_command() -> None:
    """Seed the demo tenant, programs and customers (idempotent)."""
    svc = services()
    with svc.db.transaction() as session:
        seeded = demo_data.seed(session, svc)
        click.echo(f"demo tenant {seeded.tenant.slug!r}: {len(seeded.programs)} programs, "
                   f"{len(seeded.customers)} customers")


@click.command("up")
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
    app = cast("LocalProxy[Flask]", current_app)._get_current_object()
    svc.settings.demo = True
    public = svc.settings.public_url
    click.echo(f"Passerelle is serving on http://{host}:{port}")
    click.echo(f"Demo: {public}/demo/")
    _serve(app, svc, host, port, threads=8)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65_535))
@click.option("--workers", type=int, default=None,
              help="Server processes (default: one per CPU core, at least 2).")
@click.option("--threads", default=8, show_default=True, type=int,
              help="Threads per server process.")
@needs_database
def serve_command(host: str, port: int, workers: int | None, threads: int) -> None:
    """Serve in production (gunicorn, gthread workers; no seeding, no certificates made)."""

    svc = services()
    _configure_logs(svc)
    _refuse_bad_certificates(svc)
    svc.db.dispose()  # each server process opens its own connections after the fork
    click.echo(f"Passerelle is serving on http://{host}:{port}")
    server.serve(host, port, workers or server.default_workers(), threads)


def _serve(app: Flask, svc: Services, host: str, port: int, threads: int) -> None:
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
    warn(warnings)
    if errors and svc.settings.strict_certs:
        for line in errors:
            click.secho(f"error: {line}", fg="red", err=True)
        fail("refusing to start with broken certificates (see `passerelle certs check`)")


@click.command("worker")
@click.option("--workers", default=4, show_default=True, type=int,
              help="Threads delivering jobs (pushes are I/O bound).")
@needs_database
def worker(workers: int) -> None:
    """Run the job worker: push delivery and the outbox sweeper.

    SIGTERM or Ctrl-C: stop taking jobs, let running ones finish (at most
    PASSERELLE_WORKER_SHUTDOWN_SECONDS), hand back what is still in flight, exit."""
    svc = services()
    _configure_logs(svc)
    where = svc.settings.redis_url or str(svc.settings.instance_path / "jobs.sqlite3")
    click.echo(f"worker: {workers} threads, queue {where}")
    svc.jobs.consumer(workers, svc.settings.worker_shutdown_seconds).run()
    pushes.release_held(svc)  # only what outlived the shutdown timeout is left here
    click.echo("worker: stopped")


COMMANDS = [demo_command, up, serve_command, worker]

"""Passerelle: wallet cards from CRM data. ``create_app()`` is the entry point."""

from __future__ import annotations

from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from app import api
from app.cli import register_commands
from app.infra import logs
from app.infra.config import Settings
from app.services import Services
from app.web import (
    admin,
    converters,
    csrf,
    demo,
    errors,
    google,
    health,
    hooks,
    limits,
    links,
    ops,
    passkit,
)


def create_app(settings: Settings | None = None, **overrides: Any) -> Flask:
    """Build the web application from settings (environment by default)."""
    settings = settings or Settings.from_env(**overrides)
    app = Flask(__name__, instance_path=str(settings.instance_path))
    app.config["SECRET_KEY"] = settings.ensure_secret_key()
    app.config["MAX_CONTENT_LENGTH"] = 2 * 1024 * 1024
    services = Services(settings)
    app.extensions["passerelle"] = services

    converters.register(app)  # before any route: `<id:...>` is how routes take row ids
    register_commands(app)

    logs.init_app(app)  # request ids and access lines (before errors, so errors carry them)
    errors.register(app)
    limits.init(app, settings.redis_url)
    app.register_blueprint(health.bp)
    ops.init(app)  # /readyz, /metrics and the request metrics
    app.register_blueprint(demo.bp)
    app.register_blueprint(passkit.bp)
    app.register_blueprint(google.bp)
    app.register_blueprint(hooks.bp)  # inbound webhooks: exempt from CSRF (secret-authenticated)
    app.register_blueprint(links.bp)
    app.register_blueprint(admin.bp)  # the dashboard under /admin (session login, CSRF on every form)
    api.init_app(app)  # REST API under /api/v1 (its own problem errors, limits, docs)
    # After every blueprint: machine ones (and any under /api/) are exempted by name.
    csrf.init(app, secure_cookie=settings.public_url.startswith("https://"),
              machine_blueprints=[passkit.bp, google.bp])
    if settings.trusted_proxies > 0:
        hops = settings.trusted_proxies
        # Flask's documented way to add WSGI middleware replaces this method.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops,  # type: ignore[method-assign]
                                x_host=hops)
    return app

"""CSRF protection for forms people submit (Flask-WTF's CSRFProtect).

Every POST/PUT/PATCH/DELETE needs the session's CSRF token, except the
machine endpoints, which authenticate otherwise and never see a browser
session: Apple's PassKit web service (authentication token per pass),
Google's callbacks (signed messages), and any blueprint mounted under
``/api/`` (API keys in a header, never cookies). Another machine blueprint
must be named in ``create_app`` (``machine_blueprints``), or its callers get a
400; ``tests/test_landing.py`` lists every POST route to keep this visible.

Two settings differ from Flask-WTF's defaults, on purpose:

- ``WTF_CSRF_SSL_STRICT = False``: over HTTPS Flask-WTF also demands a
  same-origin Referer, but personal pages send ``Referrer-Policy: no-referrer``
  (the link token is in their path), so a real form post carries none. The
  token, bound to a ``SameSite=Lax`` session cookie, is the protection.
- ``WTF_CSRF_TIME_LIMIT`` is 8 hours, not 1: someone may open a form and fill it
  in later in the day; an expired token only costs a reload (friendly 400 page).
"""

from __future__ import annotations

from flask import Blueprint, Flask
from flask_wtf.csrf import CSRFProtect

csrf = CSRFProtect()

API_PREFIX = "/api/"

TIME_LIMIT_SECONDS = 8 * 3600


def init(app: Flask, *, secure_cookie: bool, machine_blueprints: list[Blueprint]) -> None:
    app.config["WTF_CSRF_SSL_STRICT"] = False
    app.config["WTF_CSRF_TIME_LIMIT"] = TIME_LIMIT_SECONDS
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SECURE"] = secure_cookie
    csrf.init_app(app)
    for blueprint in machine_blueprints:
        csrf.exempt(blueprint)
    for registered in app.blueprints.values():
        prefix = registered.url_prefix or ""
        if prefix == API_PREFIX.rstrip("/") or prefix.startswith(API_PREFIX):
            csrf.exempt(registered)

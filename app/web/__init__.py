"""HTTP layer: thin Flask blueprints over the domain modules."""

from __future__ import annotations

from flask import Response, current_app

from app.services import Services


def services() -> Services:
    svc: Services = current_app.extensions["passerelle"]
    return svc


def private_page_headers(response: Response, *, referrer: str, csp: str) -> Response:
    """Pages that show personal data: never cached, indexed, sniffed or framed. The
    referrer and content-security policies differ per blueprint, so they are given."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = referrer
    response.headers["X-Robots-Tag"] = "noindex, nofollow"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = csp
    return response

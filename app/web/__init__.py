"""HTTP layer: thin Flask blueprints over the domain modules."""

from __future__ import annotations

from flask import current_app

from app.services import Services


def services() -> Services:
    svc: Services = current_app.extensions["passerelle"]
    return svc

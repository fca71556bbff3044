"""Errors: RFC 9457 problem JSON for machines, a friendly page for people. Never a bare 500."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException, InternalServerError, ServiceUnavailable

log = logging.getLogger(__name__)

#: Seconds a client is asked to wait while the database is away (a restart, a failover).
DATABASE_RETRY_AFTER = 5


def database_away(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection: not a bug, a wait."""
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def log_database_away(exc: BaseException) -> None:
    # The driver's class name only: its message may quote a statement.
    orig = getattr(exc, "orig", None)
    log.warning("database unavailable on %s %s (%s); answered 503", request.method,
                request.url_rule.rule if request.url_rule else "?",
                type(orig or exc).__name__)


def wants_json() -> bool:
    if request.path.startswith(("/api/", "/passkit/", "/healthz")):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def problem(status: int, title: str, detail: str | None = None) -> Response:
    body = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    response = jsonify(body)
    response.status_code = status
    response.mimetype = "application/problem+json"
    return response


def register(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if wants_json():
            response = problem(status, exc.name, exc.description)
        else:
            response = Response(render_template("error.html", status=status, title=exc.name,
                                                detail=exc.description),
                                status=status, mimetype="text/html")
        # What the exception says beyond its body: Allow on a 405, Retry-After on a 503...
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        if isinstance(exc, HTTPException):
            return _http_error(exc)
        if database_away(exc):  # restarting, failing over: come back shortly
            log_database_away(exc)
            response = _http_error(ServiceUnavailable("the database is unavailable; retry shortly"))
            response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER)
            return response
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _http_error(InternalServerError())

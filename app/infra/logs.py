"""Logs operators can use: one line per event, a request id, the tenant, no personal data.

``configure()`` is called by the long-running commands (``serve``, ``up``,
``worker``); a library importing ``app`` keeps its own logging. ``init_app()``
gives every request an id (taken from a well-formed ``X-Request-ID`` or made
here), returns it as a response header, and writes one access line naming the
route *template* (``/l/<token>``), never the path, so link tokens, serials and
device ids stay out of the logs.

What keeps personal data out, in layers:
- our own code logs ids, never emails, names or tokens;
- loggers that would print bound parameters, URLs or headers at DEBUG
  (SQLAlchemy, httpx/httpcore/h2, urllib3, Werkzeug's request lines) are held at
  WARNING whatever the level chosen;
- a last filter on the handler masks anything shaped like an email address, a
  bearer/ApplePass credential or an APNs device token that slipped through.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask, Response

REQUEST_ID_HEADER = "X-Request-ID"
_request_id: ContextVar[str | None] = ContextVar("passerelle_request_id", default=None)
_tenant_id: ContextVar[int | None] = ContextVar("passerelle_tenant_id", default=None)

# Loggers that print parameters, URLs or headers at DEBUG/INFO: never below WARNING.
_CHATTY = ("sqlalchemy.engine", "sqlalchemy.pool", "httpx", "httpcore", "h2", "hpack",
           "urllib3", "werkzeug", "waitress.queue", "google.auth", "requests", "PIL")
_WELL_FORMED_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SECRETS = [
    (re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+"), "<email>"),
    (re.compile(r"\b(ApplePass|Bearer|Basic)\s+\S+", re.IGNORECASE), r"\1 <redacted>"),
    (re.compile(r"\b[0-9a-fA-F]{64}\b"), "<token>"),
]

access_log = logging.getLogger("passerelle.access")


def current_request_id() -> str | None:
    return _request_id.get()


def set_tenant(tenant_id: int | None) -> None:
    """Name the tenant the current request or task works for (set by tenant sessions)."""
    _tenant_id.set(tenant_id)


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class ContextFilter(logging.Filter):
    """Stamp each record with the request id and tenant, and mask personal data."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        record.tenant = _tenant_id.get()
        message = redact(record.getMessage())
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    _EXTRA = ("method", "route", "status", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "tenant": getattr(record, "tenant", None),
        }
        for key in self._EXTRA:
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")


def configure(log_format: str = "text", level: str = "INFO",
              stream: Any = None) -> logging.Handler:
    """Send the process's logs to one handler (stderr by default); returns it."""
    if log_format not in ("text", "json"):
        raise ValueError(f"PASSERELLE_LOG_FORMAT must be 'text' or 'json', not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_passerelle", False)]:
        root.removeHandler(old)
    handler._passerelle = True  # type: ignore[attr-defined]  # marks ours for the next call
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler


def init_app(app: Flask) -> None:
    """Request ids in and out, the tenant reset per request, one access line each."""
    from flask import g, request

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        rid = incoming if _WELL_FORMED_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.request_id_token = _request_id.set(rid)
        g.tenant_token = _tenant_id.set(None)
        g.request_started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        rid = _request_id.get()
        if rid:
            response.headers[REQUEST_ID_HEADER] = rid
        started = g.get("request_started")
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
            access_log.info("%s %s %s", request.method, rule, response.status_code,
                            extra={"method": request.method, "route": rule,
                                   "status": response.status_code,
                                   "duration_ms": round((time.perf_counter() - started) * 1000,
                                                        1)})
        return response

    @app.teardown_request
    def _reset(_exc: BaseException | None) -> None:
        for key, var in (("request_id_token", _request_id), ("tenant_token", _tenant_id)):
            token = g.pop(key, None)
            if token is not None:
                var.reset(token)

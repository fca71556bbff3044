"""Rate limits for unauthenticated public endpoints (Flask-Limiter).

Counters live in memory by default and in Redis when PASSERELLE_REDIS_URL is
set, so several server processes share them. Over the limit: 429 with a
problem body. While Redis cannot be reached (restarting, failing over) each
process counts in its own memory and goes back to Redis once it answers: the
pages keep working and floods are still refused.

Every answer of a limited route carries ``X-RateLimit-*``; ``Retry-After`` ("come
back later", RFC 9110 §10.2.3) only a 429 or 503. Flask-Limiter sets it on every
answer when headers are enabled, so it is removed again from the others.

Client addresses: with ``PASSERELLE_TRUSTED_PROXIES`` set, ProxyFix (app/__init__.py)
turns the proxies' ``X-Forwarded-For`` into ``request.remote_addr``, which is the
key of every per-client limit; the production server must pass those headers
through (app/cli.py: ``serve``).
"""

from __future__ import annotations

from flask import Flask, Response
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, default_limits=[])

#: Wallet posts a handful of log lines when something fails; floods are not that.
DEVICE_LOG_LIMIT = "60 per minute"


#: The answers that may tell a client when to come back.
RETRY_AFTER_STATUSES = frozenset({429, 503})


def init(app: Flask, redis_url: str) -> None:
    app.config["RATELIMIT_STORAGE_URI"] = redis_url or "memory://"
    app.config["RATELIMIT_HEADERS_ENABLED"] = True
    app.config["RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"] = True
    # Registered before the limiter's own hook, so it runs after it (Flask runs
    # after_request functions in reverse order).
    app.after_request(_retry_after_only_when_refused)
    limiter.init_app(app)


def _retry_after_only_when_refused(response: Response) -> Response:
    if response.status_code not in RETRY_AFTER_STATUSES:
        response.headers.pop("Retry-After", None)
    return response

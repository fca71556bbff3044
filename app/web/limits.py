"""Rate limits for unauthenticated public endpoints (Flask-Limiter).

Counters live in memory by default and in Redis when PASSERELLE_REDIS_URL is
set, so several server processes share them. Over the limit: 429 with a
problem body. While Redis cannot be reached (restarting, failing over) each
process counts in its own memory and goes back to Redis once it answers: the
pages keep working and floods are still refused.
"""

from __future__ import annotations

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, default_limits=[])

#: Wallet posts a handful of log lines when something fails; floods are not that.
DEVICE_LOG_LIMIT = "60 per minute"


def init(app: Flask, redis_url: str) -> None:
    app.config["RATELIMIT_STORAGE_URI"] = redis_url or "memory://"
    app.config["RATELIMIT_HEADERS_ENABLED"] = True
    app.config["RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"] = True
    limiter.init_app(app)

"""Outbound HTTP shared by every client (CRM connector, Google Wallet REST and callback
keys, webhook deliveries): one ``requests.Session`` factory and one retry policy.

Retry policy: a network error, ``429 Too Many Requests`` and any 5xx are transient
(:func:`transient`); how long to wait comes from ``Retry-After`` when the server says
(:func:`retry_after`, seconds or an HTTP date), else from the caller's backoff
(``app.infra.outbox.backoff`` for outbox rows, the Google client's own within one call).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

import requests


def new_session(user_agent: str, headers: Mapping[str, str] | None = None) -> requests.Session:
    """A connection-pooling session that names Passerelle in ``User-Agent``."""
    session = requests.Session()
    session.headers.update({"User-Agent": user_agent, **(headers or {})})
    return session


def transient(status: int | None) -> bool:
    """Worth retrying later: no answer (``None``), rate limited, or a server error."""
    return status is None or status == 429 or status >= 500


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait per ``Retry-After`` (RFC 9110: delay-seconds or an HTTP date), or None."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))

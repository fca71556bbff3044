"""API keys: per-tenant bearer secrets for the REST API.

A key looks like ``pk_<prefix>_<secret>``: ``prefix`` is 8 random lowercase
hex characters stored in clear so people can tell keys apart (and so rate
limits can be counted per key without keeping the secret), ``secret`` carries
256 random bits. Only the SHA-256 of the whole key is stored: a leaked
database does not leak usable keys, and a key is shown exactly once, when it
is created.

Lookup is by hash (unique index), then the stored hash is compared with
``hmac.compare_digest`` so that the comparison itself leaks no timing.
Scopes are ordered: ``read`` < ``write`` < ``admin``; a key may do what its
scope and every lower scope allow.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.models import ApiKey, utcnow

SCOPES = ("read", "write", "admin")
_RANK = {scope: rank for rank, scope in enumerate(SCOPES)}
KEY_PREFIX = "pk_"
#: ``pk_`` + 8 hex + ``_`` + 43 URL-safe base64 characters (32 random bytes).
_KEY_SHAPE = re.compile(r"^pk_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
#: last_used_at is written at most this often per key: one UPDATE per request
#: would serialise busy clients on one row for no useful precision.
TOUCH_INTERVAL = dt.timedelta(minutes=1)
MAX_NAME = 100


class ApiKeyError(ValueError):
    """A key request that cannot be carried out (bad scope, bad name); message says why."""


@dataclass(frozen=True)
class KeyIdentity:
    """What a request learns from a valid key: no secret, nothing mutable."""

    id: int
    tenant_id: int
    prefix: str
    scope: str

    @property
    def actor(self) -> str:
        """How audit entries name this key (the prefix is not a secret)."""
        return f"key:{self.prefix}"

    def allows(self, needed: str) -> bool:
        return scope_allows(self.scope, needed)


def scope_allows(scope: str, needed: str) -> bool:
    return _RANK.get(scope, -1) >= _RANK[needed]


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def display(prefix: str) -> str:
    """How a key is shown after creation: its prefix only."""
    return f"{KEY_PREFIX}{prefix}_…"


def prefix_of(raw: str) -> str | None:
    """The clear prefix of a well-formed key, else None (used for rate-limit buckets)."""
    match = _KEY_SHAPE.match(raw)
    return match.group(1) if match else None


def check_scope(scope: str) -> str:
    if scope not in _RANK:
        raise ApiKeyError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    return scope


def check_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned or len(cleaned) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in cleaned):
        raise ApiKeyError(f"a key name is 1 to {MAX_NAME} printable characters")
    return cleaned


def create_key(session: Session, tenant_id: int, name: str, scope: str) -> tuple[ApiKey, str]:
    """Make a key; returns the row and the raw key, which is never available again."""
    check_scope(scope)
    name = check_name(name)
    while True:
        prefix = secrets.token_hex(4)
        raw = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        if _KEY_SHAPE.match(raw):  # token_urlsafe(32) is always 43 characters; belt and braces
            break
    row = ApiKey(tenant_id=tenant_id, prefix=prefix, key_hash=hash_key(raw), name=name,
                 scope=scope)
    session.add(row)
    session.flush()
    return row, raw


def authenticate(session: Session, raw: str | None) -> ApiKey | None:
    """The live key row for a presented key, or None (unknown, malformed or revoked).

    Use an unscoped session: the tenant is what the key tells us.
    """
    if not raw or not _KEY_SHAPE.match(raw):
        return None
    presented = hash_key(raw)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == presented))
    if row is None or not hmac.compare_digest(row.key_hash, presented):
        return None
    if row.revoked_at is not None:
        return None
    return row


def touch(row: ApiKey, now: dt.datetime | None = None) -> bool:
    """Record use, at most once per TOUCH_INTERVAL; True if the row changed."""
    now = now or utcnow()
    if row.last_used_at is not None and now - row.last_used_at < TOUCH_INTERVAL:
        return False
    row.last_used_at = now
    return True


def revoke(row: ApiKey, now: dt.datetime | None = None) -> bool:
    """Revoke a key (idempotent); True if it was live."""
    if row.revoked_at is not None:
        return False
    row.revoked_at = now or utcnow()
    return True


def identity(row: ApiKey) -> KeyIdentity:
    return KeyIdentity(id=row.id, tenant_id=row.tenant_id, prefix=row.prefix, scope=row.scope)


def list_keys(session: Session, tenant_id: int) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)
                                .order_by(ApiKey.id)))


def find_key(session: Session, tenant_id: int, key: str) -> ApiKey | None:
    """A tenant's key by id or by prefix (with or without ``pk_``)."""
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id)
    if key.isdigit() and len(key) < 12:
        return session.scalar(query.where(ApiKey.id == int(key)))
    prefix = key.removeprefix(KEY_PREFIX).split("_", 1)[0]
    return session.scalar(query.where(ApiKey.prefix == prefix))

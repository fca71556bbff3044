"""Dashboard users: one tenant each, an email and a password, and a role.

Roles are ordered, each including the ones before it:

- ``viewer`` reads every panel (programs, installs, funnels, customers,
  webhook deliveries, health);
- ``marketer`` also builds segments and exports them (an export issues links);
- ``admin`` also manages users and webhooks and reads the audit log.

Passwords are hashed with Argon2id at OWASP's recommended minimum (19 MiB,
2 passes, 1 lane: about 0.1 s on one core). argon2-cffi's own default (RFC
9106's 64 MiB, 3 passes, 4 lanes) took 0.7 s on our 2-core machines, which
makes the sign-in form a cheap way to load the server. Why Argon2id rather than
werkzeug's scrypt, which needs no new dependency: werkzeug's scrypt default
(N=2^15) is below OWASP's scrypt minimum (N=2^17), Argon2id is OWASP's first
recommendation, and argon2-cffi tells us when a stored hash was made with
weaker parameters than today's (``check_needs_rehash``) so hashes get stronger
as users log in. Verification compares in constant time, and an unknown email
or a disabled account still costs one full verification against a dummy
hash, so response times do not reveal which emails have accounts.

Emails are stored lowercased; they are unique per tenant, so the same person
may hold accounts in two tenants. Lockout after repeated failures lives in
the web layer (``app/web/admin.py``), on the shared rate limiter's storage.
Domain code only: no Flask here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.customers import customers
from app.infra.models import AdminUser, Tenant, utcnow

ROLES = ("viewer", "marketer", "admin")
MIN_PASSWORD = 12
#: Hashing a megabyte-long "password" is a cheap way to burn our CPU: refuse it.
MAX_PASSWORD = 1024

#: OWASP Password Storage Cheat Sheet, Argon2id, first configuration.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


class AdminUserError(ValueError):
    """A refused user change, as one sentence a person can act on."""


@dataclass(frozen=True)
class LoginOutcome:
    """``user`` is set only on success; ``reason`` is for the audit log, never the page."""

    user: AdminUser | None
    reason: str  # ok | unknown | disabled | bad_password
    #: The account the email names, when there is one (for the audit log).
    account_id: int | None = None


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` includes ``needed`` (viewer < marketer < admin)."""
    if role not in ROLES or needed not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AdminUserError(f"role must be one of {', '.join(ROLES)}")
    return role


def normalize_email(email: str) -> str:
    """The form in which emails are stored and looked up: the customers' rule
    (:func:`app.customers.customers.normalize_email`); anything else trimmed and lower-cased,
    so a sign-in with a malformed address finds nobody instead of failing."""
    try:
        return customers.normalize_email(email)
    except customers.CustomerDataError:
        return email.strip().lower()


def check_email(email: str) -> str:
    """An address a new dashboard user may have: the same check as every customer email."""
    try:
        return customers.normalize_email(email)
    except customers.CustomerDataError:
        raise AdminUserError("enter an email address such as name@example.com") from None


def check_password(password: str, email: str | None = None) -> str:
    """Length is what makes a password strong; composition rules only annoy (NIST 800-63B)."""
    if len(password) < MIN_PASSWORD:
        raise AdminUserError(f"the password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AdminUserError(f"the password must have at most {MAX_PASSWORD} characters")
    if email and password.strip().lower() == normalize_email(email):
        raise AdminUserError("the password must not be the email address")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Constant-time check; a malformed stored hash is a mismatch, not a crash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash("passerelle-dummy-password-for-unknown-users")


def session_fingerprint(user: AdminUser) -> str:
    """Stored in the login cookie: changing the password changes it, which ends every
    other session of that user (the cookie is signed, so it cannot be forged)."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:20]


# -- lookups ---------------------------------------------------------------------------------

def tenant_id_for(session: Session, slug: str) -> int | None:
    """The tenant a login form names (by its slug); ``None`` when there is none."""
    return session.scalar(select(Tenant.id).where(Tenant.slug == slug.strip().lower()))


def find_user(session: Session, tenant_id: int, email: str) -> AdminUser | None:
    return session.scalar(select(AdminUser).where(AdminUser.tenant_id == tenant_id,
                                                  AdminUser.email == normalize_email(email)))


def list_users(session: Session, tenant_id: int) -> list[AdminUser]:
    return list(session.scalars(select(AdminUser).where(AdminUser.tenant_id == tenant_id)
                                .order_by(AdminUser.email)))


def get_user(session: Session, tenant_id: int, user_id: int) -> AdminUser | None:
    return session.scalar(select(AdminUser).where(AdminUser.tenant_id == tenant_id,
                                                  AdminUser.id == user_id))


# -- changes (the caller commits) --------------------------------------------------------------

def create_user(session: Session, tenant_id: int, email: str, password: str,
                role: str) -> AdminUser:
    email = check_email(email)
    check_role(role)
    check_password(password, email)
    if find_user(session, tenant_id, email) is not None:
        raise AdminUserError("a user with this email already exists in this tenant")
    user = AdminUser(tenant_id=tenant_id, email=email, password_hash=hash_password(password),
                     role=role)
    session.add(user)
    session.flush()
    return user


def set_password(user: AdminUser, password: str) -> None:
    user.password_hash = hash_password(check_password(password, user.email))


def _active_admins(session: Session, tenant_id: int) -> int:
    return session.scalar(select(func.count(AdminUser.id)).where(
        AdminUser.tenant_id == tenant_id, AdminUser.role == "admin",
        AdminUser.disabled_at.is_(None))) or 0


def _keep_an_admin(session: Session, user: AdminUser) -> None:
    """A tenant must keep one active admin, or nobody could manage users any more."""
    if (user.role == "admin" and user.disabled_at is None
            and _active_admins(session, user.tenant_id) <= 1):
        raise AdminUserError("this is the tenant's last active admin; make another admin first")


def set_role(session: Session, user: AdminUser, role: str) -> bool:
    """Change the role; False when it already was that role."""
    check_role(role)
    if user.role == role:
        return False
    if role != "admin":
        _keep_an_admin(session, user)
    user.role = role
    return True


def disable(session: Session, user: AdminUser, now: dt.datetime | None = None) -> bool:
    if user.disabled_at is not None:
        return False
    _keep_an_admin(session, user)
    user.disabled_at = now or utcnow()
    return True


def enable(user: AdminUser) -> bool:
    if user.disabled_at is None:
        return False
    user.disabled_at = None
    return True


# -- logging in -------------------------------------------------------------------------------

def authenticate(session: Session, tenant_id: int | None, email: str, password: str,
                 now: dt.datetime | None = None) -> LoginOutcome:
    """Check a login. Every path costs one Argon2 verification (see the module doc).

    On success the hash is upgraded if its parameters are outdated and
    ``last_login_at`` is set; the caller commits.
    """
    if len(password) > MAX_PASSWORD:
        password = password[:MAX_PASSWORD]  # still verified (and refused): same cost
    user = find_user(session, tenant_id, email) if tenant_id is not None else None
    if user is None:
        verify_password(_dummy_hash(), password)
        return LoginOutcome(None, "unknown")
    matches = verify_password(user.password_hash, password)
    if user.disabled_at is not None:
        return LoginOutcome(None, "disabled", user.id)
    if not matches:
        return LoginOutcome(None, "bad_password", user.id)
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = now or utcnow()
    return LoginOutcome(user, "ok", user.id)

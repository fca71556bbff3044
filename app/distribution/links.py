"""Personal links in marketing emails: opaque token links and signed links.

A card reaches a customer through a button in an email, so the link itself is
the credential. Two kinds exist because email tools differ:

- **Token links** (``/l/<token>``): 192 random bits that Passerelle issues, one
  at a time or exported by the hundred thousand as CSV. Only the SHA-256 of a
  token is stored, so a copy of the database yields no working link. Each is
  bound to a tenant, program, customer (none for enrollment), purpose, optional
  campaign, expiry and use limit, and can be revoked.
- **Signed links** (``/s?tenant=…&sig=…``): for tools that compute the URL at
  send time. HMAC-SHA256 with the tenant's link secret over a documented
  canonical string. Nothing is stored, so they cannot be revoked one by one:
  they must expire, at most :data:`MAX_SIGNED_LIFETIME` ahead, and rotating the
  secret (two generations verify) kills the rest.

Resolving takes a plain session because the tenant is unknown until the link is
read; every lookup after that is filtered by the link's tenant explicitly, so a
link can never hand out another tenant's customer. Exceptions carry a machine
``reason`` and a sentence without token, email or name, fit for logs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlencode

from sqlalchemy import insert, or_, select, update
from sqlalchemy.orm import Session

from app.infra.db import rowcount, table_of
from app.infra.models import Customer, LinkToken, Program, Tenant, utcnow

PURPOSES = ("download", "enrich", "consent", "enroll")
#: Purposes that name a customer: everything but enrollment (the person is not known yet).
PERSONAL_PURPOSES = tuple(p for p in PURPOSES if p != "enroll")
#: Signed links always name a customer, so they serve the personal purposes only;
#: an enrollment link for an email is a token link without customer.
SIGNED_PURPOSES = PERSONAL_PURPOSES

TOKEN_PREFIX = "/l/"
SIGNED_PATH = "/s"
SIGNED_VERSION = "v1"
#: Query parameters of a signed link, in the order signed_url writes them.
SIGNED_PARAMS = ("tenant", "program", "customer", "purpose", "expires", "sig")
#: A leaked secret's links die within this time even if nobody rotates it.
MAX_SIGNED_LIFETIME = dt.timedelta(days=400)
#: Rows per INSERT in issue_tokens (and per page of the CSV export).
BATCH_SIZE = 1000

C = TypeVar("C", bound="CustomerRef")

_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
_SIGNATURE_SHAPE = re.compile(r"^[0-9a-f]{64}$")
_EXPIRES_SHAPE = re.compile(r"^[0-9]{1,12}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_EXTERNAL_ID = 128  # Customer.external_id
_MAX_SLUG = 64
_MAX_CAMPAIGN = 100  # LinkToken.campaign


class LinkError(Exception):
    """A link that cannot be honoured. ``reason`` is a short word; str() a log sentence.

    ``grant`` is what a *genuine* link was for (its token was found, or its signature
    verified) that is expired, revoked or used up: its page may then carry the
    program's brand and the member's language and offer a fresh link. It is never
    set on :class:`LinkInvalid`, so an unknown or forged link learns nothing.
    """

    reason = "error"

    def __init__(self, message: str, reason: str | None = None, *,
                 grant: LinkGrant | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.grant = grant


class LinkInvalid(LinkError):
    """Unknown token, bad signature, malformed parameters, unknown tenant or program."""

    reason = "invalid"


class LinkExpired(LinkError):
    reason = "expired"


class LinkRevoked(LinkError):
    reason = "revoked"


class LinkUsedUp(LinkError):
    reason = "used_up"


@dataclass(frozen=True)
class LinkGrant:
    """What a valid link allows: whose card, in which program, for what."""

    tenant_id: int
    program_id: int
    customer_id: int | None
    purpose: str
    campaign: str | None
    link_id: int | None
    expires_at: dt.datetime | None
    signed: bool
    # Signed links: the external id from the URL. The customer may not be in our
    # database yet (an external CRM knows them): customer_id is None then.
    external_id: str | None


# -- token links ----------------------------------------------------------------------

def new_token() -> str:
    """192 random bits, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_path(token: str) -> str:
    return f"{TOKEN_PREFIX}{token}"


def link_url(public_url: str, token: str) -> str:
    return public_url.rstrip("/") + token_path(token)


def _check_options(purpose: str, campaign: str | None, expires_at: dt.datetime | None,
                   max_uses: int | None) -> str | None:
    """Validate what every token of an issue shares; return the cleaned campaign."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ValueError("expires_at must be an aware datetime")
        if expires_at <= utcnow():
            raise ValueError("expires_at is in the past")
    if max_uses is not None and max_uses < 1:
        raise ValueError("max_uses must be at least 1")
    campaign = (campaign or "").strip() or None
    if campaign is not None and len(campaign) > _MAX_CAMPAIGN:
        raise ValueError(f"campaign is longer than {_MAX_CAMPAIGN} characters")
    return campaign


class CustomerRef(Protocol):
    """What issue_tokens needs of a customer: a Customer, or a row of these two columns."""

    @property
    def id(self) -> int: ...

    @property
    def tenant_id(self) -> int: ...


def _check_customer(program: Program, customer: CustomerRef) -> None:
    # The foreign key cannot say "same tenant"; this check does.
    if customer.id is None or customer.tenant_id != program.tenant_id:
        raise ValueError(f"customer {customer.id} does not belong to program {program.id}'s tenant")


def issue_token(session: Session, program: Program, customer: Customer | None, purpose: str, *,
                campaign: str | None = None, expires_at: dt.datetime | None = None,
                max_uses: int | None = None) -> str:
    """Store a new link (its hash only) and return the raw token, shown this once."""
    campaign = _check_options(purpose, campaign, expires_at, max_uses)
    if purpose == "enroll":
        if customer is not None:
            raise ValueError("an enroll link is for someone not known yet: give no customer")
    elif customer is None:
        raise ValueError(f"a {purpose} link needs a customer")
    else:
        _check_customer(program, customer)
    token = new_token()
    session.add(LinkToken(
        tenant_id=program.tenant_id, token_hash=hash_token(token), program_id=program.id,
        customer_id=customer.id if customer else None, purpose=purpose, campaign=campaign,
        expires_at=expires_at, max_uses=max_uses, uses=0))
    session.flush()
    return token


def issue_tokens(session: Session, program: Program, customers: Iterable[C], purpose: str,
                 **same: Any) -> Iterator[tuple[C, str]]:
    """One new token per customer, inserted :data:`BATCH_SIZE` rows per statement.

    Customers are Customer objects or, cheaper for big exports, rows with ``id`` and
    ``tenant_id``; each comes back with its token. Lazy: a batch is inserted when
    the caller asks for its first pair. Options (campaign, expires_at, max_uses) are
    the same for all. Does not commit.
    """
    unknown = set(same) - {"campaign", "expires_at", "max_uses"}
    if unknown:
        raise TypeError(f"unexpected options: {', '.join(sorted(unknown))}")
    if purpose not in PERSONAL_PURPOSES:
        raise ValueError(f"bulk links name customers: purpose must be one of "
                         f"{', '.join(PERSONAL_PURPOSES)}")
    campaign = _check_options(purpose, same.get("campaign"), same.get("expires_at"),
                              same.get("max_uses"))
    return _issue_batches(session, program, iter(customers), purpose, campaign,
                          same.get("expires_at"), same.get("max_uses"))


def _issue_batches(session: Session, program: Program, customers: Iterator[C],
                   purpose: str, campaign: str | None, expires_at: dt.datetime | None,
                   max_uses: int | None) -> Iterator[tuple[C, str]]:
    while batch := list(islice(customers, BATCH_SIZE)):
        now = utcnow()
        pairs = []
        for customer in batch:
            _check_customer(program, customer)
            pairs.append((customer, new_token()))
        # A Core INSERT (the ORM's bulk path costs ~3x more per row) skips the tenant
        # guard's before_flush hook, which is why _check_customer runs for every row.
        session.execute(insert(table_of(LinkToken)), [
            {"tenant_id": program.tenant_id, "token_hash": hash_token(token),
             "program_id": program.id, "customer_id": customer.id, "purpose": purpose,
             "campaign": campaign, "expires_at": expires_at, "max_uses": max_uses, "uses": 0,
             "created_at": now}
            for customer, token in pairs])
        yield from pairs


def resolve_token(session: Session, token: str, *, now: dt.datetime | None = None) -> LinkGrant:
    """The grant of a token link, or LinkInvalid / LinkRevoked / LinkExpired / LinkUsedUp."""
    now = now or utcnow()
    if not _TOKEN_SHAPE.match(token):
        raise LinkInvalid("malformed link token", "malformed")
    digest = hash_token(token)
    # Program and customer are joined on the link's own tenant: a row pointing at
    # another tenant's customer (which the schema alone cannot forbid) resolves to nothing.
    row = session.execute(
        select(LinkToken, Customer.id.label("own_customer_id"))
        .join(Program, (Program.id == LinkToken.program_id)
              & (Program.tenant_id == LinkToken.tenant_id))
        .outerjoin(Customer, (Customer.id == LinkToken.customer_id)
                   & (Customer.tenant_id == LinkToken.tenant_id))
        .where(LinkToken.token_hash == digest)).first()
    # The lookup is by index; comparing the fetched hash in constant time keeps the
    # final decision free of early-exit string comparison.
    if row is None or not hmac.compare_digest(row.LinkToken.token_hash, digest):
        raise LinkInvalid("unknown link token", "unknown")
    link: LinkToken = row.LinkToken
    if link.customer_id is not None and row.own_customer_id is None:
        raise LinkInvalid(f"link {link.id} names a customer outside its tenant", "foreign")
    grant = LinkGrant(tenant_id=link.tenant_id, program_id=link.program_id,
                      customer_id=link.customer_id, purpose=link.purpose, campaign=link.campaign,
                      link_id=link.id, expires_at=link.expires_at, signed=False,
                      external_id=None)
    if link.revoked_at is not None:
        raise LinkRevoked(f"link {link.id} was revoked", grant=grant)
    if link.expires_at is not None and link.expires_at <= now:
        raise LinkExpired(f"link {link.id} expired", grant=grant)
    if link.max_uses is not None and link.uses >= link.max_uses:
        raise LinkUsedUp(f"link {link.id} reached its use limit", grant=grant)
    return grant


def record_use(session: Session, grant: LinkGrant, *, now: dt.datetime | None = None) -> None:
    """Count one use, atomically against the limit (two clicks at once cannot both pass).

    No-op for signed links, which keep no state. Does not commit.
    """
    if grant.signed or grant.link_id is None:
        return
    result = session.execute(
        update(LinkToken)
        .where(LinkToken.id == grant.link_id,
               or_(LinkToken.max_uses.is_(None), LinkToken.uses < LinkToken.max_uses))
        .values(uses=LinkToken.uses + 1, last_used_at=now or utcnow())
        .execution_options(synchronize_session=False))
    if rowcount(result) == 0:
        raise LinkUsedUp(f"link {grant.link_id} reached its use limit", grant=grant)


def revoke_tokens(session: Session, *, tenant_id: int, program_id: int | None = None,
                  campaign: str | None = None, token: str | None = None) -> int:
    """Revoke a tenant's live links, narrowed by program, campaign or one token; the count."""
    query = (update(LinkToken)
             .where(LinkToken.tenant_id == tenant_id, LinkToken.revoked_at.is_(None)))
    if program_id is not None:
        query = query.where(LinkToken.program_id == program_id)
    if campaign is not None:
        query = query.where(LinkToken.campaign == campaign)
    if token is not None:
        query = query.where(LinkToken.token_hash == hash_token(token))
    result = session.execute(query.values(revoked_at=utcnow())
                             .execution_options(synchronize_session=False))
    return rowcount(result)


# -- signed links ---------------------------------------------------------------------

def canonical_string(tenant_slug: str, program_slug: str, external_id: str, purpose: str,
                     expires: int) -> str:
    """``v1\\n<tenant>\\n<program>\\n<external_id>\\n<purpose>\\n<expires>``, UTF-8 when signed.

    Unambiguous: slugs cannot hold a newline, purpose is a fixed word and expires
    digits, so the external id is everything between the third line and the last two.
    """
    return "\n".join((SIGNED_VERSION, tenant_slug, program_slug, external_id, purpose,
                      str(expires)))


def sign(secret: str, canonical: str) -> str:
    """HMAC-SHA256, key = the secret's UTF-8 bytes as printed; lowercase hex."""
    return hmac.new(secret.encode("utf-8"), canonical.encode("utf-8"),
                    hashlib.sha256).hexdigest()


def _check_external_id(external_id: str) -> bool:
    return 0 < len(external_id) <= _MAX_EXTERNAL_ID and not _CONTROL.search(external_id)


def signed_url(public_url: str, tenant: Tenant, program: Program, external_id: str,
               purpose: str, expires: int, secret: str | None = None) -> str:
    """A signed link; ``expires`` is a unix time in seconds, at most 400 days ahead."""
    if program.tenant_id != tenant.id:
        raise ValueError("the program belongs to another tenant")
    if purpose not in SIGNED_PURPOSES:
        raise ValueError(f"signed links serve {', '.join(SIGNED_PURPOSES)}")
    if not _check_external_id(external_id):
        raise ValueError("external id must be 1-128 characters without control characters")
    if expires > int((utcnow() + MAX_SIGNED_LIFETIME).timestamp()):
        raise ValueError(f"signed links expire at most {MAX_SIGNED_LIFETIME.days} days ahead")
    canonical = canonical_string(tenant.slug, program.slug, external_id, purpose, expires)
    signature = sign(secret if secret is not None else tenant.link_secret, canonical)
    values = (tenant.slug, program.slug, external_id, purpose, str(expires), signature)
    query = urlencode(list(zip(SIGNED_PARAMS, values)), quote_via=quote)
    return f"{public_url.rstrip('/')}{SIGNED_PATH}?{query}"


def _signed_params(params: Mapping[str, str]) -> dict[str, str]:
    found = {}
    for name in SIGNED_PARAMS:
        value = params.get(name)
        if not isinstance(value, str) or not value:
            raise LinkInvalid(f"signed link without {name!r}", "malformed")
        found[name] = value
    found["sig"] = found["sig"].lower()  # hex case is not part of the signature
    if (len(found["tenant"]) > _MAX_SLUG or len(found["program"]) > _MAX_SLUG
            or not _check_external_id(found["customer"])
            or not _EXPIRES_SHAPE.match(found["expires"])
            or not _SIGNATURE_SHAPE.match(found["sig"])):
        raise LinkInvalid("signed link with malformed parameters", "malformed")
    if found["purpose"] not in SIGNED_PURPOSES:
        raise LinkInvalid("signed link with a purpose signed links do not serve", "purpose")
    return found


def _verify(tenant: Tenant, canonical: str, signature: str) -> bool:
    """Against the current and the previous secret, both always computed."""
    valid = False
    for secret in (tenant.link_secret, tenant.link_secret_previous):
        if secret:
            valid |= hmac.compare_digest(sign(secret, canonical), signature)
    return valid


def resolve_signed(session: Session, params: Mapping[str, str], *,
                   now: dt.datetime | None = None) -> LinkGrant:
    """The grant of a signed link's query parameters, or LinkInvalid / LinkExpired."""
    now = now or utcnow()
    p = _signed_params(params)
    tenant = session.scalar(select(Tenant).where(Tenant.slug == p["tenant"]))
    if tenant is None:
        raise LinkInvalid("signed link for an unknown tenant", "tenant")
    expires = int(p["expires"])
    canonical = canonical_string(p["tenant"], p["program"], p["customer"], p["purpose"], expires)
    if not _verify(tenant, canonical, p["sig"]):
        raise LinkInvalid(f"signed link with a bad signature (tenant {tenant.id})", "signature")
    # Checked after the signature, so a forged link learns nothing about expiry rules.
    if expires > (now + MAX_SIGNED_LIFETIME).timestamp():
        raise LinkInvalid(f"signed link expiring more than {MAX_SIGNED_LIFETIME.days} days "
                          f"ahead (tenant {tenant.id})", "too_far")
    program_id = session.scalar(select(Program.id).where(
        Program.tenant_id == tenant.id, Program.slug == p["program"]))
    if expires <= now.timestamp() and program_id is None:
        raise LinkExpired(f"signed link expired (tenant {tenant.id})")
    if program_id is None:
        raise LinkInvalid(f"signed link for an unknown program (tenant {tenant.id})", "program")
    customer_id = session.scalar(select(Customer.id).where(
        Customer.tenant_id == tenant.id, Customer.external_id == p["customer"]))
    grant = LinkGrant(tenant_id=tenant.id, program_id=program_id, customer_id=customer_id,
                      purpose=p["purpose"], campaign=None, link_id=None,
                      expires_at=dt.datetime.fromtimestamp(expires, dt.UTC), signed=True,
                      external_id=p["customer"])
    if expires <= now.timestamp():
        raise LinkExpired(f"signed link expired (tenant {tenant.id})", grant=grant)
    return grant


def rotate_link_secret(session: Session, tenant: Tenant, *, keep_previous: bool = True) -> str:
    """New current secret; the old one keeps verifying until the next rotation.

    ``keep_previous=False`` drops it at once (the secret leaked). Returns the new secret.
    """
    new = secrets.token_urlsafe(32)
    tenant.link_secret_previous = tenant.link_secret if keep_previous else None
    tenant.link_secret = new
    session.flush()
    return new

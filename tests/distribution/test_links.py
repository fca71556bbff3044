"""Personal links (app/links.py): hashed token links and HMAC-signed links."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import func, insert, select, text

from app.distribution import links
from app.distribution.links import LinkExpired, LinkInvalid, LinkRevoked, LinkUsedUp
from app.infra.models import Customer, LinkToken, Program, Tenant, utcnow

PUBLIC = "https://wallet.example.test"
README = Path(__file__).resolve().parents[2] / "README.md"


# -- helpers ------------------------------------------------------------------------------

def _program(session, slug: str = "rewards", tenant: str = "demo") -> Program:  # type: ignore[no-untyped-def]
    return session.scalar(select(Program).join(Tenant).where(
        Program.slug == slug, Tenant.slug == tenant))


def _customer(session, external_id: str, tenant: str = "demo") -> Customer:  # type: ignore[no-untyped-def]
    return session.scalar(select(Customer).join(Tenant, Tenant.id == Customer.tenant_id).where(
        Customer.external_id == external_id, Tenant.slug == tenant))


def _issue(services, external_id: str | None = "C-1001", purpose: str = "download",  # type: ignore[no-untyped-def]
           program: str = "rewards", **options) -> str:
    with services.db.transaction() as session:
        customer = _customer(session, external_id) if external_id else None
        return links.issue_token(session, _program(session, program), customer, purpose,
                                 **options)


def _resolve(services, token: str, **kw):  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return links.resolve_token(session, token, **kw)


def _params(url: str) -> dict[str, str]:
    assert urlsplit(url).path == links.SIGNED_PATH
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, strict_parsing=True).items()}


def _signed(services, external_id: str = "C-1002", purpose: str = "download",  # type: ignore[no-untyped-def]
            days: float = 30, secret: str | None = None) -> str:
    expires = int((utcnow() + dt.timedelta(days=days)).timestamp())
    with services.db.session() as session:
        program = _program(session)
        return links.signed_url(PUBLIC, program.tenant, program, external_id, purpose, expires,
                                secret=secret)


def _resolve_signed(services, params, **kw):  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return links.resolve_signed(session, params, **kw)


@pytest.fixture()
def other_tenant(services, demo):  # type: ignore[no-untyped-def]
    """A second brand with the same program slug and the same customer external ids."""
    with services.db.transaction() as session:
        tenant = Tenant(slug="other", name="Other brand")
        session.add(tenant)
        session.flush()
        session.add(Program(tenant_id=tenant.id, slug="rewards", name="Other rewards",
                            template="loyalty", pass_type_identifier="pass.other",
                            team_identifier="OTHERTEAM1"))
        session.add(Customer(tenant_id=tenant.id, external_id="C-1002", attributes={}))
        session.flush()
        return {"tenant_id": tenant.id}


# -- token links ---------------------------------------------------------------------------

def test_token_resolves_to_its_grant_and_only_its_hash_is_stored(services, demo) -> None:  # type: ignore[no-untyped-def]
    expires_at = utcnow() + dt.timedelta(days=3)
    token = _issue(services, campaign=" spring ", expires_at=expires_at, max_uses=5)
    assert len(token) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    grant = _resolve(services, token)
    with services.db.session() as session:
        customer = _customer(session, "C-1001")
        assert (grant.tenant_id, grant.program_id, grant.customer_id) == (
            demo["tenant_id"], demo["program_ids"]["rewards"], customer.id)
        rows = session.execute(text("SELECT * FROM link_tokens")).mappings().all()
    assert (grant.purpose, grant.campaign, grant.signed, grant.external_id) == (
        "download", "spring", False, None)
    assert abs(grant.expires_at - expires_at) < dt.timedelta(seconds=1)
    assert len(rows) == 1 and rows[0]["id"] == grant.link_id
    assert rows[0]["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    # Not the token, nor any piece of it long enough to matter, anywhere in the row.
    for value in rows[0].values():
        assert token[:16] not in str(value) and token[-16:] not in str(value)


def test_token_url_carries_no_personal_data(services, demo) -> None:  # type: ignore[no-untyped-def]
    token = _issue(services, "C-1005")
    url = links.link_url(PUBLIC + "/", token)
    assert url == f"{PUBLIC}/l/{token}" and links.token_path(token) == f"/l/{token}"
    for personal in ("c-1005", "zoe.oconnor", "@example.com", "zoë", "o'connor", "oconnor"):
        assert personal not in url.lower()


def test_new_tokens_are_random_and_long(services) -> None:  # type: ignore[no-untyped-def]
    tokens = {links.new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(len(t) == 32 for t in tokens)  # 24 bytes = 192 bits, base64url


def test_unknown_malformed_and_foreign_tokens_are_invalid(services, demo, other_tenant) -> None:  # type: ignore[no-untyped-def]
    for token, reason in [(links.new_token(), "unknown"), ("short", "malformed"),
                          ("x" * 200, "malformed"), ("abc/def" * 5, "malformed"),
                          ("", "malformed")]:
        with pytest.raises(LinkInvalid) as caught:
            _resolve(services, token)
        assert caught.value.reason == reason
        assert token not in str(caught.value) or token == ""
    # A row whose customer is another tenant's (the schema alone allows it) gives nothing.
    token = links.new_token()
    with services.db.transaction() as session:
        foreign = _customer(session, "C-1002", tenant="other")
        session.execute(insert(LinkToken).values(
            tenant_id=demo["tenant_id"], token_hash=links.hash_token(token),
            program_id=demo["program_ids"]["rewards"], customer_id=foreign.id,
            purpose="download", uses=0, created_at=utcnow()))
    with pytest.raises(LinkInvalid) as caught:
        _resolve(services, token)
    assert caught.value.reason == "foreign"


def test_issue_refuses_wrong_customer_combinations(services, demo, other_tenant) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        program = _program(session)
        mine, theirs = _customer(session, "C-1001"), _customer(session, "C-1002", "other")
        for customer, purpose, words in [
                (None, "download", "needs a customer"), (mine, "enroll", "give no customer"),
                (theirs, "download", "does not belong"), (mine, "share", "purpose must be")]:
            with pytest.raises(ValueError, match=words):
                links.issue_token(session, program, customer, purpose)
        with pytest.raises(ValueError, match="in the past"):
            links.issue_token(session, program, mine, "enrich",
                              expires_at=utcnow() - dt.timedelta(seconds=1))
        with pytest.raises(ValueError, match="max_uses"):
            links.issue_token(session, program, mine, "enrich", max_uses=0)
        with pytest.raises(ValueError, match="does not belong"):
            list(links.issue_tokens(session, program, [mine, theirs], "download"))
        with pytest.raises(ValueError, match="bulk links name customers"):
            links.issue_tokens(session, program, [mine], "enroll")
        session.rollback()


def test_enroll_link_has_no_customer(services, demo) -> None:  # type: ignore[no-untyped-def]
    grant = _resolve(services, _issue(services, None, "enroll", program="club"))
    assert grant.customer_id is None and grant.purpose == "enroll"
    assert grant.program_id == demo["program_ids"]["club"]


def test_expired_links_are_refused(services, demo) -> None:  # type: ignore[no-untyped-def]
    expires_at = utcnow() + dt.timedelta(hours=1)
    token = _issue(services, expires_at=expires_at)
    assert _resolve(services, token, now=expires_at - dt.timedelta(seconds=1)).link_id
    with pytest.raises(LinkExpired) as caught:
        _resolve(services, token, now=expires_at)
    assert caught.value.reason == "expired"


def test_revoke_by_campaign_program_and_token_within_one_tenant(services, demo, other_tenant) -> None:  # type: ignore[no-untyped-def]
    spring = [_issue(services, external_id, campaign="spring")
              for external_id in ("C-1001", "C-1002")]
    summer = _issue(services, "C-1003", campaign="summer")
    club = _issue(services, "C-1004", program="club")
    single = _issue(services, "C-1005")
    with services.db.transaction() as session:
        # Another tenant's id revokes nothing of ours.
        assert links.revoke_tokens(session, tenant_id=other_tenant["tenant_id"]) == 0
        assert links.revoke_tokens(session, tenant_id=demo["tenant_id"], campaign="spring") == 2
        assert links.revoke_tokens(session, tenant_id=demo["tenant_id"], campaign="spring") == 0
        assert links.revoke_tokens(session, tenant_id=demo["tenant_id"],
                                   program_id=demo["program_ids"]["club"]) == 1
        assert links.revoke_tokens(session, tenant_id=demo["tenant_id"], token=single) == 1
    for token in [*spring, club, single]:
        with pytest.raises(LinkRevoked):
            _resolve(services, token)
    assert _resolve(services, summer).campaign == "summer"


def test_use_limit(services, demo) -> None:  # type: ignore[no-untyped-def]
    token = _issue(services, max_uses=2)
    for _ in range(2):
        with services.db.transaction() as session:
            links.record_use(session, links.resolve_token(session, token))
    with pytest.raises(LinkUsedUp) as caught:
        _resolve(services, token)
    assert caught.value.reason == "used_up"
    with services.db.session() as session:
        row = session.scalar(select(LinkToken))
        assert (row.uses, row.last_used_at is not None) == (2, True)
    unlimited = _issue(services, "C-1002")
    for _ in range(3):
        with services.db.transaction() as session:
            links.record_use(session, links.resolve_token(session, unlimited))
    signed = _resolve_signed(services, _params(_signed(services)))
    with services.db.transaction() as session:
        links.record_use(session, signed)  # stateless: nothing to count, no error


def test_concurrent_uses_never_exceed_the_limit(services, demo) -> None:  # type: ignore[no-untyped-def]
    """Two sessions pass resolve_token at once; only one use may be counted."""
    token = _issue(services, max_uses=1)
    first, second = services.db.session(), services.db.session()
    outcome: list[Exception | None] = []
    try:
        grant = links.resolve_token(first, token)
        assert links.resolve_token(second, token).link_id == grant.link_id  # both see 0 uses
        links.record_use(first, grant)  # holds the row (PostgreSQL) / the write lock (SQLite)

        def other_click() -> None:
            try:
                links.record_use(second, grant)
                second.commit()
                outcome.append(None)
            except Exception as exc:  # noqa: BLE001 - reported to the test's thread
                second.rollback()
                outcome.append(exc)

        thread = threading.Thread(target=other_click)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive(), "the second use did not wait for the first"
        first.commit()
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        first.close()
        second.close()
    assert len(outcome) == 1 and isinstance(outcome[0], LinkUsedUp)
    with services.db.session() as session:
        assert session.scalar(select(LinkToken.uses)) == 1


def test_issue_tokens_inserts_in_batches_lazily(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        session.execute(insert(Customer), [
            {"tenant_id": demo["tenant_id"], "external_id": f"B-{i:05d}", "attributes": {},
             "created_at": utcnow(), "updated_at": utcnow()} for i in range(1500)])
    with services.db.tenant_session(demo["tenant_id"]) as session:
        program = _program(session)
        customers = session.scalars(select(Customer).order_by(Customer.id)).all()
        issued = links.issue_tokens(session, program, customers, "download", campaign="bulk",
                                    max_uses=1)
        count = select(func.count(LinkToken.id))
        assert session.scalar(count) == 0  # nothing before it is iterated
        first_customer, first_token = next(issued)
        assert first_customer is customers[0]
        assert session.scalar(count) == links.BATCH_SIZE
        pairs = [(first_customer, first_token), *issued]
        assert session.scalar(count) == len(customers) == len(pairs) == 1505
        session.commit()
    assert len({token for _, token in pairs}) == len(pairs)
    with services.db.session() as session:
        for customer, token in pairs[:: 97]:
            grant = links.resolve_token(session, token)
            assert (grant.customer_id, grant.campaign) == (customer.id, "bulk")


# -- signed links --------------------------------------------------------------------------

def _rfc2104_hmac_sha256(key: bytes, message: bytes) -> str:
    """HMAC written out from RFC 2104 with hashlib only, to check app.distribution.links.sign."""
    block = 64  # SHA-256's block size in bytes
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(k ^ 0x36 for k in key) + message).digest()
    return hashlib.sha256(bytes(k ^ 0x5C for k in key) + inner).hexdigest()


def test_canonical_string_and_signature_match_the_documented_format() -> None:
    canonical = links.canonical_string("demo", "rewards", "C-1002", "download", 1800000000)
    assert canonical == "v1\ndemo\nrewards\nC-1002\ndownload\n1800000000"
    secret = "s3cret-Zoë"
    expected = _rfc2104_hmac_sha256(secret.encode("utf-8"), canonical.encode("utf-8"))
    assert links.sign(secret, canonical) == expected
    assert re.fullmatch(r"[0-9a-f]{64}", expected)
    # A 100-byte key is hashed first (RFC 2104), and still agrees.
    assert links.sign("k" * 100, "x") == _rfc2104_hmac_sha256(b"k" * 100, b"x")


def test_signed_link_resolves_known_and_unknown_customers(services, demo) -> None:  # type: ignore[no-untyped-def]
    url = _signed(services, "C-1002", "enrich")
    params = _params(url)
    assert list(params) == list(links.SIGNED_PARAMS)
    grant = _resolve_signed(services, params)
    with services.db.session() as session:
        customer_id = _customer(session, "C-1002").id
    assert (grant.tenant_id, grant.program_id, grant.customer_id, grant.purpose) == (
        demo["tenant_id"], demo["program_ids"]["rewards"], customer_id, "enrich")
    assert (grant.signed, grant.link_id, grant.external_id, grant.campaign) == (
        True, None, "C-1002", None)
    assert int(grant.expires_at.timestamp()) == int(params["expires"])
    # A customer only the CRM knows so far: a grant without customer id, with the external id.
    odd = "CRM 42/é+&="
    grant = _resolve_signed(services, _params(_signed(services, odd)))
    assert (grant.customer_id, grant.external_id) == (None, odd)
    # Hex case is not part of the signature.
    upper = dict(params, sig=params["sig"].upper())
    assert _resolve_signed(services, upper).customer_id == customer_id


def test_signed_link_never_gives_another_tenants_customer(services, demo, other_tenant) -> None:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        other = session.get(Tenant, other_tenant["tenant_id"])
        program = session.scalar(select(Program).where(Program.tenant_id == other.id))
        theirs = _customer(session, "C-1002", "other").id
        expires = int(time.time()) + 3600
        url = links.signed_url(PUBLIC, other, program, "C-1002", "download", expires)
        with pytest.raises(ValueError, match="another tenant"):
            links.signed_url(PUBLIC, other, _program(session), "C-1002", "download", expires)
    grant = _resolve_signed(services, _params(url))
    assert (grant.tenant_id, grant.customer_id) == (other_tenant["tenant_id"], theirs)
    # Retargeting the same link at the demo tenant breaks its signature.
    with pytest.raises(LinkInvalid) as caught:
        _resolve_signed(services, dict(_params(url), tenant="demo"))
    assert caught.value.reason == "signature"


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("tenant", "nope", "tenant"),
    ("program", "club", "signature"),
    ("program", "nope", "signature"),
    ("customer", "C-1001", "signature"),
    ("purpose", "consent", "signature"),
    ("purpose", "enroll", "purpose"),
    ("purpose", "anything", "purpose"),
    ("expires", "+1", "malformed"),
    ("expires", None, "signature"),   # one second later
    ("sig", None, "signature"),       # one hex digit changed
    ("sig", "abc", "malformed"),
    ("customer", "", "malformed"),
    ("customer", "a\nb", "malformed"),
])
def test_tampered_signed_links_are_invalid(services, demo, name, value, reason) -> None:  # type: ignore[no-untyped-def]
    params = _params(_signed(services))
    if value is None and name == "expires":
        value = str(int(params["expires"]) + 1)
    if value is None and name == "sig":
        value = params["sig"][:-1] + ("0" if params["sig"][-1] != "0" else "1")
    assert _resolve_signed(services, params).external_id == "C-1002"  # untouched: fine
    with pytest.raises(LinkInvalid) as caught:
        _resolve_signed(services, dict(params, **{name: value}))
    assert caught.value.reason == reason
    assert "C-1002" not in str(caught.value) and params["sig"] not in str(caught.value)


def test_signed_link_missing_a_parameter_is_invalid(services, demo) -> None:  # type: ignore[no-untyped-def]
    params = _params(_signed(services))
    for name in links.SIGNED_PARAMS:
        incomplete = {k: v for k, v in params.items() if k != name}
        with pytest.raises(LinkInvalid) as caught:
            _resolve_signed(services, incomplete)
        assert caught.value.reason == "malformed"


def test_signed_link_expiry_is_required_and_capped(services, demo) -> None:  # type: ignore[no-untyped-def]
    params = _params(_signed(services, days=1))
    expires = dt.datetime.fromtimestamp(int(params["expires"]), dt.UTC)
    assert _resolve_signed(services, params, now=expires - dt.timedelta(seconds=1))
    with pytest.raises(LinkExpired):
        _resolve_signed(services, params, now=expires)
    # Correctly signed, but further ahead than any signed link may live.
    with services.db.session() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.slug == "demo"))
        secret = tenant.link_secret
        too_far = int((utcnow() + links.MAX_SIGNED_LIFETIME + dt.timedelta(days=1)).timestamp())
        with pytest.raises(ValueError, match="400 days"):
            links.signed_url(PUBLIC, tenant, _program(session), "C-1002", "download", too_far)
    canonical = links.canonical_string("demo", "rewards", "C-1002", "download", too_far)
    forged = dict(params, expires=str(too_far), sig=links.sign(secret, canonical))
    with pytest.raises(LinkInvalid) as caught:
        _resolve_signed(services, forged)
    assert caught.value.reason == "too_far"
    # 399 days ahead is fine.
    assert _resolve_signed(services, _params(_signed(services, days=399)))


def test_secret_rotation_keeps_two_generations(services, demo) -> None:  # type: ignore[no-untyped-def]
    first = _params(_signed(services))
    with services.db.transaction() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.slug == "demo"))
        old = tenant.link_secret
        new = links.rotate_link_secret(session, tenant)
        assert (tenant.link_secret, tenant.link_secret_previous) == (new, old) and new != old
    second = _params(_signed(services))
    assert _resolve_signed(services, first) and _resolve_signed(services, second)
    with services.db.transaction() as session:
        links.rotate_link_secret(session, session.scalar(select(Tenant)))
    with pytest.raises(LinkInvalid) as caught:  # two rotations ago: refused
        _resolve_signed(services, first)
    assert caught.value.reason == "signature"
    assert _resolve_signed(services, second)
    with services.db.transaction() as session:
        links.rotate_link_secret(session, session.scalar(select(Tenant)), keep_previous=False)
        assert session.scalar(select(Tenant)).link_secret_previous is None
    with pytest.raises(LinkInvalid):  # dropped at once (a leaked secret)
        _resolve_signed(services, second)


# -- the README's plain-Python recipe --------------------------------------------------------

def _readme_block(marker: str) -> str:
    found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```\s*<!-- /{marker} -->",
                      README.read_text(encoding="utf-8"), re.S)
    assert found, f"README.md has no python block marked {marker}"
    return found.group(1)


def test_readme_python_recipe_builds_links_passerelle_accepts(services, demo, capsys) -> None:  # type: ignore[no-untyped-def]
    namespace: dict[str, object] = {"__name__": "readme_recipe"}
    exec(compile(_readme_block("signed-link-python"), "README.md", "exec"), namespace)
    print_out = capsys.readouterr().out
    assert print_out.startswith("https://wallet.example.com/s?tenant=")
    build = namespace["passerelle_link"]
    with services.db.session() as session:
        secret = session.scalar(select(Tenant.link_secret).where(Tenant.slug == "demo"))
    for external_id in ("C-1001", "CRM 42/é+&="):
        url = build(PUBLIC, secret, "demo", "rewards", external_id, "consent", 7)  # type: ignore[operator]
        grant = _resolve_signed(services, _params(url))
        assert (grant.external_id, grant.purpose) == (external_id, "consent")
        assert dt.timedelta(days=6) < grant.expires_at - utcnow() <= dt.timedelta(days=7)
    with pytest.raises(LinkInvalid):
        _resolve_signed(services, _params(build(PUBLIC, "wrong", "demo", "rewards",  # type: ignore[operator]
                                                "C-1001", "download", 7)))

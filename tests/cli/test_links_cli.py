"""`passerelle links …`: issue, export, revoke, sign and rotate, through Click's runner."""

from __future__ import annotations

import csv
import io
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import func, insert, select

from app.cli import main
from app.distribution import links
from app.distribution.links import LinkInvalid, LinkRevoked
from app.infra.models import Customer, LinkToken, Tenant, utcnow

PUBLIC = "https://wallet.example.test"  # the `settings` fixture's public URL


def invoke(runner, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(main, list(args), catch_exceptions=False)


def _resolve(services, url: str):  # type: ignore[no-untyped-def]
    assert url.startswith(f"{PUBLIC}/l/"), url
    with services.db.session() as session:
        return links.resolve_token(session, url.rsplit("/", 1)[1])


def _resolve_signed(services, url: str):  # type: ignore[no-untyped-def]
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{PUBLIC}{links.SIGNED_PATH}"
    params = {k: v[0] for k, v in parse_qs(parts.query).items()}
    with services.db.session() as session:
        return links.resolve_signed(session, params)


def _customer_ids(services, tenant_id: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(tenant_id) as session:
        return {e: i for e, i in session.execute(select(Customer.external_id, Customer.id))}


def test_issue_prints_a_working_url(runner, services, demo) -> None:  # type: ignore[no-untyped-def]
    result = invoke(runner, "links", "issue", "--program", "rewards", "--purpose", "download",
                    "--customer", "C-1003", "--campaign", "spring", "--expires-in-days", "3",
                    "--max-uses", "2")
    assert result.exit_code == 0, result.output
    url = result.stdout.strip()
    assert "\n" not in url and "C-1003" not in url
    grant = _resolve(services, url)
    assert grant.customer_id == _customer_ids(services, demo["tenant_id"])["C-1003"]
    assert (grant.purpose, grant.campaign) == ("download", "spring")
    days = (grant.expires_at - utcnow()).total_seconds() / 86400
    assert 2.99 < days <= 3
    with services.db.session() as session:
        assert session.scalar(select(LinkToken.max_uses)) == 2

    enroll = invoke(runner, "links", "issue", "--program", "club", "--tenant", "demo",
                    "--purpose", "enroll", "--expires", "2099-12-31")
    assert enroll.exit_code == 0, enroll.output
    grant = _resolve(services, enroll.stdout.strip())
    assert grant.customer_id is None and grant.program_id == demo["program_ids"]["club"]
    assert grant.expires_at.isoformat() == "2100-01-01T00:00:00+00:00"  # through Dec 31, UTC


@pytest.mark.parametrize(("args", "message"), [
    (("--purpose", "download"), "needs --customer EXTERNAL_ID"),
    (("--purpose", "enroll", "--customer", "C-1001"), "enroll takes no --customer"),
    (("--purpose", "download", "--customer", "nobody"), "no customer 'nobody'"),
    (("--purpose", "download", "--customer", "C-1001", "--expires-in-days", "2",
      "--expires", "2099-01-01"), "not both"),
    (("--purpose", "download", "--customer", "C-1001", "--expires", "2001-01-01"),
     "is in the past"),
])
def test_issue_refuses_bad_requests(runner, services, demo, args, message) -> None:  # type: ignore[no-untyped-def]
    result = invoke(runner, "links", "issue", "--program", "rewards", *args)
    assert result.exit_code == 1 and message in result.output
    with services.db.session() as session:
        assert session.scalar(select(func.count(LinkToken.id))) == 0


def test_issue_unknown_program_or_tenant(runner, demo) -> None:  # type: ignore[no-untyped-def]
    result = invoke(runner, "links", "issue", "--program", "nope", "--purpose", "enroll")
    assert result.exit_code == 1 and "no program 'nope'" in result.output
    result = invoke(runner, "links", "issue", "--program", "rewards", "--tenant", "other",
                    "--purpose", "enroll")
    assert result.exit_code == 1 and "no program 'rewards' in tenant 'other'" in result.output
    result = invoke(runner, "links", "issue", "--program", "rewards", "--purpose", "share")
    assert result.exit_code == 2  # click refuses the choice


def _add_customers(services, tenant_id: int, count: int) -> None:  # type: ignore[no-untyped-def]
    now = utcnow()
    with services.db.transaction(tenant_id) as session:
        session.execute(insert(Customer), [
            {"tenant_id": tenant_id, "external_id": f"X-{i:05d}",
             "email": None if i % 10 == 0 else f"p{i}@example.org", "attributes": {},
             "created_at": now, "updated_at": now} for i in range(count)])


def test_export_writes_unique_resolvable_links_for_every_customer(runner, services, demo,  # type: ignore[no-untyped-def]
                                                                  tmp_path) -> None:
    _add_customers(services, demo["tenant_id"], 2500)
    out = tmp_path / "links.csv"
    result = invoke(runner, "links", "export", "--program", "rewards", "--purpose", "download",
                    "--out", str(out), "--campaign", "spring", "--expires-in-days", "30")
    assert result.exit_code == 0, result.output
    assert f"2505 links written to {out} (250 customers without email)" in result.stdout
    assert not (tmp_path / "links.csv.part").exists()
    with out.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["external_id", "email", "url"]
    rows = rows[1:]
    ids = _customer_ids(services, demo["tenant_id"])
    assert [r[0] for r in rows] == sorted(ids, key=ids.__getitem__)  # every one, by id
    assert len({r[2] for r in rows}) == len(rows) == 2505
    assert rows[5][:2] == ["X-00000", ""] and rows[6][:2] == ["X-00001", "p1@example.org"]
    with services.db.session() as session:
        assert session.scalar(select(func.count(LinkToken.id))) == 2505
        for external_id, _email, url in rows:
            grant = links.resolve_token(session, url.rsplit("/", 1)[1])
            assert grant.customer_id == ids[external_id]
            assert (grant.program_id, grant.purpose, grant.campaign) == (
                demo["program_ids"]["rewards"], "download", "spring")
    # The batch can be revoked in one go.
    revoked = invoke(runner, "links", "revoke", "--tenant", "demo", "--campaign", "spring")
    assert revoked.exit_code == 0 and "2505 links revoked" in revoked.output
    with pytest.raises(LinkRevoked):
        _resolve(services, rows[0][2])


def test_export_to_stdout_keeps_the_csv_clean(runner, services, demo) -> None:  # type: ignore[no-untyped-def]
    result = invoke(runner, "links", "export", "--program", "club", "--purpose", "enrich",
                    "--out", "-", "--max-uses", "1")
    assert result.exit_code == 0, result.output
    assert "5 links written to stdout (0 customers without email)" in result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["external_id", "email", "url"] and len(rows) == 6
    assert rows[1][:2] == ["C-1001", "camille.martin@example.com"]
    assert all(_resolve(services, url).purpose == "enrich" for _, _, url in rows[1:])


def test_export_refuses_enroll(runner, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = invoke(runner, "links", "export", "--program", "club", "--purpose", "enroll",
                    "--out", str(tmp_path / "x.csv"))
    assert result.exit_code == 2 and not (tmp_path / "x.csv").exists()


def test_revoke_needs_a_target_and_takes_a_url(runner, services, demo) -> None:  # type: ignore[no-untyped-def]
    urls = [invoke(runner, "links", "issue", "--program", program, "--purpose", "consent",
                   "--customer", "C-1001").stdout.strip() for program in ("rewards", "club")]
    nothing = invoke(runner, "links", "revoke", "--tenant", "demo")
    assert nothing.exit_code == 1 and "say what to revoke" in nothing.output
    one = invoke(runner, "links", "revoke", "--tenant", "demo", "--token", urls[0])
    assert one.exit_code == 0 and "1 links revoked" in one.output
    with pytest.raises(LinkRevoked):
        _resolve(services, urls[0])
    assert _resolve(services, urls[1]).purpose == "consent"
    everything = invoke(runner, "links", "revoke", "--tenant", "demo", "--all")
    assert "1 links revoked" in everything.output
    unknown = invoke(runner, "links", "revoke", "--tenant", "nope", "--all")
    assert unknown.exit_code == 1 and "no tenant 'nope'" in unknown.output


def test_sign_rotate_and_show_secret(runner, services, demo) -> None:  # type: ignore[no-untyped-def]
    shown = invoke(runner, "links", "show-secret", "--tenant", "demo")
    with services.db.session() as session:
        assert shown.stdout.strip() == session.scalar(select(Tenant.link_secret))
    signed = invoke(runner, "links", "sign", "--program", "rewards", "--customer", "C-1004",
                    "--purpose", "download", "--expires-in-days", "30")
    assert signed.exit_code == 0, signed.output
    url = signed.stdout.strip()
    grant = _resolve_signed(services, url)
    assert grant.customer_id == _customer_ids(services, demo["tenant_id"])["C-1004"]
    assert 29.99 < (grant.expires_at - utcnow()).total_seconds() / 86400 <= 30
    too_long = invoke(runner, "links", "sign", "--program", "rewards", "--customer", "C-1004",
                      "--purpose", "download", "--expires-in-days", "401")
    assert too_long.exit_code == 2
    enroll = invoke(runner, "links", "sign", "--program", "rewards", "--customer", "C-1004",
                    "--purpose", "enroll", "--expires-in-days", "3")
    assert enroll.exit_code == 2

    rotated = invoke(runner, "links", "rotate-secret", "--tenant", "demo")
    assert rotated.exit_code == 0 and "previous secret still verifies" in rotated.stderr
    new_secret = rotated.stdout.strip()
    assert invoke(runner, "links", "show-secret", "--tenant", "demo").stdout.strip() == new_secret
    assert _resolve_signed(services, url).external_id == "C-1004"  # old secret: still fine
    forgot = invoke(runner, "links", "rotate-secret", "--tenant", "demo", "--forget-previous")
    assert forgot.exit_code == 0 and forgot.stdout.strip() not in (new_secret, "")
    with pytest.raises(LinkInvalid):
        _resolve_signed(services, url)

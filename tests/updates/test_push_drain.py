"""Push jobs drained in batches against the real HTTP/2 + TLS APNs stand-in: one claim
for many jobs, one push per device token and certificate, every outcome recorded
with its guarantee; a refused certificate trips the breaker (few handshakes, reported
everywhere operators look) and pushes resume by themselves once it is accepted."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from sqlalchemy import select, text, update

from app.cli import main
from app.infra import outbox
from app.infra.models import (
    AppleIdentity,
    Card,
    InstallEvent,
    PushAttempt,
    PushJob,
    Registration,
    utcnow,
)
from app.updates import pushes
from tests.apns_standin import ApnsStandin

PASS_TYPE = "pass.dev.passerelle.demo"


def _token(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture()
def apns(services):  # type: ignore[no-untyped-def]
    certs_path = services.settings.certs_path
    with ApnsStandin(client_ca_files=[certs_path / "dev" / "root-ca.pem",
                                      certs_path / "wwdr" / "dev-wwdr.pem"]) as standin:
        services.settings.apns_url = standin.url
        services.settings.apns_ca_file = str(standin.ca_file)
        try:
            yield standin
        finally:
            services.close()


def _devices(services, demo, per_card: list[list[int]]) -> tuple[list[int], dict[int, int]]:  # type: ignore[no-untyped-def]
    """Registrations (token numbers per card) on the demo's cards; (card ids, token -> reg id)."""
    regs: dict[int, int] = {}
    with services.db.transaction(demo["tenant_id"]) as session:
        cards = session.scalars(select(Card).order_by(Card.id)).all()[:len(per_card)]
        assert len(cards) == len(per_card)
        for card, numbers in zip(cards, per_card):
            for n in numbers:
                reg = Registration(card_id=card.id, device_library_identifier=f"dev-{card.id}-{n}",
                                   pass_type_identifier=PASS_TYPE, push_token=_token(n))
                session.add(reg)
                session.flush()
                regs.setdefault(n, reg.id)
        return [c.id for c in cards], regs


def _jobs(services, demo, card_ids: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        jobs = [PushJob(card_id=card_id, update_tag=i + 1) for i, card_id in enumerate(card_ids)]
        session.add_all(jobs)
        session.flush()
        return [job.id for job in jobs]


def test_a_batch_coalesces_tokens_and_records_every_outcome(services, demo, apns) -> None:  # type: ignore[no-untyped-def]
    # Card 0: a phone (1) and a removed device (2); card 1: the same phone (1) holding a
    # second card of the pass type, and a bad token (3); card 2: a device APNs fails (4).
    card_ids, regs = _devices(services, demo, [[1, 2], [1, 3], [4]])
    apns.script[_token(2)] = [(410, "Unregistered")]
    apns.script[_token(3)] = [(400, "BadDeviceToken")]
    apns.script[_token(4)] = [(503, "ServiceUnavailable")]
    # Two changes of card 0 queued before any worker ran.
    job_ids = _jobs(services, demo, [card_ids[0], card_ids[0], card_ids[1], card_ids[2]])

    drained = pushes.drain(services)

    assert drained.jobs == 4 and dict(drained.states) == {"done": 3, "retry": 1}
    # One push per token and certificate: the phone once for its two cards and two jobs.
    assert sorted(Counter(r.token for r in apns.received).items()) == \
        [(_token(n), 1) for n in (1, 2, 3, 4)]
    with services.db.session() as session:
        jobs = {j.id: j for j in session.scalars(select(PushJob))}
        assert all(jobs[i].attempts == 1 and jobs[i].claimed_until is None for i in job_ids)
        assert [jobs[i].done_at is not None for i in job_ids] == [True, True, True, False]
        retry = jobs[job_ids[3]]
        assert retry.registration_ids == [regs[4]] and retry.not_before > utcnow()
        remaining = {r.push_token: r.push_problem for r in session.scalars(select(Registration))}
        assert _token(2) not in remaining  # 410: removed...
        gone = session.scalars(select(InstallEvent.kind).where(
            InstallEvent.device == f"dev-{card_ids[0]}-2")).all()
        assert gone == ["push_gone"]  # ...and the install log says so
        assert remaining[_token(3)] == "BadDeviceToken"  # flagged, no longer pushed
        attempts = Counter((a.card_id, a.device, a.outcome)
                           for a in session.scalars(select(PushAttempt)))
    assert attempts == Counter({
        (card_ids[0], f"dev-{card_ids[0]}-1", "sent"): 1,
        (card_ids[0], f"dev-{card_ids[0]}-2", "unregistered"): 1,
        (card_ids[1], f"dev-{card_ids[1]}-1", "sent"): 1,
        (card_ids[1], f"dev-{card_ids[1]}-3", "bad_token"): 1,
        (card_ids[2], f"dev-{card_ids[2]}-4", "retry"): 1})

    # The retry comes due: only the failed device is pushed again, and the job is done.
    with services.db.transaction() as session:
        session.execute(update(PushJob).where(PushJob.id == job_ids[3])
                        .values(not_before=utcnow() - dt.timedelta(seconds=1)))
    assert pushes.drain(services).states == {"done": 1}
    assert [r.token for r in apns.received[4:]] == [_token(4)]


def test_claims_are_disjoint_and_skip_locked_rows(services, demo) -> None:  # type: ignore[no-untyped-def]
    card_ids, _ = _devices(services, demo, [[1]])
    job_ids = _jobs(services, demo, card_ids * 5)
    now = utcnow()
    postgres = services.db.engine.dialect.name == "postgresql"
    with services.db.session() as holder, services.db.session() as worker:
        if postgres:  # another worker is in the middle of claiming the first two rows
            holder.execute(text("SELECT id FROM push_jobs WHERE id IN (:a, :b) FOR UPDATE")
                           .bindparams(a=job_ids[0], b=job_ids[1]))
        first = outbox.claim_batch(worker, PushJob, now, pushes.LEASE, 2)
        assert first == (job_ids[2:4] if postgres else job_ids[:2])  # no waiting on locks
        holder.rollback()
        second = outbox.claim_batch(worker, PushJob, now, pushes.LEASE, 10)
    assert sorted(first + second) == job_ids  # each row claimed exactly once
    with services.db.session() as session:
        assert {j.attempts for j in session.scalars(select(PushJob))} == {1}
        assert outbox.claim_batch(session, PushJob, now, pushes.LEASE, 10) == []


def test_refused_certificate_trips_the_breaker_then_pushes_resume(services, demo, apns,
                                                                  runner, client) -> None:  # type: ignore[no-untyped-def]
    card_ids, _ = _devices(services, demo, [[1], [2], [3]])
    apns.refuse_client_certificates = True
    now = [1000.0]
    for _ in range(3):  # three waves of jobs while APNs refuses the certificate
        job_ids = _jobs(services, demo, card_ids)
        services.apns.client(PASS_TYPE, _identity(services)).breaker._clock = lambda: now[0]
        drained = pushes.drain(services)
        assert drained.states == {"retry": 3}
    assert apns.handshakes_started == 1  # one refused handshake, not one per job or push
    assert apns.received == []
    with services.db.session() as session:
        identity = session.scalar(select(AppleIdentity))
        assert identity.apns_failing_since is not None
        assert "certificate" in identity.apns_problem
        waiting = session.scalars(select(PushJob).where(PushJob.id.in_(job_ids))).all()
        assert all(j.not_before >= identity.apns_next_attempt_at for j in waiting)

    # Operators see it: certs check fails, the push health check says so, and the
    # dashboard's health page lists it with the certificate.
    checked = runner.invoke(main, ["certs", "check"])
    assert checked.exit_code == 1 and "APNs connections fail since" in checked.output
    health = client.get("/healthz/pushes")
    assert health.status_code == 503 and "1 certificate" in health.get_json()["detail"]
    assert client.get("/healthz").status_code == 200  # the web itself is fine
    from app.admin import dashboard

    with services.db.session() as session:
        [status] = dashboard.certificate_statuses(session, services, demo["tenant_id"])
    assert status.level == "error" and "APNs connections fail" in status.problems[0]

    # The certificate is accepted again (renewed upstream); time passes.
    apns.refuse_client_certificates = False
    now[0] += 6
    with services.db.transaction() as session:
        session.execute(update(PushJob).values(not_before=utcnow() - dt.timedelta(seconds=1)))
    drained = pushes.drain(services)
    assert drained.states == {"done": 9}
    assert sorted(r.token for r in apns.received) == [_token(n) for n in (1, 2, 3)]  # once each
    assert apns.handshakes_started == 2 and apns.connections_opened == 1
    with services.db.session() as session:
        identity = session.scalar(select(AppleIdentity))
        assert (identity.apns_failing_since, identity.apns_problem) == (None, None)
    assert client.get("/healthz/pushes").status_code == 200
    assert runner.invoke(main, ["certs", "check"]).exit_code == 0


def _identity(services):  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        identity = session.scalar(select(AppleIdentity))
        return services.signing_identity(identity)


def test_timeline_shows_outcomes_and_a_certificate_problem(services, demo, apns) -> None:  # type: ignore[no-untyped-def]
    from app.tracking import diagnostics

    card_ids, _ = _devices(services, demo, [[1]])
    _jobs(services, demo, card_ids)
    pushes.drain(services)
    with services.db.transaction() as session:
        session.execute(update(AppleIdentity).values(
            apns_failing_since=utcnow(), apns_problem="TLS refused by APNs, check it"))
    with services.db.session() as session:
        serial = session.get(Card, card_ids[0]).serial_number
        kinds = {e.kind: e.text for e in diagnostics.timeline(session, serial)}
    assert kinds["push"].endswith("sent 200")
    assert "TLS refused" in kinds["apns down"]


def test_google_rate_limit_spaces_calls() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limit = pushes._RateLimit(20.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(60):
        limit.acquire()
    # A burst of 20, then one call every 1/20 s: 60 calls take 2 s, never less.
    assert now[0] == pytest.approx(2.0, abs=0.01)

"""The job queue: a real Huey consumer on SQLite and on Redis, the outbox sweeper,
and leases that keep two workers off one job."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import redis
from sqlalchemy import select

from app.infra.config import Settings
from app.infra.models import Card, PushJob, utcnow
from app.services import Services
from app.updates import pushes
from tests import factories

REDIS_URL = "redis://127.0.0.1:6379/15"


def _flagged_job(services, demo) -> int:  # type: ignore[no-untyped-def]
    """A push job whose only device is flagged: deliverable without any network."""
    with services.db.transaction(demo["tenant_id"]) as session:
        card = session.scalars(select(Card)).first()
        factories.device(session, card, "d1", pass_type="pass.dev.passerelle.demo") \
            .push_problem = "BadDeviceToken"
        job = PushJob(card_id=card.id, update_tag=1)
        session.add(job)
        session.flush()
        return job.id


def _wait_done(services, job_id: int, seconds: float = 15) -> PushJob:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with services.db.session() as session:
            job = session.get(PushJob, job_id)
            if job.done_at is not None:
                return job
        time.sleep(0.05)
    raise AssertionError(f"push job {job_id} not delivered within {seconds}s")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_worker_delivers_dispatched_jobs(settings, demo, backend, keep_signal_handlers) -> None:  # type: ignore[no-untyped-def]
    if backend == "redis":
        redis.Redis.from_url(REDIS_URL).flushdb()
        settings = Settings.from_env(environ={}, **{**settings.__dict__, "redis_url": REDIS_URL})
    services = Services(settings)
    job_id = _flagged_job(services, demo)
    consumer = services.jobs.consumer(workers=2)
    consumer.start()
    try:
        services.jobs.dispatch([job_id])
        job = _wait_done(services, job_id)
    finally:
        consumer.stop(graceful=True)
        services.close()
    assert job.attempts == 1 and job.claimed_until is None


def test_lease_keeps_a_second_worker_off(services, demo) -> None:  # type: ignore[no-untyped-def]
    job_id = _flagged_job(services, demo)
    now = utcnow()
    with services.db.session() as session:
        assert pushes.claim(session, job_id, now) is True
        assert pushes.claim(session, job_id, now) is False  # leased
        # When the lease runs out (the worker died), it can be claimed again.
        assert pushes.claim(session, job_id, now + pushes.LEASE + dt.timedelta(seconds=1))


def test_sweeper_finds_jobs_of_dead_workers_and_due_retries(services, demo) -> None:  # type: ignore[no-untyped-def]
    old = utcnow() - dt.timedelta(minutes=5)
    with services.db.transaction(demo["tenant_id"]) as session:
        card_id = session.scalars(select(Card.id)).first()
        rows = {
            "never_ran": PushJob(card_id=card_id, update_tag=1, created_at=old),
            "lease_expired": PushJob(card_id=card_id, update_tag=2, created_at=old,
                                     claimed_until=old, attempts=1),
            "leased": PushJob(card_id=card_id, update_tag=3, created_at=old,
                              claimed_until=utcnow() + dt.timedelta(minutes=1), attempts=1),
            "retry_later": PushJob(card_id=card_id, update_tag=4, created_at=old,
                                   not_before=utcnow() + dt.timedelta(minutes=1)),
            "done": PushJob(card_id=card_id, update_tag=5, created_at=old, done_at=old),
            "just_queued": PushJob(card_id=card_id, update_tag=6),
        }
        session.add_all(rows.values())
        session.flush()
        ids = {name: row.id for name, row in rows.items()}
    due = pushes.due_jobs(services)
    assert sorted(due) == sorted([ids["never_ran"], ids["lease_expired"]])
    # Delivering them completes them (no device to push to).
    for job_id in due:
        assert pushes.deliver(services, job_id).state == "done"
    assert pushes.due_jobs(services) == []


def test_backoff_grows_and_is_capped() -> None:
    delays = [pushes.backoff(n).total_seconds() for n in range(1, 12)]
    assert delays[:4] == [10, 20, 40, 80]
    assert max(delays) == 3600 and delays == sorted(delays)

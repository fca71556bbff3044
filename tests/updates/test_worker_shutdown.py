"""SIGTERM (what systemd, containers and supervisors send) stops a `passerelle worker`
within a bounded time and loses nothing: it stops taking jobs, lets the batch in
flight finish, and hands back at once whatever outlives the shutdown timeout, so no
job waits for its lease to run out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

from sqlalchemy import select

from app.infra.models import Card, PushJob, Registration, utcnow
from tests.apns_standin import ApnsStandin
from tests.waiting import wait_until as _wait

PASS_TYPE = "pass.dev.passerelle.demo"
TOKENS = [f"{n:x}" * 64 for n in range(1, 6)]



def _jobs(services, demo) -> list[int]:  # type: ignore[no-untyped-def]
    """Five cards with a device each, and a push job per card."""
    with services.db.transaction(demo["tenant_id"]) as session:
        cards = session.scalars(select(Card).order_by(Card.id)).all()[:5]
        jobs = []
        for n, card in enumerate(cards):
            session.add(Registration(card_id=card.id, device_library_identifier=f"d-{n}",
                                     pass_type_identifier=PASS_TYPE, push_token=TOKENS[n]))
            jobs.append(PushJob(card_id=card.id, update_tag=1 + n))
        session.add_all(jobs)
        session.flush()
        return [j.id for j in jobs]


def _worker(services, apns, shutdown_seconds: int) -> subprocess.Popen:  # type: ignore[no-untyped-def, type-arg]
    settings = services.settings
    env = {**os.environ,
           "PASSERELLE_INSTANCE_PATH": str(settings.instance_path),
           "PASSERELLE_DATABASE_URL": settings.database_url,
           "PASSERELLE_CERTS_PATH": str(settings.certs_path),
           "PASSERELLE_APNS_URL": apns.url,
           "PASSERELLE_APNS_CA_FILE": str(apns.ca_file),
           "PASSERELLE_REDIS_URL": settings.redis_url,
           "PASSERELLE_WORKER_SHUTDOWN_SECONDS": str(shutdown_seconds)}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--workers", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _stop(worker: subprocess.Popen) -> tuple[float, str]:  # type: ignore[type-arg]
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    try:
        output, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    return time.monotonic() - started, output


def _apns(services) -> ApnsStandin:  # type: ignore[no-untyped-def]
    certs_path = services.settings.certs_path
    return ApnsStandin(client_ca_files=[certs_path / "dev" / "root-ca.pem",
                                        certs_path / "wwdr" / "dev-wwdr.pem"])


def _rows(services, ids: list[int]) -> list[PushJob]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return list(session.scalars(select(PushJob).where(PushJob.id.in_(ids))))


def test_sigterm_mid_fan_out_finishes_the_batch_then_exits(services, demo,  # type: ignore[no-untyped-def]
                                                           keep_signal_handlers):
    with _apns(services) as apns:
        for token in TOKENS:
            apns.script[token] = [(200, None, 2.0)]  # answered, but not at once
        ids = _jobs(services, demo)
        worker = _worker(services, apns, shutdown_seconds=20)
        services.jobs.dispatch(ids)
        # The batch is out, unanswered.
        _wait(lambda: len(apns.received) == len(TOKENS), seconds=30.0)
        took, output = _stop(worker)
    assert worker.returncode == 0, output
    assert "worker: stopped" in output
    assert took < 20  # the batch finished: no need to wait for the shutdown timeout
    assert all(job.done_at is not None for job in _rows(services, ids))
    assert Counter(r.token for r in apns.received) == dict.fromkeys(TOKENS, 1)


def test_what_outlives_the_shutdown_timeout_is_handed_back_not_left_leased(  # type: ignore[no-untyped-def]
        services, demo, keep_signal_handlers):
    with _apns(services) as apns:
        apns.script[TOKENS[0]] = [(200, None, 8.0)]  # hangs past the worker's 2 s
        ids = _jobs(services, demo)
        worker = _worker(services, apns, shutdown_seconds=2)
        services.jobs.dispatch(ids)
        _wait(lambda: len(apns.received) == len(TOKENS), seconds=30.0)
        took, output = _stop(worker)
        assert worker.returncode == 0, output
        assert took < 8  # bounded by the shutdown timeout, not by the hung push
        assert "released" in output and "push job" in output
        now = utcnow()
        for job in _rows(services, ids):
            assert job.done_at is None
            assert job.claimed_until is None or job.claimed_until < now  # nothing waits

        # Another worker takes them over at once, lease or no lease.
        services.settings.apns_url = apns.url
        services.settings.apns_ca_file = str(apns.ca_file)
        consumer = services.jobs.consumer(workers=1)
        consumer.start()
        try:
            services.jobs.dispatch(ids)
            _wait(lambda: all(job.done_at is not None for job in _rows(services, ids)),
                  seconds=30.0)
        finally:
            consumer.stop(graceful=True)
            services.close()
    # At least once: the batch in flight at the release goes out again.
    assert Counter(r.token for r in apns.received) == dict.fromkeys(TOKENS, 2)

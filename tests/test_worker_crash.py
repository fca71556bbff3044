"""At-least-once: a `passerelle worker` process killed in the middle of a push loses
nothing. Its job stays undone in the outbox; once its lease has run out the sweeper
queues it again and another worker delivers it."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time

from sqlalchemy import select, update

from app.models import Card, Program, PushJob, Registration, utcnow
from tests.apns_standin import ApnsStandin

PASS_TYPE = "pass.dev.passerelle.demo"
TOKEN = "cc" * 32


def _wait(predicate, seconds: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_killed_worker_loses_no_push(services, demo, keep_signal_handlers) -> None:  # type: ignore[no-untyped-def]
    settings = services.settings
    certs_path = settings.certs_path
    with ApnsStandin(client_ca_files=[certs_path / "dev" / "root-ca.pem",
                                      certs_path / "wwdr" / "dev-wwdr.pem"]) as apns:
        settings.apns_url, settings.apns_ca_file = apns.url, str(apns.ca_file)
        # The first push hangs long enough for us to kill the worker mid-job.
        apns.script[TOKEN] = [(200, None, 30.0)]
        with services.db.transaction(demo["tenant_id"]) as session:
            card = session.scalar(select(Card).join(Program).where(Program.slug == "club"))
            session.add(Registration(card_id=card.id, device_library_identifier="d-crash",
                                     pass_type_identifier=PASS_TYPE, push_token=TOKEN))
            job = PushJob(card_id=card.id, update_tag=1)
            session.add(job)
            session.flush()
            job_id = job.id
        env = {**os.environ,
               "PASSERELLE_INSTANCE_PATH": str(settings.instance_path),
               "PASSERELLE_DATABASE_URL": settings.database_url,
               "PASSERELLE_CERTS_PATH": str(certs_path),
               "PASSERELLE_APNS_URL": apns.url,
               "PASSERELLE_APNS_CA_FILE": str(apns.ca_file),
               "PASSERELLE_REDIS_URL": settings.redis_url}
        worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--workers", "1"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            services.jobs.dispatch([job_id])
            _wait(lambda: len(apns.received) == 1)  # the push is in flight, unanswered
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
        finally:
            if worker.poll() is None:
                worker.kill()
        with services.db.session() as session:
            stuck = session.get(PushJob, job_id)
            assert stuck.done_at is None and stuck.attempts == 1  # claimed, never finished
        assert pushes_due(services) == []  # its lease still holds

        # Time passes: the lease runs out.
        with services.db.transaction() as session:
            past = utcnow() - dt.timedelta(minutes=10)
            session.execute(update(PushJob).where(PushJob.id == job_id)
                            .values(claimed_until=past, created_at=past))
        assert pushes_due(services) == [job_id]
        consumer = services.jobs.consumer(workers=1)
        consumer.start()
        try:
            services.jobs.sweep_push_jobs.call_local()  # the periodic sweep, run now
            _wait(lambda: _done(services, job_id))
        finally:
            consumer.stop(graceful=True)
            services.close()
        tokens = [r.token for r in apns.received]
        assert tokens == [TOKEN, TOKEN]  # the one that hung, then the redelivery
    with services.db.session() as session:
        assert session.get(PushJob, job_id).attempts == 2


def pushes_due(services) -> list[int]:  # type: ignore[no-untyped-def]
    from app import pushes

    return pushes.due_jobs(services)


def _done(services, job_id: int) -> bool:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.get(PushJob, job_id).done_at is not None

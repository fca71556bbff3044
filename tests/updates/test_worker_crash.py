"""At-least-once: a `passerelle worker` process killed in the middle of a batch of pushes
loses nothing. Its jobs stay undone in the outbox (outcomes are recorded for the batch
at once, after APNs answered); once their lease has run out the sweeper queues a drain
and another worker delivers them all."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from collections import Counter

from sqlalchemy import select, update

from app.infra.models import Card, Program, PushJob, Registration, utcnow
from tests.apns_standin import ApnsStandin
from tests.waiting import wait_until as _wait

PASS_TYPE = "pass.dev.passerelle.demo"
TOKEN = "cc" * 32
OTHERS = [f"{n:x}" * 64 for n in range(4)]



def test_killed_worker_loses_no_push(services, demo, keep_signal_handlers) -> None:  # type: ignore[no-untyped-def]
    settings = services.settings
    certs_path = settings.certs_path
    with ApnsStandin(client_ca_files=[certs_path / "dev" / "root-ca.pem",
                                      certs_path / "wwdr" / "dev-wwdr.pem"]) as apns:
        settings.apns_url, settings.apns_ca_file = apns.url, str(apns.ca_file)
        # The first push hangs long enough for us to kill the worker mid-job; the other
        # cards of the same batch are answered at once.
        apns.script[TOKEN] = [(200, None, 30.0)]
        with services.db.transaction(demo["tenant_id"]) as session:
            card = session.scalar(select(Card).join(Program).where(Program.slug == "club"))
            session.add(Registration(card_id=card.id, device_library_identifier="d-crash",
                                     pass_type_identifier=PASS_TYPE, push_token=TOKEN))
            job = PushJob(card_id=card.id, update_tag=1)
            session.add(job)
            others = session.scalars(select(Card).where(Card.id != card.id)).all()[:4]
            for n, other in enumerate(others):
                session.add(Registration(card_id=other.id, device_library_identifier=f"d-{n}",
                                         pass_type_identifier=PASS_TYPE,
                                         push_token=OTHERS[n]))
            other_jobs = [PushJob(card_id=other.id, update_tag=2 + n)
                          for n, other in enumerate(others)]
            session.add_all(other_jobs)
            session.flush()
            job_id = job.id
            batch = [job_id, *(j.id for j in other_jobs)]
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
            services.jobs.dispatch(batch)
            _wait(lambda: len(apns.received) == 5)  # the whole batch is out, one unanswered
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
        finally:
            if worker.poll() is None:
                worker.kill()
        with services.db.session() as session:
            for stuck in session.scalars(select(PushJob).where(PushJob.id.in_(batch))):
                # Claimed, never finished: outcomes are recorded for the batch at once.
                assert stuck.done_at is None and stuck.attempts == 1
        assert pushes_due(services) == []  # the lease still holds

        # Time passes: the lease runs out.
        with services.db.transaction() as session:
            past = utcnow() - dt.timedelta(minutes=10)
            session.execute(update(PushJob).where(PushJob.id.in_(batch))
                            .values(claimed_until=past, created_at=past))
        assert pushes_due(services) == sorted(batch)
        consumer = services.jobs.consumer(workers=1)
        consumer.start()
        try:
            services.jobs.sweep_push_jobs.call_local()  # the periodic sweep, run now
            _wait(lambda: all(_done(services, i) for i in batch))
        finally:
            consumer.stop(graceful=True)
            services.close()
        # At least once: the batch went out again, the hung device included; nothing
        # more (no third push of anything).
        counts = Counter(r.token for r in apns.received)
        assert counts == {token: 2 for token in [TOKEN, *OTHERS[:len(batch) - 1]]}
    with services.db.session() as session:
        assert {session.get(PushJob, i).attempts for i in batch} == {2}


def pushes_due(services) -> list[int]:  # type: ignore[no-untyped-def]
    from app.updates import pushes

    return pushes.due_jobs(services)


def _done(services, job_id: int) -> bool:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.get(PushJob, job_id).done_at is not None

"""Import jobs are never lost: queue down at upload, worker dead mid-run, endless crashes."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from sqlalchemy import select, update

from app.customers import imports
from app.infra.models import Customer, ImportJob, utcnow
from tests.api_helpers import auth, make_key

API = "/api/v1"
CSV = b"external_id,email,points\nSW-1,sw1@example.com,10\nSW-2,sw2@example.com,20\n"


def _upload(client, services, demo) -> int:  # type: ignore[no-untyped-def]
    write = auth(make_key(services, demo["tenant_id"], "write"))
    response = client.post(f"{API}/customer-imports", data=CSV, content_type="text/csv",
                           headers=write)
    assert response.status_code == 202, response.get_json()
    return int(response.get_json()["id"])


def _job(services, job_id: int) -> ImportJob:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        job = session.get(ImportJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _set(services, job_id: int, **values) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        session.execute(update(ImportJob).where(ImportJob.id == job_id).values(**values))


def _imported(services) -> set[str]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return set(session.scalars(select(Customer.external_id).where(
            Customer.external_id.like("SW-%"))))


def test_a_job_the_queue_never_got_is_queued_again_by_the_sweeper(client, services, demo,  # type: ignore[no-untyped-def]
                                                                   monkeypatch) -> None:
    def queue_down(job_id: int) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(services.jobs, "run_import", queue_down)
    job_id = _upload(client, services, demo)  # accepted all the same
    assert _job(services, job_id).status == "queued"
    monkeypatch.undo()

    assert imports.sweep(services) == []  # too early: a busy queue may still get to it
    later = utcnow() + imports.REQUEUE_AFTER + dt.timedelta(seconds=1)
    assert imports.sweep(services, later) == [job_id]
    assert imports.sweep(services, later) == []  # queued once, not every minute
    services.jobs.huey.immediate = True  # the real periodic task, run in-process
    _set(services, job_id, created_at=utcnow() - 2 * imports.REQUEUE_AFTER,
         claimed_until=None)
    assert services.jobs.sweep_imports.call_local() == 1
    job = _job(services, job_id)
    assert (job.status, job.created, job.attempts) == ("done", 2, 1)
    assert _imported(services) == {"SW-1", "SW-2"}
    assert not Path(job.source_path).exists()


def test_a_job_whose_worker_died_is_run_again_and_a_live_one_is_left_alone(  # type: ignore[no-untyped-def]
        client, services, demo, monkeypatch) -> None:
    monkeypatch.setattr(services.jobs, "run_import", lambda job_id: None)  # nobody runs it
    job_id = _upload(client, services, demo)
    monkeypatch.undo()
    # A worker took it, then was killed: its lease still runs for now...
    _set(services, job_id, status="running", attempts=1,
         claimed_until=utcnow() + dt.timedelta(minutes=1))
    assert imports.run_job(services, job_id) == "skipped"
    assert imports.sweep(services) == []
    # ...and then runs out.
    _set(services, job_id, claimed_until=utcnow() - dt.timedelta(seconds=1))
    assert imports.sweep(services) == [job_id]
    assert _job(services, job_id).status == "queued"
    assert imports.run_job(services, job_id) == "done"
    job = _job(services, job_id)
    assert (job.attempts, job.claimed_until) == (2, None)
    assert _imported(services) == {"SW-1", "SW-2"}
    assert imports.run_job(services, job_id) == "done"  # a duplicate queue entry: no-op
    assert _job(services, job_id).attempts == 2


def test_a_file_that_kills_the_worker_every_time_ends_failed(client, services, demo,  # type: ignore[no-untyped-def]
                                                            monkeypatch) -> None:
    monkeypatch.setattr(services.jobs, "run_import", lambda job_id: None)
    job_id = _upload(client, services, demo)
    monkeypatch.undo()
    path = Path(_job(services, job_id).source_path)
    _set(services, job_id, status="running", attempts=imports.MAX_ATTEMPTS,
         claimed_until=utcnow() - dt.timedelta(seconds=1))
    assert imports.run_job(services, job_id) == "skipped"  # no fourth run
    assert imports.sweep(services) == []
    job = _job(services, job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert f"stopped {imports.MAX_ATTEMPTS} times" in job.errors[-1]["message"]
    assert not path.exists()
    body = client.get(f"{API}/customer-imports/{job_id}",
                      headers=auth(make_key(services, demo["tenant_id"], "read"))).get_json()
    assert body["status"] == "failed" and body["attempts"] == imports.MAX_ATTEMPTS


def test_a_long_import_keeps_its_lease(client, services, demo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(services.jobs, "run_import", lambda job_id: None)
    job_id = _upload(client, services, demo)
    monkeypatch.undo()
    monkeypatch.setattr(imports, "HEARTBEAT", dt.timedelta(milliseconds=50))
    seen: list[dt.datetime] = []
    real_import = imports.import_csv

    def slow_import(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(_job(services, job_id).claimed_until)
        time.sleep(0.5)
        seen.append(_job(services, job_id).claimed_until)
        return real_import(*args, **kwargs)

    monkeypatch.setattr(imports, "import_csv", slow_import)
    assert imports.run_job(services, job_id) == "done"
    assert seen[0] is not None and seen[1] > seen[0]  # renewed while it worked
    assert _job(services, job_id).claimed_until is None

"""Background jobs on Huey: push delivery and the outbox sweeper.

Embedded default: a SQLite-backed queue in the instance folder, no server to
run. With ``PASSERELLE_REDIS_URL`` set, the queue lives in Redis and any
number of workers on any number of machines share it.

Huey takes a task off the queue before running it, so a worker killed
mid-task loses that queue entry. Nothing is lost with it: the push job row
(app/updates.py) stays undone in the database, and the periodic sweeper
queues every job whose lease ran out. Delivery is at-least-once, and a
repeated push is harmless (the device just asks for its serials again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from huey import Huey, RedisHuey, SqliteHuey, crontab

from app import pushes
from app.config import Settings

log = logging.getLogger(__name__)


class JobQueue:
    """One Huey instance and its tasks, bound to one Services object."""

    def __init__(self, settings: Settings, services_factory: Callable[[], object]) -> None:
        self.huey: Huey = make_huey(settings)
        self._services_factory = services_factory
        self._services: object | None = None
        huey = self.huey

        @huey.task(name="deliver_push")
        def deliver_push(job_id: int) -> str:
            delivery = pushes.deliver(self.services, job_id)  # type: ignore[arg-type]
            if delivery.state == "retry" and delivery.retry_in is not None:
                deliver_push.schedule((job_id,), delay=delivery.retry_in)
            return delivery.state

        @huey.periodic_task(crontab(minute="*"), name="sweep_push_jobs")
        def sweep_push_jobs() -> int:
            job_ids = pushes.due_jobs(self.services)  # type: ignore[arg-type]
            for job_id in job_ids:
                deliver_push(job_id)
            if job_ids:
                log.info("re-queued %d push jobs", len(job_ids))
            return len(job_ids)

        self.deliver_push = deliver_push
        self.sweep_push_jobs = sweep_push_jobs

    @property
    def services(self) -> object:
        if self._services is None:
            self._services = self._services_factory()
        return self._services

    def dispatch(self, job_ids: list[int]) -> None:
        """Queue push jobs (called after the transaction that created them commits)."""
        for job_id in job_ids:
            try:
                self.deliver_push(job_id)
            except Exception:  # the queue is down: the sweeper will find the job
                log.exception("could not queue push job %s; the sweeper will retry", job_id)

    def consumer(self, workers: int = 2):  # type: ignore[no-untyped-def]
        return self.huey.create_consumer(workers=workers, worker_type="thread", periodic=True,
                                         check_worker_health=True, initial_delay=0.05,
                                         max_delay=1.0)


def make_huey(settings: Settings) -> Huey:
    if settings.redis_url:
        return RedisHuey("passerelle", url=settings.redis_url, results=False)
    settings.instance_path.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("passerelle", filename=str(settings.instance_path / "jobs.sqlite3"),
                      results=False)

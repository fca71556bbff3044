"""Background jobs on Huey: one delivery task and one per-minute sweeper per outbox
(push jobs are drained in batches rather than delivered one task per row).

Embedded default: a SQLite-backed queue in the instance folder, no server to
run. With ``PASSERELLE_REDIS_URL`` set, the queue lives in Redis and any
number of workers on any number of machines share it.

Huey takes a task off the queue before running it, so a worker killed
mid-task loses that queue entry. Nothing is lost with it: the row (a push job,
a CRM write, a webhook delivery, a card-link email, an import job) stays
undone in the database, and its sweeper queues every row nobody took or whose
lease ran out. Delivery is at-least-once; every attempt is idempotent (a
repeated push just makes the device ask for its serials again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from huey import Huey, RedisHuey, SqliteHuey, crontab
from huey.api import TaskWrapper
from huey.consumer import Consumer

from app.crm import outbox as crm_outbox
from app.customers import imports
from app.distribution import card_mail, enrollment
from app.infra.config import Settings
from app.ops import retention
from app.updates import pushes
from app.webhooks import outbound as webhooks_out

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)

#: Drain tasks started at once for a large dispatch: enough to keep every thread of a
#: couple of worker processes busy, each chain claiming its own batches.
DRAIN_CHAINS = 8

#: What one attempt says: its state, seconds until a retry is due, rows it unblocked.
Attempt = tuple[str, "float | None", Iterable[int]]


def _webhook(services: Services, delivery_id: int) -> Attempt:
    result = webhooks_out.deliver(services, delivery_id)
    return result.state, result.retry_in, ()


def _crm_write(services: Services, entry_id: int) -> Attempt:
    outcome = crm_outbox.attempt(services, entry_id)
    return outcome.state, outcome.retry_in, outcome.unblocked  # the customer's next write


def _card_mail(services: Services, entry_id: int) -> Attempt:

    sent = card_mail.attempt(services, entry_id)
    return sent.state, sent.retry_in, ()


def _import(services: Services, job_id: int) -> Attempt:

    return imports.run_job(services, job_id), None, ()


def _import_sweep(services: Services) -> list[int]:

    return imports.sweep(services)


def _card_mail_sweep(services: Services) -> list[int]:

    return card_mail.due_entries(services)


class JobQueue:
    """One Huey instance and its tasks, bound to one Services object."""

    def __init__(self, settings: Settings, services_factory: Callable[[], Services]) -> None:
        self.huey: Huey = make_huey(settings)
        self._services_factory = services_factory
        self._services: Services | None = None
        self.drain_push_jobs, self.sweep_push_jobs = self._push_tasks()
        self.deliver_webhook, self.sweep_webhooks = self._durable(
            "deliver_webhook", "sweep_webhooks", "webhook deliveries", _webhook,
            webhooks_out.due_deliveries)
        self.deliver_crm_write, self.sweep_crm_outbox = self._durable(
            "deliver_crm_write", "sweep_crm_outbox", "CRM writes", _crm_write,
            crm_outbox.due_entries)
        self.run_import, self.sweep_imports = self._durable(
            "run_import", "sweep_imports", "import jobs", _import, _import_sweep)
        self.send_card_mail, self.sweep_card_mail = self._durable(
            "send_card_mail", "sweep_card_mail", "card-link mails", _card_mail,
            _card_mail_sweep)
        self.prune = self.huey.periodic_task(crontab(minute="17", hour="3"), name="prune")(
            self._prune)

        @self.huey.periodic_task(crontab(minute="23"), name="forget_form_submissions")
        def forget_form_submissions() -> int:
            """Hourly: form submission ids whose pages can no longer be posted."""

            return enrollment.forget_submissions(self.services)

        self.forget_form_submissions = forget_form_submissions

    def _prune(self) -> dict[str, int]:
        """Daily retention (app/retention.py): every worker runs it; the deletes are
        batched and idempotent, so two workers at once only share the work."""
        settings = self.services.settings
        deleted = retention.prune(self.services.db, settings.retention)
        log.info("pruned %s", ", ".join(f"{t} {n}" for t, n in deleted.items() if n) or "nothing")
        return deleted

    def _durable(self, task_name: str, sweep_name: str, what: str,
                 attempt: Callable[[Services, int], Attempt],
                 due: Callable[[Services], list[int]]) -> tuple[TaskWrapper, TaskWrapper]:
        """A delivery task for one outbox row, and the sweeper that finds lost rows."""

        @self.huey.task(name=task_name)
        def deliver(row_id: int) -> str:
            state, retry_in, unblocked = attempt(self.services, row_id)
            if state == "retry" and retry_in is not None:
                deliver.schedule((row_id,), delay=retry_in)
            for following in unblocked:
                deliver(following)
            return state

        @self.huey.periodic_task(crontab(minute="*"), name=sweep_name)
        def sweep() -> int:
            row_ids = due(self.services)
            for row_id in row_ids:
                deliver(row_id)
            if row_ids:
                log.info("re-queued %d %s", len(row_ids), what)
            return len(row_ids)

        return deliver, sweep

    def _push_tasks(self) -> tuple[TaskWrapper, TaskWrapper]:
        """Pushes are drained, not delivered one by one: a task claims a batch of due
        jobs (any jobs, not named ones), delivers it, and queues its successor while
        batches come back full, so the work keeps moving between worker threads and
        processes. The per-minute sweeper is the safety net, as for every outbox."""

        @self.huey.task(name="drain_push_jobs")
        def drain() -> int:
            result = pushes.drain(self.services, max_batches=1)
            if result.more:
                drain()
            if result.retry_in is not None:
                drain.schedule(delay=max(result.retry_in, 1.0))
            return result.jobs

        @self.huey.periodic_task(crontab(minute="*"), name="sweep_push_jobs")
        def sweep() -> int:
            due = pushes.due_jobs(self.services, limit=pushes.BATCH)
            if due:
                self._drain(len(due))
                log.info("re-queued %d push jobs", len(due))
            return len(due)

        return drain, sweep

    def _drain(self, jobs: int) -> None:
        """Start enough drain chains for ``jobs`` new jobs (each claims BATCH at a time)."""
        chains = min(-(-jobs // pushes.BATCH), DRAIN_CHAINS)
        for _ in range(max(chains, 1)):
            self.drain_push_jobs()

    @property
    def services(self) -> Services:
        if self._services is None:
            self._services = self._services_factory()
        return self._services

    def _queue(self, task: str, row_ids: Iterable[int], what: str) -> None:
        """Queue rows whose transaction just committed. If the queue is down they wait
        in the database, and the sweeper queues them within minutes."""
        for row_id in row_ids:
            try:
                getattr(self, task)(row_id)
            except Exception:  # the sweeper will find the row
                log.exception("could not queue %s %s; the sweeper will retry", what, row_id)

    def dispatch(self, job_ids: list[int]) -> None:
        """New push jobs committed: drain them (the ids only say how many there are)."""
        if not job_ids:
            return
        try:
            self._drain(len(job_ids))
        except Exception:  # the sweeper will find the rows
            log.exception("could not queue a drain of %d push jobs; the sweeper will retry",
                          len(job_ids))

    def dispatch_crm(self, entry_ids: list[int]) -> None:
        self._queue("deliver_crm_write", entry_ids, "CRM write")

    def dispatch_webhooks(self, delivery_ids: list[int]) -> None:
        self._queue("deliver_webhook", delivery_ids, "webhook delivery")

    def dispatch_mail(self, entry_ids: list[int]) -> None:
        self._queue("send_card_mail", entry_ids, "card mail")

    def dispatch_imports(self, job_ids: list[int]) -> None:
        self._queue("run_import", job_ids, "import job")

    def consumer(self, workers: int = 2, shutdown_seconds: float = 20.0) -> Consumer:
        """SIGTERM (what systemd, containers and supervisors send) stops taking tasks
        and lets running ones finish for up to ``shutdown_seconds``; SIGINT too."""
        return self.huey.create_consumer(workers=workers, worker_type="thread", periodic=True,
                                         check_worker_health=True, initial_delay=0.05,
                                         max_delay=1.0, graceful_signal="TERM",
                                         shutdown_timeout=shutdown_seconds)


def make_huey(settings: Settings) -> Huey:
    if settings.redis_url:
        return RedisHuey("passerelle", url=settings.redis_url, results=False)
    settings.instance_path.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("passerelle", filename=str(settings.instance_path / "jobs.sqlite3"),
                      results=False)

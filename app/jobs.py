"""Background jobs on Huey: push and CRM-write delivery, and the outbox sweepers.

Embedded default: a SQLite-backed queue in the instance folder, no server to
run. With ``PASSERELLE_REDIS_URL`` set, the queue lives in Redis and any
number of workers on any number of machines share it.

Huey takes a task off the queue before running it, so a worker killed
mid-task loses that queue entry. Nothing is lost with it: the push job row
(app/updates.py) stays undone in the database, and the periodic sweeper
queues every job whose lease ran out. Delivery is at-least-once, and a
repeated push is harmless (the device just asks for its serials again).
Customer imports work alike: a job keeps a lease while it runs and
``sweep_imports`` queues again those no worker took or whose worker died
(app/imports.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from huey import Huey, RedisHuey, SqliteHuey, crontab

from app import pushes, webhooks_out
from app.config import Settings
from app.crm import outbox as crm_outbox

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
        self._add_webhook_tasks(huey)
        self._add_crm_tasks(huey)
        self._add_import_tasks(huey)
        self._add_mail_tasks(huey)

    def _add_import_tasks(self, huey: Huey) -> None:
        """Customer imports uploaded through the API (app/imports.py): one task per job."""

        @huey.task(name="run_import")
        def run_import(job_id: int) -> str:
            from app import imports

            return imports.run_job(self.services, job_id)  # type: ignore[arg-type]

        @huey.periodic_task(crontab(minute="*"), name="sweep_imports")
        def sweep_imports() -> int:
            from app import imports

            job_ids = imports.sweep(self.services)  # type: ignore[arg-type]
            for job_id in job_ids:
                run_import(job_id)
            if job_ids:
                log.info("re-queued %d import jobs", len(job_ids))
            return len(job_ids)

        self.run_import = run_import
        self.sweep_imports = sweep_imports

    def _add_mail_tasks(self, huey: Huey) -> None:
        """Card-link emails (app/card_mail.py) and their sweeper, as for pushes."""

        @huey.task(name="send_card_mail")
        def send_card_mail(entry_id: int) -> str:
            from app import card_mail

            outcome = card_mail.deliver(self.services, entry_id)  # type: ignore[arg-type]
            if outcome == "retry":
                delay = card_mail.retry_in(self.services, entry_id)  # type: ignore[arg-type]
                if delay is not None:
                    send_card_mail.schedule((entry_id,), delay=delay)
            return outcome

        @huey.periodic_task(crontab(minute="*"), name="sweep_card_mail")
        def sweep_card_mail() -> int:
            from app import card_mail

            entry_ids = card_mail.due_entries(self.services)  # type: ignore[arg-type]
            for entry_id in entry_ids:
                send_card_mail(entry_id)
            if entry_ids:
                log.info("re-queued %d card-link mails", len(entry_ids))
            return len(entry_ids)

        self.send_card_mail = send_card_mail
        self.sweep_card_mail = sweep_card_mail

    def _add_crm_tasks(self, huey: Huey) -> None:
        """CRM outbox delivery and its sweeper (app/crm/outbox.py), as for pushes."""

        @huey.task(name="deliver_crm_write")
        def deliver_crm_write(entry_id: int) -> str:
            outcome = crm_outbox.attempt(self.services, entry_id)  # type: ignore[arg-type]
            if outcome.state == "retry" and outcome.retry_in is not None:
                deliver_crm_write.schedule((entry_id,), delay=outcome.retry_in)
            for following in outcome.unblocked:  # the customer's next write, in order
                deliver_crm_write(following)
            return outcome.state

        @huey.periodic_task(crontab(minute="*"), name="sweep_crm_outbox")
        def sweep_crm_outbox() -> int:
            entry_ids = crm_outbox.due_entries(self.services)  # type: ignore[arg-type]
            for entry_id in entry_ids:
                deliver_crm_write(entry_id)
            if entry_ids:
                log.info("re-queued %d CRM writes", len(entry_ids))
            return len(entry_ids)

        self.deliver_crm_write = deliver_crm_write
        self.sweep_crm_outbox = sweep_crm_outbox

    def _add_webhook_tasks(self, huey: Huey) -> None:
        """Outbound webhook delivery and its sweeper (app/webhooks_out.py), as for pushes."""

        @huey.task(name="deliver_webhook")
        def deliver_webhook(delivery_id: int) -> str:
            result = webhooks_out.deliver(self.services, delivery_id)  # type: ignore[arg-type]
            if result.state == "retry" and result.retry_in is not None:
                deliver_webhook.schedule((delivery_id,), delay=result.retry_in)
            return result.state

        @huey.periodic_task(crontab(minute="*"), name="sweep_webhooks")
        def sweep_webhooks() -> int:
            delivery_ids = webhooks_out.due_deliveries(self.services)  # type: ignore[arg-type]
            for delivery_id in delivery_ids:
                deliver_webhook(delivery_id)
            if delivery_ids:
                log.info("re-queued %d webhook deliveries", len(delivery_ids))
            return len(delivery_ids)

        self.deliver_webhook = deliver_webhook
        self.sweep_webhooks = sweep_webhooks

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

    def dispatch_crm(self, entry_ids: list[int]) -> None:
        """Queue CRM outbox entries (called after the transaction that created them commits)."""
        for entry_id in entry_ids:
            try:
                self.deliver_crm_write(entry_id)
            except Exception:  # the queue is down: the sweeper will find the entry
                log.exception("could not queue CRM write %s; the sweeper will retry", entry_id)

    def dispatch_mail(self, entry_ids: list[int]) -> None:
        for entry_id in entry_ids:
            try:
                self.send_card_mail(entry_id)
            except Exception:  # the queue is down: the sweeper will find the entry
                log.exception("could not queue card mail %s; the sweeper will retry", entry_id)

    def dispatch_import(self, job_id: int) -> None:
        """Queue an import job (after the transaction that created it commits). If the
        queue is down the job stays "queued" and the sweeper queues it later."""
        try:
            self.run_import(job_id)
        except Exception:
            log.exception("could not queue import job %s; the sweeper will retry", job_id)

    def dispatch_webhooks(self, delivery_ids: list[int]) -> None:
        """Queue webhook deliveries (called after the transaction that created them commits)."""
        for delivery_id in delivery_ids:
            try:
                self.deliver_webhook(delivery_id)
            except Exception:  # the queue is down: the sweeper will find the delivery
                log.exception("could not queue webhook delivery %s; the sweeper will retry",
                              delivery_id)

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

"""Customer writes from the API: single upserts, and bulk imports run as background jobs.

Single records (PUT/PATCH on the API) and NDJSON lines are written by
``customers.upsert_customer``, the one write path of every customer: the
same field, attribute and email rules as everywhere. CSV uploads go through
``customers.import_csv`` itself, so a file behaves the same from the shell
and from the API.

Bulk imports are ``ImportJob`` rows: the upload is saved under the instance
folder, the job is queued on Huey (``app/jobs.py``), and the worker writes the
counts and per-row errors back to the row, where ``GET /customer-imports/{id}``
reads them. Every batch commits on its own, so good rows are kept whatever
happens to the others, and a job re-run after a crash only re-applies
idempotent upserts.

Nothing accepted is lost: a worker claims a job with one conditional UPDATE and
renews its lease from a heartbeat thread while it imports. The per-minute
sweeper (:func:`sweep`) queues again a job no worker took (the queue was down
when it was uploaded) and a job whose worker died (its lease ran out), up to
``MAX_ATTEMPTS`` runs; then the job fails with a message saying so.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from app.customers.customers import (
    BATCH_SIZE,
    STANDARD_FIELDS,
    CustomerChanges,
    CustomerDataError,
    ImportFileError,
    UpsertCounts,
    check_consent_kind,
    check_external_id,
    clean_attribute,
    clean_standard,
    import_csv,
    upsert_customer,
)
from app.customers.customers import MAX_ATTRIBUTE_NUMBER as MAX_ATTRIBUTE_NUMBER  # for app.segments
from app.infra import outbox
from app.infra.db import IMPORT_DISPATCH_KEY
from app.infra.models import Customer, ImportJob, utcnow
from app.updates import refresh as updates
from app.updates.rendering import RenderPool

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)

FORMATS = ("csv", "ndjson")
MAX_ROW_ERRORS = 1000  # a job keeps this many row errors; the count says how many there were
LEASE = dt.timedelta(minutes=5)  # a running job's lease, renewed every HEARTBEAT
HEARTBEAT = dt.timedelta(minutes=1)
REQUEUE_AFTER = dt.timedelta(minutes=2)  # a queued job nobody took is queued again after this
MAX_ATTEMPTS = 3  # runs a job may start; a file that kills the worker every time ends "failed"


def find_customer(session: Session, external_id: str) -> Customer | None:
    """In a tenant session: that tenant's customer with this external id (API lookups)."""
    return session.scalar(select(Customer).where(Customer.external_id == external_id))


# -- NDJSON -----------------------------------------------------------------------------

def parse_ndjson_record(record: object) -> tuple[str, CustomerChanges]:
    """One NDJSON object -> (external_id, changes). Absent or null fields are left alone,
    as blank CSV cells are."""
    if not isinstance(record, dict):
        raise CustomerDataError("each line must be a JSON object")
    external_id = record.get("external_id")
    if not isinstance(external_id, str):
        raise CustomerDataError("external_id is required and must be text")
    check_external_id(external_id.strip())
    changes = CustomerChanges()
    for name, value in record.items():
        if name == "external_id" or value is None:
            continue
        if name in STANDARD_FIELDS:
            if not isinstance(value, str):
                raise CustomerDataError(f"{name}: must be text")
            if value.strip():
                changes.fields[name] = clean_standard(name, value)
        elif name == "attributes":
            if not isinstance(value, dict):
                raise CustomerDataError("attributes: must be an object")
            for key, item in value.items():
                changes.attributes[key] = clean_attribute(key, item)
        elif name == "consents":
            if not isinstance(value, dict) or not all(isinstance(v, bool)
                                                      for v in value.values()):
                raise CustomerDataError("consents: must be an object of true/false")
            for kind, granted in value.items():
                changes.consents[check_consent_kind(kind)] = granted
        else:
            raise CustomerDataError(f"unknown field {name!r} (free values go under "
                                    f"\"attributes\")")
    return external_id.strip(), changes


def check_ndjson(data: bytes) -> None:
    """An NDJSON upload's shape, checked before it is accepted: UTF-8, and every non-blank
    line one JSON object (not null, a list or a bare value). What each object says is
    the job's to check, row by row."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"the file is not valid UTF-8 (byte {exc.start})") from None
    records, bad = 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            value = None
        if isinstance(value, dict):
            records += 1
        else:
            bad.append(number)
    if bad:
        shown = ", ".join(str(n) for n in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise ImportFileError(f"every line must be one JSON object; not so on line(s) {shown}")
    if not records:
        raise ImportFileError("the file holds no records")


@dataclass
class BulkReport(UpsertCounts):
    errors: list[tuple[int, str]] = field(default_factory=list)
    card_problems: list[str] = field(default_factory=list)


def import_ndjson(session: Session, services: Services, tenant_id: int, path: Path,
                  refresher: updates.CardRefresher | None = None) -> BulkReport:
    """Upsert one customer per line; a bad line is reported with its number and skipped.

    ``refresher``: re-renders the changed customers' cards a batch at a time (give
    one with a RenderPool to use every core)."""
    refresher = refresher or updates.CardRefresher(services)
    report = BulkReport()
    changed: list[Customer] = []
    pending = 0
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"the file is not valid UTF-8 (byte {exc.start})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            external_id, changes = parse_ndjson_record(json.loads(line))
        except json.JSONDecodeError as exc:
            report.errors.append((number, f"not JSON ({exc.msg})"))
            continue
        except (CustomerDataError, RecursionError) as exc:
            report.errors.append((number, str(exc) or "invalid record"))
            continue
        try:
            result = upsert_customer(session, tenant_id, external_id, changes,
                                     source="import")
        except CustomerDataError as exc:
            report.errors.append((number, str(exc)))
            continue
        assert result is not None
        report.count(result, changed)
        pending += 1
        if pending >= BATCH_SIZE:
            _commit_batch(session, refresher, changed, report)
            changed, pending = [], 0
    _commit_batch(session, refresher, changed, report)
    return report


def _commit_batch(session: Session, refresher: updates.CardRefresher, changed: list[Customer],
                  report: BulkReport) -> None:
    session.commit()  # the data is safe before any card work
    if changed:
        report.card_problems.extend(refresher.on_changed(session, changed))
        session.commit()


# -- jobs -------------------------------------------------------------------------------

def uploads_dir(services: Services) -> Path:
    folder = Path(services.settings.instance_path) / "imports"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def create_job(session: Session, services: Services, tenant_id: int, fmt: str,
               body: bytes) -> ImportJob:
    """Save the upload and add a queued job row (queue it after commit)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    path = uploads_dir(services) / f"{uuid.uuid4().hex}.{fmt}"
    path.write_bytes(body)
    job = ImportJob(tenant_id=tenant_id, status="queued", format=fmt, source_path=str(path),
                    errors=[])
    session.add(job)
    session.flush()
    outbox.queue_after_commit(session, IMPORT_DISPATCH_KEY, [job.id])
    return job


def run_job(services: Services, job_id: int,
            on_progress: Callable[[int], None] | None = None) -> str:
    """Run one import job to completion; returns its final status.

    Called by the worker. A job already done or failed is left alone, so a
    duplicated queue entry is harmless.
    """
    with services.db.transaction() as session:
        job = session.get(ImportJob, job_id)
        if job is None:
            return "missing"
        if job.status in ("done", "failed"):
            return job.status
        if not _claim(session, job_id, utcnow()):
            return "skipped"  # another worker holds it
        tenant_id, fmt, path = job.tenant_id, job.format, Path(job.source_path)
    errors: list[tuple[int, str]] = []
    counts = (0, 0, 0)
    status = "done"
    try:
        with _Heartbeat(services, job_id), services.db.tenant_session(tenant_id) as session, \
                updates.CardRefresher(services, RenderPool()) as refresher:
            if fmt == "csv":
                csv_report = import_csv(session, tenant_id, path, progress=on_progress,
                                        on_changed=refresher.on_changed)
                counts = (csv_report.created, csv_report.updated, csv_report.unchanged)
                errors = [(e.line, e.message) for e in csv_report.errors]
            else:
                bulk = import_ndjson(session, services, tenant_id, path, refresher)
                counts = (bulk.created, bulk.updated, bulk.unchanged)
                errors = bulk.errors
    except ImportFileError as exc:
        status = "failed"
        errors = [(0, str(exc).replace(str(path), "the file"))]
    except Exception:  # a job must end in a state people can read
        log.exception("import job %s failed", job_id)
        status = "failed"
        errors = [(0, "internal error while importing; the rows before it are kept")]
    with services.db.transaction() as session:
        job = session.get(ImportJob, job_id)
        assert job is not None
        job.status = status
        job.created, job.updated, job.unchanged = counts
        job.total_rows = sum(counts) + len([e for e in errors if e[0] > 0])
        job.errors = [{"line": line, "message": message}
                      for line, message in errors[:MAX_ROW_ERRORS]]
        job.finished_at, job.claimed_until = utcnow(), None
    path.unlink(missing_ok=True)
    return status


def _claim(session: Session, job_id: int, now: dt.datetime) -> bool:
    """Take a queued job (or a running one whose worker's lease ran out) for this worker."""
    taken = session.execute(
        update(ImportJob)
        .where(ImportJob.id == job_id, ImportJob.attempts < MAX_ATTEMPTS,
               or_(ImportJob.status == "queued",
                   and_(ImportJob.status == "running", ImportJob.claimed_until < now)))
        .values(status="running", claimed_until=now + LEASE, attempts=ImportJob.attempts + 1)
        .execution_options(synchronize_session=False))
    return cast("CursorResult[Any]", taken).rowcount == 1  # an UPDATE's result


class _Heartbeat:
    """Renews a running job's lease every HEARTBEAT from a thread of its own, so a long
    import keeps it and a dead worker (thread and all) loses it."""

    def __init__(self, services: Services, job_id: int) -> None:
        self.services, self.job_id = services, job_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"import-{job_id}-lease",
                                       daemon=True)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT.total_seconds()):
            try:
                with self.services.db.transaction() as session:
                    session.execute(update(ImportJob)
                                    .where(ImportJob.id == self.job_id,
                                           ImportJob.status == "running")
                                    .values(claimed_until=utcnow() + LEASE))
            except Exception:  # a missed beat is retried at the next one
                log.warning("could not renew the lease of import job %s", self.job_id,
                            exc_info=True)


def sweep(services: Services, now: dt.datetime | None = None) -> list[int]:
    """Jobs to queue again: queued ones nobody took, running ones whose worker died.

    A job that already started ``MAX_ATTEMPTS`` times fails here instead, with
    its rows so far kept. Each job queued again is left alone for REQUEUE_AFTER.
    """
    now = now or utcnow()
    abandoned = and_(ImportJob.status == "running", ImportJob.claimed_until < now)
    waiting = and_(ImportJob.status == "queued", ImportJob.created_at < now - REQUEUE_AFTER,
                   or_(ImportJob.claimed_until.is_(None), ImportJob.claimed_until < now))
    with services.db.transaction() as session:
        jobs = list(session.scalars(select(ImportJob).where(or_(abandoned, waiting))
                                    .order_by(ImportJob.id).limit(100).with_for_update()))
        again = []
        for job in jobs:
            if job.attempts >= MAX_ATTEMPTS:
                _give_up(job, now)
                continue
            job.status, job.claimed_until = "queued", now + REQUEUE_AFTER
            again.append(job.id)
    return again


def _give_up(job: ImportJob, now: dt.datetime) -> None:
    log.error("import job %s stopped %d times before finishing: failed", job.id, job.attempts)
    job.status, job.finished_at, job.claimed_until = "failed", now, None
    job.errors = [*(job.errors or []), {
        "line": 0, "message": f"the import stopped {job.attempts} times before finishing "
                              "(the worker was stopped or ran out of memory); the rows "
                              "imported before that are kept"}][:MAX_ROW_ERRORS]
    Path(job.source_path).unlink(missing_ok=True)

"""Delivering push jobs in bulk: tell every registered device of a changed card to fetch it.

A worker drains due jobs in batches (:func:`drain`): one statement claims up to
:data:`BATCH` jobs with a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
workers never wait on each other's rows; SQLite serializes writers anyway), so
two workers never push the same job at once and a job whose worker died is
picked up again when its lease ends. The batch's device tokens are coalesced
per certificate (a device holding several cards of one pass type gets one push:
it asks for all its serials), pushed concurrently over the worker's open HTTP/2
connection (app/apns.py), and the outcomes are written with a handful of
set-based statements in one commit:

- 410 Unregistered: the registration is removed and an install event says so;
- 400 BadDeviceToken / DeviceTokenNotForTopic: the registration is flagged and
  no longer pushed (usually a certificate or environment mix-up);
- 429, 5xx, network errors: those devices are retried with exponential backoff
  for up to 24 hours;
- 403 and topic errors: recorded for operators (the certificate is at fault).

While connecting to APNs fails for a certificate, its circuit breaker (app/apns.py)
answers at once without a handshake, the jobs wait at least until its next
attempt, and the identity row says so (``apns_problem``) for `certs check`,
/healthz and the dashboard.

Google Wallet jobs (``channel = "google"``) are claimed in smaller batches and
patched concurrently by a few threads, within Google's published limit of 20
requests per second per project (developers.google.com/wallet/generic/resources/faq).

Per-device outcomes (``push_attempts``) and finished jobs are a bounded window:
app/retention.py deletes them once old (``passerelle prune``, and daily in the worker).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    SQLColumnExpression,
    any_,
    delete,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from app.infra import instruments, outbox
from app.infra.db import rowcount, table_of
from app.infra.http import transient
from app.infra.models import (
    AppleIdentity,
    Card,
    Program,
    PushAttempt,
    PushJob,
    Registration,
    utcnow,
)
from app.tracking import install_state
from app.updates.apns import ApnsError, PushResult
from app.updates.google_client import GoogleApiError, GoogleWalletClient
from app.updates.google_wallet import GoogleNotConfigured, sync_object
from app.wallet.certs import CertificateError

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)

LEASE = dt.timedelta(minutes=2)  # the default of PASSERELLE_PUSH_LEASE_SECONDS
GIVE_UP_AFTER = dt.timedelta(hours=24)
FIRST_RETRY = dt.timedelta(seconds=10)
MAX_RETRY = dt.timedelta(hours=1)
#: Apple jobs claimed per statement: pushed together, recorded together.
BATCH = 1000
#: Google jobs per claim: at 20 requests/s, a batch is done well within its lease.
GOOGLE_BATCH = 100
GOOGLE_REQUESTS_PER_SECOND = 20.0  # Google Wallet API, per project (published limit)
GOOGLE_CONCURRENCY = 8


@dataclass(frozen=True)
class Delivery:
    job_id: int
    state: str  # "done" | "retry" | "skipped" | "gave_up"
    retry_in: float | None = None  # seconds, when state == "retry"
    sent: int = 0


@dataclass
class Drained:
    """What one :func:`drain` did."""

    jobs: int = 0
    sent: int = 0  # devices APNs accepted
    states: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    retry_in: float | None = None  # seconds until the earliest retry is due
    more: bool = False  # the last claim came back full: more jobs are probably due

    def add(self, delivery: Delivery) -> None:
        self.jobs += 1
        self.sent += delivery.sent
        self.states[delivery.state] += 1
        if delivery.retry_in is not None:
            self.retry_in = (delivery.retry_in if self.retry_in is None
                             else min(self.retry_in, delivery.retry_in))


def _among(session: Session, column: SQLColumnExpression[int],
           ids: Iterable[int]) -> ColumnElement[bool]:
    """``column IN ids``. On PostgreSQL as ``= ANY(:array)``: one parameter instead of
    a thousand, so the statement is compiled and parsed once, not per batch."""
    ids = list(ids)
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(literal(ids, type_=postgresql.ARRAY(Integer)))
    return column.in_(ids)


def backoff(attempt: int) -> dt.timedelta:
    return outbox.backoff(attempt, FIRST_RETRY, MAX_RETRY)


def claim(session: Session, job_id: int, now: dt.datetime,
          lease: dt.timedelta = LEASE) -> bool:
    """Take the job for one lease; False if done, leased by another worker, or not due."""
    return outbox.claim(session, PushJob, job_id, now, lease)


def deliver(services: Services, job_id: int) -> Delivery:
    """Deliver one job now (if it is claimable): the batch path with a batch of one."""
    now = utcnow()
    with services.db.session() as session:
        lease = dt.timedelta(seconds=services.settings.push_lease_seconds)
        if not claim(session, job_id, now, lease):
            return Delivery(job_id, "skipped")
    [result] = deliver_claimed(services, [job_id], now)
    return result


def drain(services: Services, max_batches: int | None = None,
          batch: int = BATCH) -> Drained:
    """Claim due jobs batch after batch and deliver them, until none is due."""
    result = Drained()
    batches = 0
    lease = dt.timedelta(seconds=services.settings.push_lease_seconds)
    while max_batches is None or batches < max_batches:
        batches += 1
        claimed = 0
        for channel, size in (("apple", batch), ("google", min(batch, GOOGLE_BATCH))):
            now = utcnow()
            with services.db.session() as session:
                job_ids = outbox.claim_batch(session, PushJob, now, lease, size,
                                             PushJob.channel == channel)
                _held.hold(job_ids)
            result.more = len(job_ids) == size if channel == "apple" else \
                result.more or len(job_ids) == size
            if job_ids:
                claimed += len(job_ids)
                try:
                    for delivery in deliver_claimed(services, job_ids, now):
                        result.add(delivery)
                finally:
                    _held.drop(job_ids)
        if not claimed:
            break
    return result


class _Held:
    """Push jobs this process has claimed and not yet finished recording."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[int] = set()

    def hold(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.update(ids)

    def drop(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.difference_update(ids)

    def take_all(self) -> list[int]:
        with self._lock:
            ids, self._ids = sorted(self._ids), set()
        return ids


_held = _Held()


def release_held(services: Services) -> int:
    """On shutdown: give back the leases of jobs this process still holds, so another
    worker takes them at once instead of after the lease runs out. Pushes of those
    jobs that went out before the release are sent again (at-least-once)."""
    ids = _held.take_all()
    if not ids:
        return 0
    with services.db.session() as session:
        released = session.execute(
            update(PushJob).where(_among(session, PushJob.id, ids), PushJob.done_at.is_(None))
            .values(claimed_until=None).execution_options(synchronize_session=False))
        session.commit()
    count = rowcount(released)
    log.warning("released %d push job(s) still in flight at shutdown", count)
    return count


def deliver_claimed(services: Services, job_ids: list[int], now: dt.datetime
                    ) -> list[Delivery]:
    """Deliver jobs this worker has claimed; outcomes recorded in one transaction."""
    with services.db.session() as session:
        jobs = session.execute(
            select(PushJob.id, PushJob.card_id, PushJob.channel, PushJob.registration_ids,
                   PushJob.created_at, PushJob.attempts)
            .where(_among(session, PushJob.id, job_ids))).all()
    apple = [_Job(*row) for row in jobs if row.channel != "google"]
    google = [_Job(*row) for row in jobs if row.channel == "google"]
    results: list[Delivery] = []
    if apple:
        results += _deliver_apple(services, apple, now)
    if google:
        results += _deliver_google(services, google, now)
    return results


# -- Apple ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    id: int
    card_id: int
    channel: str
    registration_ids: list[int] | None
    created_at: dt.datetime
    attempts: int


@dataclass(frozen=True)
class _Device:
    id: int
    card_id: int
    tenant_id: int
    device: str
    token: str


def _deliver_apple(services: Services, jobs: list[_Job], now: dt.datetime) -> list[Delivery]:

    card_ids = sorted({job.card_id for job in jobs})
    with services.db.session() as session:
        devices = [_Device(*row) for row in session.execute(
            select(Registration.id, Registration.card_id, Registration.tenant_id,
                   Registration.device_library_identifier, Registration.push_token)
            .where(_among(session, Registration.card_id, card_ids),
                   Registration.push_problem.is_(None)))]
        pass_types = dict(session.execute(
            select(Card.id, Program.pass_type_identifier).join(Program, Program.id == Card.program_id)
            .where(_among(session, Card.id, card_ids))).all())
        identities = {i.pass_type_identifier: i for i in session.scalars(
            select(AppleIdentity).where(AppleIdentity.pass_type_identifier.in_(
                set(pass_types.values()))))}
        session.expunge_all()
        session.commit()  # no transaction stays open while APNs answers

        # Which devices each job tells (a retry names its remaining registrations).
        by_card: dict[int, list[_Device]] = defaultdict(list)
        for device in devices:
            by_card[device.card_id].append(device)
        job_devices: dict[int, list[_Device]] = {}
        for job in jobs:
            wanted = set(job.registration_ids) if job.registration_ids is not None else None
            job_devices[job.id] = [d for d in by_card.get(job.card_id, ())
                                   if wanted is None or d.id in wanted]

        # Coalesce: one push per token per certificate, whatever the number of jobs/cards.
        tokens_by_type: dict[str, dict[str, None]] = defaultdict(dict)
        for job in jobs:
            pass_type = pass_types.get(job.card_id)
            for device in job_devices[job.id]:
                if pass_type is not None:
                    tokens_by_type[pass_type][device.token] = None
        results: dict[tuple[str, str], PushResult] = {}
        wait_until: dict[str, dt.datetime] = {}  # pass type -> its breaker's next attempt
        for pass_type, tokens in tokens_by_type.items():
            identity = identities.get(pass_type)
            try:
                if identity is None:
                    raise ApnsError(f"no Apple certificate is registered for {pass_type}")
                client = services.apns_client(identity)
                answers = client.push(pass_type, list(tokens))
                problem = client.problem()
            except (ApnsError, CertificateError, OSError) as exc:
                reason = f"cannot push for {pass_type}: {exc}"[:200]
                log.error("%s", reason)
                answers = [PushResult(t, None, reason, None) for t in tokens]
                problem = None
            for pushed in answers:
                results[(pass_type, pushed.push_token)] = pushed
            if identity is not None:
                _record_apns_status(session, identity, problem)
                if problem is not None:
                    wait_until[pass_type] = problem.next_attempt_at

        # Outcomes, set-based: one row per device pushed, then registrations, then jobs.
        attempts, gone, flagged = [], [], defaultdict(list)
        seen: set[int] = set()
        outcome_of: dict[int, str] = {}
        for job in jobs:
            pass_type = pass_types.get(job.card_id)
            for device in job_devices[job.id]:
                answer = results.get((pass_type or "", device.token))
                if answer is None or device.id in seen:
                    continue
                seen.add(device.id)
                outcome_of[device.id] = answer.outcome
                attempts.append({
                    "tenant_id": device.tenant_id, "card_id": device.card_id,
                    "device": device.device, "status": answer.status,
                    "outcome": answer.outcome, "reason": (answer.reason or "")[:200] or None,
                    "apns_id": answer.apns_id, "attempted_at": now})
                if answer.outcome == "unregistered":
                    gone.append(device)
                elif answer.outcome == "bad_token":
                    flagged[(answer.reason or "BadDeviceToken")[:64]].append(device.id)
                elif answer.outcome == "credentials":
                    log.error("APNs refused certificate for %s: %s", pass_type, answer.reason)
        if attempts:  # Core insert: the ORM's bulk path costs more than the rows do
            session.execute(insert(table_of(PushAttempt)), attempts)
        for reason, ids in flagged.items():
            session.execute(update(Registration).where(Registration.id.in_(ids))
                            .values(push_problem=reason, updated_at=now)
                            .execution_options(synchronize_session=False))
        if gone:
            session.execute(delete(Registration).where(Registration.id.in_(
                [d.id for d in gone])).execution_options(synchronize_session=False))
            for device in gone:  # rare: the install log keeps its per-card state machine
                card = session.get(Card, device.card_id)
                if card is not None:
                    install_state.record(session, card, "apple", "push_gone",
                                         device=device.device)

        deliveries: list[Delivery] = []
        done: list[int] = []
        retries: list[dict[str, Any]] = []
        for job in jobs:
            mine = job_devices[job.id]
            sent = sum(outcome_of.get(d.id) == "sent" for d in mine)
            retry_ids = [d.id for d in mine if outcome_of.get(d.id, "retry") == "retry"]
            if not retry_ids:
                done.append(job.id)
                deliveries.append(Delivery(job.id, "done", sent=sent))
            elif now - job.created_at > GIVE_UP_AFTER:
                done.append(job.id)
                deliveries.append(Delivery(job.id, "gave_up", sent=sent))
            else:
                not_before = now + backoff(job.attempts)
                paused = wait_until.get(pass_types.get(job.card_id) or "")
                if paused is not None and paused > not_before:
                    not_before = paused  # no point trying before the breaker lets us
                retries.append({"id": job.id, "registration_ids": retry_ids,
                                "not_before": not_before, "claimed_until": None})
                deliveries.append(Delivery(job.id, "retry", sent=sent,
                                           retry_in=(not_before - now).total_seconds()))
        if done:
            session.execute(update(PushJob).where(_among(session, PushJob.id, done))
                            .values(done_at=now, claimed_until=None)
                            .execution_options(synchronize_session=False))
        if retries:
            session.execute(update(PushJob), retries)  # executemany by primary key
        session.commit()
    instruments.push_outcomes("apple", Counter(outcome_of.values()))  # once recorded
    return deliveries


def _record_apns_status(session: Session, identity: AppleIdentity, problem: Any) -> None:
    """Keep the identity's APNs status as the breaker sees it (written only on change)."""
    if problem is None:
        if identity.apns_failing_since is None:
            return
        values: dict[str, Any] = {"apns_failing_since": None, "apns_problem": None,
                                  "apns_next_attempt_at": None}
        log.warning("APNs %s: connecting works again", identity.pass_type_identifier)
    else:
        values = {"apns_failing_since": identity.apns_failing_since or problem.failing_since,
                  "apns_problem": problem.reason[:200],
                  "apns_next_attempt_at": problem.next_attempt_at}
        if (identity.apns_problem, identity.apns_next_attempt_at) == \
                (values["apns_problem"], values["apns_next_attempt_at"]):
            return
    session.execute(update(AppleIdentity).where(AppleIdentity.id == identity.id)
                    .values(**values).execution_options(synchronize_session=False))


# -- Google ---------------------------------------------------------------------------------

class _RateLimit:
    """Token bucket shared by every thread using one Google client (one project)."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.per_second, self._clock, self._sleep = per_second, clock, sleep
        self._tokens, self._stamp = per_second, clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.per_second,
                                   self._tokens + (now - self._stamp) * self.per_second)
                self._stamp = now
                if self._tokens >= 1 - 1e-9:  # (float dust must not mean a nap of 0 s)
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self.per_second
            self._sleep(wait)


_limits: weakref.WeakKeyDictionary[object, _RateLimit] = weakref.WeakKeyDictionary()
_limits_lock = threading.Lock()


class _Throttled:
    """A Google client whose REST calls wait for the project's rate limit."""

    _CALLS = frozenset({"get", "insert", "patch", "add_message", "ensure"})

    def __init__(self, client: object) -> None:
        self._client = client
        with _limits_lock:
            limit = _limits.get(client)
            if limit is None:
                limit = _limits[client] = _RateLimit(GOOGLE_REQUESTS_PER_SECOND)
        self._limit = limit

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if name not in self._CALLS:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self._limit.acquire()
            return value(*args, **kwargs)

        return call


def _deliver_google(services: Services, jobs: list[_Job], now: dt.datetime) -> list[Delivery]:
    """Patch the cards' Google Wallet objects concurrently, within Google's request rate.

    One sync per card even when the batch holds several of its jobs, so two threads
    never sync one object at once and its notification budget (3 in 24 h, counted in
    app/google/wallet.py) is read and spent by one of them only."""
    latest: dict[int, _Job] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        latest[job.card_id] = job  # several changes of one card: one sync covers them
    with ThreadPoolExecutor(GOOGLE_CONCURRENCY, thread_name_prefix="google-sync") as pool:
        states = dict(zip(latest, pool.map(lambda job: _sync_google(services, job),
                                           latest.values())))
    deliveries: list[Delivery] = []
    done: list[int] = []
    retries: list[dict[str, Any]] = []
    for job in jobs:
        state = states.get(job.card_id, "done")
        if state == "retry" and now - job.created_at <= GIVE_UP_AFTER:
            delay = backoff(job.attempts)
            retries.append({"id": job.id, "not_before": now + delay, "claimed_until": None})
            deliveries.append(Delivery(job.id, "retry", retry_in=delay.total_seconds()))
        else:
            done.append(job.id)
            deliveries.append(Delivery(job.id, "gave_up" if state != "done" else "done"))
    with services.db.session() as session:
        if done:
            session.execute(update(PushJob).where(_among(session, PushJob.id, done))
                            .values(done_at=now, claimed_until=None)
                            .execution_options(synchronize_session=False))
        if retries:
            session.execute(update(PushJob), retries)
        session.commit()
    instruments.push_outcomes("google", Counter(states.values()))  # per card: done|retry|failed
    return deliveries


def _sync_google(services: Services, job: _Job) -> str:
    """One card's object: "done", "retry" (429/5xx/network) or "failed"."""

    with services.db.session() as session:
        card = session.get(Card, job.card_id)
        if card is None:
            return "done"
        try:
            client = services.google_client(card.program.tenant)
            # _Throttled forwards the client's REST methods through __getattr__.
            sync_object(session, services, cast("GoogleWalletClient", _Throttled(client)), card)
            session.commit()
        except GoogleNotConfigured:
            return "done"  # Google was switched off for this tenant: nothing to update
        except GoogleApiError as exc:
            # What landed before the failing call is kept (sync_object flushes each
            # step as it lands): a retry after a failed message sends the message,
            # not the PATCH again.
            session.commit()
            if transient(exc.status):
                log.warning("Google Wallet update of card %s: %s, will retry",
                            card.serial_number, exc)
                return "retry"
            log.error("Google Wallet update of card %s failed: %s", card.serial_number, exc)
            return "failed"
        except Exception:
            session.rollback()
            log.exception("Google Wallet update of card %s failed", job.card_id)
            return "retry"
    return "done"


# -- sweeping and pruning -------------------------------------------------------------------

def due_jobs(services: Services, quiet_for: dt.timedelta = dt.timedelta(seconds=30),
             limit: int = 1000) -> list[int]:
    """Jobs that should be running but are not queued anywhere we can see."""
    with services.db.session() as session:
        return outbox.due_ids(session, PushJob, utcnow(), quiet_for, limit)

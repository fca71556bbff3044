"""The lease mechanics shared by every outbox table (push jobs, CRM writes, webhooks).

Each table has ``done_at``, ``claimed_until``, ``not_before``, ``attempts`` and
``created_at``. A new row is queued once its transaction commits
(:func:`queue_after_commit`), never before (a worker could not see it) and never
after a rollback. A worker claims a row with one conditional UPDATE, so two
workers never run the same row; a dead worker's lease simply runs out, and the
per-minute sweeper finds the row again with :func:`due_ids`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, event, or_, select, update
from sqlalchemy.orm import Session

_PENDING = "passerelle.outbox_rows_to_queue"


def queue_after_commit(session: Session, dispatch_key: str, row_ids: list[int]) -> None:
    """Hand ``row_ids`` to the session's dispatcher under ``dispatch_key`` (set by
    ``Database.session``, see app/db.py) once this transaction commits."""
    session.info.setdefault(_PENDING, {}).setdefault(dispatch_key, []).extend(row_ids)


@event.listens_for(Session, "after_commit")
def _queue_committed(session: Session) -> None:
    for dispatch_key, row_ids in session.info.pop(_PENDING, {}).items():
        dispatch = session.info.get(dispatch_key)
        if row_ids and dispatch is not None:
            dispatch(row_ids)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def backoff(attempt: int, first: dt.timedelta, ceiling: dt.timedelta) -> dt.timedelta:
    """Exponential retry delay: ``first`` after the first attempt, doubling, capped."""
    return min(first * (2 ** max(attempt - 1, 0)), ceiling)


def claimable(model: Any, now: dt.datetime) -> list[ColumnElement[bool]]:
    """Not done, not leased by a live worker, and due."""
    return [model.done_at.is_(None),
            or_(model.claimed_until.is_(None), model.claimed_until < now),
            or_(model.not_before.is_(None), model.not_before <= now)]


def claim(session: Session, model: Any, row_id: int, now: dt.datetime, lease: dt.timedelta,
          *extra: ColumnElement[bool]) -> bool:
    """Take the row for one lease (counting an attempt) and commit; False if not claimable."""
    result = session.execute(
        update(model).where(model.id == row_id, *claimable(model, now), *extra)
        .values(claimed_until=now + lease, attempts=model.attempts + 1)
        .execution_options(synchronize_session=False))
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def claim_batch(session: Session, model: Any, now: dt.datetime, lease: dt.timedelta,
                limit: int, *extra: ColumnElement[bool]) -> list[int]:
    """Take up to ``limit`` claimable rows (oldest first) for one lease, counting an
    attempt on each, in one statement, and commit; their ids, ascending.

    PostgreSQL: the candidates are locked ``FOR UPDATE SKIP LOCKED``, so concurrent
    workers each get other rows instead of queueing on the same ones (and a row another
    worker claimed meanwhile fails the re-checked condition). SQLite runs one writer at
    a time, so the same UPDATE needs no locking clause there."""
    candidates = (select(model.id).where(*claimable(model, now), *extra)
                  .order_by(model.id).limit(limit))
    if session.get_bind().dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    claimed = session.scalars(
        update(model).where(model.id.in_(candidates.scalar_subquery()))
        .values(claimed_until=now + lease, attempts=model.attempts + 1)
        .returning(model.id).execution_options(synchronize_session=False)).all()
    session.commit()
    return sorted(claimed)


def due_ids(session: Session, model: Any, now: dt.datetime, quiet_for: dt.timedelta,
            limit: int, *extra: ColumnElement[bool]) -> list[int]:
    """Rows that should be running but are queued nowhere we can see: never delivered
    after ``quiet_for``, leases that ran out, retries that came due."""
    return list(session.scalars(
        select(model.id).where(*claimable(model, now), model.created_at < now - quiet_for,
                               *extra)
        .order_by(model.id).limit(limit)))

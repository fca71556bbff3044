"""The lease mechanics shared by every outbox table (push jobs, CRM writes, webhooks,
card mails, imports), and the one place where new rows are queued after commit.

Each table has ``done_at``, ``claimed_until``, ``not_before``, ``attempts`` and
``created_at``. A new row is queued once its transaction commits
(:func:`queue_after_commit`), never before (a worker could not see it) and never
after a rollback. A worker claims a row with one conditional UPDATE, so two
workers never run the same row; a dead worker's lease simply runs out, and the
per-minute sweeper finds the row again with :func:`due_ids`.

Savepoints. SQLAlchemy fires ``after_commit`` when a savepoint is *released*
too, and ``after_rollback`` when one is rolled back, although nothing is
visible to other connections until the outermost transaction commits. So rows
are kept per transaction level (the innermost savepoint, or the root
transaction): releasing a savepoint hands its rows to the enclosing level,
rolling one back forgets only its own rows, and only the outermost commit
dispatches. Queueing on a savepoint release made an inbound hook's webhook go
out a minute late (the worker could not see the row yet; the sweeper sent it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy import ColumnElement, CursorResult, or_, select, update
from sqlalchemy.orm import Session, SessionTransaction

if TYPE_CHECKING:
    from app.infra.db import Database

#: Session.info key: {transaction level: {dispatch key: [row ids or rows]}}.
_LEVELS = "passerelle.outbox_rows_to_queue"
#: Session.info key: {dispatch key: callable receiving committed ids, or None} (app/db.py).
DISPATCHERS = "passerelle.dispatchers"


def install(database: Database) -> None:
    """The after-commit hook of every outbox, on ``database``'s sessions (app/db.py)."""
    database.listen("after_commit", _queue_committed)
    database.listen("after_rollback", _forget_rolled_back)
    database.listen("after_transaction_end", _forget_at_end)


class _Row(Protocol):
    id: Any  # an int once flushed


def queue_after_commit(session: Session, dispatch_key: str,
                       rows: Iterable[int | _Row]) -> None:
    """Hand ``rows`` (ids, or ORM rows whose id is read at commit) to the database's
    dispatcher under ``dispatch_key`` (``Database.dispatchers``, see app/db.py) once the
    outermost transaction commits."""
    level = _level(session)
    if level is None:
        session.connection()  # begins the transaction the rows belong to
        level = _level(session)
    assert level is not None
    levels: dict[SessionTransaction, dict[str, list[int | _Row]]] = session.info.setdefault(
        _LEVELS, {})
    levels.setdefault(level, {}).setdefault(dispatch_key, []).extend(rows)


def _level(session: Session) -> SessionTransaction | None:
    """The transaction now committing or rolling back, or where new rows belong: the
    innermost open savepoint, else the root transaction."""
    return session.get_nested_transaction() or session.get_transaction()


def _enclosing(level: SessionTransaction) -> SessionTransaction:
    parent = level.parent
    assert parent is not None
    while parent.parent is not None and not parent.nested:  # skip flush subtransactions
        parent = parent.parent
    return parent


def _queue_committed(session: Session) -> None:
    levels = session.info.get(_LEVELS)
    level = _level(session)
    if not levels or level is None:
        return
    rows = levels.pop(level, {})
    if level.nested:  # a savepoint released: its rows now belong to the enclosing level
        target = levels.setdefault(_enclosing(level), {})
        for dispatch_key, items in rows.items():
            target.setdefault(dispatch_key, []).extend(items)
        return
    session.info.pop(_LEVELS, None)
    for dispatch_key, items in rows.items():
        ids = list(dict.fromkeys(item if isinstance(item, int) else item.id for item in items))
        ids = [row_id for row_id in ids if row_id is not None]
        dispatch = session.info.get(DISPATCHERS, {}).get(dispatch_key)
        if ids and dispatch is not None:
            dispatch(ids)


def _forget_rolled_back(session: Session) -> None:
    levels = session.info.get(_LEVELS)
    level = _level(session)
    if not levels:
        return
    if level is not None and level.nested:
        levels.pop(level, None)  # only the savepoint's rows; the enclosing ones stand
    else:
        session.info.pop(_LEVELS, None)


def _forget_at_end(session: Session, transaction: SessionTransaction) -> None:
    # A session closed without commit or rollback: nothing of it is ever queued.
    if transaction.parent is None:
        session.info.pop(_LEVELS, None)


def backoff(attempt: int, first: dt.timedelta, ceiling: dt.timedelta) -> dt.timedelta:
    """Exponential retry delay: ``first`` after the first attempt, doubling, capped."""
    return min(first * (1 << max(attempt - 1, 0)), ceiling)


def claimable(model: Any, now: dt.datetime) -> list[ColumnElement[bool]]:
    """Not done, not leased by a live worker, and due."""
    return [model.done_at.is_(None),
            or_(model.claimed_until.is_(None), model.claimed_until < now),
            or_(model.not_before.is_(None), model.not_before <= now)]


def claim(session: Session, model: Any, row_id: int, now: dt.datetime, lease: dt.timedelta,
          *extra: ColumnElement[bool]) -> bool:
    """Take the row for one lease (counting an attempt) and commit; False if not claimable.

    The one commit outside an entry point, on purpose: the lease must be durable
    before the task calls out, or a second worker would send the same row."""
    result = session.execute(
        update(model).where(model.id == row_id, *claimable(model, now), *extra)
        .values(claimed_until=now + lease, attempts=model.attempts + 1)
        .execution_options(synchronize_session=False))
    session.commit()
    return cast("CursorResult[Any]", result).rowcount == 1  # an UPDATE's result


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

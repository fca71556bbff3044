"""Database engine, sessions and the tenant guard.

Plain SQLAlchemy 2 (no Flask-SQLAlchemy) so that domain code, commands and
worker processes use the same sessions without an application context.

Tenant isolation is enforced here, not left to each query: a session opened
with ``tenant_session(tenant_id)`` adds ``tenant_id = :id`` to every ORM
SELECT of a tenant-owned model (``with_loader_criteria``), so no code path that
goes through such a session can read another tenant's rows.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Result, Table, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker, with_loader_criteria

from app.infra import events, logs, outbox
from app.infra.models import TenantOwned

TENANT_KEY = "tenant_id"
#: Session.info key: the entry point asked that no transaction stays open during an
#: outbound call made through :func:`before_outbound`.
COMMIT_BEFORE_CALLS = "passerelle.commit_before_outbound_calls"
#: Outbox queues: ``app.infra.outbox.queue_after_commit(session, <key>, rows)`` hands the rows
#: ids to ``Database.dispatchers[<key>]`` (the job queue's, set by Services) once the
#: outermost transaction commits.
PUSH_DISPATCH_KEY = "passerelle.dispatch_push_jobs"
WEBHOOK_DISPATCH_KEY = "passerelle.dispatch_webhook_deliveries"
CRM_DISPATCH_KEY = "passerelle.dispatch_crm_writes"
MAIL_DISPATCH_KEY = "passerelle.dispatch_mail"
IMPORT_DISPATCH_KEY = "passerelle.dispatch_imports"
DISPATCH_KEYS = (PUSH_DISPATCH_KEY, WEBHOOK_DISPATCH_KEY, CRM_DISPATCH_KEY, MAIL_DISPATCH_KEY,
                 IMPORT_DISPATCH_KEY)


class Database:
    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine: Engine = _make_engine(url, echo=echo)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        #: Who receives committed outbox rows, per queue: set by Services to the job queue.
        self.dispatchers: dict[str, Callable[[list[int]], None] | None] = dict.fromkeys(
            DISPATCH_KEYS)
        #: Who hears domain events published in this database's sessions (app.infra.events).
        self.subscribers: list[events.Subscriber] = []
        outbox.install(self)  # the one after-commit hook, for every outbox

    def listen(self, identifier: str, fn: Callable[..., Any]) -> None:
        """Register a Session event (before_flush, before_commit ...) for the sessions of
        this database only: listeners are installed where the process is put together
        (Services), never at import time."""
        event.listen(self._sessions, identifier, fn)

    def session(self, *, commit_before_calls: bool = False) -> Session:
        """An unscoped session: for system tasks (migrations, demo seeding, admin).

        ``commit_before_calls``: the entry point's choice that every outbound call
        made through :func:`before_outbound` (CRM reads, Google's REST API) first
        commits what the session did so far, so no row lock or snapshot is held
        while the network answers."""
        session = self._sessions()
        if commit_before_calls:
            session.info[COMMIT_BEFORE_CALLS] = True
        session.info[outbox.DISPATCHERS] = self.dispatchers
        session.info[events.SUBSCRIBERS] = self.subscribers
        return session

    def tenant_session(self, tenant_id: int, *, commit_before_calls: bool = False) -> Session:
        """A session that can only ever see rows of one tenant."""
        session = self.session(commit_before_calls=commit_before_calls)
        session.info[TENANT_KEY] = tenant_id
        logs.set_tenant(tenant_id)  # log lines of this request or task name the tenant
        return session

    @contextmanager
    def transaction(self, tenant_id: int | None = None, *,
                    commit_before_calls: bool = False) -> Iterator[Session]:
        """Open a session, commit on success, roll back on error, always close.

        With ``commit_before_calls`` the work is committed in steps, one before each
        outbound call (see :meth:`session`); an error rolls back the last step only."""
        session = (self.session(commit_before_calls=commit_before_calls) if tenant_id is None
                   else self.tenant_session(tenant_id, commit_before_calls=commit_before_calls))
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


_Client = TypeVar("_Client")


def before_outbound(session: Session, client: _Client) -> _Client:
    """``client`` (an object whose methods call out over the network) as code working in
    ``session`` must use it: if the entry point opened the session with
    ``commit_before_calls``, each method call first commits the session's transaction,
    and the rows written after the call start a new one. Otherwise ``client`` itself."""
    if not session.info.get(COMMIT_BEFORE_CALLS):
        return client
    return cast(_Client, _CommitFirst(session, client))


class _CommitFirst:
    def __init__(self, session: Session, client: object) -> None:
        self._session = session
        self._client = client

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            # Inside a savepoint the caller expects to roll back to it: keep it whole.
            if not self._session.in_nested_transaction():
                self._session.commit()
            return value(*args, **kwargs)

        return call


def _make_engine(url: str, *, echo: bool) -> Engine:
    # hide_parameters: bound values (emails, names, tokens) never reach log lines or
    # the text of a database error that a log line might carry.
    if url.startswith("sqlite"):
        # JSON stored as UTF-8, not \u-escaped: SQLite's JSON paths compare keys as
        # stored, so "$.\"fidélité\"" would never find an escaped key.
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30},
                               json_serializer=_json_utf8, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: object) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, hide_parameters=True)


def _json_utf8(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched (Session.execute types its result as the
    general Result; a DML statement's is a CursorResult)."""
    return cast("CursorResult[Any]", result).rowcount


def table_of(model: type[Any]) -> Table:
    """A mapped class's Table, for Core inserts and updates (``__table__`` is typed as
    any FromClause, our models' is always a Table)."""
    return cast(Table, model.__table__)


@event.listens_for(Session, "do_orm_execute")
def _scope_to_tenant(state: ORMExecuteState) -> None:
    tenant_id = state.session.info.get(TENANT_KEY)
    if tenant_id is None or not state.is_select:
        return
    state.statement = state.statement.options(
        with_loader_criteria(
            TenantOwned,
            lambda cls: cls.tenant_id == tenant_id,
            include_aliases=True,
        )
    )


@event.listens_for(Session, "before_flush")
def _refuse_foreign_writes(session: Session, _ctx: object, _instances: object) -> None:
    """A tenant session may only insert or change its own tenant's rows."""
    tenant_id = session.info.get(TENANT_KEY)
    if tenant_id is None:
        return
    for obj in list(session.new) + list(session.dirty) + list(session.deleted):
        if isinstance(obj, TenantOwned):
            # Mapped[int], yet None until the insert when the code left it to the session.
            if cast("int | None", obj.tenant_id) is None and obj in session.new:
                obj.tenant_id = tenant_id
            elif obj.tenant_id != tenant_id:
                raise PermissionError(
                    f"{type(obj).__name__} belongs to tenant {obj.tenant_id}, "
                    f"not to this session's tenant {tenant_id}"
                )

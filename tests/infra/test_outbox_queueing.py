"""Rows are queued after the OUTERMOST commit only, through one mechanism for every outbox
(app/outbox.py: queue_after_commit): a released savepoint hands its rows to the enclosing
transaction, a rolled-back savepoint forgets only its own rows."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.infra import outbox
from app.infra.db import DISPATCH_KEYS, PUSH_DISPATCH_KEY, WEBHOOK_DISPATCH_KEY
from app.infra.models import Tenant


@pytest.fixture()
def dispatched(services) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    seen: dict[str, list[int]] = {key: [] for key in DISPATCH_KEYS}
    services.db.dispatchers[PUSH_DISPATCH_KEY] = seen[PUSH_DISPATCH_KEY].extend
    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = seen[WEBHOOK_DISPATCH_KEY].extend
    return seen


def test_savepoint_release_is_not_a_commit(services, dispatched) -> None:  # type: ignore[no-untyped-def]
    session = services.db.session()
    outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [1])
    with session.begin_nested():
        outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [2])
        with session.begin_nested():
            outbox.queue_after_commit(session, WEBHOOK_DISPATCH_KEY, [3])
        assert dispatched[WEBHOOK_DISPATCH_KEY] == []
    assert dispatched[PUSH_DISPATCH_KEY] == []
    session.commit()
    assert dispatched[PUSH_DISPATCH_KEY] == [1, 2]
    assert dispatched[WEBHOOK_DISPATCH_KEY] == [3]
    session.commit()  # nothing left over for the next transaction
    assert dispatched[PUSH_DISPATCH_KEY] == [1, 2]
    session.close()


def test_rolled_back_savepoint_forgets_only_its_rows(services, dispatched) -> None:  # type: ignore[no-untyped-def]
    session = services.db.session()
    outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [1])
    with pytest.raises(LookupError), session.begin_nested():
        outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [2])
        raise LookupError("this savepoint is rolled back")
    savepoint = session.begin_nested()
    outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [3])
    session.commit()  # commits the still-open savepoint, then the transaction
    assert dispatched[PUSH_DISPATCH_KEY] == [1, 3]
    assert not savepoint.is_active
    session.close()


def test_rollback_and_close_queue_nothing(services, dispatched) -> None:  # type: ignore[no-untyped-def]
    session = services.db.session()
    outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [1])
    session.begin_nested()
    outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [2])
    session.rollback()
    session.commit()
    outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, [3])
    session.close()
    session.commit()
    assert dispatched[PUSH_DISPATCH_KEY] == []


def test_rows_are_read_at_commit_and_every_outbox_has_a_dispatcher(services, demo) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[str, list[int]]] = []
    for key in DISPATCH_KEYS:
        assert services.db.dispatchers[key] is not None, key  # Services wires every outbox
        services.db.dispatchers[key] = lambda ids, key=key: seen.append((key, ids))
    session = services.db.session()
    tenant: Any = session.scalar(select(Tenant))
    tenant.name = "Renamed"  # an ORM row queued before its flush: its id is read at commit
    outbox.queue_after_commit(session, DISPATCH_KEYS[0], [tenant])
    for key in DISPATCH_KEYS[1:]:
        outbox.queue_after_commit(session, key, [7, 7])
    session.commit()
    session.close()
    assert seen == [(DISPATCH_KEYS[0], [tenant.id])] + [(key, [7]) for key in DISPATCH_KEYS[1:]]

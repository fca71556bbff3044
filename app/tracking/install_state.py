"""Install state per card and platform, derived from the append-only install log.

Every signal that a card reached (or left) a wallet is appended to
``install_events`` and folded into one ``card_install_states`` row per card and
platform:

- Apple: ``downloaded`` (a .pkpass was served), ``registered`` /
  ``unregistered`` (the device web service) and ``push_gone`` (APNs 410), each
  naming the device. A card is *installed* while at least one device's latest
  event is a registration, which is exactly when it has an active
  ``Registration`` row: the log is written in the same transaction.
- Google: ``downloaded`` (a save link was opened), ``saved`` / ``deleted``
  (callbacks, timed when received, in their ``expTimeMillis`` order: see
  ``app/google/wallet.py: _callback_event_time``) and ``has_users`` (a GET of the
  object said someone holds it). The latest of saved/deleted/has_users decides.

Events arrive twice and out of order (Google retries callbacks; a late "save"
may follow a "del"). So the state is never patched by the new event alone: it
is recomputed from the card's whole log (a handful of rows, by index) with a
sort key that makes the result a function of the *set* of events, whatever
order they came in. ``rebuild`` runs the same derivation over every card, so
a rebuild always agrees with the incremental state.

Concurrency: the event is inserted first (on SQLite that takes the write lock),
then the state row is locked (``SELECT … FOR UPDATE``; created under a
savepoint, and re-read if a concurrent transaction created it first), then the
log is read. Two transactions on the same card serialize on the state row, and
the later one reads the earlier one's event, so neither overwrites the other.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.infra import events
from app.infra.models import Card, CardInstallState, InstallEvent, Program, Tenant, utcnow

if TYPE_CHECKING:
    from app.services import Services

PLATFORMS = ("apple", "google")
KINDS = {
    "apple": ("downloaded", "registered", "unregistered", "push_gone"),
    "google": ("downloaded", "saved", "deleted", "has_users"),
}
STATES = ("downloaded", "installed", "removed")
#: Events that mean "in a wallet now" / "gone from it", per platform.
_INSTALL = {"apple": frozenset({"registered"}), "google": frozenset({"saved", "has_users"})}
_REMOVE = {"apple": frozenset({"unregistered", "push_gone"}), "google": frozenset({"deleted"})}
#: Rows per transaction in rebuild.
REBUILD_CHUNK = 1000

#: Event types this module announces (app/webhooks/outbound.py delivers them as webhooks).
EVENT_DOWNLOADED = "card.downloaded"
EVENT_INSTALLED = "card.installed"
EVENT_REMOVED = "card.removed"


@dataclass(frozen=True)
class LoggedEvent:
    """One row of the log, as the derivation needs it."""

    id: int
    kind: str
    device: str | None
    occurred_at: dt.datetime


@dataclass(frozen=True)
class Derived:
    """What a card's log adds up to on one platform."""

    state: str
    device_count: int
    first_downloaded_at: dt.datetime | None
    first_installed_at: dt.datetime | None
    last_installed_at: dt.datetime | None
    removed_at: dt.datetime | None
    last_event_id: int


def _order(platform: str, event: LoggedEvent) -> tuple[dt.datetime, int, int]:
    """Time first; at the same instant a removal wins, whatever the arrival order.

    The id breaks the remaining ties only between events of the same effect,
    so the outcome never depends on which duplicate was logged first.
    """
    return (event.occurred_at, 1 if event.kind in _REMOVE[platform] else 0, event.id)


def derive(platform: str, events: Sequence[LoggedEvent]) -> Derived:
    """The state of one card on one platform: a pure function of its set of events."""
    ordered = sorted(events, key=lambda e: _order(platform, e))
    downloads = [e.occurred_at for e in ordered if e.kind == "downloaded"]
    installs = [e.occurred_at for e in ordered if e.kind in _INSTALL[platform]]
    presence = [e for e in ordered if e.kind in _INSTALL[platform] | _REMOVE[platform]]
    latest: dict[str | None, LoggedEvent] = {}
    for event in presence:  # per device for Apple; Google has one "device": the account
        latest[event.device if platform == "apple" else None] = event
    active = sum(1 for e in latest.values() if e.kind in _INSTALL[platform])
    if active:
        state, removed_at = "installed", None
    elif latest:
        state, removed_at = "removed", max(e.occurred_at for e in latest.values())
    else:
        state, removed_at = "downloaded", None
    return Derived(state=state, device_count=active,
                   first_downloaded_at=downloads[0] if downloads else None,
                   first_installed_at=min(installs) if installs else None,
                   last_installed_at=max(installs) if installs else None,
                   removed_at=removed_at,
                   last_event_id=max((e.id for e in events), default=0))


def _check(platform: str, kind: str, device: str | None) -> None:
    if platform not in KINDS:
        raise ValueError(f"unknown platform {platform!r}")
    if kind not in KINDS[platform]:
        raise ValueError(f"unknown {platform} install event {kind!r}")
    if platform == "apple" and kind != "downloaded" and not device:
        raise ValueError(f"apple {kind!r} events name the device")


# -- recording ------------------------------------------------------------------------------

def record(session: Session, card: Card, platform: str, kind: str, *, device: str | None = None,
           occurred_at: dt.datetime | None = None) -> CardInstallState:
    """Append one event and refold the card's state, in the caller's transaction.

    Emits ``card.downloaded`` (first download), ``card.installed`` and
    ``card.removed`` webhooks when the state moves. Does not commit.
    """
    _check(platform, kind, device)
    session.add(InstallEvent(tenant_id=card.tenant_id, card_id=card.id, platform=platform,
                             kind=kind, device=device if platform == "apple" else None,
                             occurred_at=occurred_at or utcnow()))
    session.flush()  # first: the log row (and, on SQLite, the write lock)
    row, created = _locked_state(session, card, platform)
    before = (None if created else row.state, row.first_downloaded_at)
    _apply(row, derive(platform, _card_events(session, card.id, platform)))
    session.flush()
    _announce(session, card, row, before)
    return row


def _locked_state(session: Session, card: Card, platform: str) -> tuple[CardInstallState, bool]:
    """The card's state row, locked until commit; created if missing (True)."""
    query = (select(CardInstallState)
             .where(CardInstallState.card_id == card.id, CardInstallState.platform == platform)
             .with_for_update().execution_options(populate_existing=True))
    row = session.scalar(query)
    if row is not None:
        return row, False
    try:
        with session.begin_nested():
            row = CardInstallState(tenant_id=card.tenant_id, card_id=card.id,
                                   program_id=card.program_id, customer_id=card.customer_id,
                                   platform=platform,
                                   state="downloaded", device_count=0, last_event_id=0)
            session.add(row)
        return row, True
    except IntegrityError:  # a concurrent first event created it: wait for and lock that one
        row = session.scalar(query)
        assert row is not None, "state row vanished after a unique conflict"
        return row, False


def _card_events(session: Session, card_id: int, platform: str) -> list[LoggedEvent]:
    rows = session.execute(
        select(InstallEvent.id, InstallEvent.kind, InstallEvent.device, InstallEvent.occurred_at)
        .where(InstallEvent.card_id == card_id, InstallEvent.platform == platform)).all()
    return [LoggedEvent(*row) for row in rows]


def _apply(row: CardInstallState, derived: Derived) -> bool:
    """Copy the derivation onto the row; True when anything changed."""
    changed = False
    for name in ("state", "device_count", "first_downloaded_at", "first_installed_at",
                 "last_installed_at", "removed_at", "last_event_id"):
        value = getattr(derived, name)
        if getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    return changed


def _announce(session: Session, card: Card, row: CardInstallState,
              before: tuple[str | None, dt.datetime | None]) -> None:
    """Webhooks for the transitions this event caused (none for a replay or a late event)."""
    old_state, old_download = before
    types = []
    if old_download is None and row.first_downloaded_at is not None:
        types.append(EVENT_DOWNLOADED)
    if row.state != old_state and row.state in ("installed", "removed"):
        types.append(EVENT_INSTALLED if row.state == "installed" else EVENT_REMOVED)
    data = event_data(card, row)
    for event_type in types:
        events.publish(session, events.Announced(card.tenant_id, event_type, dict(data)))


def event_data(card: Card, row: CardInstallState) -> dict[str, Any]:
    """A card.* webhook's data: ids only. The emitter expands ``card_id`` and
    ``customer_id`` into the program slug, the customer's record and wallet status."""
    return {"card_id": card.id, "customer_id": card.customer_id,
            "card": {"serial_number": card.serial_number, "program": card.program.slug},
            "platform": row.platform, "state": row.state, "device_count": row.device_count}


# -- wallet status for exports and webhooks -------------------------------------------------

def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


_PRECEDENCE = {None: 0, "downloaded": 1, "removed": 2, "installed": 3}


def empty_status() -> dict[str, Any]:
    return {"wallet_status": "none", "wallet_installed": False,
            "wallet_apple_installed": False, "wallet_google_installed": False,
            "wallet_apple_state": None, "wallet_google_state": None,
            "wallet_apple_devices": 0,
            "wallet_apple_installed_at": None, "wallet_google_installed_at": None}


def wallet_status(session: Session, customer_ids: Iterable[int], *,
                  program_id: int | None = None) -> dict[int, dict[str, Any]]:
    """Per customer: installed where, since when, on how many Apple devices.

    Shaped like the CRM fields integrators ask for (walletStatus none/apple/
    google/both, per-platform install times). With ``program_id`` only that
    program's card counts; without, any card of the customer does.
    """
    ids = list(dict.fromkeys(customer_ids))
    result = {customer_id: empty_status() for customer_id in ids}
    for start in range(0, len(ids), 1000):
        query = (select(CardInstallState.customer_id, CardInstallState.platform,
                        CardInstallState.state, CardInstallState.device_count,
                        CardInstallState.first_installed_at)
                 .where(CardInstallState.customer_id.in_(ids[start:start + 1000])))
        if program_id is not None:
            query = query.where(CardInstallState.program_id == program_id)
        for customer_id, platform, state, devices, installed_at in session.execute(query):
            _merge(result[customer_id], platform, state, devices, installed_at)
    for status in result.values():
        apple, google = status["wallet_apple_installed"], status["wallet_google_installed"]
        status["wallet_installed"] = apple or google
        status["wallet_status"] = ("both" if apple and google else "apple" if apple
                                   else "google" if google else "none")
    return result


def _merge(status: dict[str, Any], platform: str, state: str, devices: int,
           installed_at: dt.datetime | None) -> None:
    key = f"wallet_{platform}"
    if _PRECEDENCE[state] > _PRECEDENCE[status[f"{key}_state"]]:
        status[f"{key}_state"] = state
    status[f"{key}_installed"] = status[f"{key}_state"] == "installed"
    if platform == "apple":
        status["wallet_apple_devices"] += devices
    previous = status[f"{key}_installed_at"]
    if installed_at is not None and (previous is None or _iso(installed_at) < previous):
        status[f"{key}_installed_at"] = _iso(installed_at)


# -- rebuild ---------------------------------------------------------------------------------

def rebuild(services: Services, *, tenant_id: int | None = None,
            progress: Callable[[int], object] | None = None) -> int:
    """Recompute every state row from the log, a chunk of cards per transaction.

    Safe while traffic flows: a chunk's state rows are locked before its events
    are read, so a concurrent event either is read here or refolds after us.
    Returns the number of (card, platform) states written.
    """
    written, last_card = 0, 0
    while True:
        with _session(services, tenant_id) as session:
            card_ids = _next_cards(session, last_card, tenant_id)
        if not card_ids:
            break
        written += _rebuild_chunk_retrying(services, tenant_id, card_ids)
        last_card = card_ids[-1]
        if progress:
            progress(len(card_ids))
    with _session(services, tenant_id) as session:
        _drop_orphans(session, tenant_id)
        session.commit()
    return written


def _session(services: Services, tenant_id: int | None) -> Session:
    return services.db.session() if tenant_id is None else services.db.tenant_session(tenant_id)


def cards_to_rebuild(session: Session, tenant_id: int | None = None) -> int:
    """How many cards have install events (the rebuild's progress total)."""
    query = select(func.count(func.distinct(InstallEvent.card_id)))
    if tenant_id is not None:
        query = query.where(InstallEvent.tenant_id == tenant_id)
    return session.scalar(query) or 0


def _next_cards(session: Session, after: int, tenant_id: int | None) -> list[int]:
    query = (select(InstallEvent.card_id).where(InstallEvent.card_id > after)
             .group_by(InstallEvent.card_id).order_by(InstallEvent.card_id).limit(REBUILD_CHUNK))
    if tenant_id is not None:
        query = query.where(InstallEvent.tenant_id == tenant_id)
    return list(session.scalars(query))


def _rebuild_chunk_retrying(services: Services, tenant_id: int | None,
                            card_ids: list[int]) -> int:
    """A live first event may create a state row we meant to insert: redo the chunk."""
    for attempt in range(3):
        with _session(services, tenant_id) as session:
            try:
                written = _rebuild_chunk(session, card_ids)
                session.commit()
                return written
            except IntegrityError:
                session.rollback()
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


def _rebuild_chunk(session: Session, card_ids: list[int]) -> int:
    # A no-op UPDATE locks the existing rows first (and takes SQLite's write lock).
    session.execute(update(CardInstallState).where(CardInstallState.card_id.in_(card_ids))
                    .values(last_event_id=CardInstallState.last_event_id)
                    .execution_options(synchronize_session=False))
    rows = {(s.card_id, s.platform): s for s in session.scalars(
        select(CardInstallState).where(CardInstallState.card_id.in_(card_ids))
        .execution_options(populate_existing=True))}
    events: dict[tuple[int, str], list[LoggedEvent]] = defaultdict(list)
    for card_id, platform, event_id, kind, device, occurred_at in session.execute(
            select(InstallEvent.card_id, InstallEvent.platform, InstallEvent.id,
                   InstallEvent.kind, InstallEvent.device, InstallEvent.occurred_at)
            .where(InstallEvent.card_id.in_(card_ids))):
        events[(card_id, platform)].append(LoggedEvent(event_id, kind, device, occurred_at))
    cards = {card_id: (tenant, program, customer)
             for card_id, tenant, program, customer in session.execute(
                 select(Card.id, Card.tenant_id, Card.program_id, Card.customer_id)
                 .where(Card.id.in_(card_ids)))}
    for key, logged in events.items():
        card_id, platform = key
        row = rows.pop(key, None)
        if row is None:
            tenant, program, customer = cards[card_id]
            row = CardInstallState(tenant_id=tenant, card_id=card_id, program_id=program,
                                   customer_id=customer, platform=platform)
            session.add(row)
        _apply(row, derive(platform, logged))
    for stale in rows.values():  # a state without any event of its platform
        session.delete(stale)
    session.flush()
    return len(events)


def _drop_orphans(session: Session, tenant_id: int | None) -> None:
    """States of cards that have no event at all (never visited by the chunk loop)."""
    orphan = ~exists().where(InstallEvent.card_id == CardInstallState.card_id,
                             InstallEvent.platform == CardInstallState.platform)
    query = delete(CardInstallState).where(orphan)
    if tenant_id is not None:
        query = query.where(CardInstallState.tenant_id == tenant_id)
    session.execute(query.execution_options(synchronize_session=False))


def state_counts(session: Session, *, tenant_id: int | None = None,
                 program_id: int | None = None) -> dict[tuple[str, str, str, str], int]:
    """(tenant slug, program slug, platform, state) -> cards: what `installs rebuild` prints."""
    query = (select(Tenant.slug, Program.slug, CardInstallState.platform, CardInstallState.state,
                    func.count(CardInstallState.id))
             .join(Program, Program.id == CardInstallState.program_id)
             .join(Tenant, Tenant.id == Program.tenant_id)
             .group_by(Tenant.slug, Program.slug, CardInstallState.platform,
                       CardInstallState.state)
             .order_by(Tenant.slug, Program.slug, CardInstallState.platform,
                       CardInstallState.state))
    if tenant_id is not None:
        query = query.where(CardInstallState.tenant_id == tenant_id)
    if program_id is not None:
        query = query.where(CardInstallState.program_id == program_id)
    return {(tenant, slug, platform, state): count
            for tenant, slug, platform, state, count in session.execute(query)}

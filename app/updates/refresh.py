"""The update pipeline: customer data changed -> cards re-rendered -> devices told.

Update tags. Apple's ``passesUpdatedSince`` needs a marker that never skips
a change. Wall-clock seconds do (two changes in one second), and so does a
plain database sequence (a transaction that took tag 7 may commit after one
that took tag 8, and a device that read in between never sees 7). Here a tag
comes from one counter row incremented *inside* the transaction that changes
the card: the row lock is held until commit, so tags become visible in order.
Tags are taken as the last step before commit to keep that lock short.

Pushes. Each changed card with registered devices gets a ``PushJob`` row in
the same transaction (an outbox): if the process dies after commit, the row
is still there and the sweeper (app/jobs.py) queues it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload
from sqlalchemy.orm.attributes import set_committed_value

from app.cards import cards
from app.infra import outbox
from app.infra.db import PUSH_DISPATCH_KEY, table_of
from app.infra.models import (
    AppleIdentity,
    Card,
    Counter,
    Customer,
    GoogleObject,
    Program,
    PushJob,
    Registration,
    SignedVersion,
    utcnow,
)
from app.updates import rendering

if TYPE_CHECKING:
    from app.services import Services
    from app.updates.rendering import Rendered, RenderJob, RenderPool
    from app.wallet.builder import PassBuilder

UPDATE_TAG = "card_update_tag"


def reserve_update_tags(session: Session, count: int = 1) -> range:
    """Take `count` consecutive tags; the counter row stays locked until commit."""
    for _ in range(2):
        value = session.execute(
            update(Counter).where(Counter.name == UPDATE_TAG)
            .values(value=Counter.value + count).returning(Counter.value)
        ).scalar()
        if value is not None:
            return range(value - count + 1, value + 1)
        try:
            with session.begin_nested():
                session.add(Counter(name=UPDATE_TAG, value=0))
        except IntegrityError:
            pass  # another transaction created it first: increment that one
    raise RuntimeError("could not create the update-tag counter")


def queue_pushes(session: Session, changes: list[tuple[int, int, int]]) -> int:
    """Add a push job for each (card id, tenant id, tag) whose card has devices to tell."""
    if not changes:
        return 0
    card_ids = [card_id for card_id, _, _ in changes]
    with_devices = set(session.scalars(
        select(Registration.card_id).where(Registration.card_id.in_(card_ids),
                                           Registration.push_problem.is_(None))))
    with_google = set(session.scalars(
        select(GoogleObject.card_id).where(GoogleObject.card_id.in_(card_ids))))
    now = utcnow()
    rows = [{"tenant_id": tenant_id, "card_id": card_id, "update_tag": tag, "channel": "apple",
             "created_at": now, "attempts": 0}
            for card_id, tenant_id, tag in changes if card_id in with_devices]
    # A card saved to Google Wallet gets its object patched through the same outbox.
    rows += [{"tenant_id": tenant_id, "card_id": card_id, "update_tag": tag, "channel": "google",
              "created_at": now, "attempts": 0}
             for card_id, tenant_id, tag in changes if card_id in with_google]
    if rows:
        # One multi-row INSERT ... RETURNING (insertmanyvalues), not one per job.
        ids = list(session.scalars(insert(PushJob).returning(PushJob.id, sort_by_parameter_order=True), rows))
        outbox.queue_after_commit(session, PUSH_DISPATCH_KEY, ids)
    return len(rows)


def mark_changed(session: Session, changed: list[Card]) -> None:
    """Give changed cards new tags, and queue pushes for those with devices."""
    if not changed:
        return
    tags = reserve_update_tags(session, len(changed))
    for card, tag in zip(changed, tags):
        card.update_tag = tag
    session.flush()
    queue_pushes(session, [(card.id, card.tenant_id, card.update_tag) for card in changed])


@dataclass
class Refresh:
    changed: list[Card] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # cards whose data no longer renders


#: From this many cards on, a refresh renders in worker processes (when it has a pool).
POOL_THRESHOLD = 64


class CardRefresher:
    """Re-renders many cards at once and records their new versions set-based.

    Per batch: one query for the cards (with program and tenant), one per program
    for its Apple identity, one for which cards have devices; the cards are rendered
    (and, when they changed and devices will fetch them, signed once) in the worker
    processes of ``pool`` as ``cards build`` does; then one UPDATE of the changed
    cards, one INSERT of their push jobs and one upsert of their signed versions.
    The version and Last-Modified still move only when the content hash changes,
    and tags are still taken as the last step before the caller commits.

    Use one refresher for a whole import so its pool starts once::

        with CardRefresher(services, RenderPool()) as refresher:
            import_csv(..., on_changed=refresher.on_changed)
    """

    def __init__(self, services: Services, pool: RenderPool | None = None) -> None:
        self.services = services
        self.pool = pool

    def __enter__(self) -> CardRefresher:
        return self

    def __exit__(self, *_: object) -> None:
        if self.pool is not None:
            self.pool.close()

    def on_changed(self, session: Session, customers: list[Customer]) -> list[str]:
        """The import's change hook: re-render these customers' cards, return problems."""
        return self.customers_changed(session, customers).errors

    def customers_changed(self, session: Session, customers: Iterable[Customer]) -> Refresh:
        ids = [customer.id for customer in customers if customer.id is not None]
        if not ids:
            return Refresh()
        targets = list(session.scalars(
            select(Card).where(Card.customer_id.in_(ids))
            .options(joinedload(Card.program).joinedload(Program.tenant))
            .order_by(Card.id)).unique())
        return self.refresh(session, targets)

    def refresh(self, session: Session, targets: Iterable[Card]) -> Refresh:

        result = Refresh()
        targets = list(targets)
        if not targets:
            return result
        session.flush()  # cards just created need their ids
        signed = _fetched_by_devices(session, [card.id for card in targets])
        by_config: dict[rendering.RenderConfig, list[RenderJob]] = {}
        builders: dict[rendering.RenderConfig, PassBuilder] = {}
        identities: dict[int, AppleIdentity | Exception] = {}
        by_id: dict[int, Card] = {}
        for card in targets:
            try:
                identity = identities.get(card.program_id)
                if identity is None:
                    try:
                        identity = cards.apple_identity(session, card.program)
                    except LookupError as exc:
                        identity = exc
                    identities[card.program_id] = identity
                if isinstance(identity, Exception):
                    raise identity
                config = rendering.RenderConfig.for_program(self.services, card.program, identity)
                if config not in builders:
                    builders[config] = self.services.pass_builder(card.program, identity)
                job = (card.id, card.serial_number, cards.card_input(card, self.services),
                       card.content_hash, card.id in signed)
            except (ValueError, LookupError) as exc:
                result.errors.append(f"card {card.serial_number}: {exc}")
                continue
            by_id[card.id] = card
            by_config.setdefault(config, []).append(job)
        rendered: list[Rendered] = []
        for config, jobs in by_config.items():
            if self.pool is not None and len(jobs) >= POOL_THRESHOLD:
                rendered += self.pool.render(config, jobs)
            else:
                builder = builders[config]
                rendered += [rendering.render_one(builder, job) for job in jobs]
        changed: list[tuple[Card, str, bytes | None, bytes | None]] = []
        for card_id, content_hash, pass_json, signature, error in rendered:
            if error is not None:
                result.errors.append(error)
            elif content_hash is not None and content_hash != by_id[card_id].content_hash:
                changed.append((by_id[card_id], content_hash, pass_json, signature))
        if changed:
            _record_versions(session, changed)
            result.changed = [card for card, *_ in changed]
        return result


def _fetched_by_devices(session: Session, card_ids: list[int]) -> set[int]:
    """Cards with registered Apple devices: the ones whose new version is signed now."""
    found: set[int] = set()
    for start in range(0, len(card_ids), 1000):
        found.update(session.scalars(
            select(Registration.card_id).where(Registration.card_id.in_(card_ids[start:start + 1000]))
            .distinct()))
    return found



def _record_versions(session: Session,
                     changed: list[tuple[Card, str, bytes | None, bytes | None]]) -> None:
    """New versions, signed versions, tags and push jobs of changed cards, set-based."""
    store_signed(session, [(card.id, content_hash, pass_json, signature)
                           for card, content_hash, pass_json, signature in changed
                           if pass_json is not None and signature is not None])
    rows: list[dict[str, Any]] = []  # executemany parameters
    for card, content_hash, _, _ in changed:
        rows.append({"card_id": card.id, "new_hash": content_hash,
                     "new_version": card.version + 1,
                     "new_modified": cards.next_last_modified(
                         card.last_modified if card.version > 0 else None)})
    # Tags last: the counter row stays locked until the caller commits.
    for row, tag in zip(rows, reserve_update_tags(session, len(rows))):
        row["new_tag"] = tag
    table = table_of(Card)
    session.connection().execute(
        table.update().where(table.c.id == bindparam("card_id"))
        .values(content_hash=bindparam("new_hash"), version=bindparam("new_version"),
                last_modified=bindparam("new_modified"), update_tag=bindparam("new_tag")),
        rows)
    for (card, *_), row in zip(changed, rows):
        for name, key in (("content_hash", "new_hash"), ("version", "new_version"),
                          ("last_modified", "new_modified"), ("update_tag", "new_tag")):
            set_committed_value(card, name, row[key])
    queue_pushes(session, [(card.id, card.tenant_id, row["new_tag"])
                           for (card, *_), row in zip(changed, rows)])


def store_signed(session: Session, versions: list[tuple[int, str, bytes, bytes]]) -> None:
    """Keep (card id, content hash, pass.json, signature) as the cards' signed versions."""
    if not versions:
        return
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    make = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    statement = make(SignedVersion)
    statement = statement.on_conflict_do_update(
        index_elements=[SignedVersion.card_id],
        set_={"content_hash": statement.excluded.content_hash,
              "pass_json": statement.excluded.pass_json,
              "signature": statement.excluded.signature,
              "signed_at": statement.excluded.signed_at})
    session.connection().execute(statement, [
        {"card_id": card_id, "content_hash": content_hash, "pass_json": pass_json,
         "signature": signature, "signed_at": now}
        for card_id, content_hash, pass_json, signature in versions])


def refresh_cards(session: Session, services: Services, targets: Iterable[Card]) -> Refresh:
    """Re-render cards; those whose content changed get a new version, tag and push.

    A card whose data cannot be rendered (a template/data error naming the field)
    is reported and left as it was; the data change itself is kept.
    """
    return CardRefresher(services).refresh(session, targets)


def customers_changed(session: Session, services: Services,
                      customers: Iterable[Customer]) -> Refresh:
    """Call after changing customer data by any path (import, API, webhook, form)."""
    return CardRefresher(services).customers_changed(session, customers)

"""Bulk .pkpass builds: every card of a program, over all CPU cores, in constant memory.

The main process only reads the database (keyset pagination, so no
long-lived cursor) and turns rows into plain :class:`CardInput` values;
worker processes render, sign and zip, which is where the time goes, and send
back each card's content hash. The main process then moves the version of the
cards whose content changed. At most a few batches are in flight at once, so
memory stays flat whatever the number of cards.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, joinedload

from app.cards import cards
from app.infra.models import Card, Customer, Program
from app.updates.refresh import queue_pushes, reserve_update_tags
from app.updates.rendering import BATCH_SIZE, RenderConfig
from app.wallet.builder import CardInput, PassBuilder

if TYPE_CHECKING:
    from app.services import Services  # passed in by the entry point

PAGE_SIZE = 256


@dataclass(frozen=True)
class BuildReport:
    written: int
    changed: int
    errors: list[str]


# One item of work: (card id, serial, input); one result: (card id, content hash or error).
_Job = tuple[int, str, CardInput]
_Result = tuple[int, str | None, str | None]


# -- worker side ------------------------------------------------------------------------

_worker: tuple[PassBuilder, Path] | None = None


def _init_worker(config: RenderConfig, out_dir: str) -> None:
    global _worker
    _worker = (config.builder(), Path(out_dir))


def _build_batch(batch: list[_Job]) -> list[_Result]:
    assert _worker is not None, "worker not initialised"
    builder, out_dir = _worker
    results: list[_Result] = []
    for card_id, serial, card in batch:
        try:
            pass_json = builder.pass_json(card)
        except ValueError as exc:  # template and data errors name the field
            results.append((card_id, None, f"card {serial}: {exc}"))
            continue
        _write(out_dir / f"{serial}.pkpass", builder.packager.build(pass_json, builder.signer))
        results.append((card_id, builder.content_hash(pass_json), None))
    return results


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- main side --------------------------------------------------------------------------

def count_cards(session: Session, program: Program) -> int:
    return session.scalar(select(func.count(Card.id)).where(Card.program_id == program.id)) or 0


def issue_missing_cards(session: Session, program: Program, chunk: int = 1000) -> int:
    """Give every customer of the tenant a card in this program, a chunk at a time."""
    created = 0
    while True:
        missing = session.scalars(
            select(Customer.id).where(
                Customer.tenant_id == program.tenant_id,
                ~select(Card.id).where(Card.program_id == program.id,
                                       Card.customer_id == Customer.id).exists())
            .order_by(Customer.id).limit(chunk)).all()
        if not missing:
            return created
        session.add_all(Card(tenant_id=program.tenant_id, program_id=program.id,
                             customer_id=customer_id) for customer_id in missing)
        session.commit()
        created += len(missing)


def _pages(session: Session, program_id: int) -> Iterator[list[Card]]:
    last_id = 0
    while True:
        page = session.scalars(
            select(Card).options(joinedload(Card.customer), joinedload(Card.program))
            .where(Card.program_id == program_id, Card.id > last_id)
            .order_by(Card.id).limit(PAGE_SIZE)).unique().all()
        if not page:
            return
        yield list(page)
        last_id = page[-1].id


class _VersionRecorder:
    """Remembers in-flight cards' hashes and versions; writes only the changed ones."""

    def __init__(self, session: Session, tenant_id: int) -> None:
        self.session = session
        self.tenant_id = tenant_id
        self.known: dict[int, tuple[str | None, int, dt.datetime]] = {}
        self.changed = 0

    def remember(self, card: Card) -> None:
        self.known[card.id] = (card.content_hash, card.version, card.last_modified)

    def record(self, results: list[_Result]) -> list[str]:
        updates: list[dict[str, Any]] = []  # executemany parameters
        errors: list[str] = []
        for card_id, content_hash, error in results:
            old_hash, version, last_modified = self.known.pop(card_id)
            if error is not None:
                errors.append(error)
            elif content_hash != old_hash:
                updates.append({"id": card_id, "content_hash": content_hash,
                                "version": version + 1,
                                "last_modified": cards.next_last_modified(
                                    last_modified if version > 0 else None)})
        if updates:
            # Changed content needs new update tags and pushes, like any other change.
            tags = reserve_update_tags(self.session, len(updates))
            for row, tag in zip(updates, tags):
                row["update_tag"] = tag
            self.session.execute(update(Card), updates)
            queue_pushes(self.session, [(row["id"], self.tenant_id, row["update_tag"])
                                        for row in updates])
            self.session.commit()  # release the tag counter's row lock at once
            self.changed += len(updates)
        return errors


def build_program(session: Session, services: Services, program: Program, out_dir: Path,
                  workers: int | None = None,
                  progress: Callable[[int], object] | None = None) -> BuildReport:
    out_dir.mkdir(parents=True, exist_ok=True)
    identity_row = cards.apple_identity(session, program)
    services.signing_identity(identity_row)  # fail fast, before starting workers
    services.templates.get(program.template)  # derive and cache images once, here
    config = RenderConfig.for_program(services, program, identity_row)
    workers = workers or os.cpu_count() or 1
    recorder = _VersionRecorder(session, program.tenant_id)
    written = 0
    errors: list[str] = []
    in_flight: set[Future[list[_Result]]] = set()

    def collect(limit: int) -> None:
        nonlocal written
        while len(in_flight) > limit:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                in_flight.discard(future)
                results = future.result()
                batch_errors = recorder.record(results)
                errors.extend(batch_errors)
                written += len(results) - len(batch_errors)
                if progress:
                    progress(len(results))

    # spawn, not fork: a forked copy of a threaded server or open DB pool is unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                             initargs=(config, str(out_dir)), mp_context=context) as pool:
        program_id = program.id
        for page in _pages(session, program_id):
            batch: list[_Job] = []
            for card in page:
                try:
                    job = (card.id, card.serial_number, cards.card_input(card, services))
                except ValueError as exc:
                    errors.append(f"card {card.serial_number}: {exc}")
                    if progress:
                        progress(1)
                    continue
                recorder.remember(card)
                batch.append(job)
                if len(batch) >= BATCH_SIZE:
                    collect(workers * 4 - 1)
                    in_flight.add(pool.submit(_build_batch, batch))
                    batch = []
            if batch:
                collect(workers * 4 - 1)
                in_flight.add(pool.submit(_build_batch, batch))
            session.expunge_all()  # keep memory flat: the page's objects are done with
            session.commit()
        collect(0)
        session.commit()
    return BuildReport(written, recorder.changed, errors)

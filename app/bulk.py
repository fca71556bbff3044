"""Bulk .pkpass builds: every card of a program, over all CPU cores, in constant memory.

The main process pages through cards (keyset pagination, so no long-lived
cursor), renders pass.json and records content hashes; worker processes only
sign and zip, which is where the time goes. At most a few batches are in flight
at once, so memory stays flat whatever the number of cards.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from app import cards
from app.certs import SigningIdentity, load_identity
from app.models import Card, Customer, Program
from app.passes.package import PassPackager
from app.services import Services, identity_password

PAGE_SIZE = 256
BATCH_SIZE = 32


@dataclass(frozen=True)
class BuildReport:
    written: int
    changed: int
    errors: list[str]


# -- worker side ------------------------------------------------------------------------

_worker: tuple[PassPackager, SigningIdentity, Path] | None = None


def _init_worker(static_files: dict[str, bytes], certs_path: str, certificate_file: str,
                 key_file: str | None, password: bytes | None, out_dir: str) -> None:
    global _worker
    identity = load_identity(Path(certs_path), certificate_file, key_file, password)
    _worker = (PassPackager(static_files), identity, Path(out_dir))


def _sign_batch(batch: list[tuple[str, bytes]]) -> int:
    assert _worker is not None, "worker not initialised"
    packager, identity, out_dir = _worker
    for serial, pass_json in batch:
        _write(out_dir / f"{serial}.pkpass", packager.build(pass_json, identity.sign))
    return len(batch)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- main side --------------------------------------------------------------------------

def count_cards(session: Session, program: Program) -> int:
    return session.scalar(select(func.count(Card.id)).where(Card.program_id == program.id)) or 0


def issue_missing_cards(session: Session, program: Program) -> int:
    """Give every customer of the tenant a card in this program."""
    missing = select(Customer).where(
        Customer.tenant_id == program.tenant_id,
        ~select(Card.id).where(Card.program_id == program.id,
                               Card.customer_id == Customer.id).exists())
    created = 0
    for customer in session.scalars(missing).all():
        session.add(Card(tenant_id=program.tenant_id, program=program, customer=customer))
        created += 1
    session.commit()
    return created


def _pages(session: Session, program: Program) -> Iterator[list[Card]]:
    last_id = 0
    while True:
        page = session.scalars(
            select(Card).options(joinedload(Card.customer), joinedload(Card.program))
            .where(Card.program_id == program.id, Card.id > last_id)
            .order_by(Card.id).limit(PAGE_SIZE)).unique().all()
        if not page:
            return
        yield list(page)
        last_id = page[-1].id


def build_program(session: Session, services: Services, program: Program, out_dir: Path,
                  workers: int | None = None,
                  progress: Callable[[int], None] | None = None) -> BuildReport:
    out_dir.mkdir(parents=True, exist_ok=True)
    identity_row = cards.apple_identity(session, program)
    builder = services.pass_builder(program, identity_row)
    workers = workers or os.cpu_count() or 1
    init_args = (builder.template.static_files, str(services.settings.certs_path),
                 identity_row.certificate_file, identity_row.key_file,
                 identity_password(identity_row), str(out_dir))
    written = changed = 0
    errors: list[str] = []
    in_flight: set[Future[int]] = set()
    max_in_flight = workers * 4

    def drain(limit: int) -> None:
        nonlocal written
        while len(in_flight) > limit:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                in_flight.discard(future)
                count = future.result()
                written += count
                if progress:
                    progress(count)

    # spawn, not fork: a forked copy of a threaded server or open DB pool is unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                             initargs=init_args, mp_context=context) as pool:
        for page in _pages(session, program):
            batch: list[tuple[str, bytes]] = []
            for card in page:
                try:
                    rendered = cards.render(card, services, builder)
                except ValueError as exc:  # template/data problems name the field
                    errors.append(f"card {card.serial_number}: {exc}")
                    if progress:
                        progress(1)
                    continue
                changed += rendered.changed
                batch.append((card.serial_number, rendered.pass_json))
                if len(batch) >= BATCH_SIZE:
                    drain(max_in_flight - 1)
                    in_flight.add(pool.submit(_sign_batch, batch))
                    batch = []
            if batch:
                drain(max_in_flight - 1)
                in_flight.add(pool.submit(_sign_batch, batch))
            session.commit()  # record versions page by page
            session.expunge_all()
        drain(0)
    return BuildReport(written, changed, errors)

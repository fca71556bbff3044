"""Table sizes after a 100,000-card campaign, before and after pruning (issue 14).

    .venv/bin/python benchmarks/retention_sizes.py postgresql://postgres@127.0.0.1:5432/<db>
        [--cards 100000] [--campaigns 3]

The database's ``public`` schema is DROPPED and recreated (give it a database of
its own), migrated, and seeded with the demo tenant plus N customers, each with a
card, a registered Apple device and a personal link (tables that are never pruned).

Then one campaign's worth of rows in every table app/retention.py prunes, written
with bulk INSERTs (Core ``insert`` in chunks of 10,000, not the request and worker
paths: those would take an hour here, and sizes depend on the row shapes, not on
the path). The shapes are the ones the code writes: a webhook payload and a CRM
payload are produced once by the real code (``webhooks_out.emit``,
``crm.outbox.customer_payload``) and repeated with each row's own ids; push
attempts carry a 200 and an apns-id like the worker records; Wallet log lines
are the length of the ones devices send. Per card:

    push_jobs            1 Apple job + 0.2 Google job, done
    push_attempts        1 (one device, sent)
    device_logs          0.02 (one device in 50 posts a log line)
    funnel_events        2 (link opened; Apple download or Google save)
    webhook_deliveries   1 card.installed event to one subscription, delivered,
                         with its webhook_attempts row (1)
    inbound_events       1 loyalty-engine event applied (the change behind the campaign)
    google_callback_nonces 0.2 (Google save callbacks)
    crm_outbox           1 write-back, done
    mail_outbox          1 card-link email, done
    import_jobs          1 per campaign (the CSV import)

All of it is dated 401 days ago: past every retention window, the funnel's 400
days included. Then ``app.ops.retention.prune`` (what ``passerelle prune`` and the
worker's daily task call) with the default windows and batch size, then a plain
``VACUUM`` (what autovacuum does: the space becomes reusable, and empty pages at
a table's end go back to the file system). Then (``--campaigns``, default 3) the
same again: the next campaign, prune, VACUUM, and the last campaign's rows on top,
to see whether the tables level off or grow from one campaign to the next.

Printed per table: rows and ``pg_total_relation_size`` (table + indexes + TOAST)
at each step. Sizes do not depend on the machine's load; the timings printed
alongside do.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import Connection, make_url

from app.crm.outbox import customer_payload
from app.infra import migrate
from app.infra.config import Settings
from app.infra.models import (
    Card,
    CrmOutboxEntry,
    Customer,
    DeviceLog,
    FunnelEvent,
    GoogleCallbackNonce,
    ImportJob,
    InboundEvent,
    InboundHook,
    LinkToken,
    MailOutboxEntry,
    PushAttempt,
    PushJob,
    Registration,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)
from app.ops import retention
from app.services import Services
from app.tenants import demo
from app.webhooks import outbound as webhooks_out

CHUNK = 10_000
AGE = dt.timedelta(days=401)  # past every default window (funnel_events: 400 days)
#: Pruned tables (webhook_attempts go with their deliveries), in the order printed.
TABLES = ("push_jobs", "push_attempts", "device_logs", "funnel_events", "webhook_deliveries",
          "webhook_attempts", "inbound_events", "google_callback_nonces", "crm_outbox",
          "mail_outbox", "import_jobs")
#: What a Wallet log line looks like (≈ 270 characters; the serial is the card's).
LOG_LINE = ("[{when}] Get pass task (pass type pass.dev.passerelle.demo, serial number "
            "{serial}, if-modified-since {when}; with web service url "
            "https://wallet.example.test/passkit) encountered error: Unexpected response "
            "code 304")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url", help="PostgreSQL URL; its public schema is dropped")
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--campaigns", type=int, default=3,
                        help="campaigns in a row, each pruned and vacuumed before the next "
                             "(1: stop after the first VACUUM)")
    args = parser.parse_args()
    if make_url(args.database_url).get_backend_name() != "postgresql":
        parser.error("a postgresql:// URL: sizes are PostgreSQL's pg_total_relation_size")

    with tempfile.TemporaryDirectory(prefix="retention-sizes-") as tmp:
        settings = Settings.from_env(environ={}, instance_path=Path(tmp) / "instance",
                                     database_url=args.database_url,
                                     certs_path=Path(tmp) / "certs", strict_certs=False,
                                     public_url="https://wallet.example.test")
        settings.instance_path.mkdir()
        services = Services(settings)
        try:
            return run(services, args.cards, args.campaigns)
        finally:
            services.close()


def run(services: Services, cards: int, campaigns: int) -> int:
    engine = services.db.engine
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    migrate.upgrade(services.settings.database_url)
    started = time.perf_counter()
    base = seed_population(services, cards)
    print(f"cores: {os.cpu_count()}; Python {platform.python_version()}; PostgreSQL "
          f"{server_version(services)}; {cards} cards (customers, cards, devices, links: "
          f"{time.perf_counter() - started:.0f} s)")

    steps: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for k in range(1, campaigns + 1):
        nth = "campaign" if k == 1 else f"campaign {k}"
        started = time.perf_counter()
        campaign(services, base, utcnow() - AGE, first_id=(k - 1) * cards)
        analyze(services)
        steps.append((nth, measure(services)))
        print(f"{nth} dated {AGE.days} days ago written in "
              f"{time.perf_counter() - started:.0f} s")
        if k == campaigns and k > 1:
            break  # the last of several: its size on top of the pruned ones

        started = time.perf_counter()
        deleted = retention.prune(services.db)
        took = time.perf_counter() - started
        if k == 1:
            steps.append(("pruned", measure(services)))
        print(f"prune (defaults, batches of {retention.BATCH}): {sum(deleted.values())} rows "
              f"deleted in {took:.1f} s")

        started = time.perf_counter()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in TABLES:
                conn.execute(text(f"VACUUM {table}"))
        steps.append(("VACUUM" if k == 1 else f"pruned+VACUUM {k}", measure(services)))
        print(f"VACUUM of the pruned tables: {time.perf_counter() - started:.1f} s")
    print()
    print_table(steps)
    return 0


# -- the population (never pruned) --------------------------------------------------------

class Base:
    def __init__(self, tenant_id: int, slug: str, program_id: int, hook_id: int,
                 subscription_id: int, cards: list[tuple[int, int, str, str]],
                 link_ids: list[int], webhook_payload: dict[str, Any],
                 crm_payload: dict[str, Any]) -> None:
        self.tenant_id, self.slug, self.program_id = tenant_id, slug, program_id
        self.hook_id, self.subscription_id = hook_id, subscription_id
        self.cards = cards  # (card id, customer id, serial, device library id)
        self.link_ids = link_ids
        self.webhook_payload, self.crm_payload = webhook_payload, crm_payload


def seed_population(services: Services, count: int) -> Base:
    with services.db.transaction() as session:
        seeded = demo.seed(session, services)
        tenant_id, slug = seeded.tenant.id, seeded.tenant.slug
        program_id = next(p.id for p in seeded.programs if p.slug == "rewards")
        hook = InboundHook(tenant_id=tenant_id, slug="loyalty-engine", secret_hash="0" * 64)
        session.add(hook)
        session.flush()
        hook_id = hook.id
        subscription_id = webhooks_out.create_subscription(
            session, tenant_id, "https://hooks.example.test/passerelle",
            ["card.installed"]).id
    with services.db.engine.begin() as conn:
        for start, stop in chunks(count):
            conn.execute(insert(Customer), [
                {"tenant_id": tenant_id, "external_id": f"M{i:08d}",
                 "email": f"member{i}@example.test", "first_name": "Camille",
                 "last_name": f"Member{i}", "locale": "fr-FR",
                 "attributes": {"points": 1000 + i % 5000, "tier": "silver"}}
                for i in range(start, stop)])
        customer_ids = conn.execute(select(Customer.id).where(Customer.tenant_id == tenant_id,
                                                              Customer.external_id.like("M%"))
                                    .order_by(Customer.id)).scalars().all()
        for start, stop in chunks(count):
            conn.execute(insert(Card), [
                {"tenant_id": tenant_id, "program_id": program_id,
                 "customer_id": customer_ids[i], "serial_number": secrets.token_urlsafe(16),
                 "authentication_token": secrets.token_urlsafe(32)}
                for i in range(start, stop)])
        rows = conn.execute(select(Card.id, Card.customer_id, Card.serial_number)
                            .where(Card.customer_id.in_(select(Customer.id).where(
                                Customer.external_id.like("M%"))))
                            .order_by(Card.id)).all()
        cards = [(card_id, customer_id, serial, secrets.token_hex(16))
                 for card_id, customer_id, serial in rows]
        for start, stop in chunks(count):
            conn.execute(insert(Registration), [
                {"tenant_id": tenant_id, "card_id": card_id, "device_library_identifier": device,
                 "pass_type_identifier": demo.DEMO_PASS_TYPE, "push_token": secrets.token_hex(32)}
                for card_id, _, _, device in cards[start:stop]])
            conn.execute(insert(LinkToken), [
                {"tenant_id": tenant_id, "token_hash": secrets.token_hex(32),
                 "program_id": program_id, "customer_id": customer_id, "purpose": "download",
                 "campaign": "winter-statement"}
                for _, customer_id, _, _ in cards[start:stop]])
        link_ids = conn.execute(select(LinkToken.id).where(LinkToken.tenant_id == tenant_id)
                                .order_by(LinkToken.id)).scalars().all()
    # One payload of each kind made by the real code, repeated with each row's ids.
    with services.db.transaction() as session:
        webhooks_out.emit(session, tenant_id, "card.installed",
                          {"card_id": cards[0][0], "platform": "apple"})
        session.flush()
        delivery = session.scalars(select(WebhookDelivery)).one()
        webhook_payload = dict(delivery.payload)
        session.delete(delivery)
        crm_payload = customer_payload(session.get(Customer, cards[0][1]),
                                       ["attributes.points"])
    return Base(tenant_id, slug, program_id, hook_id, subscription_id, cards, link_ids,
                webhook_payload, crm_payload)


def chunks(count: int) -> Iterator[tuple[int, int]]:
    for start in range(0, count, CHUNK):
        yield start, min(start + CHUNK, count)


# -- one campaign's rows in the pruned tables -----------------------------------------------

def campaign(services: Services, base: Base, when: dt.datetime, first_id: int) -> None:
    """The rows a campaign over every card leaves behind, dated ``when``."""
    tenant = base.tenant_id
    later = when + dt.timedelta(seconds=30)
    n = len(base.cards)
    every = list(enumerate(base.cards))
    google = every[::5]  # one card in five is in Google Wallet
    tables: list[tuple[Any, Callable[[int, tuple[int, int, str, str]], dict[str, Any]],
                       list[tuple[int, tuple[int, int, str, str]]]]] = [
        (PushJob, lambda i, c: {
            "tenant_id": tenant, "card_id": c[0], "channel": "apple", "update_tag": i + 1,
            "registration_ids": None, "created_at": when, "attempts": 1, "done_at": later},
         every),
        (PushJob, lambda i, c: {
            "tenant_id": tenant, "card_id": c[0], "channel": "google", "update_tag": i + 1,
            "registration_ids": None, "created_at": when, "attempts": 1, "done_at": later},
         google),
        (PushAttempt, lambda i, c: {
            "tenant_id": tenant, "card_id": c[0], "device": c[3], "status": 200,
            "outcome": "sent", "reason": None, "apns_id": str(uuid.uuid4()).upper(),
            "attempted_at": later}, every),
        (DeviceLog, lambda i, c: {
            "tenant_id": tenant, "card_id": c[0], "received_at": later,
            "message": LOG_LINE.format(when=later.isoformat(timespec="seconds"),
                                       serial=c[2])}, every[::50]),
        (FunnelEvent, lambda i, c: {
            "tenant_id": tenant, "program_id": base.program_id, "customer_id": c[1],
            "card_id": c[0], "link_id": base.link_ids[i], "kind": "link_opened",
            "platform": "apple" if i % 5 else "google", "campaign": "winter-statement",
            "occurred_at": when}, every),
        (FunnelEvent, lambda i, c: {
            "tenant_id": tenant, "program_id": base.program_id, "customer_id": c[1],
            "card_id": c[0], "link_id": base.link_ids[i],
            "kind": "apple_downloaded" if i % 5 else "google_opened",
            "platform": "apple" if i % 5 else "google", "campaign": "winter-statement",
            "occurred_at": later}, every),
        (InboundEvent, lambda i, c: {
            "tenant_id": tenant, "hook_id": base.hook_id,
            "event_id": f"evt_{first_id + i:012d}", "event_type": "points.updated",
            "payload": {"id": f"evt_{first_id + i:012d}", "type": "points.updated",
                        "member": f"M{i:08d}", "points": 1000 + i % 5000},
            "status": "applied", "customer_id": c[1], "received_at": when,
            "applied_at": when}, every),
        (GoogleCallbackNonce, lambda i, c: {
            "nonce": secrets.token_urlsafe(24), "received_at": later}, google),
        (CrmOutboxEntry, lambda i, c: {
            "tenant_id": tenant, "customer_id": c[1], "operation": "update",
            "payload": {**base.crm_payload, "external_id": f"M{i:08d}",
                        "attributes": {"points": 1000 + i % 5000}},
            "created_at": when, "attempts": 1, "done_at": later}, every),
        (MailOutboxEntry, lambda i, c: {
            "tenant_id": tenant, "program_id": base.program_id, "customer_id": c[1],
            "kind": "card_link", "locale": "fr-FR", "campaign": "winter-statement",
            "created_at": when, "attempts": 1, "done_at": later}, every),
    ]
    with services.db.engine.begin() as conn:
        for model, row, cards in tables:
            for start in range(0, len(cards), CHUNK):
                conn.execute(insert(model), [row(i, c) for i, c in cards[start:start + CHUNK]])
        webhooks(conn, base, when, later, first_id)
        conn.execute(insert(ImportJob), [{
            "tenant_id": tenant, "status": "done", "format": "csv",
            "source_path": f"imports/{uuid.uuid4().hex}.csv", "total_rows": n, "updated": n,
            "errors": [], "created_at": when, "finished_at": later, "attempts": 1}])


def webhooks(conn: Connection, base: Base, when: dt.datetime, later: dt.datetime,
             first_id: int) -> None:
    template = base.webhook_payload
    for start, stop in chunks(len(base.cards)):
        rows = []
        for i in range(start, stop):
            event_id = str(uuid.uuid4())
            data = dict(template["data"])
            if isinstance(data.get("customer"), dict):
                data["customer"] = {**data["customer"], "external_id": f"M{i:08d}"}
            if isinstance(data.get("card"), dict):
                data["card"] = {**data["card"], "serial_number": base.cards[i][2]}
            rows.append({"tenant_id": base.tenant_id, "subscription_id": base.subscription_id,
                         "event_id": event_id, "event_type": "card.installed",
                         "payload": {**template, "id": event_id,
                                     "created_at": when.isoformat(), "data": data},
                         "created_at": when, "attempts": 1, "last_status": 200,
                         "done_at": later, "outcome": "delivered"})
        ids = conn.execute(insert(WebhookDelivery).returning(WebhookDelivery.id),
                           rows).scalars().all()
        conn.execute(insert(WebhookAttempt), [
            {"tenant_id": base.tenant_id, "delivery_id": delivery_id, "status": 200,
             "error": None, "duration_ms": 85, "attempted_at": later} for delivery_id in ids])


# -- measuring ------------------------------------------------------------------------------

def analyze(services: Services) -> None:
    with services.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))


def measure(services: Services) -> dict[str, tuple[int, int]]:
    """Rows and pg_total_relation_size (bytes) per table."""
    out = {}
    with services.db.engine.connect() as conn:
        for table in TABLES:
            rows = conn.execute(select(func.count()).select_from(text(table))).scalar_one()
            size = conn.execute(text("SELECT pg_total_relation_size(CAST(:t AS regclass))"),
                                {"t": table}).scalar_one()
            out[table] = (rows, size)
    return out


def server_version(services: Services) -> str:
    with services.db.engine.connect() as conn:
        return str(conn.execute(text("SHOW server_version")).scalar_one()).split()[0]


def print_table(steps: list[tuple[str, dict[str, tuple[int, int]]]]) -> None:
    header = f"{'table':<24}" + "".join(f"{name:>24}" for name, _ in steps)
    print(header)
    print(f"{'':<24}" + "".join(f"{'rows':>12}{'size':>12}" for _ in steps))
    totals = [[0, 0] for _ in steps]
    for table in TABLES:
        line = f"{table:<24}"
        for k, (_, figures) in enumerate(steps):
            rows, size = figures[table]
            totals[k][0] += rows
            totals[k][1] += size
            line += f"{rows:>12,}{mib(size):>12}"
        print(line)
    print(f"{'total':<24}" + "".join(f"{rows:>12,}{mib(size):>12}" for rows, size in totals))


def mib(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB" if size >= 1024 * 1024 else f"{size // 1024} KiB"


if __name__ == "__main__":
    sys.exit(main())

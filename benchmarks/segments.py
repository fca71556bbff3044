"""Segment counts and a streamed export with 1,000,000 customers on PostgreSQL.

    .venv/bin/python benchmarks/segments.py [--customers 1000000] [--export 200000]
        [--database-url postgresql://postgres@127.0.0.1:5432/test_h9]

Empties the database's public schema (it must be a scratch database), migrates
it, seeds the demo tenant, then loads with COPY: customers (points and tier
attributes), a card for 90 % of them, install states in a realistic mix, a
marketing-email consent history, and a campaign's links. Then it measures:

- every segment count (median of 5 runs, after one warm-up), with the default
  consent filter, and a few with tier / points / campaign / dates;
- a "not installed" export with a fresh link per row, run twice in processes
  of their own (so each peak RSS is its own): ``--export`` rows and a tenth of
  that. Equal peaks show the export runs in constant memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.infra import migrate
from app.infra.config import Settings
from app.segments import segments
from app.services import Services
from app.tenants import demo

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test_h9"
TIERS = ("Member", "Silver", "Gold", "Platinum")
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def settings_for(url: str, instance: Path) -> Settings:
    return Settings.from_env(environ={}, instance_path=instance, database_url=url,
                             strict_certs=False, public_url="https://wallet.example.test")


def reset_schema(url: str) -> None:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


def _copy(conn: psycopg.Connection, table: str, columns: tuple[str, ...], rows) -> int:  # type: ignore[no-untyped-def]
    n = 0
    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            n += 1
    return n


def _mix(rng: random.Random) -> tuple[str | None, str | None]:
    """(apple state, google state) for one customer; None = no row."""
    roll = rng.random()
    if roll < 0.25:
        return None, None                         # never downloaded
    if roll < 0.40:
        return "downloaded", None                 # downloaded on Apple, not installed
    if roll < 0.45:
        return None, "downloaded"                 # opened Google's save page only
    if roll < 0.78:
        return "installed", None                  # Apple
    if roll < 0.88:
        return None, "installed"                  # Google
    if roll < 0.92:
        return "installed", "installed"           # both
    if roll < 0.97:
        return "removed", None                    # removed from Apple
    return "downloaded", "removed"                # removed from Google


def seed(url: str, settings: Settings, count: int) -> dict[str, int]:
    """Load everything with COPY; returns the tenant and program ids."""
    migrate.upgrade(settings.database_url)
    services = Services(settings)
    with services.db.transaction() as session:
        seeded = demo.seed(session, services)
        tenant_id = seeded.tenant.id
        program_id = next(p.id for p in seeded.programs if p.slug == "rewards")
    services.close()
    rng = random.Random(20261124)
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM customers").fetchone()[0]
        ids = range(first, first + count)
        _copy(conn, "customers", ("id", "tenant_id", "external_id", "email", "first_name",
                                  "last_name", "locale", "attributes", "created_at",
                                  "updated_at"),
              ((cid, tenant_id, f"L{cid:08d}", f"load{cid}@example.test", "Load", "Test",
                "fr-FR", json.dumps({"points": rng.randrange(0, 20000),
                                     "tier": rng.choice(TIERS)}),
                EPOCH + dt.timedelta(minutes=cid % 400000), EPOCH) for cid in ids))
        conn.execute("SELECT setval('customers_id_seq', %s)", (first + count,))
        _seed_cards_and_states(conn, rng, tenant_id, program_id, ids)
        _seed_consents(conn, rng, tenant_id, ids)
        _copy(conn, "link_tokens", ("tenant_id", "token_hash", "program_id", "customer_id",
                                    "purpose", "campaign", "uses", "created_at"),
              ((tenant_id, f"{cid:064x}", program_id, cid, "download", "spring", 0, EPOCH)
               for cid in ids if cid % 3 == 0))
        conn.execute("SELECT setval('link_tokens_id_seq', (SELECT max(id) FROM link_tokens))")
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return {"tenant_id": tenant_id, "program_id": program_id}


def _seed_cards_and_states(conn: psycopg.Connection, rng: random.Random, tenant_id: int,
                           program_id: int, ids: range) -> None:
    cards, states = [], []
    card_id = conn.execute("SELECT coalesce(max(id), 0) FROM cards").fetchone()[0]
    for cid in ids:
        apple, google = _mix(rng)
        if apple is None and google is None and rng.random() < 0.6:
            continue  # most never-downloaded customers have no card yet
        card_id += 1
        cards.append((card_id, tenant_id, program_id, cid, f"s{card_id:021d}", "t" * 43, 0,
                      EPOCH, False, EPOCH))
        for platform, state in (("apple", apple), ("google", google)):
            if state is None:
                continue
            at = EPOCH + dt.timedelta(minutes=rng.randrange(0, 400000))
            installed = at if state in ("installed", "removed") else None
            states.append((tenant_id, card_id, program_id, cid, platform, state,
                           1 if state == "installed" else 0, at, installed, installed,
                           at + dt.timedelta(days=3) if state == "removed" else None, 0, EPOCH))
    _copy(conn, "cards", ("id", "tenant_id", "program_id", "customer_id", "serial_number",
                          "authentication_token", "version", "last_modified", "voided",
                          "created_at"),
          cards)
    conn.execute("SELECT setval('cards_id_seq', %s)", (card_id,))
    _copy(conn, "card_install_states",
          ("tenant_id", "card_id", "program_id", "customer_id", "platform", "state",
           "device_count",
           "first_downloaded_at", "first_installed_at", "last_installed_at", "removed_at",
           "last_event_id", "updated_at"), states)


def _seed_consents(conn: psycopg.Connection, rng: random.Random, tenant_id: int,
                   ids: range) -> None:
    """80 % granted marketing email; an eighth of those later withdrew it."""
    rows = []
    for cid in ids:
        if rng.random() < 0.8:
            rows.append((tenant_id, cid, "marketing_email", True, EPOCH, "import"))
            if rng.random() < 0.125:
                rows.append((tenant_id, cid, "marketing_email", False,
                             EPOCH + dt.timedelta(days=30), "form"))
        if rng.random() < 0.5:
            rows.append((tenant_id, cid, "sms", True, EPOCH, "import"))
    _copy(conn, "consents", ("tenant_id", "customer_id", "kind", "granted", "recorded_at",
                             "source"), rows)
    # What customers.record_consent keeps for each decision (and migration 0008 backfills).
    conn.execute("""
        INSERT INTO current_consents (customer_id, kind, granted, recorded_at, consent_id,
                                      tenant_id)
        SELECT DISTINCT ON (customer_id, kind) customer_id, kind, granted, recorded_at, id,
               tenant_id
        FROM consents WHERE customer_id >= %s
        ORDER BY customer_id, kind, recorded_at DESC, id DESC""", (ids.start,))


def measure_counts(settings: Settings, program_id: int, repeat: int) -> None:
    services = Services(settings)
    cases = [(state or "(all)", segments.Segment(program_id, state=state))
             for state in (None, *segments.STATES)]
    cases += [
        ("not-installed, all consents",
         segments.Segment(program_id, state="not-installed", include_without_consent=True)),
        ("installed-apple, all consents",
         segments.Segment(program_id, state="installed-apple", include_without_consent=True)),
        ("not-installed + tier Gold", segments.Segment(program_id, state="not-installed",
                                                      tier="gold")),
        ("not-installed + points 5000-10000",
         segments.Segment(program_id, state="not-installed", points_min=5000,
                          points_max=10000)),
        ("not-installed + campaign", segments.Segment(program_id, state="not-installed",
                                                     campaign="spring")),
        ("installed in March 2026", segments.Segment(
            program_id, state="installed-any",
            installed_from=dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
            installed_to=dt.datetime(2026, 4, 1, tzinfo=dt.UTC))),
    ]
    print(f"{'segment count':<36}{'customers':>10}{'median ms':>11}{'max ms':>9}"
          f"{'1-core CPU ms':>15}")
    with services.db.session() as session:
        floor_ms, floor = _baseline(session, program_id, repeat)
        print(f"{'baseline: count the tenant':<36}{floor:>10}{floor_ms:>11.0f}")
        for name, segment in cases:
            result = segments.count(session, segment)  # warm-up
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                assert segments.count(session, segment) == result
                times.append((time.perf_counter() - start) * 1000)
            cpu = serial_cpu_ms(session, segment, repeat)
            print(f"{name:<36}{result:>10}{statistics.median(times):>11.0f}{max(times):>9.0f}"
                  f"{cpu:>15}")
            session.rollback()
    services.close()


def _baseline(session, program_id: int, repeat: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """The floor, measured in the same run: counting the tenant's customers, no filter."""
    query = text("SELECT count(*) FROM customers WHERE tenant_id = "
                 "(SELECT tenant_id FROM programs WHERE id = :program)")
    result = session.scalar(query, {"program": program_id})
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.scalar(query, {"program": program_id})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def _backend_cpu_seconds(pid: int) -> float:
    """utime + stime of a local PostgreSQL backend, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serial_cpu_ms(session, segment: segments.Segment, repeat: int) -> str:  # type: ignore[no-untyped-def]
    """Median CPU time of the count in one backend, parallel workers off: what the query
    costs on one idle core, whatever else the machine runs (local server only)."""
    pid = session.scalar(text("SELECT pg_backend_pid()"))
    if not Path(f"/proc/{pid}/stat").exists():
        return "n/a"
    session.execute(text("SET max_parallel_workers_per_gather = 0"))
    samples = []
    for _ in range(repeat):
        before = _backend_cpu_seconds(pid)
        segments.count(session, segment)
        samples.append((_backend_cpu_seconds(pid) - before) * 1000)
    session.execute(text("RESET max_parallel_workers_per_gather"))
    return f"{statistics.median(samples):.0f}"


def export_child(url: str, instance: str, program_id: int, rows: int) -> None:
    """Run in its own process: export, then print rows, seconds and peak RSS as JSON."""
    services = Services(settings_for(url, Path(instance)))
    segment = segments.Segment(program_id, state="not-installed")
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="") as out, \
            services.db.session() as session:
        start = time.perf_counter()
        written = segments.export_csv(session, services, segment, out, link_campaign="resend",
                                      limit=rows)
        elapsed = time.perf_counter() - start
        size = out.tell()
    # VmHWM, not getrusage: ru_maxrss survives exec, so it would report the seeding parent's peak.
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:"))
               .split()[1]) // 1024
    print(json.dumps({"rows": written, "seconds": elapsed, "peak_mib": peak, "bytes": size}))


def measure_export(url: str, instance: Path, program_id: int, rows: int) -> None:
    for size in (rows // 10, rows):
        out = subprocess.run([sys.executable, __file__, "--database-url", url, "--child-export",
                              str(size), "--child-instance", str(instance), "--child-program",
                              str(program_id)], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"not-installed export {result['rows']:>7} rows: "
              f"{result['rows'] / result['seconds']:>6.0f} rows/s "
              f"({result['seconds']:.1f} s, {result['bytes'] / 2**20:.0f} MiB CSV), "
              f"peak RSS {result['peak_mib']} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--export", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-seed", action="store_true", help="Reuse the last seed.")
    parser.add_argument("--child-export", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-instance", help=argparse.SUPPRESS)
    parser.add_argument("--child-program", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_export:
        export_child(args.database_url, args.child_instance, args.child_program,
                     args.child_export)
        return
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(args.database_url, Path(tmp))
        if not args.skip_seed:
            reset_schema(args.database_url)
            start = time.perf_counter()
            seed(args.database_url, settings, args.customers)
            print(f"seeded {args.customers} customers in {time.perf_counter() - start:.0f} s")
        services = Services(settings)
        with services.db.session() as session:
            program_id = session.scalar(text(
                "SELECT p.id FROM programs p JOIN tenants t ON t.id = p.tenant_id "
                "WHERE t.slug = 'demo' AND p.slug = 'rewards'"))
        services.close()
        with psycopg.connect(args.database_url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        print(f"PostgreSQL {version}; median of {args.repeat}")
        measure_counts(settings, program_id, args.repeat)
        measure_export(args.database_url, Path(tmp), program_id, args.export)


if __name__ == "__main__":
    main()

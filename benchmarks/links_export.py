"""Personal-link CSV export: rows per second, and peak memory at 10,000 vs 100,000 rows.

    .venv/bin/python benchmarks/links_export.py [--rows 100000] [--small 10000]

One SQLite database (a temporary instance) holds two tenants, one with --small
customers and one with --rows. Each measurement runs in a process of its own,
so its peak RSS (VmHWM) is its own:

- idle: the same imports and one query, no export — the floor every process pays;
- bare baseline: per row a token, its SHA-256, the URL and a CSV line, no
  database — what the export would cost if storing links were free;
- export: ``app.segments.links_export.export_links`` (what ``passerelle links export``
  runs), at both sizes, timed; then again under tracemalloc for the peak of
  Python allocations (slower, so not timed).

Constant memory shows as the same peak at both sizes.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, insert, select

from app.distribution import links
from app.infra import migrate
from app.infra.db import Database
from app.infra.models import Customer, Program, Tenant, utcnow
from app.segments import links_export

PUBLIC = "https://wallet.example.com"


def _peak_rss_mib() -> float:
    """This process's peak RSS. Linux's ru_maxrss survives exec, so a child started
    by a big parent would report the parent's peak; VmHWM belongs to this image."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def seed(url: str, sizes: dict[str, int]) -> None:
    migrate.upgrade(url)
    db = Database(url)
    for slug, count in sizes.items():
        with db.transaction() as session:
            tenant = Tenant(slug=slug, name=slug)
            session.add(tenant)
            session.flush()
            session.add(Program(tenant_id=tenant.id, slug="rewards", name="Rewards",
                                template="loyalty", pass_type_identifier="pass.bench",
                                team_identifier="BENCHTEAM1"))
            tenant_id = tenant.id
        for start in range(0, count, 5000):
            now = utcnow()
            with db.transaction(tenant_id) as session:
                session.execute(insert(Customer), [
                    {"tenant_id": tenant_id, "external_id": f"{slug}-{i:07d}",
                     "email": f"member{i}@example.org", "attributes": {},
                     "created_at": now, "updated_at": now}
                    for i in range(start, min(start + 5000, count))])
    db.dispose()


def run_export(url: str, tenant_slug: str, out: Path, traced: bool) -> dict[str, float]:
    db = Database(url)
    with db.session() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.slug == tenant_slug))
    with db.tenant_session(tenant_id) as session, out.open("w", newline="") as fh:
        program = session.scalar(select(Program))
        if traced:
            tracemalloc.start()
        start = time.perf_counter()
        report = links_export.export_links(session, program, "download", fh, public_url=PUBLIC,
                                           campaign="bench", max_uses=3)
        seconds = time.perf_counter() - start
        traced_peak = tracemalloc.get_traced_memory()[1] / 2**20 if traced else 0.0
    return {"rows": report.rows, "seconds": seconds, "rss_mib": _peak_rss_mib(),
            "traced_mib": traced_peak}


def run_idle(url: str) -> dict[str, float]:
    db = Database(url)
    with db.session() as session:
        session.scalar(select(func.count(Customer.id)))
    return {"rss_mib": _peak_rss_mib()}


def run_bare(rows: int, out: Path) -> dict[str, float]:
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        start = time.perf_counter()
        for i in range(rows):
            token = links.new_token()
            links.hash_token(token)
            writer.writerow((f"big-{i:07d}", f"member{i}@example.org",
                             links.link_url(PUBLIC, token)))
        seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "rss_mib": _peak_rss_mib()}


def child(*args: str) -> dict[str, float]:
    """Run one measurement in a fresh process; its last line is JSON."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "export":
            result = run_export(rest[0], rest[1], Path(rest[2]), rest[3] == "traced")
        elif kind == "idle":
            result = run_idle(rest[0])
        else:
            result = run_bare(int(rest[0]), Path(rest[1]))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.sqlite3"
        start = time.perf_counter()
        seed(url, {"small": args.small, "big": args.rows})
        print(f"SQLite, Python {sys.version.split()[0]}; seeded {args.small:,} + {args.rows:,} "
              f"customers in {time.perf_counter() - start:.1f} s")
        idle = child("idle", url)
        bare = child("bare", str(args.rows), f"{tmp}/bare.csv")
        runs = {size: child("export", url, slug, f"{tmp}/{slug}.csv", "timed")
                for slug, size in (("small", args.small), ("big", args.rows))}
        traced = {size: child("export", url, slug, f"{tmp}/{slug}-t.csv", "traced")
                  for slug, size in (("small", args.small), ("big", args.rows))}
    print(f"{'run':<34}{'rows':>9}{'rows/s':>10}{'peak RSS':>11}{'traced peak':>13}")
    print(f"{'idle process (imports + 1 query)':<34}{'':>9}{'':>10}{idle['rss_mib']:>7.1f} MiB")
    print(f"{'bare baseline (no database)':<34}{bare['rows']:>9,.0f}"
          f"{bare['rows'] / bare['seconds']:>10,.0f}{bare['rss_mib']:>7.1f} MiB")
    for size, run in runs.items():
        print(f"{'export_links':<34}{run['rows']:>9,.0f}{run['rows'] / run['seconds']:>10,.0f}"
              f"{run['rss_mib']:>7.1f} MiB{traced[size]['traced_mib']:>9.1f} MiB")
    small, big = runs[args.small], runs[args.rows]
    print(f"export / bare: {big['rows'] / big['seconds'] / (bare['rows'] / bare['seconds']):.0%};"
          f" peak RSS {args.rows:,} vs {args.small:,} rows: "
          f"{big['rss_mib'] - small['rss_mib']:+.1f} MiB; traced peak "
          f"{traced[args.rows]['traced_mib'] - traced[args.small]['traced_mib']:+.1f} MiB")


if __name__ == "__main__":
    main()

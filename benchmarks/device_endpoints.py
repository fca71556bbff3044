"""Apple device endpoints under load, with 100,000 registrations on PostgreSQL.

    .venv/bin/python benchmarks/device_endpoints.py [--registrations 100000] [--requests 3000]

Seeds a database `passerelle_bench` on 127.0.0.1:5432 (dropped and recreated),
starts `passerelle serve` (waitress, 8 threads) in its own process, and drives
it with a keep-alive HTTP client (16 threads) from this process. In the same
run it measures GET /healthz (one SELECT 1) as the server's baseline for a
trivial database request through the same stack and client. Prints
requests/s and p50/p99 latency per endpoint.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import requests
from sqlalchemy import insert, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.infra import migrate
from app.infra.config import Settings
from app.infra.models import Card, Counter, Customer, Registration
from app.services import Services
from app.tenants import demo
from app.updates import refresh as updates

PG = "postgresql://postgres@127.0.0.1:5432"
DB = "passerelle_bench"
PASS_TYPE = demo.DEMO_PASS_TYPE


def recreate_database() -> str:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    return f"{PG}/{DB}"


def seed(settings: Settings, count: int) -> list[tuple[str, str, str, int]]:
    """Customers, cards (update_tag = i) and one device registration each.
    Returns a sample of (device, serial, token, tag) to request."""
    migrate.upgrade(settings.database_url)
    services = Services(settings)
    with services.db.transaction() as session:
        seeded = demo.seed(session, services)
        tenant_id = seeded.tenant.id
        program_id = next(p.id for p in seeded.programs if p.slug == "rewards")
    chunk = 10_000
    with services.db.engine.begin() as conn:
        for start in range(0, count, chunk):
            rows = range(start, min(start + chunk, count))
            conn.execute(insert(Customer), [
                {"tenant_id": tenant_id, "external_id": f"L{i:07d}", "first_name": "Load",
                 "last_name": "Test", "locale": "fr-FR", "attributes": {"points": i}}
                for i in rows])
        ids = conn.execute(select(Customer.id).where(Customer.external_id.like("L%"))
                           .order_by(Customer.id)).scalars().all()
        for start in range(0, count, chunk):
            conn.execute(insert(Card), [
                {"tenant_id": tenant_id, "program_id": program_id, "customer_id": ids[i],
                 "serial_number": secrets.token_urlsafe(16),
                 "authentication_token": secrets.token_urlsafe(32), "update_tag": i + 1}
                for i in range(start, min(start + chunk, count))])
        cards = conn.execute(select(Card.id, Card.serial_number, Card.authentication_token,
                                    Card.update_tag).where(Card.program_id == program_id,
                                                           Card.update_tag > 0)).all()
        for start in range(0, len(cards), chunk):
            conn.execute(insert(Registration), [
                {"tenant_id": tenant_id, "card_id": card_id, "device_library_identifier":
                 f"device{card_id:08d}", "pass_type_identifier": PASS_TYPE,
                 "push_token": "ab" * 32} for card_id, _, _, _ in cards[start:start + chunk]])
        # The tag counter must stay ahead of every tag already handed out.
        conn.execute(insert(Counter).values(name=updates.UPDATE_TAG, value=count))
        conn.execute(text("ANALYZE"))
    services.close()
    step = max(len(cards) // 2000, 1)
    return [(f"device{cid:08d}", serial, token, tag) for cid, serial, token, tag in cards[::step]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(name: str, urls_headers: list[tuple[str, dict[str, str]]], expect: int,
         threads: int) -> tuple[float, float, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    jobs = iter(urls_headers)

    def run() -> None:
        session = requests.Session()
        mine = []
        while True:
            with lock:
                item = next(jobs, None)
            if item is None:
                break
            start = time.perf_counter()
            response = session.get(item[0], headers=item[1])
            mine.append(time.perf_counter() - start)
            assert response.status_code == expect, (name, response.status_code, response.text[:200])
        with lock:
            latencies.extend(mine)
        session.close()

    begin = time.perf_counter()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - begin
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registrations", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = recreate_database()
        settings = Settings.from_env(environ={}, instance_path=Path(tmp), database_url=url,
                                     strict_certs=False)
        t0 = time.perf_counter()
        sample = seed(settings, args.registrations)
        print(f"seeded {args.registrations} customers, cards and registrations "
              f"in {time.perf_counter() - t0:.0f}s")
        port = free_port()
        env = {**os.environ, "PASSERELLE_INSTANCE_PATH": tmp, "PASSERELLE_DATABASE_URL": url,
               "PASSERELLE_STRICT_CERTS": "false"}
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                                   "--threads", "8"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    if requests.get(f"{base}/healthz", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(0.2)
            n = args.requests
            picks = [sample[i % len(sample)] for i in range(n)]
            serials = [(f"{base}/passkit/v1/devices/{d}/registrations/{PASS_TYPE}"
                        f"?passesUpdatedSince={tag - 1}", {}) for d, _, _, tag in picks]
            passes = [(f"{base}/passkit/v1/passes/{PASS_TYPE}/{s}",
                       {"Authorization": f"ApplePass {t}"}) for _, s, t, _ in picks[: n // 5]]
            # Warm up: render every sampled pass once (first render records its version).
            load("warm", passes, 200, args.threads)
            far_future = "Fri, 01 Jan 2100 00:00:00 GMT"
            not_modified = [(u, {**h, "If-Modified-Since": far_future}) for u, h in passes]
            rows = [
                ("GET /healthz (baseline)", [(f"{base}/healthz", {})] * n, 200),
                ("serials since tag", serials, 200),
                ("latest pass, 200 (signed)", passes, 200),
                ("latest pass, 304", not_modified, 304),
            ]
            print(f"{args.threads} client threads, waitress 8 threads, "
                  f"{args.registrations} registrations, PostgreSQL")
            print(f"{'endpoint':<28}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
            for name, items, expect in rows:
                rate, p50, p99 = load(name, items, expect, args.threads)
                print(f"{name:<28}{rate:>8.0f}{p50:>9.1f}{p99:>9.1f}")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()

"""From one CSV import to every device holding the new card, as a brand runs it.

    .venv/bin/python benchmarks/update_storm.py [--customers 10000 | --large]
        [--server gthread|sync|waitress] [--connections 1000]

PostgreSQL and Redis, each process as production runs it: the server (`passerelle
serve`'s server, or the one named by --server), `passerelle worker` processes on the
Redis queue, the APNs stand-in (tests/apns_standin.py, HTTP/2 over TLS) in a process
of its own, `passerelle customers import` for the CSV. Seeds N customers with a card
each and one registered device per card; every device starts up to date.

Then one CSV import changes every member's points, and simulated devices (one
asyncio process, --connections concurrent keep-alive HTTP/1.1 connections) wait for
their push: the stand-in writes each accepted token to this process, and that
device then asks for its serials since its tag and fetches the latest pass, like
Wallet. The run ends when the last device holds the new version.

Printed per stage, each with its ceiling measured in the same run:
- import: rows/s, against `cards build` (app.updates.bulk.build_program) on the same cards,
  and the same import run alone before the storm (no workers, no devices);
- pushes: pushes/s as devices received them, against the stand-in's ceiling with a
  lean client (h2load -c 1 -m 100; a bare Python h2 loop without h2load);
- device fetches: devices/s (serials + pass) during the storm and replayed alone,
  against GET /healthz through the same server and client (two requests per device);
- the total time from the import's start to the last device.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth; the database --db is dropped and
recreated) and Redis (--redis; that database is flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import email.utils
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg
import redis
from sqlalchemy import insert, select, text, update

from app.infra import migrate
from app.infra.config import Settings
from app.infra.models import Card, Customer, Program, PushJob, Registration, Tenant, utcnow
from app.services import Services
from app.tenants import demo
from app.updates import bulk

PG = "postgresql://postgres@127.0.0.1:5432"
PASS_TYPE = demo.DEMO_PASS_TYPE
STREAMS = 100


# -- the APNs stand-in, in a process of its own, telling us which token it accepted -------

def standin_child(argv: list[str]) -> int:
    """`update_storm.py --standin-child ROOT_CA WWDR CA_OUT`: print each accepted token."""
    from tests.apns_standin import ApnsStandin

    root_ca, wwdr, ca_out = (Path(a) for a in argv)
    out = sys.stdout
    pending: list[str] = []
    lock = threading.Lock()

    class Telling(ApnsStandin):
        def _record(self, item):  # type: ignore[no-untyped-def]
            if item.status == 200:
                with lock:
                    pending.append(item.token)

    stop = threading.Event()
    with Telling([root_ca, wwdr], client_cert="optional", record=False) as server:
        shutil.copyfile(server.ca_file, ca_out)
        out.write(f"listening {server.url}\n")
        out.flush()
        while not stop.wait(0.02):  # batched writes: the pipe is not the bottleneck
            with lock:
                lines, pending[:] = pending[:], []
            if lines:
                try:
                    out.write("\n".join(lines) + "\n")
                    out.flush()
                except BrokenPipeError:
                    return 0
    return 0


# -- seeding ----------------------------------------------------------------------------

@dataclass
class Device:
    device_id: str
    serial: str
    auth: str
    push_token: str
    tag: str
    last_modified: str  # HTTP date of the version the device holds
    pushed_at: float = 0.0
    done_at: float = 0.0


def recreate_database(name: str) -> str:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return f"{PG}/{name}"


def seed(services: Services, count: int) -> tuple[int, int]:
    """The demo tenant, N customers with a card each in its 'rewards' program."""
    migrate.upgrade(services.settings.database_url)
    with services.db.transaction() as session:
        seeded = demo.seed(session, services)
        tenant_id = seeded.tenant.id
        program_id = next(p.id for p in seeded.programs if p.slug == "rewards")
    chunk = 10_000
    with services.db.engine.begin() as conn:
        for start in range(0, count, chunk):
            conn.execute(insert(Customer), [
                {"tenant_id": tenant_id, "external_id": f"S{i:07d}", "first_name": "Storm",
                 "last_name": f"Member{i}", "locale": "fr-FR", "attributes": {"points": i}}
                for i in range(start, min(start + chunk, count))])
        ids = conn.execute(select(Customer.id).where(Customer.external_id.like("S%"))
                           .order_by(Customer.id)).scalars().all()
        for start in range(0, count, chunk):
            conn.execute(insert(Card), [
                {"tenant_id": tenant_id, "program_id": program_id, "customer_id": ids[i],
                 "serial_number": secrets.token_urlsafe(16),
                 "authentication_token": secrets.token_urlsafe(32)}
                for i in range(start, min(start + chunk, count))])
        conn.execute(text("ANALYZE"))
    return tenant_id, program_id


def register_devices(services: Services, program_id: int) -> list[Device]:
    """One device per card, registered after the cards were built (so no push is due)."""
    with services.db.engine.begin() as conn:
        rows = conn.execute(select(Card.id, Card.tenant_id, Card.serial_number,
                                   Card.authentication_token, Card.update_tag,
                                   Card.last_modified)
                            .where(Card.program_id == program_id).order_by(Card.id)).all()
        devices = [Device(f"storm{card_id:08d}", serial, token, secrets.token_hex(32),
                          str(tag), email.utils.format_datetime(modified, usegmt=True))
                   for card_id, _, serial, token, tag, modified in rows]
        for start in range(0, len(rows), 10_000):
            conn.execute(insert(Registration), [
                {"tenant_id": tenant_id, "card_id": card_id,
                 "device_library_identifier": device.device_id,
                 "pass_type_identifier": PASS_TYPE, "push_token": device.push_token}
                for (card_id, tenant_id, *_), device in zip(rows[start:start + 10_000],
                                                             devices[start:start + 10_000])])
        conn.execute(text("ANALYZE"))
    return devices


def write_csv(path: Path, count: int, bump: int) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["external_id", "points"])
        writer.writerows([f"S{i:07d}", i + bump] for i in range(count))


# -- processes --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_standin(certs: Path, work: Path) -> tuple[subprocess.Popen, str, Path]:
    ca_file = work / "standin-ca.pem"
    child = subprocess.Popen(
        [sys.executable, __file__, "--standin-child", str(certs / "dev" / "root-ca.pem"),
         str(certs / "wwdr" / "dev-wwdr.pem"), str(ca_file)],
        stdout=subprocess.PIPE, text=True, bufsize=1)
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.startswith("listening "):
        child.kill()
        raise SystemExit(f"stand-in did not start: {line!r}")
    return child, line.split()[1], ca_file


def server_command(kind: str, port: int, workers: int, threads: int) -> list[str]:
    if kind == "serve":
        return [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    if kind == "waitress":
        return [sys.executable, "-c",
                "from waitress import serve; from app import create_app; "
                f"serve(create_app(), host='127.0.0.1', port={port}, threads={threads}, "
                "connection_limit=2000, backlog=2048)"]
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    command = [gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
               "--backlog", "2048", "--keep-alive", "75", "--log-level", "warning"]
    if kind == "gthread":
        command += ["--worker-class", "gthread", "--threads", str(threads),
                    "--worker-connections", "2000"]
    return [*command, "app:create_app()"]


def wait_healthy(base: str, process: subprocess.Popen) -> None:
    import urllib.request

    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit("the server exited at start")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server did not answer /healthz")


# -- the lean keep-alive HTTP/1.1 client ------------------------------------------------

@dataclass
class Counters:
    requests: int = 0
    refused: int = 0
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)


class Connection:
    def __init__(self, port: int, counters: Counters) -> None:
        self.port, self.counters = port, counters
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = False  # served a request: a new connection after that is a reconnect

    async def _connect(self) -> None:
        delay = 0.05
        while True:
            try:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
                return
            except OSError:
                self.counters.refused += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        for _attempt in range(3):
            if self.writer is None:
                if self.used:
                    self.counters.reconnects += 1
                await self._connect()
            assert self.reader is not None and self.writer is not None
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            try:
                self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n"
                                  .encode())
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionResetError("closed")
                status = int(status_line.split()[1])
                response_headers = {}
                while True:
                    line = await self.reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    response_headers[name.strip().lower()] = value.strip()
                length = int(response_headers.get("content-length", "0"))
                body = await self.reader.readexactly(length) if length else b""
                if response_headers.get("connection", "").lower() == "close":
                    self.close()
                self.counters.requests += 1
                self.used = True
                return status, response_headers, body
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                self.close()
        raise ConnectionError(f"GET {path}: no answer after 3 connections")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def fetch_new_version(conn: Connection, device: Device) -> bool:
    """What Wallet does after a push: serials since its tag, then each changed pass."""
    status, _, body = await conn.get(
        f"/passkit/v1/devices/{device.device_id}/registrations/{PASS_TYPE}"
        f"?passesUpdatedSince={device.tag}", {})
    if status != 200:
        return False
    import json

    answer = json.loads(body)
    if device.serial not in answer["serialNumbers"]:
        return False
    status, headers, body = await conn.get(
        f"/passkit/v1/passes/{PASS_TYPE}/{device.serial}",
        {"Authorization": f"ApplePass {device.auth}", "If-Modified-Since": device.last_modified})
    if status != 200 or not body.startswith(b"PK"):
        return False
    device.tag, device.last_modified = answer["lastUpdated"], headers["last-modified"]
    return True


async def drive(port: int, connections: int, queue: asyncio.Queue, total: int,
                counters: Counters, retry: bool) -> list[Device]:
    """Connections take devices off the queue until `total` devices hold their new version."""
    finished: list[Device] = []
    done = asyncio.Event()

    async def connection_loop() -> None:
        conn = Connection(port, counters)
        try:
            while not done.is_set():
                device = await queue.get()
                if device is None:
                    return
                try:
                    ok = await fetch_new_version(conn, device)
                except ConnectionError as exc:
                    counters.errors.append(str(exc))
                    ok = False
                if ok:
                    device.done_at = time.perf_counter()
                    finished.append(device)
                    if len(finished) >= total:
                        done.set()
                elif retry:  # pushed before its change was visible? ask again shortly
                    await asyncio.sleep(0.2)
                    queue.put_nowait(device)
                else:
                    counters.errors.append(f"device {device.device_id}: no new version")
                    finished.append(device)
                    if len(finished) >= total:
                        done.set()
        finally:
            conn.close()

    tasks = [asyncio.create_task(connection_loop()) for _ in range(connections)]
    try:
        await done.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return finished


async def hammer(port: int, connections: int, items: list[tuple[str, dict[str, str], int]],
                 counters: Counters) -> float:
    """Requests/s for a fixed list of requests over `connections` keep-alive connections."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def loop() -> None:
        conn = Connection(port, counters)
        while True:
            try:
                path, headers, expect = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            status, _, _ = await conn.get(path, headers)
            if status != expect:
                counters.errors.append(f"{path}: {status}")
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(connections)))
    return len(items) / (time.perf_counter() - started)


# -- the stand-in's ceiling -------------------------------------------------------------

def h2load_rate(url: str, count: int, work: Path) -> tuple[str, float]:
    if not shutil.which("h2load"):
        return "no h2load (apt-get install nghttp2-client)", 0.0
    uris, body = work / "uris.txt", work / "body.json"
    uris.write_text("".join(f"{url}/3/device/{secrets.token_hex(32)}\n" for _ in range(count)))
    body.write_bytes(b"{}")
    out = subprocess.run(
        ["h2load", "-n", str(count), "-c", "1", "-m", str(STREAMS), "-t", "1",
         "-d", str(body), "-H", "apns-topic: x", "-i", str(uris)],
        capture_output=True, text=True, check=True).stdout
    match = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    assert match, out
    return f"h2load -c 1 -m {STREAMS}", float(match.group(3))


# -- the run ----------------------------------------------------------------------------

def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--standin-child":
        return standin_child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--large", action="store_true", help="100,000 customers")
    parser.add_argument("--db", default="passerelle_storm", help="dropped and recreated")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="flushed")
    parser.add_argument("--server", default="serve",
                        choices=["serve", "gthread", "sync", "waitress"],
                        help="serve: what `passerelle serve` runs; the others for comparing")
    parser.add_argument("--server-workers", type=int, default=4)
    parser.add_argument("--server-threads", type=int, default=8)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--worker-processes", type=int, default=1)
    parser.add_argument("--worker-threads", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    count = 100_000 if args.large else args.customers

    with tempfile.TemporaryDirectory(prefix="update-storm-") as tmp:
        work = Path(tmp)
        url = recreate_database(args.db)
        redis.Redis.from_url(args.redis).flushdb()
        env = {**os.environ, "PASSERELLE_INSTANCE_PATH": str(work / "instance"),
               "PASSERELLE_DATABASE_URL": url, "PASSERELLE_REDIS_URL": args.redis,
               "PASSERELLE_STRICT_CERTS": "false", "PYTHONPATH": str(ROOT)}
        settings = Settings.from_env(environ={}, instance_path=work / "instance",
                                     database_url=url, redis_url=args.redis,
                                     strict_certs=False)
        services = Services(settings)
        t = time.perf_counter()
        _, program_id = seed(services, count)
        print(f"seeded {count} customers and cards in {time.perf_counter() - t:.0f} s")

        # Ceiling of the import: `cards build` over the same cards (this also gives every
        # card its first version; no device is registered yet, so no push is due).
        with services.db.session() as session:
            program = session.get(Program, program_id)
            t = time.perf_counter()
            report = bulk.build_program(session, services, program, work / "built")
            build_rate = report.written / (time.perf_counter() - t)
        shutil.rmtree(work / "built")
        devices = register_devices(services, program_id)
        by_token = {device.push_token: device for device in devices}

        # The import alone (no worker, no device): what the import path itself does.
        solo_csv = work / "solo.csv"
        write_csv(solo_csv, count, 1)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "app.cli", "customers", "import", str(solo_csv),
                        "--tenant", demo_tenant_slug(services)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        solo_rate = count / (time.perf_counter() - t)
        forget_pushes(services, args.redis, devices)

        standin, apns_url, ca_file = start_standin(settings.certs_path, work)
        env.update(PASSERELLE_APNS_URL=apns_url, PASSERELLE_APNS_CA_FILE=str(ca_file))
        ceiling_label, apns_ceiling = h2load_rate(apns_url, max(count, 10_000), work)
        port = free_port()
        server = subprocess.Popen(server_command(args.server, port, args.server_workers,
                                                 args.server_threads) if args.server != "serve"
                                  else [*server_command("serve", port, 0, 0)],
                                  env={**env, "PASSERELLE_PUBLIC_URL": f"http://127.0.0.1:{port}"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        workers = [subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--workers",
                                     str(args.worker_threads)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for _ in range(args.worker_processes)]
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server)
            result = asyncio.run(storm(args, count, port, env, services, standin, by_token,
                                       work))
        finally:
            for process in [server, *workers, standin]:
                process.terminate()
            for process in [server, *workers, standin]:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
        services.close()

    import_rate, push_rate, storm_device_rate, replay_rate, health_rate, total, counters, \
        lost = result
    print(f"\ncores: {os.cpu_count()}; Python {platform.python_version()}; {count} customers, "
          f"one device each; server: {describe_server(args)}; "
          f"{args.worker_processes} worker process(es) x {args.worker_threads} threads; "
          f"{args.connections} device connections; PostgreSQL + Redis")
    print(f"{'stage':<44}{'rate':>12}{'ceiling, same run':>34}{'ratio':>8}")
    rows = [
        ("import alone (CLI, rows/s)", solo_rate, "cards build", build_rate),
        ("import during the storm (rows/s)", import_rate, "cards build", build_rate),
        ("pushes received by devices (/s)", push_rate, ceiling_label, apns_ceiling),
        ("device fetches during the storm (devices/s)", storm_device_rate,
         "GET /healthz x2 (devices' worth)", health_rate / 2),
        ("device fetches replayed alone (devices/s)", replay_rate,
         "GET /healthz x2 (devices' worth)", health_rate / 2),
    ]
    for name, rate, label, ceiling in rows:
        ratio = f"{rate / ceiling:.0%}" if ceiling else "-"
        print(f"{name:<44}{rate:>12.0f}{label:>24}{ceiling:>10.0f}{ratio:>8}")
    print(f"import start -> last device holding the new version: {total:.1f} s")
    print(f"connections refused: {counters.refused}; reconnects: {counters.reconnects}; "
          f"request errors: {len(counters.errors)}; devices without the new version: {lost}")
    for error in counters.errors[:5]:
        print(f"  {error}")
    return 0 if lost == 0 and not counters.errors else 1


def describe_server(args: argparse.Namespace) -> str:
    if args.server == "serve":
        return "`passerelle serve`"
    if args.server == "waitress":
        return f"waitress, {args.server_threads} threads"
    if args.server == "sync":
        return f"gunicorn sync, {args.server_workers} workers"
    return f"gunicorn gthread, {args.server_workers} workers x {args.server_threads} threads"


def demo_tenant_slug(services: Services) -> str:
    with services.db.session() as session:
        return session.scalar(select(Tenant.slug).join(Program, Program.tenant_id == Tenant.id)
                              .where(Program.slug == "rewards"))  # type: ignore[return-value]


def forget_pushes(services: Services, redis_url: str, devices: list[Device]) -> None:
    """After the solo import: its pushes are not part of the storm; devices catch up."""
    redis.Redis.from_url(redis_url).flushdb()
    with services.db.engine.begin() as conn:
        conn.execute(update(PushJob).values(done_at=utcnow()))
        rows = dict(conn.execute(select(Registration.device_library_identifier,
                                        Card.update_tag).join(Card)).all())
        modified = dict(conn.execute(select(Card.serial_number, Card.last_modified)).all())
    for device in devices:
        device.tag = str(rows[device.device_id])
        device.last_modified = email.utils.format_datetime(modified[device.serial], usegmt=True)


async def storm(args, count, port, env, services, standin, by_token, work):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    counters = Counters()
    pushed: list[float] = []

    def read_tokens() -> None:
        assert standin.stdout is not None
        for line in standin.stdout:
            device = by_token.get(line.strip())
            if device is not None and not device.pushed_at:
                device.pushed_at = time.perf_counter()
                pushed.append(device.pushed_at)
                loop.call_soon_threadsafe(queue.put_nowait, device)

    threading.Thread(target=read_tokens, daemon=True).start()
    storm_csv = work / "storm.csv"
    write_csv(storm_csv, count, 2)
    started = time.perf_counter()
    importer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "customers", "import", str(storm_csv),
        "--tenant", demo_tenant_slug(services), env=env,
        stdout=asyncio.subprocess.DEVNULL)
    driver = asyncio.create_task(drive(port, args.connections, queue, count, counters,
                                       retry=True))
    await importer.wait()
    import_rate = count / (time.perf_counter() - started)
    try:
        finished = await asyncio.wait_for(driver, args.timeout)
    except TimeoutError:
        finished = [d for d in by_token.values() if d.done_at]
        print(f"timed out after {args.timeout:.0f} s: {len(pushed)} of {count} devices "
              f"pushed, {len(finished)} hold the new version")
    lost = count - len([d for d in finished if d.done_at])
    done_times = sorted(d.done_at for d in finished if d.done_at)
    total = (done_times[-1] - started) if done_times else float("nan")
    push_rate = len(pushed) / (max(pushed) - min(pushed)) if len(pushed) > 1 else 0.0
    fetch_starts = sorted(d.pushed_at for d in finished if d.done_at)
    device_rate = (len(done_times) / (done_times[-1] - fetch_starts[0])
                   if done_times else 0.0)

    # The server's own ceiling with the same client and connections: /healthz (one
    # SELECT 1), then the device requests replayed alone (a device that missed the
    # storm asking again: tag before the change, pass without If-Modified-Since).
    sample = list(by_token.values())
    items = [("/healthz", {}, 200)] * (2 * count)
    health_rate = await hammer(port, args.connections, items, counters)
    replay = []
    for device in sample:
        replay.append((f"/passkit/v1/devices/{device.device_id}/registrations/{PASS_TYPE}"
                       f"?passesUpdatedSince={int(device.tag) - 1}", {}, 200))
        replay.append((f"/passkit/v1/passes/{PASS_TYPE}/{device.serial}",
                       {"Authorization": f"ApplePass {device.auth}"}, 200))
    replay_rate = await hammer(port, args.connections, replay, counters) / 2
    return (import_rate, push_rate, device_rate, replay_rate, health_rate, total, counters,
            lost)


if __name__ == "__main__":
    raise SystemExit(main())

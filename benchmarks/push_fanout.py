"""Push fan-out by the real worker: N changed cards, 1 device each, as push jobs.

    .venv/bin/python benchmarks/push_fanout.py [--cards 10000] [--repeat 3]
        [--database-url postgresql://postgres@127.0.0.1:5432/passerelle_push_bench]
        [--redis-url redis://127.0.0.1:6379/5] [--cpu-quota 0.5]

What production runs, end to end from the outbox: the database (PostgreSQL by
default; the named database is dropped and recreated, so give it one of its own)
is seeded with N cards that each have one registered device, plus the demo tenant
and its development Pass Type ID certificate. `passerelle worker` processes (1,
then 2) run against the APNs stand-in (tests/apns_standin.py, HTTP/2 over TLS,
its own process) with the Huey queue in Redis. Per run, N push jobs are written
(as the update pipeline writes them), handed to `JobQueue.dispatch` like a
committed import does, and timed until the database says every job is done;
every device must have a `sent` outcome. Reported: pushes/s per worker count, and
the CPU time the workers and the stand-in spent per push (from /proc: what the
rate would be with a core to spare, when the machine is shared).

In the same run, interleaved with the worker runs so both see the same machine,
the stand-in's ceiling with a lean client: `h2load` (C, from nghttp2; `apt-get
install nghttp2-client`), 1 connection, 100 concurrent streams. h2load cannot
present a client certificate, so the stand-in accepts clients without one (a
connection that presents one, like the worker's, is still verified and
topic-checked). Without h2load, a bare Python `h2` loop is used (and said so).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import make_url

from app.infra import migrate
from app.infra.config import Settings
from app.infra.models import Card, Customer, Program, PushAttempt, PushJob, Registration
from app.services import Services
from app.tenants import demo

PASS_TYPE = demo.DEMO_PASS_TYPE
STREAMS = 100  # h2load's concurrent streams on its one connection
DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/passerelle_push_bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="worker process counts to run")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker process")
    parser.add_argument("--database-url", default=DEFAULT_DB,
                        help="dropped and recreated (PostgreSQL) or a new SQLite file")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5",
                        help="Huey queue (flushed); '' for the embedded SQLite queue")
    parser.add_argument("--bare", choices=["auto", "h2load", "python"], default="auto")
    parser.add_argument("--cpu-quota", type=float, default=None, metavar="CORES",
                        help="cap each worker process at this many cores (a cgroup of its own; "
                             "root, cgroup v1 or v2): shows how rates add up per process on a "
                             "machine too small to give each worker a core")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="push-fanout-") as tmp:
        work = Path(tmp)
        database_url = _fresh_database(args.database_url, work)
        if args.redis_url:
            import redis

            redis.Redis.from_url(args.redis_url).flushdb()
        settings = Settings.from_env(
            environ={}, instance_path=work / "instance", database_url=database_url,
            certs_path=work / "certs", redis_url=args.redis_url, strict_certs=False,
            public_url="https://wallet.example.test")
        migrate.upgrade(database_url)
        services = Services(settings)
        with services.db.transaction() as session:
            demo.seed(session, services)
        card_ids = _seed_cards(services, args.cards)
        server, url, ca_file = _start_standin(settings.certs_path, work)
        bare = _pick_bare(args.bare)
        env = {**os.environ, "PASSERELLE_DATABASE_URL": database_url,
               "PASSERELLE_INSTANCE_PATH": str(settings.instance_path),
               "PASSERELLE_CERTS_PATH": str(settings.certs_path),
               "PASSERELLE_REDIS_URL": args.redis_url, "PASSERELLE_APNS_URL": url,
               "PASSERELLE_APNS_CA_FILE": str(ca_file)}
        rates: dict[int, list[float]] = {}
        cpu_per_push: dict[int, list[tuple[float, ...]]] = {}  # (workers, stand-in) in us
        ceilings: list[float] = []
        tokens = [secrets.token_hex(32) for _ in range(args.cards)]
        try:
            for count in [int(n) for n in args.workers.split(",")]:
                workers = [subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "worker", "--workers", str(args.threads)],
                    env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                    stderr=open(work / f"worker-{count}-{i}.log", "w"))
                    for i in range(count)]
                groups = [_cap_cpu(w.pid, args.cpu_quota) for w in workers] if args.cpu_quota else []
                try:
                    _run(services, card_ids[:200], count)  # processes up, connections open
                    for _ in range(args.repeat):
                        ceilings.append(_bare_rate(bare, url, ca_file, tokens, work))
                        cpu = _cpu_seconds([w.pid for w in workers]), _cpu_seconds([server.pid])
                        rates.setdefault(count, []).append(_run(services, card_ids, count))
                        cpu_per_push.setdefault(count, []).append(tuple(
                            (after - before) / len(card_ids) * 1e6 for before, after in zip(
                                cpu, (_cpu_seconds([w.pid for w in workers]),
                                      _cpu_seconds([server.pid])))))
                finally:
                    for worker in workers:
                        worker.send_signal(signal.SIGINT)
                    for worker in workers:
                        try:
                            worker.wait(timeout=15)
                        except subprocess.TimeoutExpired:
                            worker.kill()
                    for group in groups:
                        _remove_group(group)
        finally:
            server.terminate()
            server.wait(timeout=10)
            services.close()

    ceiling = statistics.median(ceilings)
    label = {"h2load": f"h2load -c 1 -m {STREAMS}",
             "python": f"bare Python h2 loop, {STREAMS} streams; client-bound, so a floor "
                       f"of the real ceiling: apt-get install nghttp2-client for h2load"}[bare]
    database = make_url(database_url).get_backend_name()
    print(f"cores: {os.cpu_count()}; Python {platform.python_version()}; {database}, queue "
          f"{'Redis' if args.redis_url else 'SQLite'}; {args.cards} changed cards with 1 "
          f"device each per run; median of {args.repeat}")
    if args.cpu_quota:
        print(f"each worker process capped at {args.cpu_quota:g} core(s) (cgroup cpu quota)")
    print(f"stand-in ceiling ({label})")
    print(f"  {ceiling:8.0f} pushes/s   runs: {', '.join(f'{r:.0f}' for r in ceilings)}")
    for count, runs in rates.items():
        rate = statistics.median(runs)
        print(f"passerelle worker x{count} ({args.threads} threads each): push jobs written "
              f"-> dispatch -> all done")
        print(f"  {rate:8.0f} pushes/s   runs: {', '.join(f'{r:.0f}' for r in runs)}   "
              f"{rate / count:.0f}/s per process, {rate / ceiling:.0%} of the ceiling")
        worker_us = statistics.median(c[0] for c in cpu_per_push[count])
        standin_us = statistics.median(c[1] for c in cpu_per_push[count])
        print(f"  CPU per push: workers {worker_us:.0f} us (all {count} together; one core "
              f"would carry {1e6 / worker_us:.0f}/s), stand-in {standin_us:.0f} us")
    if len(rates) > 1:
        one, *_, last = sorted(rates)
        scale = statistics.median(rates[last]) / statistics.median(rates[one])
        print(f"scaling {one} -> {last} processes: x{scale:.2f}")
    return 0


def _cap_cpu(pid: int, cores: float) -> Path:
    """Put one process (all its threads) in a cgroup of its own limited to ``cores``."""
    period = 100_000
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    group = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/cpu") / f"push-fanout-{pid}"
    group.mkdir()
    if v2:
        (group / "cpu.max").write_text(f"{int(cores * period)} {period}")
    else:
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(int(cores * period)))
    (group / "cgroup.procs").write_text(str(pid))
    return group


def _remove_group(group: Path) -> None:
    for _ in range(50):  # the exited process leaves the group a moment later
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes so far (Linux /proc), all their threads."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _fresh_database(url: str, work: Path) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:///{work / 'bench.sqlite3'}"
    import psycopg

    name = parsed.database
    admin = parsed.set(database="postgres").render_as_string(hide_password=False)
    admin = admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url


def _seed_cards(services: Services, count: int) -> list[int]:
    """`count` customers of the demo tenant, each with a card and one registered device."""
    with services.db.session() as session:
        program = session.scalar(select(Program).where(Program.slug == "rewards"))
        tenant_id, program_id = program.tenant_id, program.id
    chunk = 5000
    with services.db.engine.begin() as conn:
        for start in range(0, count, chunk):
            conn.execute(insert(Customer), [
                {"tenant_id": tenant_id, "external_id": f"P{i:07d}", "first_name": "Push",
                 "attributes": {"points": i}} for i in range(start, min(start + chunk, count))])
        customers = conn.execute(select(Customer.id).where(Customer.external_id.like("P%"))
                                 .order_by(Customer.id)).scalars().all()
        for start in range(0, count, chunk):
            conn.execute(insert(Card), [
                {"tenant_id": tenant_id, "program_id": program_id, "customer_id": customer,
                 "serial_number": secrets.token_urlsafe(16),
                 "authentication_token": secrets.token_urlsafe(32)}
                for customer in customers[start:start + chunk]])
        card_ids = conn.execute(select(Card.id).where(Card.customer_id.in_(
            select(Customer.id).where(Customer.external_id.like("P%")))).order_by(Card.id)
        ).scalars().all()
        for start in range(0, count, chunk):  # one device per card, tokens all different
            conn.execute(insert(Registration), [
                {"tenant_id": tenant_id, "card_id": card_id,
                 "device_library_identifier": f"bench{card_id:09d}",
                 "pass_type_identifier": PASS_TYPE, "push_token": secrets.token_hex(32)}
                for card_id in card_ids[start:start + chunk]])
        if conn.dialect.name == "postgresql":
            conn.execute(text("ANALYZE"))
    return list(card_ids)


def _run(services: Services, card_ids: list[int], workers: int) -> float:
    """Write one push job per card (as the update pipeline does), dispatch, time until
    every job is done; every device must have been sent its push."""
    tag = int(time.time() * 1000)
    with services.db.engine.begin() as conn:
        tenant_id = conn.execute(select(Card.tenant_id).limit(1)).scalar_one()
        job_ids = conn.execute(insert(PushJob).returning(PushJob.id), [
            {"tenant_id": tenant_id, "card_id": card_id, "update_tag": tag}
            for card_id in card_ids]).scalars().all()
        before = conn.execute(select(func.count(PushAttempt.id))
                              .where(PushAttempt.outcome == "sent")).scalar_one()
    started = time.perf_counter()
    services.jobs.dispatch(list(job_ids))
    deadline = time.monotonic() + 600
    while True:
        with services.db.engine.connect() as conn:
            left = conn.execute(select(func.count(PushJob.id))
                                .where(PushJob.done_at.is_(None))).scalar_one()
        if not left:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{left} push jobs still not done after 600 s "
                             f"({workers} worker processes): see the worker logs")
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    with services.db.engine.begin() as conn:
        sent = conn.execute(select(func.count(PushAttempt.id))
                            .where(PushAttempt.outcome == "sent")).scalar_one() - before
    if sent < len(card_ids):
        raise SystemExit(f"only {sent} of {len(card_ids)} devices were sent their push")
    return len(card_ids) / elapsed


def _start_standin(certs_path: Path, work: Path) -> tuple[subprocess.Popen, str, Path]:
    ca_file = work / "standin-ca.pem"
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "apns_standin.py"),
         "--client-ca", str(certs_path / "dev" / "root-ca.pem"),
         "--client-ca", str(certs_path / "wwdr" / "dev-wwdr.pem"),
         "--client-cert", "optional", "--ca-out", str(ca_file)],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("listening "):
        server.kill()
        raise SystemExit(f"stand-in did not start: {line!r}")
    return server, line.split()[1], ca_file


def _pick_bare(choice: str) -> str:
    if choice == "auto":
        return "h2load" if shutil.which("h2load") else "python"
    if choice == "h2load" and not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client (or --bare python)")
    return choice


def _bare_rate(kind: str, url: str, ca_file: Path, tokens: list[str], work: Path) -> float:
    if kind == "h2load":
        return _h2load_rate(url, tokens, work)
    return _python_h2_rate(url, ca_file, tokens)


def _h2load_rate(url: str, tokens: list[str], work: Path) -> float:
    uris, body = work / "uris.txt", work / "body.json"
    uris.write_text("".join(f"{url}/3/device/{t}\n" for t in tokens))
    body.write_bytes(b"{}")
    out = subprocess.run(
        ["h2load", "-n", str(len(tokens)), "-c", "1", "-m", str(STREAMS), "-t", "1",
         "-d", str(body), "-H", f"apns-topic: {PASS_TYPE}", "-i", str(uris)],
        capture_output=True, text=True, check=True).stdout
    done = re.search(r"status codes: (\d+) 2xx", out)
    if not done or int(done.group(1)) != len(tokens):
        raise SystemExit(f"h2load: not every request got a 2xx:\n{out}")
    match = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    assert match, out
    return float(match.group(3))


def _python_h2_rate(url: str, ca_file: Path, tokens: list[str]) -> float:
    """Bare h2 on a blocking TLS socket (no client certificate): STREAMS requests open."""
    import h2.config
    import h2.connection
    import h2.events

    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 443
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    started = time.perf_counter()
    pending, done, next_token = 0, 0, 0
    authority = f"{host}:{port}"
    while done < len(tokens):
        while pending < STREAMS and next_token < len(tokens):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [(":method", "POST"), (":scheme", "https"),
                                       (":authority", authority),
                                       (":path", f"/3/device/{tokens[next_token]}"),
                                       ("apns-topic", PASS_TYPE), ("content-length", "2")])
            conn.send_data(stream, b"{}", end_stream=True)
            pending, next_token = pending + 1, next_token + 1
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        if not data:
            raise SystemExit("stand-in closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.StreamEnded):
                pending, done = pending - 1, done + 1
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    elapsed = time.perf_counter() - started
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    return len(tokens) / elapsed


if __name__ == "__main__":
    raise SystemExit(main())

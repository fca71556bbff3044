"""The multi-node layout under faults, on one machine (issue 14).

PostgreSQL and Redis of our own, two ``passerelle serve`` processes behind
haproxy (deploy/haproxy.cfg, health-checked on /readyz), two ``passerelle worker``
processes and the APNs stand-in. Phones are simulated the way Wallet behaves:
they register through the proxy, and when a push reaches the stand-in they ask
for the serials changed since their tag and fetch the latest pass. People fill
in the enrollment form (GET, CSRF token, POST) from addresses of their own.

While a campaign update (one CSV import changing every card) is delivered, the
test kills a worker with SIGKILL, kills a web process, restarts Redis and
restarts PostgreSQL, each restarted as a supervisor would. Afterwards: every
phone holds the new version; no push was lost, and the only duplicate pushes
went to phones whose push was in flight when its worker died or whose outcome
could not be written while PostgreSQL was down (at-least-once); every form
submission exists exactly once; clients never saw a 500, and saw 5xx only
inside the restart windows (503s with Retry-After).

Run with ``pytest -m cluster`` (the default ``pytest`` run leaves it out). It
skips when haproxy, redis-server or PostgreSQL's binaries are missing, unless
``PASSERELLE_REQUIRE_CLUSTER=1`` (as in .ci/run) makes that a failure.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.infra.config import normalize_database_url
from tests.apns_standin import ApnsStandin
from tests.cluster import harness

pytestmark = pytest.mark.cluster

REQUIRE_ENV = "PASSERELLE_REQUIRE_CLUSTER"
CUSTOMERS = 200          # cards in the campaign
TWO_DEVICES = 40         # of which this many are on two phones
PUSH_DELAY = 1.5         # seconds the APNs stand-in takes to answer a campaign push
PUSH_LEASE_SECONDS = 15  # PASSERELLE_PUSH_LEASE_SECONDS: a dead worker's jobs come back soon
SETTLE = 3.0             # seconds after a fault's recovery that still count as its window
DEADLINE = 240.0         # seconds for every phone to hold the new version
PASS_TYPE = "pass.dev.passerelle.demo"


@dataclass
class Call:
    started: float
    ended: float
    what: str
    status: int  # 0: no HTTP answer at all
    retry_after: str | None = None


@dataclass
class Journal:
    """Every request a client made through the proxy, and the fault windows."""

    calls: list[Call] = field(default_factory=list)
    windows: list[tuple[str, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, client: httpx.Client, what: str, method: str, url: str,
                **kwargs: object) -> httpx.Response | None:
        started = time.monotonic()
        try:
            response = client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError:
            response = None
        call = Call(started, time.monotonic(), what,
                    response.status_code if response is not None else 0,
                    response.headers.get("Retry-After") if response is not None else None)
        with self.lock:
            self.calls.append(call)
        return response

    def in_window(self, call: Call) -> bool:
        return any(call.started <= end and call.ended >= start
                   for _, start, end in self.windows)


def retry_pause(response: httpx.Response | None) -> float:
    if response is not None and (response.headers.get("Retry-After") or "").isdigit():
        return min(float(response.headers["Retry-After"]), 2.0)
    return 0.5


@dataclass
class Phone:
    device: str
    token: str
    serial: str
    auth: str
    tag: str = ""
    last_modified: str | None = None
    points: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def points_of(pkpass: bytes) -> int:
    with zipfile.ZipFile(io.BytesIO(pkpass)) as archive:
        data = json.loads(archive.read("pass.json"))
    for style in ("storeCard", "generic", "eventTicket", "coupon", "boardingPass"):
        for group, fields_ in data.get(style, {}).items():
            if group.endswith("Fields"):
                for item in fields_:
                    if item.get("key") == "points":  # "100,000": formatted for the locale
                        return int(re.sub(r"\D", "", str(item["value"])))
    raise AssertionError("no points field in pass.json")


class Fleet:
    """Simulated phones: each one reacts to its pushes as Wallet does."""

    def __init__(self, base: str, journal: Journal, phones: list[Phone]) -> None:
        self.base = base
        self.journal = journal
        self.by_token = {p.token: p for p in phones}
        self.client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=16))
        self.pool = concurrent.futures.ThreadPoolExecutor(8)
        self.failures: list[str] = []

    def register(self, phone: Phone) -> None:
        url = f"{self.base}/passkit/v1/devices/{phone.device}/registrations/{PASS_TYPE}/{phone.serial}"
        response = self.journal.request(self.client, "register", "POST", url,
                                        headers={"Authorization": f"ApplePass {phone.auth}"},
                                        json={"pushToken": phone.token})
        assert response is not None and response.status_code == 201, response
        self.refresh(phone)

    def refresh(self, phone: Phone) -> None:
        """What Wallet does on a push: serials since its tag, then each changed pass."""
        with phone.lock:
            try:
                for _attempt in range(60):
                    if self._refresh_once(phone):
                        return
                self.failures.append(f"{phone.device}: gave up refreshing")
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.failures.append(f"{phone.device}: {exc!r}")

    def _refresh_once(self, phone: Phone) -> bool:
        url = f"{self.base}/passkit/v1/devices/{phone.device}/registrations/{PASS_TYPE}"
        params = {"passesUpdatedSince": phone.tag} if phone.tag else {}
        response = self.journal.request(self.client, "serials", "GET", url, params=params)
        if response is None or response.status_code >= 500:
            time.sleep(retry_pause(response))
            return False
        if response.status_code == 204:
            return True
        assert response.status_code == 200, response.text
        body = response.json()
        for serial in body["serialNumbers"]:
            headers = {"Authorization": f"ApplePass {phone.auth}"}
            if phone.last_modified:
                headers["If-Modified-Since"] = phone.last_modified
            got = self.journal.request(self.client, "latest pass", "GET",
                                       f"{self.base}/passkit/v1/passes/{PASS_TYPE}/{serial}",
                                       headers=headers)
            if got is None or got.status_code >= 500:
                time.sleep(retry_pause(got))
                return False  # the tag stays: ask again for the same serials
            if got.status_code == 200:
                phone.points = points_of(got.content)
                phone.last_modified = got.headers.get("Last-Modified")
            else:
                assert got.status_code == 304, got.text
        phone.tag = body["lastUpdated"]
        return True

    def on_push(self, token: str) -> None:
        phone = self.by_token.get(token)
        if phone is not None:
            self.pool.submit(self.refresh, phone)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


class PushWatch(threading.Thread):
    """Hands every push the stand-in receives to the phone it was for, stamped in time."""

    def __init__(self, apns: ApnsStandin, fleet: Fleet) -> None:
        super().__init__(daemon=True)
        self.apns, self.fleet = apns, fleet
        self.seen: list[tuple[float, str, int]] = []  # (time, token, connection id)
        self.stop = threading.Event()

    def run(self) -> None:
        index = 0
        while not self.stop.is_set():
            received = self.apns.received
            while index < len(received):
                item = received[index]
                index += 1
                self.seen.append((time.monotonic(), item.token, item.connection_id))
                self.fleet.on_push(item.token)
            time.sleep(0.02)


class People(threading.Thread):
    """People enrolling through the public form, each from an address of their own.

    Each person types a name nobody else has, so their enrollment can be counted
    in the database whatever shape it takes (a new member, or a held enrollment
    for a known email). A person whose post got a 5xx taps "send" again.
    """

    PAUSE = 6.5  # under the form limit (10 a minute) even if all came from one address

    def __init__(self, base: str, journal: Journal) -> None:
        super().__init__(daemon=True)
        self.base, self.journal = base, journal
        self.stop = threading.Event()
        self.enrolled: list[str] = []  # their unique last names
        self.failures: list[str] = []
        self.tapped_again = 0

    def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            number += 1
            name = f"Form{secrets.token_hex(6)}"
            address = f"127.0.{1 + number // 250}.{1 + number % 250}"
            try:
                self.enroll(name, address)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.failures.append(f"{name}: {exc!r}")
            self.stop.wait(self.PAUSE)

    def enroll_when(self, moment: threading.Event) -> None:
        """One person who opens the form now and sends it at ``moment`` (a fault)."""
        name = f"Form{secrets.token_hex(6)}"
        try:
            self.enroll(name, "127.0.0.250", moment)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.failures.append(f"{name}: {exc!r}")

    def enroll(self, name: str, address: str, moment: threading.Event | None = None) -> None:
        transport = httpx.HTTPTransport(local_address=address)
        url = f"{self.base}/join/demo/rewards"
        with httpx.Client(transport=transport, timeout=30) as client:
            for _ in range(60):
                page = self.journal.request(client, "form", "GET", url)
                if page is not None and page.status_code == 200:
                    break
                time.sleep(retry_pause(page))
            else:
                raise AssertionError("the form never loaded")
            form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                                   page.text))
            form.update(email=f"{name.lower()}@forms.example", first_name="Alex",
                        last_name=name, consent_terms="yes", website="")
            if moment is not None:
                moment.wait(120)
            for attempt in range(60):
                answer = self.journal.request(client, "enroll", "POST", url, data=form)
                if answer is not None and answer.status_code == 303:
                    self.enrolled.append(name)
                    self.tapped_again += attempt > 0
                    return
                if answer is not None and answer.status_code == 429:
                    time.sleep(min(float(answer.headers.get("Retry-After") or 5), 10))
                    continue
                if answer is not None and answer.status_code < 500:
                    raise AssertionError(f"form answered {answer.status_code}: "
                                         f"{answer.text[:300]}")
                time.sleep(retry_pause(answer))  # tap again, as a person would
            raise AssertionError("never accepted")


def _environment(root: Path, pg: harness.Postgres, redis: harness.Redis,
                 proxy_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSERELLE_")}
    (root / "metrics").mkdir()
    env.update({
        "PASSERELLE_DATABASE_URL": pg.url,
        "PASSERELLE_REDIS_URL": redis.url,
        "PASSERELLE_INSTANCE_PATH": str(root / "instance"),
        "PASSERELLE_CERTS_PATH": str(root / "certs"),
        "PASSERELLE_SECRET_KEY": secrets.token_urlsafe(32),
        "PASSERELLE_PUBLIC_URL": f"http://127.0.0.1:{proxy_port}",
        "PASSERELLE_TRUSTED_PROXIES": "1",
        "PASSERELLE_PUSH_LEASE_SECONDS": str(PUSH_LEASE_SECONDS),
        "PASSERELLE_LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": str(root / "metrics"),
    })
    return env


def _local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (from /proc: its fds, then the tcp tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _wait_ready(cluster: harness.Cluster, seconds: float = 60) -> None:
    harness.wait_until(lambda: httpx.get(f"{cluster.url}/readyz", timeout=2).status_code == 200,
                       seconds, "the proxy's /readyz")


def test_campaign_survives_faults(capsys: pytest.CaptureFixture[str]) -> None:
    missing = harness.missing_programs()
    if missing:
        reason = (f"the cluster test needs {', '.join(missing)} "
                  "(apt-get install haproxy redis-server postgresql)")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason + f"; {REQUIRE_ENV}=1 makes it mandatory")
        pytest.skip(reason)

    root = harness.make_root()
    pg, redis = harness.Postgres(root), harness.Redis(root)
    pg.init()
    redis.start()
    proxy_port = harness.free_port()
    cluster = harness.Cluster(root, _environment(root, pg, redis, proxy_port), pg, redis)
    engine = create_engine(normalize_database_url(pg.url), pool_pre_ping=True)
    apns: ApnsStandin | None = None
    passed = False
    try:
        apns = _run(cluster, engine, proxy_port, capsys)
        passed = True
    except BaseException:
        print(cluster.logs())
        print(f"every log and the database's folder are kept in {root}")
        raise
    finally:
        if apns is not None:
            apns.stop()
        engine.dispose()
        cluster.stop()
        if passed:
            shutil.rmtree(root, ignore_errors=True)


def _run(cluster: harness.Cluster, engine, proxy_port: int,  # type: ignore[no-untyped-def]
         capsys: pytest.CaptureFixture[str]) -> ApnsStandin:
    root = cluster.root
    setup_began = time.monotonic()
    # -- the brand's data, as an operator would load it ----------------------------------
    cluster.cli("db", "upgrade")
    cluster.cli("demo")  # the demo tenant, its development certificates and programs
    first = [{"external_id": f"K-{i:04d}", "email": f"k{i:04d}@cluster.example",
              "first_name": "Kim", "points": i, "tier": "Member"} for i in range(CUSTOMERS)]
    _write_csv(root / "before.csv", first)
    cluster.cli("customers", "import", str(root / "before.csv"), "--tenant", "demo")
    cluster.cli("cards", "build", "--program", "rewards", "--tenant", "demo",
                "--out", str(root / "cards"), "--issue-missing", "--workers", "2")

    apns = ApnsStandin(client_ca_files=[root / "certs" / "dev" / "root-ca.pem",
                                        root / "certs" / "wwdr" / "dev-wwdr.pem"]).start()
    cluster.env["PASSERELLE_APNS_URL"] = apns.url
    cluster.env["PASSERELLE_APNS_CA_FILE"] = str(apns.ca_file)

    # -- the layout: two web processes behind haproxy, two workers -----------------------
    cluster.add_web()
    cluster.add_web()
    for index in range(2):
        harness.wait_until(lambda i=index: cluster.web_ready(i), 60, f"web{index + 1}")
    cluster.start_proxy(proxy_port)
    _wait_ready(cluster)
    cluster.add_worker()
    cluster.add_worker()

    # -- phones install their cards (read from the .pkpass files) and register -----------
    with engine.connect() as conn:
        external_of = dict(conn.execute(text(
            "SELECT c.serial_number, cu.external_id FROM cards c "
            "JOIN customers cu ON cu.id = c.customer_id")).all())
    phones: list[Phone] = []
    expected: dict[str, int] = {}
    for path in sorted((root / "cards").glob("*.pkpass")):
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read("pass.json"))
        assert data["webServiceURL"] == f"http://127.0.0.1:{proxy_port}/passkit"
        external_id = external_of[data["serialNumber"]]
        if not external_id.startswith("K-"):
            continue
        number = int(external_id[2:])
        expected[data["serialNumber"]] = 100_000 + number
        for _ in range(2 if number < TWO_DEVICES else 1):
            phones.append(Phone(device=secrets.token_hex(16), token=secrets.token_hex(32),
                                serial=data["serialNumber"], auth=data["authenticationToken"]))
    assert len(expected) == CUSTOMERS
    journal = Journal()
    fleet = Fleet(cluster.url, journal, phones)
    list(fleet.pool.map(fleet.register, phones))
    assert not fleet.failures
    assert all(p.points == expected[p.serial] - 100_000 for p in phones)

    # -- the campaign, under faults -------------------------------------------------------
    for phone in phones:  # the campaign's pushes take a while to answer: some are in flight
        apns.script[phone.token] = [(200, None, PUSH_DELAY)]
    watch = PushWatch(apns, fleet)
    watch.start()
    people = People(cluster.url, journal)
    people.start()
    second = [{"external_id": row["external_id"], "points": 100_000 + i}
              for i, row in enumerate(first)]
    _write_csv(root / "campaign.csv", second)
    began = time.monotonic()
    setup = began - setup_began
    cluster.cli("customers", "import", str(root / "campaign.csv"), "--tenant", "demo")

    # 1. SIGKILL a worker in the middle of its pushes; its supervisor starts it again.
    harness.wait_until(lambda: len(watch.seen) >= 20, 60, "campaign pushes in flight")
    before = {c.id for c in list(apns._protocols)}
    # The worker whose drain took the campaign holds the stand-in's connections: that
    # one is killed (a queue task goes to whichever worker asks first).
    peers = {c.transport.get_extra_info("peername")[1]
             for c in list(apns._protocols) if c.transport is not None}
    victim = next((i for i, w in enumerate(cluster.workers)
                   if w.process is not None and _local_ports(w.process.pid) & peers), 0)
    killed_at = time.monotonic()
    cluster.workers[victim].kill(signal.SIGKILL)
    time.sleep(1.0)
    killed_connections = before - {c.id for c in list(apns._protocols)}
    assert killed_connections, "the killed worker held no APNs connection"
    in_flight_killed = {token for at, token, conn in watch.seen
                        if conn in killed_connections and at <= killed_at + 0.5}

    # 2. SIGKILL a web process; its supervisor starts it again at once. Clients may
    #    see the requests it was answering fail until haproxy's checks notice (3 s).
    time.sleep(2.0)
    start = time.monotonic()
    cluster.web[0].kill(signal.SIGKILL)
    journal.windows.append(("web1 killed", start, start + 3.0 + SETTLE))

    # 3. Restart PostgreSQL while phones fetch their passes and someone sends the form.
    stopped = threading.Event()
    sender = threading.Thread(target=people.enroll_when, args=(stopped,), daemon=True)
    sender.start()
    time.sleep(2.0)
    pg_down = time.monotonic()
    cluster.postgres.stop("fast")
    stopped.set()
    time.sleep(3.0)
    cluster.postgres.start()
    _wait_ready(cluster)
    pg_up = time.monotonic()
    journal.windows.append(("postgres restart", pg_down, pg_up + SETTLE))

    # 4. Restart Redis (it keeps nothing: every queued task is gone; sweepers find them).
    time.sleep(2.0)
    start = time.monotonic()
    cluster.redis.stop()
    time.sleep(2.0)
    cluster.redis.start()
    _wait_ready(cluster)
    journal.windows.append(("redis restart", start, time.monotonic() + SETTLE))
    harness.wait_until(lambda: cluster.web_ready(0), 120, "web1 again")
    time.sleep(SETTLE + 2.0)
    people.stop.set()
    people.join(timeout=120)
    sender.join(timeout=120)

    # -- every phone ends up with the new version ----------------------------------------
    def all_current() -> bool:
        return all(p.points == expected[p.serial] for p in phones)

    harness.wait_until(all_current, DEADLINE - (time.monotonic() - began), "every phone current",
                       every=0.5)
    finished = time.monotonic() - began
    time.sleep(1.0)
    watch.stop.set()
    watch.join(timeout=10)
    fleet.close()

    # -- what must hold -------------------------------------------------------------------
    assert not fleet.failures, fleet.failures
    assert not people.failures, people.failures
    pushes: dict[str, int] = {}
    first_push_at: dict[str, float] = {}
    for at, token, _conn in watch.seen:
        pushes[token] = pushes.get(token, 0) + 1
        first_push_at.setdefault(token, at)
    lost = [p.device for p in phones if p.token not in pushes]
    assert not lost, f"{len(lost)} phones never got their push"
    duplicated = {t for t, n in pushes.items() if n > 1}
    # At-least-once: a push may go out twice only if its outcome could not be written:
    # its worker was killed, or PostgreSQL was down when it was answered.
    during_pg = {t for t, at in first_push_at.items() if pg_down - PUSH_DELAY - 2 <= at <= pg_up}
    unexplained = duplicated - in_flight_killed - during_pg
    assert not unexplained, f"{len(unexplained)} devices got a push twice for no reason"

    with engine.connect() as conn:
        counts = dict(conn.execute(text(
            "SELECT last_name, count(*) FROM customers WHERE last_name LIKE 'Form%' "
            "GROUP BY last_name")).all())
    assert people.enrolled, "no enrollment went through"
    twice = {n: c for n, c in counts.items() if c != 1}
    assert not twice, f"form submissions stored more than once: {twice}"
    assert set(counts) == set(people.enrolled)

    five = [c for c in journal.calls if c.status >= 500 or c.status == 0]
    assert not [c for c in five if c.status == 500], "a client saw a 500"
    outside = [c for c in five if not journal.in_window(c)]
    assert not outside, f"5xx or no answer outside the restart windows: {outside[:5]}"
    no_retry_after = [c for c in five if c.status == 503 and not c.retry_after]
    assert not no_retry_after, f"503 without Retry-After: {no_retry_after[:5]}"
    for process in cluster.web:  # what app/web/errors.py logs before answering 500
        log = process.log.read_text(errors="replace")
        assert "unhandled error" not in log, f"{process.name}:\n{log[-3000:]}"
    # Only the processes the test killed were started again: none died on its own (one
    # started again while PostgreSQL is down exits, and is started once more).
    survivor = cluster.workers[1 - victim]
    assert survivor.starts == 1, f"{survivor.name} died on its own"
    assert cluster.web[1].starts == 1, "web2 died on its own"

    with capsys.disabled():
        by_status: dict[int, int] = {}
        for c in journal.calls:
            by_status[c.status] = by_status.get(c.status, 0) + 1
        print(f"\ncluster: setup {setup:.0f}s; {len(phones)} phones on {CUSTOMERS} cards all current "
              f"{finished:.0f}s after the import; pushes {sum(pushes.values())}, duplicated "
              f"for {len(duplicated)} devices ({len(duplicated & in_flight_killed)} in flight "
              f"in the killed worker [{len(in_flight_killed)} were], "
              f"{len(duplicated & during_pg - in_flight_killed)} during the PostgreSQL "
              f"restart); {len(people.enrolled)} enrollments, {people.tapped_again} needed "
              f"another tap; client answers {dict(sorted(by_status.items()))}; windows "
              + ", ".join(f"{name} {end - start:.1f}s" for name, start, end in journal.windows)
              + f"; started web {[w.starts for w in cluster.web]}, workers "
              f"{[w.starts for w in cluster.workers]}")
    return apns

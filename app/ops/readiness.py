"""Is this process ready for traffic? What load balancers and operators ask.

``/healthz`` says the process is alive (and the database answers); ``/readyz``
says it should be sent traffic: database reachable, schema at the latest
migration, every Pass Type ID certificate loadable and in date, and the job
queue reachable. Checks that read files are cached briefly so that a load
balancer probing every second costs one SELECT, not a certificate parse.

The queue is reported but not required: every web process shares the same
Redis, so taking them all out of the load balancer while it restarts would turn
a few seconds of late pushes (rows wait in the database; the sweepers queue
them) into an outage of every page and device request. ``/readyz`` then
answers 200 with ``"status": "degraded"``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from app.infra import migrate
from app.infra.models import AppleIdentity, Program
from app.wallet import certs
from app.wallet.certs import identity_password

if TYPE_CHECKING:
    from app.services import Services

CACHE_SECONDS = 30.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""
    #: False: a failure degrades the process but it should still get traffic.
    required: bool = True


def check_certificates(services: Services, *, apns: bool = False
                       ) -> tuple[list[str], list[str]]:
    """Every registered identity and every program's pass type: (errors, warnings).

    ``apns``: also report certificates the push workers cannot connect to APNs with
    (`certs check` does; ``/readyz`` does not: web processes serve fine meanwhile,
    and ``/healthz/pushes`` reports it)."""

    errors: list[str] = []
    warnings: list[str] = []
    with services.db.session() as session:
        identities = session.scalars(select(AppleIdentity)).all()
        programs = session.scalars(select(Program)).all()
        known = {i.pass_type_identifier for i in identities}
        for identity in identities:
            if apns and identity.apns_failing_since is not None:
                errors.append(apns_status_line(identity))
            try:
                password = identity_password(identity)
            except certs.CertificateError as exc:
                errors.append(str(exc))
                continue
            for problem in certs.check_identity(
                    services.settings.certs_path, identity.certificate_file, identity.key_file,
                    password, identity.pass_type_identifier, identity.team_identifier,
                    warn_days=services.settings.cert_warn_days):
                line = f"{identity.pass_type_identifier}: {problem.message}"
                (errors if problem.level == "error" else warnings).append(line)
        for program in programs:
            if program.pass_type_identifier not in known:
                errors.append(f"program {program.slug!r}: no certificate registered for "
                              f"{program.pass_type_identifier!r}")
    return errors, warnings


def apns_status_line(identity: AppleIdentity) -> str:
    """What the push workers' circuit breaker recorded for this identity."""
    next_at = identity.apns_next_attempt_at
    return (f"{identity.pass_type_identifier}: APNs connections fail since "
            f"{identity.apns_failing_since:%Y-%m-%d %H:%M} UTC, pushes are paused"
            + (f" (next attempt {next_at:%H:%M:%S} UTC)" if next_at else "")
            + f": {identity.apns_problem}")


def certificate_expiry(services: Services) -> list[tuple[str, dt.datetime]]:
    """(pass type, not-after) of every identity whose certificate loads."""
    out = []
    with services.db.session() as session:
        identities = session.scalars(select(AppleIdentity)).all()
        for identity in identities:
            try:
                loaded = services.signing_identity(identity)
            except certs.CertificateError:
                continue
            out.append((identity.pass_type_identifier, loaded.not_after))
    return out


class Readiness:
    """The checks of one process, with the slow ones cached."""

    def __init__(self, services: Services, clock: Callable[[], float] = time.monotonic) -> None:
        self.services = services
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: dict[str, tuple[float, Check]] = {}

    def checks(self) -> list[Check]:
        database = self._database()
        if not database.ok:  # the others need it: say the one thing that is wrong
            return [database]
        return [database, self._cache("migrations", self._migrations),
                self._cache("certificates", self._certificates), self._queue()]

    def _cache(self, name: str, run: Callable[[], Check]) -> Check:
        now = self._clock()
        with self._lock:
            hit = self._cached.get(name)
            if hit and hit[1].ok and now - hit[0] < CACHE_SECONDS:
                return hit[1]  # a failure is re-checked at once, a success held briefly
        result = run()
        with self._lock:
            self._cached[name] = (now, result)
        return result

    def _database(self) -> Check:
        try:
            with self.services.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            return Check("database", False, type(exc).__name__)
        return Check("database", True)

    def _migrations(self) -> Check:
        if migrate.is_current(self.services.db.engine):
            return Check("migrations", True)
        return Check("migrations", False, "schema behind: run `passerelle db upgrade`")

    def _certificates(self) -> Check:
        errors, _warnings = check_certificates(self.services)
        return Check("certificates", not errors, "; ".join(errors))

    def _queue(self) -> Check:
        try:
            self.services.jobs.huey.storage.queue_size()
        except Exception as exc:  # noqa: BLE001 - Redis down, SQLite unreadable: degraded either way
            return Check("queue", False, f"{type(exc).__name__}: pushes and deliveries wait "
                                         f"in the database until it answers", required=False)
        return Check("queue", True, required=False)

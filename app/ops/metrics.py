"""Prometheus metrics: what the system is doing, from web processes and workers.

Counters and histograms are defined in app/infra/instruments.py and fed where things
happen (requests, pushes, Google calls). Queue depths, the oldest due row per outbox
and days to certificate expiry are read from the database when /metrics is
scraped, so they are the same whichever process answers.

Several processes on one host (a preforking server, workers): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty folder shared by all of them before they
start; each process writes its counters there and any web process's /metrics
adds them up (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.infra.models import (
    AppleIdentity,
    CrmOutboxEntry,
    ImportJob,
    MailOutboxEntry,
    PushJob,
    WebhookDelivery,
    utcnow,
)
from app.infra.outbox import claimable

if TYPE_CHECKING:
    from app.services import Services

from app.infra.instruments import FED
from app.ops.readiness import certificate_expiry


class StateCollector(Collector):
    """Read at scrape time: outbox depth and oldest due row, certificate expiry."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("passerelle_outbox_due",
                                  "Rows not done and due now, per outbox", labels=["outbox"])
        oldest = GaugeMetricFamily(
            "passerelle_outbox_oldest_due_seconds",
            "Age of the oldest row not done and due now, per outbox (0 when empty)",
            labels=["outbox"])
        up = GaugeMetricFamily("passerelle_database_up", "1 when the database answered")
        try:
            now = utcnow()
            with self.services.db.session() as session:
                for name, count, first in _outbox_state(session, now):
                    depth.add_metric([name], count)
                    oldest.add_metric([name], (now - first).total_seconds() if first else 0.0)
            up.add_metric([], 1)
        except SQLAlchemyError:
            up.add_metric([], 0)
        yield up
        yield depth
        yield oldest
        try:  # a database gone mid-scrape: say so above, never answer 500
            state = [*_certificate_metrics(self.services), *_breaker_metrics(self.services)]
        except SQLAlchemyError:
            return
        yield from state


def _outbox_state(session: Any, now: dt.datetime) -> Iterable[tuple[str, int, Any]]:
    for name, model, extra in (
            ("apple_pushes", PushJob, [PushJob.channel == "apple"]),
            ("google_updates", PushJob, [PushJob.channel == "google"]),
            ("crm_writes", CrmOutboxEntry, []), ("webhooks", WebhookDelivery, []),
            ("mails", MailOutboxEntry, []), ("imports", ImportJob, [])):
        conditions = [*claimable(model, now), *extra] if hasattr(model, "done_at") else [
            model.finished_at.is_(None), *extra]
        count, first = session.execute(
            select(func.count(), func.min(model.created_at)).where(*conditions)).one()
        yield name, count, first


def _certificate_metrics(services: Services) -> Iterator[Metric]:

    days = GaugeMetricFamily("passerelle_certificate_expiry_days",
                             "Days until each Pass Type ID certificate expires",
                             labels=["pass_type"])
    for pass_type, not_after in certificate_expiry(services):
        days.add_metric([pass_type], (not_after - dt.datetime.now(dt.UTC)).total_seconds()
                        / 86400)
    yield days


def _breaker_metrics(services: Services) -> Iterator[Metric]:
    """The APNs circuit breaker per certificate, as the workers last wrote it down
    (app/pushes.py keeps the identity's apns_* columns in step with the breaker)."""
    is_open = GaugeMetricFamily(
        "passerelle_apns_circuit_open",
        "1 while connecting to APNs fails for this Pass Type ID and its pushes are paused",
        labels=["pass_type"])
    failing = GaugeMetricFamily(
        "passerelle_apns_circuit_failing_seconds",
        "How long connecting to APNs has been failing for this Pass Type ID (0 when it works)",
        labels=["pass_type"])
    now = utcnow()
    with services.db.session() as session:
        rows = session.execute(select(AppleIdentity.pass_type_identifier,
                                      AppleIdentity.apns_failing_since)).all()
    for pass_type, since in rows:
        is_open.add_metric([pass_type], 1 if since is not None else 0)
        failing.add_metric([pass_type], max((now - since).total_seconds(), 0.0)
                           if since is not None else 0.0)
    yield is_open
    yield failing


def exposition(services: Services) -> tuple[bytes, str]:
    """The text format of every metric this host's processes recorded, plus state."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        for collector in FED:
            registry.register(collector)
    registry.register(StateCollector(services))
    return generate_latest(registry), CONTENT_TYPE_LATEST

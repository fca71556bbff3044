"""Prometheus metrics: what the system is doing, from web processes and workers.

Counters and histograms are updated where things happen (requests here, pushes
and Google calls in their modules). Queue depths, the oldest due row per outbox
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
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.models import (
    CrmOutboxEntry,
    ImportJob,
    MailOutboxEntry,
    PushJob,
    WebhookDelivery,
    utcnow,
)
from app.outbox import claimable

if TYPE_CHECKING:
    from app.services import Services

# Endpoint groups: few, stable label values (never a path: paths carry tokens).
GROUPS = {"passkit": "device_api", "links": "landing", "demo": "landing", "api": "marketer_api",
          "google": "callbacks", "hooks": "callbacks", "admin": "dashboard",
          "health": "health", "ops": "health"}

REQUESTS = Counter("passerelle_http_requests_total", "HTTP requests answered",
                   ["group", "method", "status"])
REQUEST_SECONDS = Histogram(
    "passerelle_http_request_duration_seconds", "Time to answer a request", ["group"],
    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
PUSH_OUTCOMES = Counter("passerelle_push_outcomes_total",
                        "Per-device push outcomes (APNs) and object updates (Google)",
                        ["channel", "outcome"])
APNS_SECONDS = Histogram("passerelle_apns_request_duration_seconds",
                         "APNs request round trip", buckets=(.005, .01, .025, .05, .1, .25,
                                                             .5, 1, 2.5, 5, 10))
APNS_ERRORS = Counter("passerelle_apns_errors_total",
                      "APNs answers other than 200, and transport failures", ["reason"])
GOOGLE_SECONDS = Histogram("passerelle_google_request_duration_seconds",
                           "Google Wallet REST round trip", ["method"],
                           buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
GOOGLE_ERRORS = Counter("passerelle_google_errors_total",
                        "Google Wallet REST answers >= 400 and transport failures", ["status"])


def group_of(blueprint: str | None) -> str:
    return GROUPS.get(blueprint or "", "other")


def observe_request(blueprint: str | None, method: str, status: int, seconds: float) -> None:
    group = group_of(blueprint)
    REQUESTS.labels(group, method, str(status)).inc()
    REQUEST_SECONDS.labels(group).observe(seconds)


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
        yield from _certificate_metrics(self.services)


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
    from app.readiness import certificate_expiry

    days = GaugeMetricFamily("passerelle_certificate_expiry_days",
                             "Days until each Pass Type ID certificate expires",
                             labels=["pass_type"])
    for pass_type, not_after in certificate_expiry(services):
        days.add_metric([pass_type], (not_after - dt.datetime.now(dt.UTC)).total_seconds()
                        / 86400)
    yield days


def exposition(services: Services) -> tuple[bytes, str]:
    """The text format of every metric this host's processes recorded, plus state."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        for collector in (REQUESTS, REQUEST_SECONDS, PUSH_OUTCOMES, APNS_SECONDS,
                          APNS_ERRORS, GOOGLE_SECONDS, GOOGLE_ERRORS):
            registry.register(collector)
    registry.register(StateCollector(services))
    return generate_latest(registry), CONTENT_TYPE_LATEST

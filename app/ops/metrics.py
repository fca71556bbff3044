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
                        "Per-device push outcomes (APNs) and per-card object updates (Google)",
                        ["channel", "outcome"])
APNS_SECONDS = Histogram("passerelle_apns_request_duration_seconds",
                         "APNs request round trip (answered requests)",
                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
APNS_ERRORS = Counter("passerelle_apns_errors_total",
                      "APNs answers other than 200, and pushes that got no answer",
                      ["status", "reason"])
APNS_CONNECTIONS = Counter("passerelle_apns_connections_total",
                           "APNs connection attempts (TCP + TLS + HTTP/2 settings)",
                           ["result"])
GOOGLE_SECONDS = Histogram("passerelle_google_request_duration_seconds",
                           "Google Wallet REST round trip (answered requests)", ["operation"],
                           buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
GOOGLE_ERRORS = Counter("passerelle_google_errors_total",
                        "Google Wallet REST answers >= 400 and calls that got no answer",
                        ["operation", "status"])
_FED = (REQUESTS, REQUEST_SECONDS, PUSH_OUTCOMES, APNS_SECONDS, APNS_ERRORS, APNS_CONNECTIONS,
        GOOGLE_SECONDS, GOOGLE_ERRORS)

# Label values come from these fixed sets only: an unexpected status or reason is folded
# into its class ("5xx") or "other", so a misbehaving server cannot grow the series count.
#: Statuses APNs documents (developer.apple.com, "Handling notification responses from APNs").
APNS_STATUSES = frozenset({400, 403, 404, 405, 410, 413, 429, 500, 503})
#: Reasons APNs documents for those statuses.
APNS_REASONS = frozenset({
    "BadCollapseId", "BadDeviceToken", "BadExpirationDate", "BadMessageId", "BadPriority",
    "BadTopic", "DeviceTokenNotForTopic", "DuplicateHeaders", "IdleTimeout",
    "InvalidPushType", "MissingDeviceToken", "MissingTopic", "PayloadEmpty",
    "TopicDisallowed", "BadCertificate", "BadCertificateEnvironment", "ExpiredProviderToken",
    "Forbidden", "InvalidProviderToken", "MissingProviderToken", "UnrelatedKeyIdInToken",
    "BadEnvironmentKeyInToken", "BadPath", "MethodNotAllowed", "ExpiredToken",
    "Unregistered", "PayloadTooLarge", "TooManyProviderTokenUpdates", "TooManyRequests",
    "InternalServerError", "ServiceUnavailable", "Shutdown"})
#: Why an APNs push or connection got no HTTP answer (app/apns.py decides which).
APNS_TRANSPORT_REASONS = frozenset({
    "connect_failed", "connect_timeout", "tls_refused", "circuit_open", "timeout",
    "connection_lost", "client_closed"})
#: What the Google client calls (from the HTTP method and path, never the ids in it).
GOOGLE_OPERATIONS = frozenset({"get", "list", "insert", "patch", "add_message", "other"})
GOOGLE_STATUSES = frozenset({400, 401, 403, 404, 409, 429, 500, 502, 503, 504})
PUSH_OUTCOME_VALUES = frozenset({
    "sent", "unregistered", "bad_token", "retry", "credentials", "failed", "done"})


def _status_label(status: int, known: frozenset[int]) -> str:
    return str(status) if status in known else f"{status // 100}xx"


def apns_answered(status: int, reason: str | None, seconds: float) -> None:
    """One APNs request that got an HTTP answer."""
    APNS_SECONDS.observe(seconds)
    if status != 200:
        APNS_ERRORS.labels(_status_label(status, APNS_STATUSES),
                           reason if reason in APNS_REASONS else "other").inc()


def apns_unanswered(kind: str, count: int = 1) -> None:
    """Pushes that got no HTTP answer: ``kind`` is one of APNS_TRANSPORT_REASONS."""
    APNS_ERRORS.labels("none", kind if kind in APNS_TRANSPORT_REASONS else "other").inc(count)


def apns_connection(result: str) -> None:
    """A connection attempt: "opened" or one of APNS_TRANSPORT_REASONS."""
    APNS_CONNECTIONS.labels(result if result == "opened" or result in APNS_TRANSPORT_REASONS
                            else "other").inc()


def google_operation(method: str, path: str) -> str:
    """The walletobjects operation a request is (a path holds ids: never a label)."""
    if path.endswith("/addMessage"):
        return "add_message"
    item = path.count("/") >= 4  # /walletobjects/v1/<collection>/<id>
    return {("GET", True): "get", ("GET", False): "list", ("POST", False): "insert",
            ("PATCH", True): "patch"}.get((method, item), "other")


def google_answered(operation: str, status: int, seconds: float) -> None:
    GOOGLE_SECONDS.labels(operation).observe(seconds)
    if status >= 400:
        GOOGLE_ERRORS.labels(operation, _status_label(status, GOOGLE_STATUSES)).inc()


def google_unanswered(operation: str, kind: str) -> None:
    """No HTTP answer: ``kind`` is "network" or "token_refused"."""
    GOOGLE_ERRORS.labels(operation, kind if kind in ("network", "token_refused")
                         else "other").inc()


def push_outcomes(channel: str, counts: dict[str, int]) -> None:
    for outcome, count in counts.items():
        if count:
            PUSH_OUTCOMES.labels(channel, outcome if outcome in PUSH_OUTCOME_VALUES
                                 else "other").inc(count)


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
    from app.ops.readiness import certificate_expiry

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
        for collector in _FED:
            registry.register(collector)
    registry.register(StateCollector(services))
    return generate_latest(registry), CONTENT_TYPE_LATEST

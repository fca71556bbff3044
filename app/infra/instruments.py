"""Prometheus instruments the stages feed where things happen.

Requests (web), pushes and APNs calls (updates), Google REST calls: counters and
histograms defined once here, in the infrastructure layer, so a stage records a
measurement without importing the part that serves /metrics (app/ops/metrics.py,
which adds the database-derived gauges and renders the text format). Label values
come from fixed sets only, never paths, tokens or ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
FED = (REQUESTS, REQUEST_SECONDS, PUSH_OUTCOMES, APNS_SECONDS, APNS_ERRORS, APNS_CONNECTIONS,
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

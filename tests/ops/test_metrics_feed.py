"""/metrics is fed by the real paths: pushes through the APNs stand-in (HTTP/2 over TLS)
and Google calls through the Google stand-in move the outcome counters, latency
histograms and error counters with bounded labels; the circuit breaker of a refused
certificate shows as open; and a separate worker process's counters reach a web
process's /metrics in prometheus multiprocess mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from app.infra.models import (
    AppleIdentity,
    Card,
    Customer,
    GoogleObject,
    Program,
    PushJob,
    Registration,
    Tenant,
    utcnow,
)
from app.updates import pushes
from app.updates import refresh as updates
from tests.apns_standin import ApnsStandin
from tests.google_standin import DEFAULT_ISSUER_ID, GoogleStandin
from tests.waiting import wait_until

PASS_TYPE = "pass.dev.passerelle.demo"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _token(n: int) -> str:
    return f"{n:064x}"


def _scrape(client) -> tuple[Samples, str]:  # type: ignore[no-untyped-def]
    response = client.get("/metrics")
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out, body


def _grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


@pytest.fixture()
def apns(services) -> Iterator[ApnsStandin]:  # type: ignore[no-untyped-def]
    certs_path = services.settings.certs_path
    with ApnsStandin(client_ca_files=[certs_path / "dev" / "root-ca.pem",
                                      certs_path / "wwdr" / "dev-wwdr.pem"]) as standin:
        services.settings.apns_url = standin.url
        services.settings.apns_ca_file = str(standin.ca_file)
        try:
            yield standin
        finally:
            services.close()


def _devices_with_jobs(services, demo, numbers: list[int], first: int = 0) -> list[int]:  # type: ignore[no-untyped-def]
    """One card per token number (from the ``first``-th card on), a device on it, and a
    push job per card."""
    with services.db.transaction(demo["tenant_id"]) as session:
        cards = session.scalars(select(Card).order_by(Card.id)).all()[first:first + len(numbers)]
        assert len(cards) == len(numbers)
        jobs = []
        for card, n in zip(cards, numbers):
            session.add(Registration(card_id=card.id, device_library_identifier=f"dev-{n}",
                                     pass_type_identifier=PASS_TYPE, push_token=_token(n)))
            jobs.append(PushJob(card_id=card.id, update_tag=n))
        session.add_all(jobs)
        session.flush()
        return [job.id for job in jobs]


def test_pushes_feed_outcomes_latency_and_errors_by_status_and_reason(  # type: ignore[no-untyped-def]
        client, services, demo, apns):
    apns.script[_token(2)] = [(410, "Unregistered")]
    apns.script[_token(3)] = [(500, "InternalServerError")]
    apns.script[_token(4)] = [(400, "BadDeviceToken")]
    apns.script[_token(5)] = [(503, "a reason APNs never documented, 8f3e1c")]
    _devices_with_jobs(services, demo, [1, 2, 3, 4, 5])
    before, _ = _scrape(client)

    drained = pushes.drain(services)

    assert dict(drained.states) == {"done": 3, "retry": 2}
    after, body = _scrape(client)
    outcomes = {outcome: _grew(before, after, "passerelle_push_outcomes_total",
                               channel="apple", outcome=outcome)
                for outcome in ("sent", "unregistered", "retry", "bad_token", "failed")}
    assert outcomes == {"sent": 1, "unregistered": 1, "retry": 2, "bad_token": 1, "failed": 0}
    # Every answered request is timed, in seconds.
    assert _grew(before, after, "passerelle_apns_request_duration_seconds_count") == 5
    assert 0 < _grew(before, after, "passerelle_apns_request_duration_seconds_sum") < 50
    errors = "passerelle_apns_errors_total"
    assert _grew(before, after, errors, status="410", reason="Unregistered") == 1
    assert _grew(before, after, errors, status="500", reason="InternalServerError") == 1
    assert _grew(before, after, errors, status="400", reason="BadDeviceToken") == 1
    # A reason outside APNs' documented list is folded: the series count stays bounded.
    assert _grew(before, after, errors, status="503", reason="other") == 1
    assert all(dict(labels)["reason"] != "a reason APNs never documented, 8f3e1c"
               for labels in _series(after, errors))
    assert _grew(before, after, "passerelle_apns_connections_total", result="opened") == 1
    assert _token(2) not in body and _token(2)[:8] not in body  # no device token, even cut
    assert "8f3e1c" not in body


def _identity(services):  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return services.signing_identity(session.scalar(select(AppleIdentity)))


def test_a_refused_certificate_counts_handshakes_and_shows_the_breaker_open(  # type: ignore[no-untyped-def]
        client, services, demo, apns):
    breaker_key = ("passerelle_apns_circuit_open", (("pass_type", PASS_TYPE),))
    before, _ = _scrape(client)
    assert before[breaker_key] == 0
    apns.refuse_client_certificates = True
    now = [1000.0]
    services.apns.client(PASS_TYPE, _identity(services)).breaker._clock = lambda: now[0]
    _devices_with_jobs(services, demo, [1, 2, 3])

    assert pushes.drain(services).states == {"retry": 3}  # one refused handshake
    with services.db.transaction(demo["tenant_id"]) as session:  # a second wave, breaker open
        session.add(PushJob(card_id=session.scalars(select(Card).order_by(Card.id)).first().id,
                            update_tag=99))
    assert pushes.drain(services).states == {"retry": 1}

    after, _ = _scrape(client)
    assert apns.handshakes_started == 1
    assert _grew(before, after, "passerelle_apns_connections_total", result="tls_refused") == 1
    errors = "passerelle_apns_errors_total"
    assert _grew(before, after, errors, status="none", reason="tls_refused") == 3
    assert _grew(before, after, errors, status="none", reason="circuit_open") == 1
    assert _grew(before, after, "passerelle_push_outcomes_total",
                 channel="apple", outcome="retry") == 4
    assert _grew(before, after, "passerelle_apns_request_duration_seconds_count") == 0
    assert after[breaker_key] == 1
    assert after[("passerelle_apns_circuit_failing_seconds", (("pass_type", PASS_TYPE),))] >= 0

    # Accepted again, time passes: the next drain connects and the breaker closes.
    apns.refuse_client_certificates = False
    now[0] += 6
    with services.db.transaction() as session:
        session.execute(update(PushJob).values(not_before=utcnow()))
    assert pushes.drain(services).states == {"done": 4}
    closed, _ = _scrape(client)
    assert closed[breaker_key] == 0
    assert closed[("passerelle_apns_circuit_failing_seconds", (("pass_type", PASS_TYPE),))] == 0


# -- Google ---------------------------------------------------------------------------------

@pytest.fixture()
def google_standin() -> Iterator[GoogleStandin]:
    with GoogleStandin() as server:
        yield server


@pytest.fixture()
def settings(settings, request):  # type: ignore[no-untyped-def]
    if "google_standin" in request.fixturenames:
        standin = request.getfixturevalue("google_standin")
        settings.google_api_url = standin.url
        settings.google_keys_url = standin.keys_url
    return settings


def test_google_calls_feed_latency_errors_and_outcomes(  # type: ignore[no-untyped-def]
        client, services, demo, google_standin, tmp_path):
    info, _ = google_standin.new_service_account()
    path = tmp_path / "google-sa.json"
    path.write_text(json.dumps(info))
    with services.db.transaction() as session:
        tenant = session.get(Tenant, demo["tenant_id"])
        tenant.google_issuer_id, tenant.google_service_account_file = DEFAULT_ISSUER_ID, str(path)
        serials = session.scalars(select(Card.serial_number).join(Program)
                                  .where(Program.slug == "rewards")).all()
    for serial in serials:  # every member saves the card to Google Wallet
        assert client.get(f"/demo/cards/{serial}/google").status_code == 303
    with services.db.session() as session:
        objects = sorted(session.scalars(select(GoogleObject.object_id)))
    assert len(objects) >= 3
    prefix = "/walletobjects/v1/loyaltyObject/"
    google_standin.fail_next(prefix + objects[0], 500, method="PATCH")  # retried, then fine
    google_standin.fail_next(prefix + objects[1], 400, method="PATCH")  # the caller's fault
    before, _ = _scrape(client)

    with services.db.transaction() as session:
        customers = session.scalars(select(Customer)).all()
        for customer in customers:
            customer.attributes = {**customer.attributes, "points": 4321}
        updates.customers_changed(session, services, customers)
    pushes.drain(services)

    after, body = _scrape(client)
    accepted = len(google_standin.api_requests("PATCH"))  # scripted failures not listed
    assert accepted == len(objects) - 1
    assert _grew(before, after, "passerelle_google_request_duration_seconds_count",
                 operation="patch") == accepted + 2
    errors = "passerelle_google_errors_total"
    assert _grew(before, after, errors, operation="patch", status="500") == 1
    assert _grew(before, after, errors, operation="patch", status="400") == 1
    assert _grew(before, after, "passerelle_push_outcomes_total",
                 channel="google", outcome="done") == len(objects) - 1
    assert _grew(before, after, "passerelle_push_outcomes_total",
                 channel="google", outcome="failed") == 1
    # Saving the cards went through the same client: inserts were timed too.
    assert after[("passerelle_google_request_duration_seconds_count",
                  (("operation", "insert"),))] >= len(objects)
    assert {dict(labels)["operation"] for labels in
            _series(after, "passerelle_google_request_duration_seconds_count")} <= \
        {"get", "list", "insert", "patch", "add_message", "other"}
    assert not any(object_id in body for object_id in objects)  # ids never become labels


# -- multiprocess mode ------------------------------------------------------------------------

def _worker(services, apns, metrics_dir: Path) -> subprocess.Popen:  # type: ignore[no-untyped-def, type-arg]
    settings = services.settings
    env = {**os.environ,
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "PASSERELLE_INSTANCE_PATH": str(settings.instance_path),
           "PASSERELLE_DATABASE_URL": settings.database_url,
           "PASSERELLE_CERTS_PATH": str(settings.certs_path),
           "PASSERELLE_APNS_URL": apns.url,
           "PASSERELLE_APNS_CA_FILE": str(apns.ca_file),
           "PASSERELLE_REDIS_URL": settings.redis_url}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _done(services, ids: list[int]) -> bool:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return all(job.done_at is not None
                   for job in session.scalars(select(PushJob).where(PushJob.id.in_(ids))))


def test_worker_processes_counters_reach_the_web_process_in_multiprocess_mode(  # type: ignore[no-untyped-def]
        client, services, demo, apns, tmp_path, monkeypatch, keep_signal_handlers):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    apns.script[_token(2)] = [(410, "Unregistered")]
    for first, numbers in ((0, [1, 2]), (2, [3, 4])):  # two worker processes in turn
        batch = _devices_with_jobs(services, demo, numbers, first)
        worker = _worker(services, apns, metrics_dir)
        try:
            services.jobs.dispatch(batch)
            wait_until(lambda batch=batch: _done(services, batch), seconds=60.0)
        finally:
            worker.send_signal(signal.SIGTERM)
            output, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0, output
    assert len(list(metrics_dir.glob("*.db"))) >= 2  # each process wrote its own files

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    samples, _ = _scrape(client)  # this process pushed nothing: all of it is the workers'
    assert samples[("passerelle_push_outcomes_total",
                    (("channel", "apple"), ("outcome", "sent")))] == 3
    assert samples[("passerelle_push_outcomes_total",
                    (("channel", "apple"), ("outcome", "unregistered")))] == 1
    assert samples[("passerelle_apns_request_duration_seconds_count", ())] == 4
    assert samples[("passerelle_apns_errors_total",
                    (("reason", "Unregistered"), ("status", "410")))] == 1
    assert samples[("passerelle_apns_connections_total", (("result", "opened"),))] == 2
    assert samples[("passerelle_apns_circuit_open", (("pass_type", PASS_TYPE),))] == 0
    assert samples[("passerelle_database_up", ())] == 1

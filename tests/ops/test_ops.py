"""/readyz and /metrics: what a load balancer and a monitoring system are told."""

from __future__ import annotations

import dataclasses
import datetime as dt

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text

from app.infra import migrate
from app.infra.models import Card, PushJob, utcnow
from app.services import Services


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_readyz_is_ready_when_every_check_passes(client, demo) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "checks": {
        "database": "ok", "migrations": "ok", "certificates": "ok", "queue": "ok"}}


def test_readyz_is_503_with_retry_after_when_the_schema_is_behind(client, services, demo):  # type: ignore[no-untyped-def]
    with services.db.engine.begin() as conn:
        head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        conn.execute(text("UPDATE alembic_version SET version_num = :v"),
                     {"v": _previous_revision(services, head)})
    try:
        response = client.get("/readyz")
    finally:
        with services.db.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    body = response.get_json()
    assert response.mimetype == "application/problem+json" and body["status"] == 503
    assert body["checks"]["migrations"].startswith("schema behind")
    assert body["checks"]["database"] == "ok"
    assert client.get("/readyz").status_code == 200  # a failure is not cached


def _previous_revision(services: Services, head: str) -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config(services.settings.database_url))
    previous = script.get_revision(head).down_revision
    assert isinstance(previous, str)
    return previous


def test_an_unreachable_queue_degrades_the_process_but_keeps_it_in_rotation(settings):  # type: ignore[no-untyped-def]
    from app import create_app

    broken = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    app = create_app(broken)
    try:
        checks = {c.name: c for c in app.extensions["passerelle.readiness"].checks()}
        response = app.test_client().get("/readyz")
    finally:
        app.extensions["passerelle"].db.dispose()
    assert checks["database"].ok and not checks["queue"].ok and not checks["queue"].required
    assert "Connection" in checks["queue"].detail
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "degraded"
    assert body["checks"]["queue"].startswith("ConnectionError: pushes and deliveries wait")


def test_metrics_count_requests_per_group_and_read_outbox_state(client, services, demo):  # type: ignore[no-untyped-def]
    before = _samples(client.get("/metrics").get_data(as_text=True))
    client.get("/passkit/v1/passes/pass.dev.passerelle.demo/nope")  # device API, 401
    client.get("/api/v1/programs")  # marketer API, 401
    old = utcnow() - dt.timedelta(minutes=5)
    with services.db.transaction() as session:
        card = session.scalars(select(Card)).first()
        for created in (old, old + dt.timedelta(minutes=1)):
            session.add(PushJob(tenant_id=card.tenant_id, card_id=card.id, update_tag=1,
                                created_at=created))
        session.add(PushJob(tenant_id=card.tenant_id, card_id=card.id, update_tag=2,
                            done_at=old, created_at=old - dt.timedelta(hours=1)))

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    after = _samples(response.get_data(as_text=True))

    def grew(labels: dict[str, str]) -> float:
        key = ("passerelle_http_requests_total", tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew({"group": "device_api", "method": "GET", "status": "401"}) == 1
    assert grew({"group": "marketer_api", "method": "GET", "status": "401"}) == 1
    assert after[("passerelle_outbox_due", (("outbox", "apple_pushes"),))] == 2
    assert after[("passerelle_outbox_due", (("outbox", "webhooks"),))] == 0
    oldest = after[("passerelle_outbox_oldest_due_seconds", (("outbox", "apple_pushes"),))]
    assert 290 < oldest < 3600
    assert after[("passerelle_database_up", ())] == 1
    days = after[("passerelle_certificate_expiry_days",
                  (("pass_type", "pass.dev.passerelle.demo"),))]
    assert days > 30


def test_metrics_are_for_loopback_or_a_token_holder(app, client, services) -> None:  # type: ignore[no-untyped-def]
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert client.get("/metrics", environ_base=remote).status_code == 404
    services.settings.metrics_token = "s3cret-metrics-token"
    assert client.get("/metrics", environ_base=remote).status_code == 401
    assert client.get("/metrics", environ_base=remote,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics").status_code == 401  # with a token, loopback needs it too
    assert client.get("/metrics", environ_base=remote, headers={
        "Authorization": "Bearer s3cret-metrics-token"}).status_code == 200

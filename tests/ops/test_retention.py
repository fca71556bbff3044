"""Retention: old logs and finished outbox rows go, in batches; what marketers target stays."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from app.infra.models import (
    Card,
    CardInstallState,
    CrmOutboxEntry,
    Customer,
    DeviceLog,
    FunnelEvent,
    GoogleCallbackNonce,
    ImportJob,
    InboundEvent,
    InboundHook,
    MailOutboxEntry,
    PushAttempt,
    PushJob,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from app.ops import retention
from app.segments.segments import Segment
from app.tracking import install_state
from tests.segments.test_segments import ids, world  # noqa: F401  (the segments' known population)

STATES = [None, "installed-apple", "installed-google", "installed-any", "removed",
          "downloaded-not-installed", "never-downloaded", "not-installed"]


def _ago(days: float) -> dt.datetime:
    return utcnow() - dt.timedelta(days=days)


@pytest.fixture()
def history(services, world):  # type: ignore[no-untyped-def]  # noqa: F811
    """For each pruned table: rows past the default retention, and rows that must stay."""
    tenant = world["tenant_id"]
    with services.db.transaction() as session:
        card = session.scalars(select(Card).where(Card.program_id == world["program_id"])).first()
        customer = session.scalars(select(Customer)).first()
        hook = InboundHook(tenant_id=tenant, slug="engine", mapping={})
        subscription = WebhookSubscription(tenant_id=tenant, url="https://hooks.example/x",
                                           event_types=["card.installed"])
        session.add_all([hook, subscription])
        session.flush()
        for age in (40, 45, 1):  # the first two are past 30 days
            session.add(PushAttempt(tenant_id=tenant, card_id=card.id, device="d", status=200,
                                    outcome="sent", attempted_at=_ago(age)))
            session.add(DeviceLog(tenant_id=tenant, card_id=card.id, message="m",
                                  received_at=_ago(age)))
            delivery = WebhookDelivery(tenant_id=tenant, subscription_id=subscription.id,
                                       event_id=f"e{age}", event_type="card.installed",
                                       payload={}, created_at=_ago(age + 1), done_at=_ago(age),
                                       outcome="delivered")
            session.add(delivery)
            session.flush()
            session.add(WebhookAttempt(tenant_id=tenant, delivery_id=delivery.id, status=200,
                                       attempted_at=_ago(age)))
            session.add(InboundEvent(tenant_id=tenant, hook_id=hook.id, event_id=f"i{age}",
                                     status="applied", received_at=_ago(age)))
            session.add(CrmOutboxEntry(tenant_id=tenant, customer_id=customer.id,
                                       operation="update", payload={}, done_at=_ago(age)))
            session.add(MailOutboxEntry(tenant_id=tenant, program_id=world["program_id"],
                                        customer_id=customer.id, kind="card_link",
                                        done_at=_ago(age), outcome="sent"))
        for age in (10, 8, 1):
            session.add(PushJob(tenant_id=tenant, card_id=card.id, update_tag=age,
                                done_at=_ago(age)))
            session.add(GoogleCallbackNonce(nonce=f"n{age}", received_at=_ago(age)))
        for age in (100, 95, 1):
            session.add(ImportJob(tenant_id=tenant, format="csv", source_path="/gone",
                                  status="done", finished_at=_ago(age)))
        for age in (500, 410, 10):
            session.add(FunnelEvent(tenant_id=tenant, program_id=world["program_id"],
                                    kind="link_opened", occurred_at=_ago(age)))
        # Never finished: kept whatever their age (a retry or a sweeper still owns them).
        session.add(PushJob(tenant_id=tenant, card_id=card.id, update_tag=99,
                            created_at=_ago(300)))
        session.add(WebhookDelivery(tenant_id=tenant, subscription_id=subscription.id,
                                    event_id="pending", event_type="card.installed",
                                    payload={}, created_at=_ago(300)))
        session.add(InboundEvent(tenant_id=tenant, hook_id=hook.id, event_id="failed",
                                 status="failed", received_at=_ago(300)))
        session.add(ImportJob(tenant_id=tenant, format="csv", source_path="/running",
                              status="running", created_at=_ago(300)))
    return world


def _counts(services) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return {p.name: session.scalar(select(func.count()).select_from(p.model)) or 0
                for p in retention.POLICIES} | {
            "webhook_attempts": session.scalar(select(func.count(WebhookAttempt.id))) or 0}


def _marketing_view(services, world) -> tuple:  # type: ignore[no-untyped-def]  # noqa: F811
    with services.db.session() as session:
        states = sorted(session.execute(select(
            CardInstallState.card_id, CardInstallState.platform, CardInstallState.state,
            CardInstallState.device_count, CardInstallState.first_downloaded_at,
            CardInstallState.first_installed_at, CardInstallState.last_installed_at,
            CardInstallState.removed_at)).all())
    return (states, [sorted(ids(services, Segment(world["program_id"], state=s)))
                     for s in STATES])


def test_prune_deletes_what_is_past_retention_in_batches_and_keeps_the_rest(  # type: ignore[no-untyped-def]
        services, history):
    before, view = _counts(services), _marketing_view(services, history)
    progress: list[tuple[str, int]] = []
    deleted = retention.prune(services.db, batch=1, progress=lambda t, n: progress.append((t, n)))
    assert deleted == {"push_attempts": 2, "device_logs": 2, "push_jobs": 2,
                       "webhook_deliveries": 2, "crm_outbox": 2, "mail_outbox": 2,
                       "import_jobs": 2, "inbound_events": 2, "google_callback_nonces": 2,
                       "funnel_events": 2}
    assert all(n == 1 for _, n in progress)  # batches of one: the loop ran, row by row
    after = _counts(services)
    assert {t: before[t] - after[t] for t in deleted} == deleted
    assert before["webhook_attempts"] - after["webhook_attempts"] == 2  # went with deliveries
    with services.db.session() as session:
        assert session.scalar(select(PushJob).where(PushJob.update_tag == 99)) is not None
        assert session.scalar(select(WebhookDelivery).where(
            WebhookDelivery.event_id == "pending")) is not None
        assert session.scalar(select(InboundEvent).where(
            InboundEvent.status == "failed")) is not None
        assert session.scalar(select(ImportJob).where(ImportJob.status == "running")) is not None
    # What marketers target is the same, and rebuilding install state from what is left
    # gives the same states.
    assert _marketing_view(services, history) == view
    install_state.rebuild(services)
    assert _marketing_view(services, history) == view
    assert retention.prune(services.db) == dict.fromkeys(deleted, 0)  # nothing left to do


def test_retention_is_set_per_table(services, history) -> None:  # type: ignore[no-untyped-def]
    deleted = retention.prune(services.db, "push_attempts=0, device_logs=2",
                              only={"push_attempts", "device_logs"})
    assert deleted == {"device_logs": 2}  # push_attempts=0 keeps them forever
    with pytest.raises(ValueError, match="not <table>=<days>"):
        retention.effective_days("pushes=3")
    with pytest.raises(ValueError, match="whole number"):
        retention.effective_days("device_logs=soon")
    with pytest.raises(ValueError, match="negative"):
        retention.effective_days("device_logs=-1")
    # Never below the week the dashboard's health page reads; 0 keeps forever.
    with pytest.raises(ValueError, match="at least 8 days"):
        retention.effective_days("push_attempts=7")
    assert retention.effective_days("push_attempts=0, push_jobs=8")["push_jobs"] == 8


def test_prune_command_reports_per_table_and_refuses_bad_settings(runner, services, history):  # type: ignore[no-untyped-def]
    result = runner.invoke(args=["prune", "--table", "push_attempts", "--table", "funnel_events",
                                 "--batch", "1"])
    assert result.exit_code == 0, result.output
    assert "push_attempts: 2 rows deleted (older than 30 days)" in result.output
    assert "funnel_events: 2 rows deleted (older than 400 days)" in result.output
    assert "device_logs" not in result.output
    services.settings.retention = "device_logs=0"
    result = runner.invoke(args=["prune", "--table", "device_logs"])
    assert result.exit_code == 0 and "device_logs: kept forever" in result.output
    services.settings.retention = "device_log=3"
    result = runner.invoke(args=["prune"])
    assert result.exit_code == 1 and "not <table>=<days>" in result.output


def test_the_worker_prunes_daily(services, history) -> None:  # type: ignore[no-untyped-def]
    task = services.jobs.prune
    periodic = task.task_class()
    # Huey's crontab matches naive times (its clock is naive UTC by default).
    assert periodic.validate_datetime(dt.datetime(2026, 12, 3, 3, 17))  # noqa: DTZ001
    assert not periodic.validate_datetime(dt.datetime(2026, 12, 3, 4, 17))  # noqa: DTZ001
    assert task.call_local()["push_attempts"] == 2

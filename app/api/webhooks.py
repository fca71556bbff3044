"""Admin scope: outbound webhook subscriptions, their delivery log, redelivery.

Admin, not write: a subscription sends customer data to a URL of the caller's
choosing, and its secret is what receivers trust.
"""

from __future__ import annotations

from typing import Any

from flask import Response
from sqlalchemy import select

from app.api.core import (
    ApiProblem,
    bp,
    db,
    not_found,
    page,
    query,
    record,
    reply,
    require,
    responses,
    services,
    spec,
    tenant_id,
)
from app.api.core import body as json_body
from app.api.schemas import (
    DeliveryOut,
    DeliveryPage,
    PageQuery,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookPage,
    WebhookPatch,
)
from app.infra.models import WebhookDelivery, WebhookSubscription
from app.webhooks import outbound as webhooks_out

TAG = "webhooks"


def subscription_out(row: WebhookSubscription, cls: type[WebhookOut] = WebhookOut,
                     **extra: Any) -> WebhookOut:
    return cls(id=row.id, url=row.url, event_types=list(row.event_types or []),
               active=row.active, description=row.description, created_at=row.created_at,
               **extra)


def delivery_out(row: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(id=row.id, subscription_id=row.subscription_id, event_id=row.event_id,
                       event_type=row.event_type, created_at=row.created_at,
                       attempts=row.attempts, last_status=row.last_status,
                       last_error=row.last_error, done_at=row.done_at, outcome=row.outcome)


def load_subscription(subscription_id: int) -> WebhookSubscription:
    row = db().scalar(select(WebhookSubscription).where(
        WebhookSubscription.id == subscription_id))
    if row is None:
        raise not_found("webhook subscription")
    return row


@bp.get("/webhooks")
@require("admin")
@spec.validate(query=PageQuery, resp=responses({200: WebhookPage}, 400, 403), tags=[TAG],
               operation_id="listWebhooks")
def list_webhooks() -> Any:
    """The tenant's webhook subscriptions (secrets are not shown again)."""
    params = query(PageQuery)
    rows, cursor = page(db(), select(WebhookSubscription), WebhookSubscription.id,
                        params.limit, params.cursor)
    return reply(WebhookPage(items=[subscription_out(r) for r in rows], next_cursor=cursor))


@bp.post("/webhooks")
@require("admin")
@spec.validate(json=WebhookCreate, resp=responses({201: WebhookCreated}, 400, 403, 413),
               tags=[TAG], operation_id="createWebhook")
def create_webhook() -> Any:
    """Subscribe a URL to events; the answer holds the signing secret, once."""
    data = json_body(WebhookCreate)
    session = db()
    try:
        row = webhooks_out.create_subscription(
            session, tenant_id(), data.url, data.event_types, data.description,
            allow_private=services().settings.webhook_allow_private_networks)
    except ValueError as exc:
        raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    record("webhook.create", f"webhook:{row.id}", {"event_types": row.event_types})
    session.commit()
    return reply(subscription_out(row, WebhookCreated, secret=row.secret), 201)


@bp.get("/webhooks/<id:subscription_id>")
@require("admin")
@spec.validate(resp=responses({200: WebhookOut}, 403, 404), tags=[TAG],
               operation_id="getWebhook")
def get_webhook(subscription_id: int) -> Any:
    """One subscription."""
    return reply(subscription_out(load_subscription(subscription_id)))


@bp.patch("/webhooks/<id:subscription_id>")
@require("admin")
@spec.validate(json=WebhookPatch, resp=responses({200: WebhookOut}, 400, 403, 404, 413),
               tags=[TAG], operation_id="updateWebhook")
def update_webhook(subscription_id: int) -> Any:
    """Enable or disable a subscription (a 410 from the receiver disables it), or
    change its description."""
    data = json_body(WebhookPatch)
    row = load_subscription(subscription_id)
    if data.active is not None:
        row.active = data.active
    if "description" in data.model_fields_set:
        row.description = data.description
    record("webhook.update", f"webhook:{row.id}", {"fields": sorted(data.model_fields_set)})
    db().commit()
    return reply(subscription_out(row))


@bp.delete("/webhooks/<id:subscription_id>")
@require("admin")
@spec.validate(resp=responses({204: None}, 403, 404), tags=[TAG], operation_id="deleteWebhook")
def delete_webhook(subscription_id: int) -> Any:
    """Delete a subscription and its delivery log."""
    session = db()
    row = load_subscription(subscription_id)
    session.delete(row)
    record("webhook.delete", f"webhook:{subscription_id}")
    session.commit()
    return Response(status=204)


@bp.get("/webhooks/<id:subscription_id>/deliveries")
@require("admin")
@spec.validate(query=PageQuery, resp=responses({200: DeliveryPage}, 400, 403, 404), tags=[TAG],
               operation_id="listWebhookDeliveries")
def list_deliveries(subscription_id: int) -> Any:
    """A subscription's deliveries, oldest first: attempts, last status, outcome."""
    row = load_subscription(subscription_id)
    params = query(PageQuery)
    rows, cursor = page(db(), select(WebhookDelivery).where(
        WebhookDelivery.subscription_id == row.id), WebhookDelivery.id, params.limit,
        params.cursor)
    return reply(DeliveryPage(items=[delivery_out(r) for r in rows], next_cursor=cursor))


@bp.post("/webhook-deliveries/<id:delivery_id>/redeliver")
@require("admin")
@spec.validate(resp=responses({202: DeliveryOut}, 403, 404), tags=[TAG],
               operation_id="redeliverWebhook")
def redeliver(delivery_id: int) -> Any:
    """Send an event again (same event id and payload) as a new delivery."""
    session = db()
    original = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id))
    if original is None:
        raise not_found("webhook delivery")
    copy = webhooks_out.redeliver(session, original.id)
    record("webhook.redeliver", f"delivery:{delivery_id}", {"new_delivery": copy.id})
    session.commit()
    return reply(delivery_out(copy), 202)

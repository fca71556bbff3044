"""``passerelle webhooks``: outbound subscriptions, the delivery log, redelivery."""

from __future__ import annotations

import click

from app.cli.common import ROW_ID, ROWS, fail, needs_database, services, tenant
from app.webhooks import outbound as webhooks_out


@click.group("webhooks")
def webhooks_group() -> None:
    """Outbound webhooks: subscriptions, the delivery log, redelivery (docs/webhooks.md)."""


@webhooks_group.command("add")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--url", required=True, help="Where to POST events (https://...).")
@click.option("--events", required=True, help="Comma-separated, e.g. card.installed,card.removed")
@click.option("--description", default=None)
@needs_database
def webhooks_add(tenant_slug: str, url: str, events: str, description: str | None) -> None:
    """Subscribe a URL to event types; prints the signing secret once."""
    svc = services()
    with svc.db.session() as session:
        tenant_id = tenant(session, tenant_slug).id
    try:
        with svc.db.transaction(tenant_id) as session:
            sub = webhooks_out.create_subscription(
                session, tenant_id, url, [e.strip() for e in events.split(",") if e.strip()],
                description, allow_private=svc.settings.webhook_allow_private_networks)
            click.echo(f"subscription {sub.id}: {', '.join(sub.event_types)} -> {sub.url}")
            click.echo(f"signing secret (shown once, keep it in the receiver): {sub.secret}")
    except ValueError as exc:
        fail(str(exc))


@webhooks_group.command("list")
@click.option("--tenant", "tenant_slug", default=None)
@needs_database
def webhooks_list(tenant_slug: str | None) -> None:
    """Subscriptions (never their secrets)."""
    with services().db.session() as session:
        for sub, slug in webhooks_out.list_subscriptions(session, tenant_slug):
            state = "active" if sub.active else "disabled"
            click.echo(f"{sub.id:>5}  {slug:<16} {state:<8} {','.join(sub.event_types)}  {sub.url}")


@webhooks_group.command("deliveries")
@click.option("--tenant", "tenant_slug", required=True)
@click.option("--failed", is_flag=True, help="Only given-up, cancelled or failing deliveries.")
@click.option("--limit", default=50, show_default=True, type=ROWS)
@needs_database
def webhooks_deliveries(tenant_slug: str, failed: bool, limit: int) -> None:
    """The delivery log, newest first, with each attempt's HTTP status."""
    svc = services()
    with svc.db.session() as session:
        tenant_id = tenant(session, tenant_slug).id
    with svc.db.tenant_session(tenant_id) as session:
        for delivery, codes in webhooks_out.recent_deliveries(session, failed=failed,
                                                              limit=limit):
            click.echo(f"{delivery.id:>6}  {delivery.created_at:%Y-%m-%d %H:%M:%S}  "
                       f"{delivery.event_type:<17} {delivery.outcome or 'pending':<9} "
                       f"attempts [{', '.join(str(c) if c else '-' for c in codes)}]  "
                       f"sub {delivery.subscription_id}  event {delivery.event_id}"
                       + (f"  ({delivery.last_error})" if delivery.last_error else ""))


@webhooks_group.command("redeliver")
@click.argument("delivery_id", type=ROW_ID)
@needs_database
def webhooks_redeliver(delivery_id: int) -> None:
    """Send a delivery's event again (same event id and body) as a new delivery."""
    svc = services()
    with svc.db.session() as session:
        tenant_id = webhooks_out.delivery_tenant(session, delivery_id)
    if tenant_id is None:
        fail(f"no webhook delivery {delivery_id}")
    with svc.db.transaction(tenant_id) as session:
        copy = webhooks_out.redeliver(session, delivery_id)
        click.echo(f"delivery {copy.id} queued (event {copy.event_id}); "
                   f"run `passerelle worker` if none is running")


def _set_subscription_active(subscription_id: int, active: bool) -> None:
    with services().db.transaction() as session:
        if not webhooks_out.set_subscription_active(session, subscription_id, active):
            fail(f"no webhook subscription {subscription_id}")
    click.echo(f"subscription {subscription_id} {'enabled' if active else 'disabled'}")


@webhooks_group.command("disable")
@click.argument("subscription_id", type=ROW_ID)
@needs_database
def webhooks_disable(subscription_id: int) -> None:
    """Stop sending to a subscription (pending deliveries are cancelled)."""
    _set_subscription_active(subscription_id, False)


@webhooks_group.command("enable")
@click.argument("subscription_id", type=ROW_ID)
@needs_database
def webhooks_enable(subscription_id: int) -> None:
    """Send to a subscription again (e.g. after a 410 disabled it)."""
    _set_subscription_active(subscription_id, True)


COMMANDS = [webhooks_group]

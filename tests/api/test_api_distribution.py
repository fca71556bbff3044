"""API endpoints over the distribution modules: links, segments and exports, the funnel,
webhook subscriptions and deliveries."""

from __future__ import annotations

import csv
import io

import pytest
from sqlalchemy import func, select

from app.distribution import links
from app.infra.models import LinkToken, WebhookDelivery
from tests.api_helpers import auth, is_problem, make_key

API = "/api/v1"


@pytest.fixture()
def keys(services, demo):  # type: ignore[no-untyped-def]
    return {scope: make_key(services, demo["tenant_id"], scope, scope)
            for scope in ("read", "write", "admin")}


def test_one_link_and_bulk_links(client, services, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    one = client.post(f"{API}/programs/rewards/links", headers=write, json={
        "purpose": "download", "customer": "C-1001", "campaign": "spring", "max_uses": 3})
    assert one.status_code == 201, one.get_json()
    url = one.get_json()["url"]
    assert url.startswith("https://wallet.example.test/l/")
    with services.db.session() as session:
        row = session.scalar(select(LinkToken))
        assert row.token_hash == links.hash_token(url.rsplit("/", 1)[1])  # only the hash kept
        assert (row.campaign, row.max_uses) == ("spring", 3)
    enroll = client.post(f"{API}/programs/rewards/links", headers=write, json={"purpose": "enroll"})
    assert enroll.status_code == 201 and enroll.get_json()["customer"] is None
    assert is_problem(client.post(f"{API}/programs/rewards/links", headers=write,
                                  json={"purpose": "download"}), 422)  # needs a customer
    assert is_problem(client.post(f"{API}/programs/rewards/links", headers=write, json={
        "purpose": "download", "customer": "NOPE"}), 404)
    assert is_problem(client.post(f"{API}/programs/rewards/links", headers=write, json={
        "purpose": "download", "customer": "C-1001", "expires_at": "2001-01-01T00:00:00Z"}), 422)
    bulk = client.post(f"{API}/programs/rewards/links/bulk", headers=write, json={
        "purpose": "download", "customers": ["C-1002", "C-1003", "GHOST", "C-1002"]})
    assert bulk.status_code == 201
    body = bulk.get_json()
    assert [i["customer"] for i in body["items"]] == ["C-1002", "C-1003"]
    assert body["unknown"] == ["GHOST"]
    assert len({i["url"] for i in body["items"]}) == 2
    assert is_problem(client.post(f"{API}/programs/rewards/links", headers=auth(keys["read"]),
                                  json={"purpose": "enroll"}), 403)


def test_segment_count_pages_and_export(client, services, keys):  # type: ignore[no-untyped-def]
    read, write = auth(keys["read"]), auth(keys["write"])
    counted = client.get(f"{API}/programs/rewards/segment?state=never-downloaded", headers=read)
    assert counted.status_code == 200, counted.get_json()
    assert counted.get_json()["count"] == 5  # every demo customer consented by email
    gold = client.get(f"{API}/programs/rewards/segment?tier=Gold", headers=read).get_json()
    assert gold["count"] == 1 and gold["segment"]["tier"] == "Gold"
    seen, cursor = [], ""
    while True:
        body = client.get(f"{API}/programs/rewards/segment/customers?limit=2&cursor={cursor}",
                          headers=read).get_json()
        seen += [item["external_id"] for item in body["items"]]
        assert all(item["wallet_status"] == "none" for item in body["items"])
        if not body["next_cursor"]:
            break
        cursor = body["next_cursor"]
    assert sorted(seen) == [f"C-100{n}" for n in range(1, 6)]
    assert is_problem(client.get(f"{API}/programs/rewards/segment?created_from=yesterday",
                                 headers=read), 422)
    assert is_problem(client.get(f"{API}/programs/rewards/segment?points_min=10&points_max=1",
                                 headers=read), 422)
    exported = client.post(f"{API}/programs/rewards/segment/export", headers=write,
                           json={"state": "not-installed", "link_campaign": "resend"})
    assert exported.status_code == 200 and exported.mimetype == "text/csv"
    assert exported.is_streamed  # not built whole in memory
    rows = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    exported.close()  # as a WSGI server does once the body is sent
    assert len(rows) == 5
    assert all(r["url"].startswith("https://wallet.example.test/l/") for r in rows)
    with services.db.session() as session:
        assert session.scalar(select(func.count(LinkToken.id))
                              .where(LinkToken.campaign == "resend")) == 5
    assert is_problem(client.post(f"{API}/programs/rewards/segment/export", headers=read,
                                  json={}), 403)


def test_funnel(client, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    client.post(f"{API}/programs/rewards/links/bulk", headers=write, json={
        "purpose": "download", "customers": ["C-1001", "C-1002"], "campaign": "may"})
    by_campaign = client.get(f"{API}/programs/rewards/funnel?by=campaign",
                             headers=auth(keys["read"]))
    assert by_campaign.status_code == 200
    assert by_campaign.get_json()["rows"] == [{
        "day": None, "campaign": "may", "links_issued": 2, "opened": 0, "downloaded_apple": 0,
        "downloaded_google": 0, "installed_apple": 0, "installed_google": 0}]
    by_day = client.get(f"{API}/programs/rewards/funnel?from=2000-01-01",
                        headers=auth(keys["read"])).get_json()["rows"]
    assert len(by_day) == 1 and by_day[0]["links_issued"] == 2
    assert is_problem(client.get(f"{API}/programs/rewards/funnel?by=week",
                                 headers=auth(keys["read"])), 422)


def test_webhook_subscriptions_and_deliveries(client, services, keys, demo):  # type: ignore[no-untyped-def]
    admin = auth(keys["admin"])
    assert is_problem(client.get(f"{API}/webhooks", headers=auth(keys["write"])), 403)
    created = client.post(f"{API}/webhooks", headers=admin, json={
        "url": "https://hooks.example/passerelle", "event_types": ["card.installed"]})
    assert created.status_code == 201, created.get_json()
    sub = created.get_json()
    assert len(sub["secret"]) >= 32
    listed = client.get(f"{API}/webhooks", headers=admin).get_json()["items"]
    assert [s["id"] for s in listed] == [sub["id"]] and "secret" not in listed[0]
    assert is_problem(client.post(f"{API}/webhooks", headers=admin, json={
        "url": "ftp://x", "event_types": ["card.installed"]}), 422)
    assert is_problem(client.post(f"{API}/webhooks", headers=admin, json={
        "url": "https://x.example", "event_types": ["nope"]}), 422)
    disabled = client.patch(f"{API}/webhooks/{sub['id']}", headers=admin, json={"active": False})
    assert disabled.get_json()["active"] is False
    with services.db.transaction() as session:
        session.add(WebhookDelivery(tenant_id=demo["tenant_id"], subscription_id=sub["id"],
                                    event_id="evt-1", event_type="card.installed",
                                    payload={"x": 1}, attempts=3, last_status=500))
    deliveries = client.get(f"{API}/webhooks/{sub['id']}/deliveries",
                            headers=admin).get_json()["items"]
    assert [(d["event_id"], d["last_status"]) for d in deliveries] == [("evt-1", 500)]
    again = client.post(f"{API}/webhook-deliveries/{deliveries[0]['id']}/redeliver",
                        headers=admin)
    assert again.status_code == 202 and again.get_json()["event_id"] == "evt-1"
    assert again.get_json()["id"] != deliveries[0]["id"]
    assert is_problem(client.post(f"{API}/webhook-deliveries/999999/redeliver",
                                  headers=admin), 404)
    assert client.delete(f"{API}/webhooks/{sub['id']}", headers=admin).status_code == 204
    assert is_problem(client.get(f"{API}/webhooks/{sub['id']}", headers=admin), 404)

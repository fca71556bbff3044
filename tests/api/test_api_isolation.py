"""Tenant isolation through the API: tenant A's key on tenant B's ids finds nothing.

Routes are enumerated from the application's url_map, so a new endpoint under
/api/v1 is covered without editing this test: one with a path parameter must
answer 404 for B's id; one without must be classified below, or this test fails.
"""

from __future__ import annotations

import json
import re

from sqlalchemy import func, select

from app.api import PUBLIC_ENDPOINTS
from app.infra.models import (
    ApiKey,
    Card,
    Customer,
    LinkToken,
    Program,
    WebhookDelivery,
    WebhookSubscription,
)
from tests.api_helpers import auth, is_problem, make_key, make_other_tenant

API = "/api/v1"

#: Request bodies valid enough to get past validation to the lookup.
BODIES: dict[str, object] = {
    "api.update_program": {"name": "Renamed by A"},
    "api.patch_customer": {"attributes": {"points": 1}},
    "api.put_customer": {"attributes": {"points": 1}},
    "api.issue_link": {"purpose": "enroll"},
    "api.issue_links": {"purpose": "download", "customers": ["B-ONLY-1"]},
    "api.update_webhook": {"active": False},
}
#: Routes whose path names one of B's rows but that create in the caller's own tenant.
CREATES_OWN = {("api.put_customer", "PUT")}
#: Routes without ids in the path: what "not seeing B" means for each.
LISTS = {"api.list_programs", "api.list_customers", "api.list_device_logs", "api.list_keys",
         "api.list_audit", "api.list_templates", "api.get_tenant", "api.update_tenant",
         "api.list_webhooks"}
#: Creating routes: they take no foreign id at all (the body names the caller's own things).
OWN_CREATES = {"api.create_program", "api.create_key", "api.import_customers",
               "api.create_webhook"}
#: Routes whose body names other rows: sent B's ids, they must answer 404.
BODY_IDS = {"api.issue_card"}
#: Other API blueprints that must follow the same rule are added here as they land.


def _path(rule: str, ids: dict[str, object]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1).split(":")[-1]
        assert name in ids, f"add an id for path parameter {name!r} to this test"
        return str(ids[name])

    return re.sub(r"<([^>]+)>", substitute, rule)


def test_tenant_a_key_on_tenant_b_ids_gets_404_everywhere(app, client, services, demo):  # type: ignore[no-untyped-def]
    other = make_other_tenant(services)
    key = make_key(services, demo["tenant_id"], "admin", "tenant-a-admin")
    ids = {"slug": other.program_slug, "external_id": other.external_id,
           "serial": other.serial, "job_id": other.import_job_id, "key_id": other.key_id,
           "subscription_id": other.subscription_id, "delivery_id": other.delivery_id}
    b_markers = [other.program_slug, other.external_id, other.serial, "b.person@example.org",
                 "other-brand"]
    checked = 0
    # Routes that create in A's own tenant run last: they must not mask the others.
    rules = sorted(app.url_map.iter_rules(),
                   key=lambda r: any((r.endpoint, m) in CREATES_OWN for m in r.methods or ()))
    for rule in rules:
        if not rule.rule.startswith(API) or rule.endpoint in PUBLIC_ENDPOINTS \
                or not rule.endpoint.startswith("api."):
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            body = BODIES.get(rule.endpoint, {})
            where = f"{method} {rule.rule}"
            if rule.arguments:
                path = _path(rule.rule, ids)
                response = client.open(path, method=method, headers=auth(key),
                                       json=body if method in ("POST", "PUT", "PATCH") else None)
                if (rule.endpoint, method) in CREATES_OWN:
                    assert response.status_code == 201, where  # A's own new customer
                else:
                    assert is_problem(response, 404), (where, response.status_code,
                                                       response.get_data(as_text=True)[:200])
            elif rule.endpoint in LISTS:
                response = client.open(rule.rule, method=method, headers=auth(key),
                                       json={"name": "Maison Aurore"} if method == "PATCH"
                                       else None)
                assert response.status_code == 200, where
                text = response.get_data(as_text=True)
                assert not any(marker in text for marker in b_markers), where
            elif rule.endpoint in BODY_IDS:
                response = client.open(rule.rule, method=method, headers=auth(key), json={
                    "program": other.program_slug, "customer": other.external_id})
                assert is_problem(response, 404), where
            else:
                assert rule.endpoint in OWN_CREATES, f"classify {where} in this test"
                continue
            checked += 1
    assert checked >= 20

    # B's rows are exactly as they were.
    with services.db.session() as session:
        card = session.scalar(select(Card).where(Card.serial_number == other.serial))
        assert card is not None and not card.voided and card.version == 0
        assert session.scalar(select(ApiKey.revoked_at).where(ApiKey.id == other.key_id)) is None
        program = session.scalar(select(Program).where(Program.slug == other.program_slug,
                                                       Program.tenant_id == other.tenant_id))
        assert program is not None and program.name == "Other card"
        customer = session.scalar(select(Customer).where(Customer.tenant_id == other.tenant_id))
        assert customer.attributes == {"points": 7}
        subscription = session.get(WebhookSubscription, other.subscription_id)
        assert subscription is not None and subscription.active
        assert session.scalar(select(func.count(WebhookDelivery.id))) == 1  # no redelivery
        assert session.scalar(select(func.count(LinkToken.id))) == 0


def test_tenant_b_key_sees_its_own_rows(client, services, demo):  # type: ignore[no-untyped-def]
    """The 404s above are about ownership, not broken routes: B's own key finds them."""
    other = make_other_tenant(services)
    headers = auth(other.key)
    assert client.get(f"{API}/programs/{other.program_slug}", headers=headers).status_code == 200
    assert client.get(f"{API}/customers/{other.external_id}", headers=headers).status_code == 200
    assert client.get(f"{API}/cards/{other.serial}", headers=headers).status_code == 200
    assert client.get(f"{API}/customer-imports/{other.import_job_id}",
                      headers=headers).status_code == 200
    listed = client.get(f"{API}/customers", headers=headers).get_json()
    assert [c["external_id"] for c in listed["items"]] == [other.external_id]
    assert "C-1001" not in json.dumps(listed)

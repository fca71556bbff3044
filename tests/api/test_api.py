"""The REST API: keys and scopes, problem errors, each resource's happy path and bad input,
cursor pagination, import jobs, card actions, rate limits, the audit log."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image, ImageChops
from sqlalchemy import func, select

from app.admin import apikeys
from app.infra.models import ApiKey, AuditEntry, Card, Customer, DeviceLog, PushJob, Registration
from tests.api_helpers import auth, is_problem, make_key, make_other_tenant

API = "/api/v1"


@pytest.fixture()
def keys(services, demo):  # type: ignore[no-untyped-def]
    tid = demo["tenant_id"]
    return {scope: make_key(services, tid, scope, f"{scope}-key")
            for scope in ("read", "write", "admin")}


def _card(services, external_id: str = "C-1001", program: str = "rewards") -> Card:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        card = session.scalar(select(Card).join(Card.customer).join(Card.program)
                              .where(Customer.external_id == external_id))
        assert card is not None and card.program.slug in ("rewards", "club")
        return session.scalar(select(Card).join(Card.customer).join(Card.program).where(
            Customer.external_id == external_id, Card.program.has(slug=program)))


# -- keys, scopes, problems --------------------------------------------------------------

def test_missing_invalid_and_revoked_keys_get_401_problems(client, services, keys):  # type: ignore[no-untyped-def]
    response = client.get(f"{API}/customers")
    assert is_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert is_problem(client.get(f"{API}/customers", headers=auth("pk_nothing")), 401)
    forged = keys["read"][:-4] + ("AAAA" if not keys["read"].endswith("AAAA") else "BBBB")
    assert is_problem(client.get(f"{API}/customers", headers=auth(forged)), 401)
    assert is_problem(client.get(f"{API}/customers", headers={"Authorization": keys["read"]}),
                      401)
    assert client.get(f"{API}/customers", headers=auth(keys["read"])).status_code == 200
    with services.db.transaction() as session:
        row = session.scalar(select(ApiKey).where(
            ApiKey.prefix == apikeys.prefix_of(keys["read"])))
        apikeys.revoke(row)
    assert is_problem(client.get(f"{API}/customers", headers=auth(keys["read"])), 401)


def test_scopes_are_ordered_read_write_admin(client, keys):  # type: ignore[no-untyped-def]
    body = {"attributes": {"points": 5}}
    assert is_problem(client.patch(f"{API}/customers/C-1001", json=body,
                                   headers=auth(keys["read"])), 403)
    assert client.patch(f"{API}/customers/C-1001", json=body,
                        headers=auth(keys["write"])).status_code == 200
    assert is_problem(client.get(f"{API}/keys", headers=auth(keys["write"])), 403)
    assert client.get(f"{API}/keys", headers=auth(keys["admin"])).status_code == 200
    assert client.patch(f"{API}/customers/C-1001", json=body,
                        headers=auth(keys["admin"])).status_code == 200


def test_keys_are_stored_hashed_and_last_use_is_recorded_once_a_minute(client, services, keys):  # type: ignore[no-untyped-def]
    raw = keys["read"]
    assert raw.startswith("pk_") and len(raw.split("_", 2)[2]) == 43  # 256 random bits
    with services.db.session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == apikeys.prefix_of(raw)))
        assert row.key_hash == apikeys.hash_key(raw) and raw not in row.key_hash
        assert row.last_used_at is None
    client.get(f"{API}/programs", headers=auth(raw))
    with services.db.session() as session:
        first = session.scalar(select(ApiKey.last_used_at).where(ApiKey.prefix == row.prefix))
    assert first is not None
    client.get(f"{API}/programs", headers=auth(raw))
    with services.db.session() as session:
        again = session.scalar(select(ApiKey.last_used_at).where(ApiKey.prefix == row.prefix))
    assert again == first


def test_unknown_routes_methods_and_bodies_under_api_are_problems(client, keys):  # type: ignore[no-untyped-def]
    assert is_problem(client.get(f"{API}/nothing-here", headers=auth(keys["read"])), 404)
    assert is_problem(client.post(f"{API}/templates", headers=auth(keys["read"])), 405)
    big = {"attributes": {"x": "a" * 900}, "first_name": "x" * (1024 * 1024)}
    assert is_problem(client.put(f"{API}/customers/C-1001", json=big,
                                 headers=auth(keys["write"])), 413)
    response = client.put(f"{API}/customers/C-1001", data=b"{not json",
                          content_type="application/json", headers=auth(keys["write"]))
    assert response.status_code in (400, 422) and is_problem(response, response.status_code)


def test_openapi_document_is_3_1_and_generated_from_the_views(client):  # type: ignore[no-untyped-def]
    response = client.get(f"{API}/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert len({op["operationId"] for op in operations}) == len(operations) >= 20
    for op in operations:
        for code, answer in op["responses"].items():
            if int(code) >= 400:
                assert list(answer["content"]) == ["application/problem+json"], op["operationId"]
        assert op["x-required-scope"] in ("read", "write", "admin")
    docs = client.get(f"{API}/docs/")
    assert docs.status_code == 200 and b"swagger-ui-bundle.js" in docs.data
    assert b"https://" not in docs.data  # served locally, no CDN
    script = client.get(f"{API}/docs/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.data) > 100_000
    script.close()


# -- programs -------------------------------------------------------------------------

def test_programs_crud(client, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    listed = client.get(f"{API}/programs", headers=auth(keys["read"])).get_json()
    assert {p["slug"] for p in listed["items"]} == {"rewards", "club"}
    created = client.post(f"{API}/programs", headers=write, json={
        "slug": "spring", "name": "Spring card", "template": "loyalty",
        "field_mapping": {"points": "spring_points"}, "options": {"barcode_format": "pdf417"}})
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["pass_type_identifier"] == "pass.dev.passerelle.demo"
    assert is_problem(client.post(f"{API}/programs", headers=write, json={
        "slug": "spring", "name": "Again", "template": "loyalty"}), 409)
    assert is_problem(client.post(f"{API}/programs", headers=write, json={
        "slug": "nope", "name": "No", "template": "no-such-template"}), 422)
    assert is_problem(client.post(f"{API}/programs", headers=write, json={
        "slug": "Bad Slug", "name": "No", "template": "loyalty"}), 422)
    assert is_problem(client.post(f"{API}/programs", headers=write, json={
        "slug": "x", "name": "No", "template": "loyalty", "surprise": 1}), 422)
    patched = client.patch(f"{API}/programs/rewards", headers=write,
                           json={"name": "Aurore Rewards+", "options": {"barcode_format": "aztec"}})
    assert patched.status_code == 200, patched.get_json()
    assert patched.get_json()["cards_updated"] == 5  # the barcode changed on every card
    assert is_problem(client.patch(f"{API}/programs/rewards", headers=write,
                                   json={"template": "no-such"}), 422)
    assert client.get(f"{API}/programs/rewards",
                      headers=write).get_json()["name"] == "Aurore Rewards+"
    assert is_problem(client.delete(f"{API}/programs/rewards", headers=write), 409)
    assert client.delete(f"{API}/programs/spring", headers=write).status_code == 204
    assert is_problem(client.get(f"{API}/programs/spring", headers=write), 404)
    assert client.delete(f"{API}/programs/club?cascade=true", headers=write).status_code == 204
    names = {t["name"] for t in client.get(f"{API}/templates", headers=write).get_json()["items"]}
    assert {"loyalty", "membership"} <= names


def test_preview_is_a_png_that_changes_with_the_customer_data(client, keys):  # type: ignore[no-untyped-def]
    read, write = auth(keys["read"]), auth(keys["write"])
    first = client.get(f"{API}/programs/rewards/preview.png?customer=C-1001", headers=read)
    assert first.status_code == 200 and first.mimetype == "image/png"
    assert first.data.startswith(b"\x89PNG\r\n\x1a\n")
    before = Image.open(io.BytesIO(first.data))
    before.verify()
    assert client.patch(f"{API}/customers/C-1001", headers=write,
                        json={"attributes": {"points": 99999}}).status_code == 200
    after = client.get(f"{API}/programs/rewards/preview.png?customer=C-1001", headers=read)
    a = Image.open(io.BytesIO(first.data)).convert("RGB")
    b = Image.open(io.BytesIO(after.data)).convert("RGB")
    assert a.size == b.size and ImageChops.difference(a, b).getbbox() is not None
    same = client.get(f"{API}/programs/rewards/preview.png?customer=C-1001", headers=read)
    assert same.data == after.data  # deterministic: only the data moves pixels
    sample = client.get(f"{API}/programs/club/preview.png", headers=read)
    assert sample.status_code == 200 and sample.data.startswith(b"\x89PNG")
    assert is_problem(client.get(f"{API}/programs/rewards/preview.png?customer=NOPE",
                                 headers=read), 404)


# -- customers ------------------------------------------------------------------------

def test_customer_upsert_patch_and_read(client, services, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    created = client.put(f"{API}/customers/NEW-1", headers=write, json={
        "email": "New.Person@Example.com", "first_name": "Nova", "locale": "fr-FR",
        "birthday": "1990-04-01", "attributes": {"points": 10, "tier": "Silver"},
        "consents": {"marketing_email": True}})
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert body["email"] == "new.person@example.com"
    assert body["consents"]["marketing_email"]["granted"] is True
    assert body["consents"]["marketing_email"]["source"] == "api"
    again = client.put(f"{API}/customers/NEW-1", headers=write,
                       json={"attributes": {"points": 11}, "first_name": None})
    assert again.status_code == 200
    assert again.get_json()["attributes"] == {"points": 11}  # PUT replaces attributes
    assert again.get_json()["first_name"] is None
    version = _card(services).version
    patched = client.patch(f"{API}/customers/C-1001", headers=write,
                           json={"attributes": {"points": 4242, "tier": None}})
    assert patched.status_code == 200
    attributes = patched.get_json()["attributes"]
    assert attributes["points"] == 4242 and "tier" not in attributes
    assert attributes["points_to_next_tier"] == 720  # merged, not replaced
    assert _card(services).version > version  # the card moved on and will be pushed
    got = client.get(f"{API}/customers/C-1001", headers=auth(keys["read"])).get_json()
    assert {c["program"] for c in got["cards"]} == {"rewards", "club"}


@pytest.mark.parametrize("body", [
    {"email": "not-an-email"},
    {"locale": "xx-NOWHERE-42"},
    {"birthday": "1800-01-01"},
    {"attributes": {"bad name!": 1}},
    {"attributes": {"points": 10**20}},
    {"attributes": {"nested": {"a": 1}}},
    {"first_name": "line\nbreak"},
    {"first_name": "nul\u0000"},
    {"consents": {"marketing_email": "yes"}},
    {"unknown": 1},
    [],
])
def test_bad_customer_input_is_a_422_problem(client, keys, body):  # type: ignore[no-untyped-def]
    response = client.put(f"{API}/customers/C-1001", headers=auth(keys["write"]), json=body)
    assert is_problem(response, 422), response.get_json()


def test_customer_conflicts_and_bad_ids(client, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    assert is_problem(client.put(f"{API}/customers/C-1002", headers=write,
                                 json={"email": "camille.martin@example.com"}), 409)
    assert is_problem(client.patch(f"{API}/customers/NOPE", headers=write, json={}), 404)
    assert is_problem(client.get(f"{API}/customers/NOPE", headers=write), 404)
    assert is_problem(client.get(f"{API}/customers/%00", headers=write), 404)
    assert is_problem(client.put(f"{API}/customers/%20padded", headers=write, json={}), 422)
    assert is_problem(client.put(f"{API}/customers/{'x' * 129}", headers=write, json={}), 422)


def test_cursor_pagination_walks_every_customer_once(client, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    for n in range(23):
        assert client.put(f"{API}/customers/P-{n:03}", headers=write, json={}).status_code == 201
    seen: list[str] = []
    cursor = ""
    pages = 0
    while True:
        response = client.get(f"{API}/customers?limit=7&cursor={cursor}", headers=write)
        assert response.status_code == 200
        body = response.get_json()
        seen += [c["external_id"] for c in body["items"]]
        pages += 1
        if body["next_cursor"] is None:
            break
        cursor = body["next_cursor"]
    assert len(seen) == len(set(seen)) == 28 and pages == 4
    assert is_problem(client.get(f"{API}/customers?cursor=garbage!", headers=write), 422)
    assert is_problem(client.get(f"{API}/customers?cursor=Zm9v", headers=write), 400)
    assert is_problem(client.get(f"{API}/customers?limit=0", headers=write), 422)


# -- imports --------------------------------------------------------------------------

def test_csv_import_job_reports_per_row_errors(client, services, keys):  # type: ignore[no-untyped-def]
    services.jobs.huey.immediate = True  # run the queued task in-process
    csv_body = (b"external_id,email,points\n"
                b"IMP-1,imp1@example.com,10\n"
                b"IMP-2,not-an-email,20\n"
                b"C-1001,,555\n"
                b",nobody@example.com,1\n")
    response = client.post(f"{API}/customer-imports", data=csv_body,
                           content_type="text/csv", headers=auth(keys["write"]))
    assert response.status_code == 202, response.get_json()
    job = client.get(response.headers["Location"], headers=auth(keys["read"])).get_json()
    assert job["status"] == "done" and job["format"] == "csv"
    assert (job["created"], job["updated"]) == (1, 1)
    assert [e["line"] for e in job["errors"]] == [3, 5]
    assert "email" in job["errors"][0]["message"]
    assert client.get(f"{API}/customers/C-1001",
                      headers=auth(keys["read"])).get_json()["attributes"]["points"] == "555"


def test_ndjson_import_job_and_bad_uploads(client, services, keys):  # type: ignore[no-untyped-def]
    services.jobs.huey.immediate = True
    lines = [json.dumps({"external_id": "ND-1", "first_name": "Nd",
                         "attributes": {"points": 3}, "consents": {"sms": False}}),
             "",
             json.dumps({"external_id": "ND-2", "colour": "red"}),
             json.dumps({"external_id": "C-1002", "attributes": {"points": 1}})]
    write = auth(keys["write"])
    response = client.post(f"{API}/customer-imports", data="\n".join(lines).encode(),
                           content_type="application/x-ndjson", headers=write)
    assert response.status_code == 202
    job = client.get(f"{API}/customer-imports/{response.get_json()['id']}",
                     headers=write).get_json()
    assert job["status"] == "done"
    assert (job["created"], job["updated"], job["total_rows"]) == (1, 1, 3)
    assert [e["line"] for e in job["errors"]] == [3]  # line numbers of the file, blanks too
    nd = client.get(f"{API}/customers/ND-1", headers=write).get_json()
    assert nd["attributes"] == {"points": 3} and nd["consents"]["sms"]["source"] == "import"
    broken = client.post(f"{API}/customer-imports", data=b'{"external_id": "ND-3"}\n{broken\n',
                         content_type="application/x-ndjson", headers=write)
    assert is_problem(broken, 422) and "line(s) 2" in broken.get_json()["detail"]
    assert is_problem(client.post(f"{API}/customer-imports", data=b"x",
                                  content_type="application/pdf", headers=write), 415)
    assert is_problem(client.post(f"{API}/customer-imports", data=b"",
                                  content_type="text/csv", headers=write), 422)
    failed = client.post(f"{API}/customer-imports", data=b"name\nx\n",
                         content_type="text/csv", headers=write)
    job = client.get(failed.headers["Location"], headers=write).get_json()
    assert job["status"] == "failed" and "external_id" in job["errors"][0]["message"]
    assert "/" not in job["errors"][0]["message"].split(":")[0]  # no server path leaks
    assert is_problem(client.get(f"{API}/customer-imports/999999", headers=write), 404)


def test_import_bodies_may_be_large_but_not_unbounded(client, services, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    two_mib = b"external_id,note\n" + b"X-1," + b"a" * (2 * 1024 * 1024) + b"\n"
    services.jobs.huey.immediate = True
    assert client.post(f"{API}/customer-imports", data=two_mib, content_type="text/csv",
                       headers=write).status_code == 202
    huge = b"a" * (21 * 1024 * 1024)
    assert is_problem(client.post(f"{API}/customer-imports", data=huge,
                                  content_type="text/csv", headers=write), 413)


# -- cards and device logs ------------------------------------------------------------

def test_card_read_void_reissue_and_push(client, services, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    serial = _card(services).serial_number
    card = client.get(f"{API}/cards/{serial}", headers=write).get_json()
    assert card["program"] == "rewards" and card["customer"] == "C-1001"
    with services.db.transaction() as session:
        row = session.scalar(select(Card).where(Card.serial_number == serial))
        session.add(Registration(tenant_id=row.tenant_id, card_id=row.id,
                                 device_library_identifier="dev-api",
                                 pass_type_identifier=row.program.pass_type_identifier,
                                 push_token="ab" * 32))
    voided = client.post(f"{API}/cards/{serial}/void", headers=write).get_json()
    assert voided["voided"] is True and voided["version"] > card["version"]
    assert voided["queued_pushes"] == 1 and voided["apple_devices"] == 1
    reissued = client.post(f"{API}/cards/{serial}/reissue", headers=write).get_json()
    assert reissued["voided"] is False and reissued["version"] == voided["version"] + 1
    assert reissued["serial_number"] == serial  # Apple: an installed card keeps its serial
    pushed = client.post(f"{API}/cards/{serial}/push", headers=write).get_json()
    assert pushed["version"] == reissued["version"]  # same content, new tag
    assert pushed["update_tag"] > reissued["update_tag"] and pushed["queued_pushes"] == 1
    with services.db.session() as session:
        assert session.scalar(select(func.count(PushJob.id))
                              .where(PushJob.card_id == row.id)) == 3
    assert is_problem(client.post(f"{API}/cards/nope/void", headers=write), 404)
    assert is_problem(client.post(f"{API}/cards/{serial}/void", headers=auth(keys["read"])), 403)


def test_issue_card(client, services, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    assert client.put(f"{API}/customers/ISS-1", headers=write, json={}).status_code == 201
    issued = client.post(f"{API}/cards", headers=write,
                         json={"program": "rewards", "customer": "ISS-1"})
    assert issued.status_code == 201 and issued.get_json()["version"] == 1
    again = client.post(f"{API}/cards", headers=write,
                        json={"program": "rewards", "customer": "ISS-1"})
    assert again.status_code == 200
    assert again.get_json()["serial_number"] == issued.get_json()["serial_number"]
    assert is_problem(client.post(f"{API}/cards", headers=write,
                                  json={"program": "rewards", "customer": "NOPE"}), 404)


def test_device_logs_show_only_the_tenants_lines(client, services, keys, demo):  # type: ignore[no-untyped-def]
    other = make_other_tenant(services)
    card = _card(services)
    with services.db.transaction() as session:
        session.add_all([
            DeviceLog(tenant_id=demo["tenant_id"], card_id=card.id, message="mine"),
            DeviceLog(tenant_id=demo["tenant_id"], message="mine, no card"),
            DeviceLog(tenant_id=other.tenant_id, message="theirs"),
            DeviceLog(message="nobody's")])
    read = auth(keys["read"])
    items = client.get(f"{API}/device-logs", headers=read).get_json()["items"]
    assert [i["message"] for i in items] == ["mine", "mine, no card"]
    assert items[0]["serial_number"] == card.serial_number
    only = client.get(f"{API}/device-logs?serial={card.serial_number}", headers=read).get_json()
    assert [i["message"] for i in only["items"]] == ["mine"]
    assert is_problem(client.get(f"{API}/device-logs?serial={other.serial}", headers=read), 404)


# -- admin, audit, limits --------------------------------------------------------------

def test_admin_keys_tenant_and_audit(client, keys):  # type: ignore[no-untyped-def]
    admin = auth(keys["admin"])
    created = client.post(f"{API}/keys", headers=admin, json={"name": "ci", "scope": "read"})
    assert created.status_code == 201
    new = created.get_json()
    assert new["key"].startswith(f"pk_{new['prefix']}_")
    assert client.get(f"{API}/programs", headers=auth(new["key"])).status_code == 200
    listed = client.get(f"{API}/keys", headers=admin).get_json()["items"]
    assert all("key" not in item for item in listed) and len(listed) == 4
    assert client.delete(f"{API}/keys/{new['id']}", headers=admin).status_code == 204
    assert is_problem(client.get(f"{API}/programs", headers=auth(new["key"])), 401)
    assert is_problem(client.delete(f"{API}/keys/999999", headers=admin), 404)
    assert is_problem(client.post(f"{API}/keys", headers=admin,
                                  json={"name": "x", "scope": "root"}), 422)
    tenant = client.patch(f"{API}/tenant", headers=admin, json={"name": "Maison Aurore SA"})
    assert tenant.status_code == 200 and tenant.get_json()["slug"] == "demo"
    client.patch(f"{API}/customers/C-1001", headers=auth(keys["write"]),
                 json={"attributes": {"points": 1}})
    entries = client.get(f"{API}/audit", headers=admin).get_json()["items"]
    actions = [(e["action"], e["actor"]) for e in entries]
    admin_actor = f"key:{apikeys.prefix_of(keys['admin'])}"
    assert ("key.create", admin_actor) in actions and ("key.revoke", admin_actor) in actions
    assert ("tenant.update", admin_actor) in actions
    assert ("customer.patch", f"key:{apikeys.prefix_of(keys['write'])}") in actions
    assert not any("@" in json.dumps(e) for e in entries)  # no emails in the audit log


def test_every_write_is_audited(client, services, keys):  # type: ignore[no-untyped-def]
    write = auth(keys["write"])
    serial = _card(services).serial_number
    client.put(f"{API}/customers/AUD-1", headers=write, json={"email": "aud@example.com"})
    client.post(f"{API}/programs", headers=write,
                json={"slug": "aud", "name": "Audited", "template": "loyalty"})
    client.post(f"{API}/cards/{serial}/push", headers=write)
    with services.db.session() as session:
        actions = set(session.scalars(select(AuditEntry.action)))
    assert {"customer.upsert", "program.create", "card.push"} <= actions


def test_rate_limit_is_per_key(app, client, keys):  # type: ignore[no-untyped-def]
    app.config["PASSERELLE_API_RATE_LIMIT"] = "3 per minute"
    for _ in range(3):
        assert client.get(f"{API}/programs", headers=auth(keys["read"])).status_code == 200
    limited = client.get(f"{API}/programs", headers=auth(keys["read"]))
    assert is_problem(limited, 429)
    assert client.get(f"{API}/programs", headers=auth(keys["write"])).status_code == 200


def test_cli_creates_lists_and_revokes_keys(runner, client, demo):  # type: ignore[no-untyped-def]
    created = runner.invoke(args=["apikeys", "create", "--tenant", "demo", "--scope", "write",
                                  "--name", "shell"])
    assert created.exit_code == 0, created.output
    raw = created.stdout.strip().splitlines()[0]
    assert apikeys.prefix_of(raw) is not None
    assert client.get(f"{API}/programs", headers=auth(raw)).status_code == 200
    listed = runner.invoke(args=["apikeys", "list", "--tenant", "demo"])
    assert f"pk_{apikeys.prefix_of(raw)}_" in listed.output and raw not in listed.output
    revoked = runner.invoke(args=["apikeys", "revoke", "--tenant", "demo",
                                  f"pk_{apikeys.prefix_of(raw)}"])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert client.get(f"{API}/programs", headers=auth(raw)).status_code == 401
    bad = runner.invoke(args=["apikeys", "create", "--tenant", "nope", "--scope", "read"])
    assert bad.exit_code != 0

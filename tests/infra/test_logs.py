"""Logs operators can use: JSON lines with a request id and the tenant, and no personal
data in any line at any level — checked at DEBUG, the level that shows the most."""

from __future__ import annotations

import io
import json
import logging

import pytest
from sqlalchemy import select

from app.infra import logs
from app.infra.models import Card, Customer, Program
from tests.api_helpers import auth, make_key

API = "/api/v1"
PASS_TYPE = "pass.dev.passerelle.demo"
DEVICE = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
PUSH_TOKEN = "ab12" * 16


@pytest.fixture()
def captured():  # type: ignore[no-untyped-def]
    """Configure the process's logs as `serve --log-format json` does, at DEBUG."""
    root = logging.getLogger()
    saved_level = root.level
    saved_levels = {name: logging.getLogger(name).level for name in logs._CHATTY}
    stream = io.StringIO()
    handler = logs.configure("json", "DEBUG", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def _lines(stream: io.StringIO) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_every_request_gets_an_id_returned_as_a_header_and_in_its_lines(client, captured):  # type: ignore[no-untyped-def]
    given = client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.42"})
    assert given.headers["X-Request-ID"] == "lb-7f3a.42"
    made = client.get("/healthz", headers={"X-Request-ID": "<script> " + "x" * 200})
    fresh = made.headers["X-Request-ID"]
    assert fresh != "lb-7f3a.42" and len(fresh) == 32 and fresh.isalnum()  # malformed: replaced
    access = [line for line in _lines(captured) if line["logger"] == "passerelle.access"]
    assert [(a["request_id"], a["route"], a["status"]) for a in access] == [
        ("lb-7f3a.42", "/healthz", 200), (fresh, "/healthz", 200)]
    assert all(a["level"] == "info" and a["duration_ms"] >= 0 for a in access)


def test_lines_name_the_tenant_and_the_route_template_not_the_path(client, services, demo,  # type: ignore[no-untyped-def]
                                                                  captured):
    key = make_key(services, demo["tenant_id"], "read")
    client.get(f"{API}/customers/C-1001", headers=auth(key))
    [line] = [a for a in _lines(captured) if a["logger"] == "passerelle.access"]
    assert line["tenant"] == demo["tenant_id"]
    assert line["route"] == "/api/v1/customers/<external_id>"
    assert "C-1001" not in json.dumps(line)


def test_no_email_name_or_token_in_any_line_at_debug(client, services, demo, captured):  # type: ignore[no-untyped-def]
    email, first, last = "Zelda.Quill@example.org", "Zelda", "Quillfeather"
    write = make_key(services, demo["tenant_id"], "write")
    created = client.put(f"{API}/customers/LOG-1", headers=auth(write), json={
        "email": email, "first_name": first, "last_name": last,
        "attributes": {"points": 5}})
    assert created.status_code == 201
    # A conflict makes the database raise: its error text must not carry the values.
    client.put(f"{API}/customers/LOG-2", headers=auth(write), json={"email": email})
    with services.db.session() as session:
        card = session.scalar(select(Card).join(Program).join(Customer).where(
            Program.slug == "rewards", Customer.external_id == "C-1001"))
        serial, token = card.serial_number, card.authentication_token
        member = card.customer
        demo_secrets = (member.email, member.last_name)
    device = {"Authorization": f"ApplePass {token}"}
    registered = client.post(
        f"/passkit/v1/devices/{DEVICE}/registrations/{PASS_TYPE}/{serial}",
        json={"pushToken": PUSH_TOKEN}, headers=device)
    assert registered.status_code == 201
    assert client.get(f"/passkit/v1/passes/{PASS_TYPE}/{serial}", headers=device).status_code == 200
    client.post("/passkit/v1/log", json={"logs": [f"token {PUSH_TOKEN} for {email}"]})
    logging.getLogger("app.test").debug("slipped through: %s %s", email, f"Bearer {write}")

    text = captured.getvalue()
    assert len(_lines(captured)) >= 6, text  # the flow did log: the check below can fail
    for secret in (email, email.lower(), last, token, PUSH_TOKEN, write, serial, DEVICE,
                   *demo_secrets):
        assert secret not in text, secret
    assert "<email>" in text and "Bearer <redacted>" in text  # the last filter worked


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text.*json"):
        logs.configure("xml", "INFO", stream=io.StringIO())

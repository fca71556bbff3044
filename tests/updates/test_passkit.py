"""Apple's PassKit web service, endpoint by endpoint, as a device calls it."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import zipfile

import pytest
from sqlalchemy import func, select

from app.infra.models import Card, Customer, DeviceLog, InstallEvent, Program, PushJob, Registration
from app.updates import refresh as updates

PASS_TYPE = "pass.dev.passerelle.demo"
DEVICE = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
TOKEN_HEX = "ab" * 32


@pytest.fixture()
def card(services, demo):  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        card = session.scalar(select(Card).join(Program).join(Customer).where(
            Program.slug == "rewards", Customer.external_id == "C-1001"))
        return {"serial": card.serial_number, "token": card.authentication_token, "id": card.id}


def auth(card) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"Authorization": f"ApplePass {card['token']}"}


def reg_url(card, device: str = DEVICE) -> str:  # type: ignore[no-untyped-def]
    return f"/passkit/v1/devices/{device}/registrations/{PASS_TYPE}/{card['serial']}"


def serials_url(device: str = DEVICE, since: str | None = None) -> str:
    url = f"/passkit/v1/devices/{device}/registrations/{PASS_TYPE}"
    return url + (f"?passesUpdatedSince={since}" if since is not None else "")


def test_register_201_then_200_and_token_refresh(client, services, card) -> None:  # type: ignore[no-untyped-def]
    first = client.post(reg_url(card), json={"pushToken": TOKEN_HEX}, headers=auth(card))
    assert first.status_code == 201
    again = client.post(reg_url(card), json={"pushToken": "cd" * 32}, headers=auth(card))
    assert again.status_code == 200
    with services.db.session() as session:
        [registration] = session.scalars(select(Registration)).all()
        assert registration.push_token == "cd" * 32  # the newest token wins
        kinds = session.scalars(select(InstallEvent.kind)).all()
        assert kinds == ["registered"]


@pytest.mark.parametrize("header", [None, "ApplePass wrong-token-wrong-token-wrong", "Bearer x",
                                    "ApplePass "])
def test_register_refuses_bad_tokens(client, card, header) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": header} if header else {}
    response = client.post(reg_url(card), json={"pushToken": TOKEN_HEX}, headers=headers)
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"


def test_unknown_serial_looks_like_a_wrong_token(client, card) -> None:  # type: ignore[no-untyped-def]
    unknown = dict(card, serial="NoSuchSerialNumber0000")
    a = client.post(reg_url(unknown), json={"pushToken": TOKEN_HEX}, headers=auth(card))
    b = client.post(reg_url(card), json={"pushToken": TOKEN_HEX},
                    headers={"Authorization": "ApplePass " + "z" * 43})
    assert a.status_code == b.status_code == 401
    assert a.get_json() == b.get_json()


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"pushToken": 5}', b"{}",
                                  b'{"pushToken": "../../etc"}', b"\xff\xfe"])
def test_register_rejects_junk_bodies(client, card, body) -> None:  # type: ignore[no-untyped-def]
    response = client.post(reg_url(card), data=body, headers=auth(card),
                           content_type="application/json")
    assert response.status_code == 400


def test_huge_body_and_odd_paths_are_4xx(client, card) -> None:  # type: ignore[no-untyped-def]
    huge = client.post(reg_url(card), data=b'{"pushToken":"' + b"a" * 3_000_000 + b'"}',
                       headers=auth(card), content_type="application/json")
    assert huge.status_code in (400, 413)
    odd = client.post(reg_url(card, device="bad$device"), json={"pushToken": TOKEN_HEX},
                      headers=auth(card))
    assert odd.status_code == 400
    assert client.get(serials_url(device="x" * 200)).status_code == 400
    assert client.get(serials_url(since="yesterday")).status_code == 400
    assert client.get(serials_url(since="-1")).status_code == 400
    assert client.put(reg_url(card)).status_code == 405


def test_unregister_is_idempotent_and_authenticated(client, services, card) -> None:  # type: ignore[no-untyped-def]
    client.post(reg_url(card), json={"pushToken": TOKEN_HEX}, headers=auth(card))
    assert client.delete(reg_url(card)).status_code == 401
    assert client.delete(reg_url(card), headers=auth(card)).status_code == 200
    assert client.delete(reg_url(card), headers=auth(card)).status_code == 200
    with services.db.session() as session:
        assert session.scalar(select(func.count(Registration.id))) == 0
        assert session.scalars(select(InstallEvent.kind).order_by(InstallEvent.id)).all() == [
            "registered", "unregistered"]


def test_serials_since_tag(client, services, card) -> None:  # type: ignore[no-untyped-def]
    assert client.get(serials_url()).status_code == 204  # nothing registered
    client.post(reg_url(card), json={"pushToken": TOKEN_HEX}, headers=auth(card))
    first = client.get(serials_url())
    assert first.status_code == 200 and first.headers["Cache-Control"] == "no-store"
    body = first.get_json()
    assert body["serialNumbers"] == [card["serial"]]
    tag = body["lastUpdated"]
    assert client.get(serials_url(since=tag)).status_code == 204
    # Another device sees nothing: the device library id is the secret.
    assert client.get(serials_url(device="other-device")).status_code == 204

    with services.db.transaction() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        customer.attributes["points"] = 9999
        changed = updates.customers_changed(session, services, [customer]).changed
        assert card["serial"] in [c.serial_number for c in changed]
    after = client.get(serials_url(since=tag)).get_json()
    assert after["serialNumbers"] == [card["serial"]]
    assert int(after["lastUpdated"]) > int(tag)
    with services.db.session() as session:
        assert session.scalar(select(func.count(PushJob.id))) == 1


def test_two_changes_in_the_same_instant_both_get_later_tags(client, services, card) -> None:  # type: ignore[no-untyped-def]
    client.post(reg_url(card), json={"pushToken": TOKEN_HEX}, headers=auth(card))
    tag = client.get(serials_url()).get_json()["lastUpdated"]
    seen = []
    for points in (1, 2):
        with services.db.transaction() as session:
            customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
            customer.attributes["points"] = points
            updates.customers_changed(session, services, [customer])
        body = client.get(serials_url(since=tag)).get_json()
        seen.append(body["serialNumbers"])
        tag = body["lastUpdated"]
    assert seen == [[card["serial"]], [card["serial"]]]


def test_latest_pass_last_modified_and_304(client, services, card) -> None:  # type: ignore[no-untyped-def]
    url = f"/passkit/v1/passes/{PASS_TYPE}/{card['serial']}"
    assert client.get(url).status_code == 401
    response = client.get(url, headers=auth(card))
    assert response.status_code == 200
    assert response.mimetype == "application/vnd.apple.pkpass"
    last_modified = response.headers["Last-Modified"]
    with zipfile.ZipFile(io.BytesIO(response.data)) as zf:
        assert json.loads(zf.read("pass.json"))["serialNumber"] == card["serial"]
    head = client.head(url, headers=auth(card))
    assert head.status_code == 200 and head.headers["Last-Modified"] == last_modified
    assert head.data == b""
    cached = client.get(url, headers={**auth(card), "If-Modified-Since": last_modified})
    assert cached.status_code == 304 and cached.data == b""
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert client.get(url, headers={**auth(card), "If-Modified-Since": old}).status_code == 200
    junk = client.get(url, headers={**auth(card), "If-Modified-Since": "not a date"})
    assert junk.status_code == 200


def test_voided_card_is_served_without_web_service(client, services, card) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        session.get(Card, card["id"]).voided = True
    response = client.get(f"/passkit/v1/passes/{PASS_TYPE}/{card['serial']}", headers=auth(card))
    with zipfile.ZipFile(io.BytesIO(response.data)) as zf:
        pass_json = json.loads(zf.read("pass.json"))
    assert pass_json["voided"] is True
    assert "webServiceURL" not in pass_json and "authenticationToken" not in pass_json


def test_log_endpoint_stores_and_links_messages(client, services, card) -> None:  # type: ignore[no-untyped-def]
    message = f"[2026-11-23] Get pass task (pass type {PASS_TYPE}, serial number {card['serial']}) failed"
    assert client.post("/passkit/v1/log", json={"logs": [message, "unrelated"]}).status_code == 200
    assert client.post("/passkit/v1/log", json={"description": "legacy"}).status_code == 200
    assert client.post("/passkit/v1/log", data=b"junk").status_code == 400
    assert client.post("/passkit/v1/log", json={"logs": [1, 2]}).status_code == 400
    with services.db.session() as session:
        logs = session.scalars(select(DeviceLog).order_by(DeviceLog.id)).all()
        assert [log.message for log in logs] == [message, "unrelated", "legacy"]
        assert [log.card_id for log in logs] == [card["id"], None, None]


def test_card_timeline_command(client, services, card, app) -> None:  # type: ignore[no-untyped-def]
    from app.cli import main

    client.post(reg_url(card), json={"pushToken": TOKEN_HEX}, headers=auth(card))
    client.post("/passkit/v1/log", json={"logs": [f"serial number {card['serial']} failed"]})
    result = app.test_cli_runner().invoke(main, ["cards", "timeline", card["serial"]])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    kinds = [line.split()[2] for line in lines]
    assert {"issued", "content", "registered", "wallet"} <= set(kinds)
    assert DEVICE not in result.output  # device ids are shortened
    missing = app.test_cli_runner().invoke(main, ["cards", "timeline", "nope"])
    assert missing.exit_code == 1 and "no card with serial 'nope'" in missing.output


def _points_shown(response) -> str:  # type: ignore[no-untyped-def]
    with zipfile.ZipFile(io.BytesIO(response.data)) as zf:
        pass_json = json.loads(zf.read("pass.json"))
    value = next(f["value"] for f in pass_json["storeCard"]["primaryFields"]
                 if f["key"] == "points")
    return "".join(ch for ch in value if ch.isdigit())  # grouped per the member's locale


def test_quick_updates_keep_order_without_a_future_last_modified(client, services,  # type: ignore[no-untyped-def]
                                                                 card) -> None:
    """Several updates in a row, the device fetching after each (as pushes make it do):
    each fetch is the new version, and no Last-Modified is later than the clock."""
    url = f"/passkit/v1/passes/{PASS_TYPE}/{card['serial']}"
    held = client.get(url, headers=auth(card))  # what the device has
    shown: list[str] = []
    for points in range(7001, 7006):
        with services.db.session() as session:
            customer = session.get(Card, card["id"]).customer
            customer.attributes = {**customer.attributes, "points": points}
            assert updates.customers_changed(session, services, [customer]).changed
            session.commit()
        fresh = client.get(url, headers={**auth(card),
                                          "If-Modified-Since": held.headers["Last-Modified"]})
        now = dt.datetime.now(dt.UTC)
        assert fresh.status_code == 200, points  # the device's copy is older: never a 304
        assert fresh.last_modified is not None and fresh.last_modified <= now, (
            fresh.headers["Last-Modified"], now)
        shown.append(_points_shown(fresh))
        by_tag = client.get(url, headers={**auth(card), "If-None-Match": held.headers["ETag"]})
        assert by_tag.status_code == 200  # an older version's ETag: the new pass
        held = fresh
    assert shown == ["7001", "7002", "7003", "7004", "7005"]
    current = client.get(url, headers={**auth(card), "If-None-Match": held.headers["ETag"],
                                       "If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert current.status_code == 304 and current.headers["ETag"] == held.headers["ETag"]


def test_log_endpoint_is_rate_limited(client) -> None:  # type: ignore[no-untyped-def]
    codes = [client.post("/passkit/v1/log", json={"logs": ["x"]}).status_code for _ in range(61)]
    assert codes[:60] == [200] * 60
    assert codes[60] == 429
    limited = client.post("/passkit/v1/log", json={"logs": ["x"]})
    assert limited.mimetype == "application/problem+json"


# -- each version signed once (issue 12, item 5) ------------------------------------------

def _change_points(services, points: int) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        customer.attributes["points"] = points
        updates.customers_changed(session, services, [customer])


def _no_render_or_signature(monkeypatch, services) -> list[str]:  # type: ignore[no-untyped-def]
    """Make rendering and signing record that they ran (and still work)."""
    from app.cards import cards

    calls: list[str] = []
    real_render = cards.render

    def render(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("render")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(cards, "render", render)
    for builder in list(services._builders.values()):
        real_sign = builder.signer

        def sign(data, real_sign=real_sign):  # type: ignore[no-untyped-def]
            calls.append("sign")
            return real_sign(data)

        monkeypatch.setattr(builder, "signer", sign)
    return calls


def test_a_changed_card_is_served_from_its_signed_version(client, services, card, monkeypatch,  # type: ignore[no-untyped-def]
                                                         tmp_path) -> None:
    from app.infra.models import SignedVersion
    from tests.pkpass_check import verify_pkpass

    url = f"/passkit/v1/passes/{PASS_TYPE}/{card['serial']}"
    client.post(reg_url(card), json={"pushToken": TOKEN_HEX}, headers=auth(card))
    _change_points(services, 4321)  # signed now, at update time: the card has a device
    with services.db.session() as session:
        signed = session.get(SignedVersion, card["id"])
        assert signed is not None
        assert signed.content_hash == session.get(Card, card["id"]).content_hash

    calls = _no_render_or_signature(monkeypatch, services)
    commits: list[object] = []
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    def on_commit(session) -> None:  # type: ignore[no-untyped-def]
        commits.append(session)

    event.listen(Session, "after_commit", on_commit)
    try:
        response = client.get(url, headers=auth(card))
        last_modified = response.headers["Last-Modified"]
        again = client.get(url, headers={**auth(card), "If-Modified-Since": last_modified})
        wrong = client.get(url, headers={"Authorization": "ApplePass " + "x" * 43})
    finally:
        event.remove(Session, "after_commit", on_commit)
    assert response.status_code == 200 and again.status_code == 304 and wrong.status_code == 401
    assert calls == [] and commits == []  # no render, no signature, no commit
    pass_json = verify_pkpass(response.data, services.settings.certs_path / "dev" / "root-ca.pem",
                              tmp_path)  # a valid signature over what is served
    assert pass_json["serialNumber"] == card["serial"]
    assert re.search(r"4\W?321", json.dumps(pass_json, ensure_ascii=False))  # the new points


def test_a_card_without_a_signed_version_is_signed_on_first_fetch_only(client, services, card,  # type: ignore[no-untyped-def]
                                                                      monkeypatch) -> None:
    from app.infra.models import SignedVersion

    url = f"/passkit/v1/passes/{PASS_TYPE}/{card['serial']}"
    first = client.get(url, headers=auth(card))  # rendered, signed and kept
    assert first.status_code == 200
    calls = _no_render_or_signature(monkeypatch, services)
    second = client.get(url, headers=auth(card))
    assert second.status_code == 200 and second.data == first.data
    assert calls == []
    # A stale signed version (content changed without it) is never served.
    with services.db.transaction() as session:
        session.get(SignedVersion, card["id"]).content_hash = "0" * 64
    third = client.get(url, headers=auth(card))
    assert third.status_code == 200 and calls == ["render", "sign"]
    with services.db.session() as session:
        assert session.get(SignedVersion, card["id"]).content_hash == session.get(
            Card, card["id"]).content_hash


def test_passerelle_serve_holds_device_connections_open(services, card, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The production server (gunicorn, gthread workers) keeps a device's connection
    across its requests, as Wallet expects, and answers the device endpoints."""
    import http.client
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = services.settings
    env = {**os.environ, "PASSERELLE_INSTANCE_PATH": str(settings.instance_path),
           "PASSERELLE_DATABASE_URL": settings.database_url,
           "PASSERELLE_CERTS_PATH": str(settings.certs_path),
           "PASSERELLE_SECRET_KEY": settings.ensure_secret_key(),
           "PASSERELLE_STRICT_CERTS": "false"}
    log = tmp_path / "serve.log"
    with log.open("wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                                   "--workers", "2", "--threads", "2"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "passerelle serve did not start"
                time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", reg_url(card), body=json.dumps({"pushToken": TOKEN_HEX}),
                     headers={**auth(card), "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 201 and response.read() == b""
        first_socket = conn.sock
        conn.request("GET", serials_url())
        response = conn.getresponse()
        assert response.status == 200 and card["serial"] in response.read().decode()
        conn.request("GET", f"/passkit/v1/passes/{PASS_TYPE}/{card['serial']}", headers=auth(card))
        response = conn.getresponse()
        assert response.status == 200 and response.read().startswith(b"PK")
        assert conn.sock is first_socket  # one keep-alive connection for all three
        conn.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

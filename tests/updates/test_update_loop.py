"""The whole loop with real peers: a device registers, data changes, the push goes
through a real HTTP/2 + TLS APNs stand-in via a real Huey worker, the device asks
for its serials, downloads the new pass, and gets 304 after that."""

from __future__ import annotations

import datetime as dt
import io
import json
import zipfile

from sqlalchemy import select

from app.infra.models import Card, Customer, InstallEvent, Program, PushAttempt, Registration
from app.updates import refresh as updates
from tests.apns_standin import ApnsStandin
from tests.waiting import wait_until as _wait

PASS_TYPE = "pass.dev.passerelle.demo"
PHONE, OLD_PHONE = "phone-0001", "phone-gone"
PHONE_TOKEN, OLD_TOKEN = "aa" * 32, "bb" * 32



def test_register_change_push_fetch_304(client, services, demo, keep_signal_handlers) -> None:  # type: ignore[no-untyped-def]
    certs_path = services.settings.certs_path
    with ApnsStandin(client_ca_files=[certs_path / "dev" / "root-ca.pem",
                                      certs_path / "wwdr" / "dev-wwdr.pem"]) as apns:
        services.settings.apns_url = apns.url
        services.settings.apns_ca_file = str(apns.ca_file)
        apns.script[OLD_TOKEN] = [(410, "Unregistered")]

        with services.db.session() as session:
            card = session.scalar(select(Card).join(Program).join(Customer).where(
                Program.slug == "rewards", Customer.external_id == "C-1002"))
            serial, token = card.serial_number, card.authentication_token
        auth = {"Authorization": f"ApplePass {token}"}
        pass_url = f"/passkit/v1/passes/{PASS_TYPE}/{serial}"

        # The device installs the card: downloads it, registers, reads its tag.
        first = client.get(pass_url, headers=auth)
        assert first.status_code == 200
        for device, push_token in ((PHONE, PHONE_TOKEN), (OLD_PHONE, OLD_TOKEN)):
            registered = client.post(
                f"/passkit/v1/devices/{device}/registrations/{PASS_TYPE}/{serial}",
                json={"pushToken": push_token}, headers=auth)
            assert registered.status_code == 201
        serials_url = f"/passkit/v1/devices/{PHONE}/registrations/{PASS_TYPE}"
        tag = client.get(serials_url).get_json()["lastUpdated"]

        consumer = services.jobs.consumer(workers=2)
        consumer.start()
        try:
            # The CRM credits points.
            with services.db.transaction(demo["tenant_id"]) as session:
                customer = session.scalar(select(Customer).where(Customer.external_id == "C-1002"))
                customer.attributes["points"] = 1337
                assert updates.customers_changed(session, services, [customer]).changed
            # The worker pushes both devices through the stand-in.
            _wait(lambda: len(apns.received) >= 2, seconds=15.0)
            by_token = {r.token: r for r in apns.received}
            assert by_token[PHONE_TOKEN].topic == PASS_TYPE
            assert by_token[PHONE_TOKEN].client_uid == PASS_TYPE
            assert json.loads(by_token[PHONE_TOKEN].body) == {}
            assert by_token[OLD_TOKEN].status == 410
        finally:
            consumer.stop(graceful=True)
            services.close()

        # The phone asks what changed since its tag, then fetches the new pass.
        changed = client.get(f"{serials_url}?passesUpdatedSince={tag}").get_json()
        assert changed["serialNumbers"] == [serial]
        fresh = client.get(pass_url, headers={**auth,
                                              "If-Modified-Since": first.headers["Last-Modified"]})
        assert fresh.status_code == 200
        assert fresh.headers["ETag"] != first.headers["ETag"]  # a new version
        # Never earlier than the copy it replaces, never later than now (it may equal the
        # first one's when both came in one second: app/passkit.py says why that is safe).
        assert first.last_modified <= fresh.last_modified <= dt.datetime.now(dt.UTC)
        with zipfile.ZipFile(io.BytesIO(fresh.data)) as zf:
            pass_json = json.loads(zf.read("pass.json"))
        points = [f for f in pass_json["storeCard"]["primaryFields"] if f["key"] == "points"]
        assert points[0]["value"] == "1\xa0337"  # Czech grouping for Jiří
        again = client.get(pass_url, headers={**auth,
                                              "If-Modified-Since": fresh.headers["Last-Modified"],
                                              "If-None-Match": fresh.headers["ETag"]})
        assert again.status_code == 304
        assert client.get(f"{serials_url}?passesUpdatedSince={changed['lastUpdated']}"
                          ).status_code == 204

    # 410 removed the old phone's registration and logged it as an uninstall.
    with services.db.session() as session:
        devices = session.scalars(select(Registration.device_library_identifier)).all()
        assert devices == [PHONE]
        kinds = session.scalars(select(InstallEvent.kind).where(
            InstallEvent.device == OLD_PHONE).order_by(InstallEvent.id)).all()
        assert kinds == ["registered", "push_gone"]
        outcomes = sorted(session.scalars(select(PushAttempt.outcome)).all())
        assert outcomes == ["sent", "unregistered"]


def test_push_with_a_p8_token_key_instead_of_the_certificate(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from app.infra.models import AppleIdentity, PushJob
    from app.updates import pushes

    key = ec.generate_private_key(ec.SECP256R1())
    certs_path = services.settings.certs_path
    (certs_path / "AuthKey_KEYID12345.p8").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with services.db.transaction() as session:
        identity = session.scalar(select(AppleIdentity))
        identity.apns_key_file, identity.apns_key_id = "AuthKey_KEYID12345.p8", "KEYID12345"
        card = session.scalar(select(Card).join(Program).where(Program.slug == "club"))
        session.add(Registration(card_id=card.id, device_library_identifier="p8-phone",
                                 pass_type_identifier=PASS_TYPE, push_token=PHONE_TOKEN,
                                 tenant_id=card.tenant_id))
        job = PushJob(card_id=card.id, update_tag=1, tenant_id=card.tenant_id)
        session.add(job)
        session.flush()
        job_id, team = job.id, identity.team_identifier
    with ApnsStandin(client_ca_files=[certs_path / "dev" / "root-ca.pem"],
                     client_cert="optional") as apns:
        apns.token_keys["KEYID12345"] = (team, key.public_key(), {PASS_TYPE})
        services.settings.apns_url = apns.url
        services.settings.apns_ca_file = str(apns.ca_file)
        try:
            assert pushes.deliver(services, job_id).state == "done"
        finally:
            services.close()
        [received] = apns.received
    assert (received.token, received.status, received.client_uid) == (PHONE_TOKEN, 200, None)

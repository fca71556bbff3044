"""Google Wallet end to end: demo program -> class and object at the stand-in -> save
link JWT verified with the service-account key; data changes -> PATCH within the
notification budget; signed callbacks through the endpoint flip install state once."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import jwt
import pytest
from sqlalchemy import delete, func, select

from app.infra.models import (
    Card,
    CardInstallState,
    Customer,
    GoogleCallbackNonce,
    GoogleClass,
    GoogleNotification,
    GoogleObject,
    InstallEvent,
    Program,
    PushJob,
    Tenant,
)
from app.tracking import install_state
from app.updates import google_wallet, pushes
from app.updates import refresh as updates
from tests import factories
from tests.google_signing import GoogleSigner, tampered
from tests.google_standin import DEFAULT_ISSUER_ID, GoogleStandin

ISSUER = DEFAULT_ISSUER_ID
SAVE_PREFIX = "https://pay.google.com/gp/v/save/"


@pytest.fixture()
def standin() -> Iterator[GoogleStandin]:
    with GoogleStandin() as server:
        yield server


@pytest.fixture()
def settings(settings, standin):  # type: ignore[no-untyped-def]
    settings.google_api_url = standin.url
    settings.google_keys_url = standin.keys_url
    return settings


@pytest.fixture()
def google(services, demo, standin, tmp_path):  # type: ignore[no-untyped-def]
    """The demo tenant configured as a Google issuer; returns the service-account info."""
    return factories.google_issuer(services, demo["tenant_id"], standin, tmp_path, ISSUER)


def _serial(services, external_id: str = "C-1001", program: str = "rewards") -> str:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.scalar(select(Card.serial_number).join(Customer).join(Program).where(
            Customer.external_id == external_id, Program.slug == program))


def _save(client, serial: str) -> str:  # type: ignore[no-untyped-def]
    response = client.get(f"/demo/cards/{serial}/google")
    assert response.status_code == 303, response.get_data(as_text=True)
    location = response.headers["Location"]
    assert location.startswith(SAVE_PREFIX)
    return location[len(SAVE_PREFIX):]


def _public_key(info: dict):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(info["private_key"].encode(), password=None).public_key()


def test_save_link_is_a_skinny_jwt_for_a_validated_object(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    serial = _serial(services)
    token = _save(client, serial)
    claims = jwt.decode(token, _public_key(google), algorithms=["RS256"], audience="google")
    assert jwt.get_unverified_header(token)["kid"] == google["private_key_id"]
    assert claims["iss"] == google["client_email"] and claims["typ"] == "savetowallet"
    assert isinstance(claims["iat"], int) and claims["origins"] == []
    [ref] = claims["payload"]["loyaltyObjects"]
    assert set(ref) == {"id", "classId"}  # skinny: the object lives at Google already
    assert ref["id"] == f"{ISSUER}.{serial}"

    # The stand-in validated both bodies against the discovery document on insert.
    google_class = standin.objects["loyaltyClass"][ref["classId"]]
    assert google_class["callbackOptions"]["url"] == (
        f"https://wallet.example.test/google/callback/{ISSUER}")
    assert google_class["programLogo"]["sourceUri"]["uri"].startswith(
        "https://wallet.example.test/google/images/")
    stored = standin.objects["loyaltyObject"][ref["id"]]
    assert stored["loyaltyPoints"]["balance"] == {"int": 1280}
    assert stored["state"] == "ACTIVE"
    assert stored["barcode"]["value"]  # the same member id the Apple card shows
    assert len(SAVE_PREFIX + token) < 1000

    # A second click signs a new JWT but sends nothing: the object has not changed.
    writes = len(standin.api_requests("POST")) + len(standin.api_requests("PATCH"))
    _save(client, serial)
    assert len(standin.api_requests("POST")) + len(standin.api_requests("PATCH")) == writes


def test_a_generic_program_saves_and_updates_through_google(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    """The demo's club program (template kind "generic"): class and object are accepted by
    the stand-in, which validates GenericClass/GenericObject against the discovery document."""
    serial = _serial(services, program="club")
    token = _save(client, serial)
    claims = jwt.decode(token, _public_key(google), algorithms=["RS256"], audience="google")
    [ref] = claims["payload"]["genericObjects"]
    assert ref["id"] == f"{ISSUER}.{serial}"
    stored_class = standin.objects["genericClass"][ref["classId"]]
    assert stored_class["callbackOptions"]["url"].endswith(f"/google/callback/{ISSUER}")
    stored = standin.objects["genericObject"][ref["id"]]
    assert stored["hexBackgroundColor"] == "#123456"  # the colour lives on a generic object
    assert stored["header"]["defaultValue"]["value"] == "Camille Martin"
    assert standin.objects["loyaltyClass"] == {} and standin.objects["loyaltyObject"] == {}

    # A notifying change (membership_level is in the template's notify list) patches the
    # generic object and adds a lock-screen message to it.
    with services.db.transaction() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        customer.attributes = {**customer.attributes, "membership_level": "Platinum"}
        updates.customers_changed(session, services, [customer])
    with services.db.session() as session:
        job_ids = list(session.scalars(select(PushJob.id).join(Card).join(Program).where(
            PushJob.channel == "google", Program.slug == "club")))
    assert job_ids
    for job_id in job_ids:
        assert pushes.deliver(services, job_id).state == "done"
    [patch] = [r for r in standin.api_requests("PATCH") if r.path.endswith(ref["id"])]
    assert patch.path.startswith("/walletobjects/v1/genericObject/")
    level = next(m for m in standin.objects["genericObject"][ref["id"]]["textModulesData"]
                 if m["id"] == "level")
    assert level["body"] == "Platinum"
    [message] = [r for r in standin.api_requests("POST") if r.path.endswith("/addMessage")]
    assert message.path == f"/walletobjects/v1/genericObject/{ref['id']}/addMessage"


def _change_points(services, points: int, tier: str | None = None) -> list[int]:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        attributes = {**customer.attributes, "points": points}
        if tier:
            attributes["tier"] = tier
        customer.attributes = attributes
        updates.customers_changed(session, services, [customer])
    with services.db.session() as session:
        return list(session.scalars(select(PushJob.id).where(
            PushJob.channel == "google", PushJob.done_at.is_(None))))


def test_changes_patch_the_object_and_notify_within_the_budget(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    serial = _serial(services)
    _save(client, serial)
    object_id = f"{ISSUER}.{serial}"

    for points in (1300, 1400, 1500, 1600, 1700):
        [job_id] = _change_points(services, points)
        assert pushes.deliver(services, job_id).state == "done"
        assert standin.objects["loyaltyObject"][object_id]["loyaltyPoints"]["balance"] == {
            "int": points}

    patches = [r for r in standin.api_requests("PATCH") if r.path.endswith(object_id)]
    assert len(patches) == 5
    # PATCH replaces arrays whole: each one carries every text module, not a diff.
    assert all(len(p.body["textModulesData"]) == len(patches[0].body["textModulesData"]) > 0
               for p in patches)
    messages = [r for r in standin.api_requests("POST") if r.path.endswith("/addMessage")]
    assert len(messages) == 3  # Google's budget: 3 notifications per pass per 24 hours
    assert all(m.body["message"]["messageType"] == "TEXT_AND_NOTIFY" for m in messages)
    # Camille's card is in French: "Vous avez maintenant 1 300 points" (narrow nbsp).
    assert "1300" in "".join(c for c in messages[0].body["message"]["body"] if c.isdigit())
    with services.db.session() as session:
        assert session.scalar(select(GoogleNotification.id).limit(1)) is not None
        assert len(session.scalars(select(GoogleNotification)).all()) == 3


@pytest.mark.parametrize("google_answers", [403, 429])
def test_googles_notification_limit_drops_the_message_not_the_update(  # type: ignore[no-untyped-def]
        client, services, google, standin, google_answers) -> None:
    """Our count says there is budget, Google's says there is none (a restored database,
    or a reply lost after Google counted it): the object is patched once, the job is
    done, the message dropped, and our count corrected so the next change stays silent."""
    services.google_client_options = {"backoff": 0.0}
    standin.notify_limit_status = google_answers  # 403 is what Google answers; 429 too
    serial = _serial(services)
    _save(client, serial)
    object_id = f"{ISSUER}.{serial}"
    for points in (1300, 1400, 1500):  # Google's 3 notifications for today
        [job_id] = _change_points(services, points)
        assert pushes.deliver(services, job_id).state == "done"
    assert len(standin.notified[object_id]) == 3
    with services.db.transaction() as session:  # the database is restored from yesterday
        session.execute(delete(GoogleNotification))

    [job_id] = _change_points(services, 1600)
    assert pushes.deliver(services, job_id).state == "done"
    with services.db.session() as session:
        job = session.get(PushJob, job_id)
        assert job.done_at is not None and job.not_before is None
        # Corrected: Google says 3 were sent in its window, so we count 3 from now.
        assert session.scalar(select(func.count(GoogleNotification.id))) == 3
    patches = [r for r in standin.api_requests("PATCH") if r.path.endswith(object_id)]
    assert len(patches) == 4  # 1300, 1400, 1500, 1600: once each
    assert standin.objects["loyaltyObject"][object_id]["loyaltyPoints"]["balance"] == {
        "int": 1600}
    refused = [r for r in standin.log if r.path.endswith("/addMessage") and r.status >= 400]
    assert [r.status for r in refused] == [google_answers]
    assert len(standin.notified[object_id]) == 3  # nothing more reached the lock screen

    # The next change updates silently without asking Google to notify at all.
    [job_id] = _change_points(services, 1700)
    assert pushes.deliver(services, job_id).state == "done"
    messages = [r for r in standin.log if r.path.endswith("/addMessage")]
    assert len(messages) == 4  # 3 sent, 1 refused: none for 1700
    assert len([r for r in standin.api_requests("PATCH") if r.path.endswith(object_id)]) == 5


def test_a_failed_message_is_retried_without_patching_again(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    """Google down while adding the message: the retry sends the message, not the PATCH."""
    services.google_client_options = {"backoff": 0.0, "max_retries": 0}
    serial = _serial(services)
    _save(client, serial)
    object_id = f"{ISSUER}.{serial}"
    standin.fail_next(f"/walletobjects/v1/loyaltyObject/{object_id}/addMessage", 503)
    [job_id] = _change_points(services, 1300)
    assert pushes.deliver(services, job_id).state == "retry"
    with services.db.transaction() as session:  # the backoff has passed
        session.get(PushJob, job_id).not_before = None
    assert pushes.deliver(services, job_id).state == "done"
    assert len([r for r in standin.api_requests("PATCH") if r.path.endswith(object_id)]) == 1
    assert len(standin.notified[object_id]) == 1
    with services.db.session() as session:
        assert session.scalar(select(func.count(GoogleNotification.id))) == 1


def test_an_unchanged_rendering_is_not_patched(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    _save(client, _serial(services))
    with services.db.transaction() as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        customer.attributes = {**customer.attributes, "favourite_colour": "teal"}  # not on card
        updates.customers_changed(session, services, [customer])
    with services.db.session() as session:
        job_ids = session.scalars(select(PushJob.id).where(PushJob.channel == "google")).all()
    for job_id in job_ids:  # the Apple side may re-render; Google's object is unchanged
        assert pushes.deliver(services, job_id).state == "done"
    assert standin.api_requests("PATCH") == []
    assert [r for r in standin.api_requests("POST") if "addMessage" in r.path] == []


def test_google_down_falls_back_or_asks_to_retry(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    services.google_client_options = {"backoff": 0.0, "max_retries": 1}
    serial = _serial(services)
    standin.fail_next("/walletobjects/v1/", 503, times=100)
    response = client.get(f"/demo/cards/{serial}/google")
    if response.status_code == 303:  # the whole object fits a link Google accepts
        token = response.headers["Location"][len(SAVE_PREFIX):]
        assert len(token) <= google_wallet.MAX_SAFE_JWT
        claims = jwt.decode(token, _public_key(google), algorithms=["RS256"], audience="google")
        [full] = claims["payload"]["loyaltyObjects"]
        assert full["loyaltyPoints"]["balance"] == {"int": 1280}
    else:
        assert response.status_code == 503
        assert "try again" in response.get_data(as_text=True).lower()


def test_fat_fallback_is_used_only_when_it_fits(services, google, standin, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    services.google_client_options = {"backoff": 0.0, "max_retries": 0}
    standin.fail_next("/walletobjects/v1/", 503, times=100)
    with services.db.session() as session:
        card = session.scalar(select(Card).where(Card.serial_number == _serial(services)))
        monkeypatch.setattr(google_wallet, "MAX_SAFE_JWT", 100_000)
        url = google_wallet.save_url(session, services, card)
        assert "loyaltyPoints" in json.dumps(jwt.decode(
            url[len(SAVE_PREFIX):], options={"verify_signature": False}))
        monkeypatch.setattr(google_wallet, "MAX_SAFE_JWT", 200)
        with pytest.raises(google_wallet.GoogleUnavailable):
            google_wallet.save_url(session, services, card)


def test_permission_problem_is_a_page_not_a_500(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    standin.issuer_ids.clear()  # the service account was removed from the issuer
    response = client.get(f"/demo/cards/{_serial(services)}/google")
    assert response.status_code == 502
    assert "refused" in response.get_data(as_text=True)


# -- callbacks -----------------------------------------------------------------------------

@pytest.fixture()
def signer(standin) -> GoogleSigner:  # type: ignore[no-untyped-def]
    google = GoogleSigner(ISSUER)
    standin.root_keys_json = google.root_keys_document()
    return google


def _saved_object(client, services) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    serial = _serial(services)
    _save(client, serial)
    with services.db.session() as session:
        return (session.scalar(select(GoogleClass.class_id)),
                session.scalar(select(GoogleObject.object_id)))


def _post(client, body: dict, issuer: str = ISSUER):  # type: ignore[no-untyped-def]
    return client.post(f"/google/callback/{issuer}", data=json.dumps(body),
                       content_type="application/json")


def _state(services) -> tuple[bool, list[str]]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        saved = session.scalar(select(GoogleObject.saved))
        kinds = list(session.scalars(select(InstallEvent.kind).where(
            InstallEvent.platform == "google", InstallEvent.kind.in_(("saved", "deleted")))
            .order_by(InstallEvent.id)))
    return saved, kinds


def test_callbacks_flip_install_state_once_per_event(client, services, google, signer) -> None:  # type: ignore[no-untyped-def]
    class_id, object_id = _saved_object(client, services)
    now = int(time.time() * 1000)
    save = signer.callback(class_id, object_id, "save", exp_time_millis=now + 60_000)
    assert _post(client, save).status_code == 200
    assert _state(services) == (True, ["saved"])
    assert _post(client, save).status_code == 200  # Google delivers twice: a no-op
    assert _state(services) == (True, ["saved"])

    delete = signer.callback(class_id, object_id, "del", exp_time_millis=now + 120_000)
    assert _post(client, delete).status_code == 200
    assert _state(services) == (False, ["saved", "deleted"])

    late_save = signer.callback(class_id, object_id, "save", exp_time_millis=now + 90_000)
    assert _post(client, late_save).status_code == 200  # older than the del: logged only
    saved, kinds = _state(services)
    assert saved is False and kinds == ["saved", "deleted", "saved"]


def _events(services) -> list[tuple[str, dt.datetime]]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return [(kind, when) for kind, when in session.execute(
            select(InstallEvent.kind, InstallEvent.occurred_at).where(
                InstallEvent.platform == "google", InstallEvent.kind.in_(("saved", "deleted")))
            .order_by(InstallEvent.id))]


def _install_state(services) -> tuple[str, dt.datetime | None, dt.datetime | None]:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        row = session.scalar(select(CardInstallState).where(CardInstallState.platform == "google"))
        return row.state, row.first_installed_at, row.removed_at


def test_callback_events_are_timed_when_received_not_at_expiry(client, services, google, signer) -> None:  # type: ignore[no-untyped-def]
    """Google's expTimeMillis is about an hour after sending: never an event's time."""
    class_id, object_id = _saved_object(client, services)
    hour = 3_600_000
    before = dt.datetime.now(dt.UTC)
    save = signer.callback(class_id, object_id, "save", exp_time_millis=_millis(before) + hour)
    assert _post(client, save).status_code == 200
    after = dt.datetime.now(dt.UTC)
    [(kind, when)] = _events(services)
    assert kind == "saved" and before <= when <= after
    state, installed_at, _ = _install_state(services)
    assert state == "installed" and before <= installed_at <= after


@pytest.mark.parametrize("arrival", ["in_order", "delete_first"])
@pytest.mark.parametrize("gap_ms", [30_000, 0])
def test_a_save_sent_before_a_delete_never_wins(client, services, google, signer, arrival, gap_ms) -> None:  # type: ignore[no-untyped-def]
    """Ordering still follows Google's expTimeMillis, whatever order callbacks arrive in
    (at the same expTimeMillis the delete wins), and the log rebuilds to the same state."""
    class_id, object_id = _saved_object(client, services)
    exp = _millis(dt.datetime.now(dt.UTC)) + 3_600_000
    save = signer.callback(class_id, object_id, "save", exp_time_millis=exp - gap_ms)
    delete = signer.callback(class_id, object_id, "del", exp_time_millis=exp)
    for body in ([save, delete] if arrival == "in_order" else [delete, save]):
        assert _post(client, body).status_code == 200
    now = dt.datetime.now(dt.UTC)
    assert _state(services)[0] is False
    state, _, removed_at = _install_state(services)
    assert state == "removed" and removed_at <= now
    events = dict(_events(services))
    assert events["saved"] <= events["deleted"] <= now  # nothing in the future
    install_state.rebuild(services)
    assert _install_state(services)[0] == "removed"

    # A later save (sent after the delete) installs the card again, dated when received.
    again = signer.callback(class_id, object_id, "save", exp_time_millis=exp + 1)
    assert _post(client, again).status_code == 200
    assert _state(services)[0] is True and _install_state(services)[0] == "installed"
    assert _events(services)[-1][1] <= dt.datetime.now(dt.UTC)


def _millis(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def test_unknown_event_types_are_acknowledged(client, services, google, signer) -> None:  # type: ignore[no-untyped-def]
    class_id, object_id = _saved_object(client, services)
    response = _post(client, signer.callback(class_id, object_id, "activation"))
    assert response.status_code == 200
    assert _state(services) == (False, [])


@pytest.mark.parametrize("spoil", ["signedMessage", "signedKey", "signature"])
def test_tampered_callbacks_are_refused(client, services, google, signer, spoil) -> None:  # type: ignore[no-untyped-def]
    class_id, object_id = _saved_object(client, services)
    response = _post(client, tampered(signer.callback(class_id, object_id, "save"), spoil))
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    assert _state(services) == (False, [])


def test_callback_for_another_issuer_is_refused(client, services, google, signer) -> None:  # type: ignore[no-untyped-def]
    class_id, object_id = _saved_object(client, services)
    body = signer.callback(class_id, object_id, "save", recipient_id="3388000000000000001")
    assert _post(client, body).status_code == 400
    assert _post(client, signer.callback(class_id, object_id), "not-a-number").status_code == 404
    assert _state(services) == (False, [])


def _nonces(services) -> int:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.scalar(select(func.count()).select_from(GoogleCallbackNonce)) or 0


def test_callback_for_an_issuer_no_tenant_configured_is_refused(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    """Validly signed by Google for an issuer of ours no more (or never): 404, nothing kept."""
    stranger = "3388000000099999999"
    signer = GoogleSigner(stranger)
    standin.root_keys_json = signer.root_keys_document()
    body = signer.callback(f"{stranger}.other-club", f"{stranger}.someone", "save")
    response = _post(client, body, issuer=stranger)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["status"] == 404
    assert _nonces(services) == 0 and _state(services) == (None, [])

    # The same issuer once a tenant configures it: accepted, the nonce is kept.
    with services.db.transaction() as session:
        session.scalar(select(Tenant)).google_issuer_id = stranger
    assert _post(client, body, issuer=stranger).status_code == 200
    assert _nonces(services) == 1


def test_no_root_keys_means_retry_later(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    signer = GoogleSigner(ISSUER)  # its keys are not served: the stand-in answers 404
    class_id, object_id = _saved_object(client, services)
    response = _post(client, signer.callback(class_id, object_id))
    assert response.status_code == 503
    assert _state(services) == (False, [])


def test_robots_lets_googlebot_reach_callbacks_only(client) -> None:  # type: ignore[no-untyped-def]
    text = client.get("/robots.txt").get_data(as_text=True)
    googlebot = text.split("User-agent: *")[0]
    assert "User-agent: Googlebot" in googlebot and "Allow: /google/" in googlebot
    assert urlsplit("https://x/google/callback/1").path.startswith("/google/")


def test_google_check_command(runner, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(args=["google", "check", "--tenant", "demo"])
    assert result.exit_code == 0, result.output
    assert google["client_email"] in result.output
    standin.issuer_ids.clear()
    result = runner.invoke(args=["google", "check", "--tenant", "demo"])
    assert result.exit_code != 0
    assert "add the service account" in result.output


def test_a_class_change_is_patched_for_review(client, services, google, standin) -> None:  # type: ignore[no-untyped-def]
    _save(client, _serial(services))
    with services.db.transaction() as session:
        program = session.scalar(select(Program).where(Program.slug == "rewards"))
        program.name = "Aurore Rewards+"
    _save(client, _serial(services, "C-1002"))
    [patch] = [r for r in standin.api_requests("PATCH") if "/loyaltyClass/" in r.path]
    # Google wants an edited class sent back for review; it stays usable meanwhile.
    assert patch.body["reviewStatus"] == "UNDER_REVIEW"
    assert patch.body["programName"] == "Aurore Rewards+"
    [stored] = standin.objects["loyaltyClass"].values()
    assert stored["programName"] == "Aurore Rewards+" and stored["reviewStatus"] == "APPROVED"


def test_the_demo_save_button_holds_no_transaction_while_google_answers(  # type: ignore[no-untyped-def]
        client, services, google, standin, database_url) -> None:
    from tests.txn_probe import TransactionProbe

    probe = TransactionProbe(database_url)
    standin.on_request = probe
    _save(client, _serial(services))
    assert probe.calls >= 3  # token, class, object
    assert probe.held == []
    with services.db.session() as session:
        assert session.scalar(select(GoogleObject.object_id)) is not None

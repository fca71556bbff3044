"""The Google Wallet REST client against the local stand-in (a real HTTP server that
checks OAuth assertions and validates bodies against Google's discovery document)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from app.updates import google_client as client_module
from app.updates.google_client import GoogleApiError, GoogleCredentialsError, GoogleWalletClient
from tests.google_standin import (
    DEFAULT_ISSUER_ID,
    GoogleStandin,
    collections,
    discovery,
    make_service_account,
    validate,
)

ISSUER = DEFAULT_ISSUER_ID
CLASS_ID = f"{ISSUER}.demo-rewards"
OBJECT_ID = f"{ISSUER}.card-1"


def loyalty_class(class_id: str = CLASS_ID) -> dict:
    return {"id": class_id, "issuerName": "Maison Aurore", "programName": "Aurore Rewards",
            "reviewStatus": "UNDER_REVIEW", "hexBackgroundColor": "#3a1c40",
            "programLogo": {"sourceUri": {"uri": "https://wallet.example.test/logo.png"}}}


def loyalty_object(object_id: str = OBJECT_ID, points: int = 10) -> dict:
    return {"id": object_id, "classId": CLASS_ID, "state": "ACTIVE",
            "accountId": "M-1", "accountName": "Camille Martin",
            "loyaltyPoints": {"label": "Points", "balance": {"int": points}},
            "barcode": {"type": "QR_CODE", "value": "M-1"},
            "textModulesData": [{"id": "tier", "header": "Tier", "body": "Gold"},
                                {"id": "next", "header": "Next", "body": "720"}]}


@pytest.fixture()
def standin() -> Iterator[GoogleStandin]:
    with GoogleStandin() as server:
        yield server


@pytest.fixture()
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff sleeps are recorded instead of slept: tests stay fast and can see them."""
    recorded: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", recorded.append)
    return recorded


@pytest.fixture()
def wallet(standin: GoogleStandin, sleeps: list[float]) -> GoogleWalletClient:
    info, _ = standin.new_service_account()
    return GoogleWalletClient(info, standin.url, max_retries=3, backoff=0.5)


def test_token_is_fetched_once_with_the_wallet_scope(wallet, standin) -> None:  # type: ignore[no-untyped-def]
    wallet.check_issuer(ISSUER)
    wallet.get("loyaltyClass", CLASS_ID)
    assert len(standin.token_requests) == 1
    [claims] = standin.token_requests
    assert claims["scope"] == "https://www.googleapis.com/auth/wallet_object.issuer"
    assert claims["aud"] == "https://oauth2.googleapis.com/token"
    assert claims["iss"] == wallet.service_account_email


def test_ensure_inserts_once_then_reads_back(wallet, standin) -> None:  # type: ignore[no-untyped-def]
    created_class, created = wallet.ensure("loyaltyClass", loyalty_class())
    assert created and created_class["id"] == CLASS_ID
    # The stand-in approves classes sent UNDER_REVIEW, as Google does for issuers.
    assert standin.objects["loyaltyClass"][CLASS_ID]["reviewStatus"] == "APPROVED"
    again, created = wallet.ensure("loyaltyClass", loyalty_class())
    assert not created and again["id"] == CLASS_ID
    inserts = standin.api_requests("POST")
    assert len(inserts) == 1


def test_ensure_reads_back_after_a_409(wallet, standin) -> None:  # type: ignore[no-untyped-def]
    wallet.insert("loyaltyClass", loyalty_class())
    # Someone else inserted between our GET and our POST: the GET said 404.
    standin.fail_next(f"/walletobjects/v1/loyaltyClass/{CLASS_ID}", 404, method="GET")
    found, created = wallet.ensure("loyaltyClass", loyalty_class())
    assert not created and found["id"] == CLASS_ID
    assert [r.status for r in standin.log if r.method == "POST"][-1] == 409


def test_get_unknown_is_none_and_patch_replaces_arrays_whole(wallet, standin) -> None:  # type: ignore[no-untyped-def]
    assert wallet.get("loyaltyObject", OBJECT_ID) is None
    wallet.insert("loyaltyClass", loyalty_class())
    wallet.insert("loyaltyObject", loyalty_object())
    wallet.patch("loyaltyObject", OBJECT_ID,
                 {"textModulesData": [{"id": "tier", "header": "Tier", "body": "Platinum"}],
                  "loyaltyPoints": {"label": "Points", "balance": {"int": 99}}})
    stored = wallet.get("loyaltyObject", OBJECT_ID)
    assert stored["textModulesData"] == [{"id": "tier", "header": "Tier", "body": "Platinum"}]
    assert stored["loyaltyPoints"]["balance"] == {"int": 99}
    assert stored["classReference"]["id"] == CLASS_ID


def test_add_message_returns_the_resource(wallet) -> None:  # type: ignore[no-untyped-def]
    wallet.insert("loyaltyClass", loyalty_class())
    wallet.insert("loyaltyObject", loyalty_object())
    updated = wallet.add_message("loyaltyObject", OBJECT_ID, {
        "id": "m1", "header": "Aurore", "body": "You now have 99 points",
        "messageType": "TEXT_AND_NOTIFY"})
    assert updated["messages"][0]["messageType"] == "TEXT_AND_NOTIFY"


def test_a_refused_body_names_the_field(wallet) -> None:  # type: ignore[no-untyped-def]
    body = loyalty_class()
    body["barcodeType"] = "QR_CODE"  # a field LoyaltyClass does not have
    with pytest.raises(GoogleApiError) as caught:
        wallet.insert("loyaltyClass", body)
    assert caught.value.status == 400
    assert "barcodeType" in str(caught.value)


def test_403_says_to_add_the_service_account_to_the_issuer(wallet, sleeps) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GoogleApiError) as caught:
        wallet.check_issuer("3388000000099999999")
    error = caught.value
    assert error.status == 403 and error.reason == "PERMISSION_DENIED"
    assert wallet.service_account_email in error.message
    assert "add the service account" in error.message and "3388000000099999999" in error.message
    assert sleeps == []  # a permission problem is not retried


def test_429_and_5xx_are_retried_with_growing_backoff(wallet, standin, sleeps) -> None:  # type: ignore[no-untyped-def]
    wallet.insert("loyaltyClass", loyalty_class())
    standin.fail_next("/walletobjects/v1/loyaltyClass", 429, times=1)
    standin.fail_next("/walletobjects/v1/loyaltyClass", 503, times=1)
    assert wallet.get("loyaltyClass", CLASS_ID)["id"] == CLASS_ID
    statuses = [r.status for r in standin.log if r.path.endswith(CLASS_ID)]
    assert statuses == [429, 503, 200]
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] > 0


def test_retry_after_is_honoured(wallet, standin, sleeps) -> None:  # type: ignore[no-untyped-def]
    standin.fail_next("/walletobjects/v1/loyaltyClass", 429, retry_after=7)
    assert wallet.get("loyaltyClass", CLASS_ID) is None
    assert sleeps == [7.0]


def test_retries_give_up_with_the_last_status(wallet, standin, sleeps) -> None:  # type: ignore[no-untyped-def]
    standin.fail_next("/walletobjects/v1/loyaltyClass", 503, times=10)
    with pytest.raises(GoogleApiError) as caught:
        wallet.get("loyaltyClass", CLASS_ID)
    assert caught.value.status == 503
    assert "gave up after 4 attempts" in str(caught.value)
    assert len(sleeps) == 3


def test_403_rate_limit_reason_is_retried(wallet, standin, sleeps) -> None:  # type: ignore[no-untyped-def]
    standin.fail_next("/walletobjects/v1/loyaltyClass", 403, reason="rateLimitExceeded")
    assert wallet.get("loyaltyClass", CLASS_ID) is None
    assert len(sleeps) == 1


def test_a_revoked_token_is_replaced_once(wallet, standin) -> None:  # type: ignore[no-untyped-def]
    wallet.check_issuer(ISSUER)
    standin.expire_tokens()
    wallet.check_issuer(ISSUER)
    assert len(standin.token_requests) == 2


def test_unknown_service_account_is_a_clear_error(standin, sleeps) -> None:  # type: ignore[no-untyped-def]
    info, _ = make_service_account(standin.token_url, "stranger@other.iam.gserviceaccount.com")
    wallet = GoogleWalletClient(info, standin.url)
    with pytest.raises(GoogleApiError) as caught:
        wallet.check_issuer(ISSUER)
    assert caught.value.reason == "token_refused"
    assert "stranger@other.iam.gserviceaccount.com" in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)


def test_unreachable_api_is_a_network_error(standin, sleeps) -> None:  # type: ignore[no-untyped-def]
    info, _ = standin.new_service_account()
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    wallet = GoogleWalletClient(info, f"http://127.0.0.1:{port}", max_retries=1)
    with pytest.raises(GoogleApiError) as caught:
        wallet.get("loyaltyClass", CLASS_ID)
    assert caught.value.status is None and caught.value.reason == "network"
    assert len(sleeps) == 1
    assert len(standin.token_requests) == 1  # the token came; the API was down


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    (json.dumps({"type": "authorized_user", "client_email": "a@b", "private_key": "x",
                 "token_uri": "https://oauth2.googleapis.com/token"}), "not a service-account"),
    (json.dumps({"type": "service_account"}), "lacks client_email, private_key, token_uri"),
    (json.dumps({"type": "service_account", "client_email": "a@b.iam.gserviceaccount.com",
                 "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                 "token_uri": "https://oauth2.googleapis.com/token"}), "cannot be loaded"),
])
def test_bad_service_account_files(tmp_path, content, expected) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "sa.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GoogleCredentialsError) as caught:
        GoogleWalletClient.from_file(path)
    assert expected in str(caught.value)


# -- the stand-in's own validation must bite, or the tests above prove nothing -----------

@pytest.mark.parametrize("change, path", [
    ({"mystery": 1}, "mystery"),
    ({"state": "SOMETIMES"}, "state"),
    ({"barcode": {"type": "QR_CODE", "value": 5}}, "barcode.value"),
    ({"loyaltyPoints": {"balance": {"int": 2**31}}}, "loyaltyPoints.balance.int"),
    ({"loyaltyPoints": {"balance": {"int": 1, "string": "1"}}}, "loyaltyPoints.balance"),
    ({"textModulesData": [{"id": "a.b", "body": "x"}]}, "textModulesData[0].id"),
    ({"textModulesData": [{"header": ["x"]}]}, "textModulesData[0].header"),
])
def test_standin_refuses_what_google_refuses(change: dict, path: str) -> None:
    problems = validate("LoyaltyObject", {**loyalty_object(), **change}, require=True)
    assert path in [p.path for p in problems]


def test_standin_accepts_a_valid_object_and_requires_ids() -> None:
    assert validate("LoyaltyObject", loyalty_object(), require=True) == []
    missing = validate("LoyaltyObject", {"state": "ACTIVE"}, require=True)
    assert {"id", "classId"} <= {p.path for p in missing}


# The stand-in validates whatever collection a body is sent to, on every write method: a
# stand-in that checked only the kind tests tried first (loyalty) let a GenericClass with a
# field Google's GenericClass lacks go unnoticed (issue 11).
@pytest.mark.parametrize("collection", sorted(collections()))
def test_standin_validates_every_collection_on_every_write(wallet, standin, collection) -> None:  # type: ignore[no-untyped-def]
    resource_id = f"{ISSUER}.validated-{collection}"
    bad = {"id": resource_id, "surelyNotAField": 1}
    calls = [lambda: wallet.insert(collection, bad),
             lambda: wallet.patch(collection, resource_id, bad),
             lambda: wallet._call("PUT", wallet._item_path(collection, resource_id), bad),
             lambda: wallet.add_message(collection, resource_id, {"messageType": "LOUD"})]
    for call in calls:
        with pytest.raises(GoogleApiError) as caught:
            call()
        assert caught.value.status == 400
    messages = [r for r in standin.log if r.status == 400]
    assert len(messages) == 4
    # Required fields of this collection's schema are demanded on insert.
    schema = collections()[collection].schema
    required = [name for name, spec in discovery()["schemas"][schema]["properties"].items()
                if spec.get("description", "").startswith("Required.") and name != "id"]
    if required:  # GenericClass needs only its id
        with pytest.raises(GoogleApiError) as caught:
            wallet.insert(collection, {"id": resource_id})
        assert caught.value.status == 400 and f"'{required[0]}'" in caught.value.message
    assert standin.objects[collection] == {}


def test_standin_keeps_generic_and_loyalty_apart(wallet, standin) -> None:  # type: ignore[no-untyped-def]
    generic_class = {"id": f"{ISSUER}.club", "multipleDevicesAndHoldersAllowedStatus":
                     "ONE_USER_ALL_DEVICES"}
    with pytest.raises(GoogleApiError) as caught:  # GenericClass has no colour
        wallet.insert("genericClass", {**generic_class, "hexBackgroundColor": "#123456"})
    assert "hexBackgroundColor" in caught.value.message
    with pytest.raises(GoogleApiError) as caught:  # nor a review status
        wallet.insert("genericClass", {**generic_class, "reviewStatus": "UNDER_REVIEW"})
    assert "reviewStatus" in caught.value.message
    with pytest.raises(GoogleApiError):  # a loyalty class is not a generic class
        wallet.insert("genericClass", loyalty_class(f"{ISSUER}.club"))
    wallet.insert("genericClass", generic_class)
    generic_object = {"id": f"{ISSUER}.card-g", "classId": f"{ISSUER}.club", "state": "ACTIVE",
                      "cardTitle": {"defaultValue": {"language": "en", "value": "Club"}},
                      "header": {"defaultValue": {"language": "en", "value": "Camille"}},
                      "hexBackgroundColor": "#123456"}
    with pytest.raises(GoogleApiError) as caught:  # GenericObject has no points
        wallet.insert("genericObject", {**generic_object, "loyaltyPoints": {
            "balance": {"int": 1}}})
    assert "loyaltyPoints" in caught.value.message
    with pytest.raises(GoogleApiError) as caught:  # header and cardTitle are required
        wallet.insert("genericObject", {k: v for k, v in generic_object.items()
                                        if k != "header"})
    assert "header" in caught.value.message
    with pytest.raises(GoogleApiError) as caught:  # the class is a generic one
        wallet.insert("loyaltyObject", {**loyalty_object(f"{ISSUER}.card-l"),
                                        "classId": f"{ISSUER}.club"})
    assert caught.value.status == 404
    wallet.insert("genericObject", generic_object)
    stored = wallet.get("genericObject", f"{ISSUER}.card-g")
    # Google's GenericObject has no classReference (LoyaltyObject has): none is invented.
    assert "classReference" not in stored
    assert validate("GenericObject", stored, require=True) == []


@pytest.mark.parametrize("status", [403, 429])
def test_the_notification_limit_is_not_retried_nor_blamed_on_access(wallet, standin, sleeps, status) -> None:  # type: ignore[no-untyped-def]
    wallet.insert("loyaltyClass", loyalty_class())
    wallet.insert("loyaltyObject", loyalty_object())
    standin.notify_limit, standin.notify_limit_status = 1, status
    message = {"id": "m", "header": "Aurore", "body": "99 points", "messageType": "TEXT_AND_NOTIFY"}
    wallet.add_message("loyaltyObject", OBJECT_ID, message)
    with pytest.raises(GoogleApiError) as caught:
        wallet.add_message("loyaltyObject", OBJECT_ID, {**message, "id": "m2"})
    error = caught.value
    assert error.status == status and error.reasons == {"quotaExceeded"}
    assert "TEXT_AND_NOTIFY" in error.message and "add the service account" not in error.message
    assert sleeps == []
    # TEXT messages are not counted against the limit.
    wallet.add_message("loyaltyObject", OBJECT_ID, {**message, "id": "m3", "messageType": "TEXT"})
    assert len(standin.notified[OBJECT_ID]) == 1

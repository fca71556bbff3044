"""Google Wallet callbacks: ECv2SigningOnly verification and the root key store.

No mocks: callbacks are signed by tests/google_signing.py (which plays Google),
root keys are served over HTTP by a local server, and real callbacks sent by
Google are verified against Google's root key.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from app.tracking.google_callbacks import (
    GOOGLE_KEYS_URL,
    RETRY_AFTER_FAILURE_SECONDS,
    CallbackError,
    CallbackMessage,
    RootKeyStore,
    parse_root_keys,
    verify_callback,
)
from tests.google_signing import (
    DAY_MILLIS,
    GoogleSigner,
    compact_json,
    length_values,
    new_key,
    now_millis,
    public_key_b64,
    sign,
    tampered,
)

ISSUER = "3388000000012345678"
OTHER_ISSUER = "3388000000087654321"
CLASS_ID = f"{ISSUER}.gold"
OBJECT_ID = f"{ISSUER}.card-0001"


@pytest.fixture(scope="module")
def google() -> GoogleSigner:
    return GoogleSigner(ISSUER)


def test_valid_callback(google: GoogleSigner) -> None:
    exp = now_millis() + 60_000
    body = google.callback(CLASS_ID, OBJECT_ID, "save", nonce="n-1", exp_time_millis=exp)

    message = verify_callback(body, ISSUER, google.root_keys())

    assert message == CallbackMessage(class_id=CLASS_ID, object_id=OBJECT_ID, event_type="save",
                                      nonce="n-1", exp_time_millis=exp)
    # As received on the wire: bytes or text.
    assert verify_callback(json.dumps(body).encode(), ISSUER, google.root_keys()) == message
    assert verify_callback(json.dumps(body), ISSUER, google.root_keys()) == message


@pytest.mark.parametrize("event_type", ["del", "activate"])
def test_other_event_types_are_reported_as_is(google: GoogleSigner, event_type: str) -> None:
    body = google.callback(CLASS_ID, OBJECT_ID, event_type)
    assert verify_callback(body, ISSUER, google.root_keys()).event_type == event_type


def test_tampered_signed_message_is_refused(google: GoogleSigner) -> None:
    body = tampered(google.callback(CLASS_ID, OBJECT_ID, "save"), "signedMessage")
    with pytest.raises(CallbackError, match="^signature: "):
        verify_callback(body, ISSUER, google.root_keys())


def test_tampered_message_signature_is_refused(google: GoogleSigner) -> None:
    body = tampered(google.callback(CLASS_ID, OBJECT_ID), "signature")
    with pytest.raises(CallbackError, match="^signature: "):
        verify_callback(body, ISSUER, google.root_keys())


def test_tampered_signed_key_is_refused(google: GoogleSigner) -> None:
    # Moving an expired key's expiration forward must break the root's signature.
    body = tampered(google.callback(CLASS_ID, OBJECT_ID), "signedKey")
    with pytest.raises(CallbackError, match="^intermediateSigningKey: no signature verifies"):
        verify_callback(body, ISSUER, google.root_keys())


def test_intermediate_key_signed_by_an_unknown_root_is_refused(google: GoogleSigner) -> None:
    body = google.callback(CLASS_ID, OBJECT_ID, root_signers=[new_key()])
    with pytest.raises(CallbackError, match="^intermediateSigningKey: no signature verifies"):
        verify_callback(body, ISSUER, google.root_keys())


def test_message_signed_by_another_key_is_refused(google: GoogleSigner) -> None:
    body = google.callback(CLASS_ID, OBJECT_ID, message_signer=new_key())
    with pytest.raises(CallbackError, match="^signature: "):
        verify_callback(body, ISSUER, google.root_keys())


def test_any_one_valid_signature_under_any_root_key_is_enough() -> None:
    google = GoogleSigner(ISSUER, root_count=2)
    second_root = google.root_private_keys[1]
    body = google.callback(CLASS_ID, OBJECT_ID, root_signers=[new_key(), second_root])
    assert verify_callback(body, ISSUER, google.root_keys()).object_id == OBJECT_ID


def test_expired_intermediate_key_is_refused(google: GoogleSigner) -> None:
    now = now_millis()
    body = google.callback(CLASS_ID, OBJECT_ID, key_expiration_millis=now - 1)
    with pytest.raises(CallbackError, match="^signedKey: the intermediate signing key has expired"):
        verify_callback(body, ISSUER, google.root_keys(), now_millis=now)
    # Same body, a moment before the key expired.
    assert verify_callback(body, ISSUER, google.root_keys(), now_millis=now - 2).nonce


def test_expired_message_is_refused(google: GoogleSigner) -> None:
    now = now_millis()
    body = google.callback(CLASS_ID, OBJECT_ID, exp_time_millis=now - 1)
    with pytest.raises(CallbackError, match=r"^signedMessage: expired \(expTimeMillis"):
        verify_callback(body, ISSUER, google.root_keys(), now_millis=now)
    assert verify_callback(body, ISSUER, google.root_keys(), now_millis=now - 2).nonce


def test_expired_root_key_is_not_trusted() -> None:
    google = GoogleSigner(ISSUER, root_key_expiration_millis=now_millis() - 1)
    body = google.callback(CLASS_ID, OBJECT_ID)
    with pytest.raises(CallbackError, match="^root keys: no non-expired ECv2SigningOnly root key"):
        verify_callback(body, ISSUER, google.root_keys())


def test_non_ascii_content_uses_byte_lengths(google: GoogleSigner) -> None:
    class_id, object_id, nonce = f"{ISSUER}.café-☕", f"{ISSUER}.Zoë-🎫", "nonce-ü-€"
    body = google.callback(class_id, object_id, nonce=nonce)
    assert not body["signedMessage"].isascii()  # raw UTF-8, no \\u escapes

    message = verify_callback(json.dumps(body, ensure_ascii=False).encode(), ISSUER,
                              google.root_keys())
    assert (message.class_id, message.object_id, message.nonce) == (class_id, object_id, nonce)

    # A signer that counts characters (a bug seen in peer libraries) is refused.
    def char_lengths(*parts: str) -> bytes:
        return b"".join(struct.pack("<I", len(p)) + p.encode() for p in parts)

    body["signature"] = sign(google.intermediate_private_key, char_lengths(
        "GooglePayPasses", ISSUER, "ECv2SigningOnly", body["signedMessage"]))
    with pytest.raises(CallbackError, match="^signature: "):
        verify_callback(body, ISSUER, google.root_keys())


def test_message_signed_for_another_issuer_is_refused(google: GoogleSigner) -> None:
    body = google.callback(CLASS_ID, OBJECT_ID, recipient_id=OTHER_ISSUER)
    with pytest.raises(CallbackError, match="^signature: .* for this issuer"):
        verify_callback(body, ISSUER, google.root_keys())
    # That issuer would accept it, and then find the ids are not its own.
    with pytest.raises(CallbackError, match=f"not under issuer {OTHER_ISSUER}$"):
        verify_callback(body, OTHER_ISSUER, google.root_keys())


@pytest.mark.parametrize("class_id, object_id", [
    (f"{OTHER_ISSUER}.gold", OBJECT_ID),
    (CLASS_ID, f"{OTHER_ISSUER}.card-0001"),
    (f"{ISSUER}0.gold", f"{ISSUER}0.card"),  # a longer issuer id sharing our digits
])
def test_ids_under_another_issuer_are_refused(google: GoogleSigner, class_id: str,
                                              object_id: str) -> None:
    body = google.callback(class_id, object_id)
    with pytest.raises(CallbackError, match="^signedMessage: classId or objectId is not under"):
        verify_callback(body, ISSUER, google.root_keys())


@pytest.mark.parametrize("version", ["ECv2", "ECv1", "", None])
def test_wrong_protocol_version_is_refused(google: GoogleSigner, version: str | None) -> None:
    body = google.callback(CLASS_ID, OBJECT_ID, protocol_version=version)  # type: ignore[arg-type]
    with pytest.raises(CallbackError, match="^protocolVersion: expected ECv2SigningOnly"):
        verify_callback(body, ISSUER, google.root_keys())


def _without(body: dict, field: str) -> dict:
    return {k: v for k, v in body.items() if k != field}


@pytest.mark.parametrize("make, error", [
    (lambda b: b"\xff\xfe not utf-8", "^body: not valid UTF-8 JSON"),
    (lambda b: "{not json", "^body: not valid UTF-8 JSON"),
    (lambda b: "[]", "^body: expected a JSON object"),
    (lambda b: _without(b, "signature"), "^body: expected exactly the fields"),
    (lambda b: _without(b, "signedMessage"), "^body: expected exactly the fields"),
    (lambda b: {**b, "extra": 1}, "^body: expected exactly the fields"),
    (lambda b: {**b, "intermediateSigningKey": "x"}, "^intermediateSigningKey: expected exactly"),
    (lambda b: {**b, "intermediateSigningKey": {"signedKey": b["intermediateSigningKey"]
                                                ["signedKey"]}},
     "^intermediateSigningKey: expected exactly"),
    (lambda b: {**b, "signedMessage": json.loads(b["signedMessage"])},
     "^body: signedKey and signedMessage must be JSON strings"),
    (lambda b: {**b, "intermediateSigningKey": {**b["intermediateSigningKey"], "signatures": []}},
     "^body: signatures must be a non-empty list"),
    (lambda b: {**b, "signature": 7}, "^body: signatures must be a non-empty list"),
    (lambda b: {**b, "intermediateSigningKey": {**b["intermediateSigningKey"],
                                                "signatures": ["not base64!"]}},
     "^intermediateSigningKey: no signature verifies"),
])
def test_malformed_bodies_are_refused(google: GoogleSigner, make, error: str) -> None:  # type: ignore[no-untyped-def]
    body = make(google.callback(CLASS_ID, OBJECT_ID))
    with pytest.raises(CallbackError, match=error):
        verify_callback(body, ISSUER, google.root_keys())


@pytest.mark.parametrize("message, error", [
    ("not json", "^signedMessage: not valid UTF-8 JSON"),
    ("[1]", "^signedMessage: expected a JSON object"),
    ({"objectId": OBJECT_ID, "eventType": "save", "nonce": "n", "expTimeMillis": 1},
     "^signedMessage: classId is required"),
    ({"classId": CLASS_ID, "eventType": "save", "nonce": "n", "expTimeMillis": 1},
     "^signedMessage: objectId is required"),
    ({"classId": CLASS_ID, "objectId": OBJECT_ID, "nonce": "n", "expTimeMillis": 1},
     "^signedMessage: eventType is required"),
    ({"classId": CLASS_ID, "objectId": OBJECT_ID, "eventType": "save", "expTimeMillis": 1},
     "^signedMessage: nonce is required"),
    ({"classId": CLASS_ID, "objectId": OBJECT_ID, "eventType": "save", "nonce": "n"},
     "^signedMessage: expTimeMillis is required"),
    ({"classId": CLASS_ID, "objectId": OBJECT_ID, "eventType": "save", "nonce": "n",
      "expTimeMillis": True}, "^signedMessage.expTimeMillis: expected epoch milliseconds"),
    ({"classId": CLASS_ID, "objectIds": [OBJECT_ID, f"{ISSUER}.b"], "eventType": "save",
      "nonce": "n", "expTimeMillis": 1}, "^signedMessage: objectIds must hold exactly one"),
])
def test_malformed_signed_messages_are_refused(google: GoogleSigner, message: object,
                                               error: str) -> None:
    # Signed correctly, so each check after the signatures is reached.
    text = message if isinstance(message, str) else compact_json(message)
    body = google.callback(CLASS_ID, OBJECT_ID, signed_message=text)
    with pytest.raises(CallbackError, match=error):
        verify_callback(body, ISSUER, google.root_keys(), now_millis=0)


def test_exp_time_millis_may_be_a_string_of_digits(google: GoogleSigner) -> None:
    exp = now_millis() + 60_000
    text = compact_json({"classId": CLASS_ID, "objectId": OBJECT_ID, "eventType": "del",
                         "expTimeMillis": str(exp), "nonce": "n-2"})
    body = google.callback(CLASS_ID, OBJECT_ID, signed_message=text)
    assert verify_callback(body, ISSUER, google.root_keys()).exp_time_millis == exp


def test_errors_name_the_check_without_key_material(google: GoogleSigner) -> None:
    body = tampered(google.callback(CLASS_ID, OBJECT_ID), "signedKey")
    with pytest.raises(CallbackError) as info:
        verify_callback(body, ISSUER, google.root_keys())
    text = str(info.value)
    assert public_key_b64(google.intermediate_private_key)[30:60] not in text
    assert public_key_b64(google.root_private_keys[0])[30:60] not in text
    assert body["signature"][:20] not in text


def test_root_key_with_another_protocol_version_is_ignored() -> None:
    google = GoogleSigner(ISSUER, root_protocol_version="ECv2")
    body = google.callback(CLASS_ID, OBJECT_ID)
    assert [k.protocol_version for k in google.root_keys()] == ["ECv2"]
    with pytest.raises(CallbackError, match="^root keys: no non-expired ECv2SigningOnly root key"):
        verify_callback(body, ISSUER, google.root_keys())


def test_root_key_without_expiration_is_not_trusted(google: GoogleSigner) -> None:
    # As in Tink: for ECv2SigningOnly a root key must carry keyExpiration.
    document = google.root_keys_document()
    del document["keys"][0]["keyExpiration"]
    keys = parse_root_keys(document)
    assert keys[0].key_expiration_millis is None
    with pytest.raises(CallbackError, match="^root keys: no non-expired"):
        verify_callback(google.callback(CLASS_ID, OBJECT_ID), ISSUER, keys)


def test_parse_root_keys(google: GoogleSigner) -> None:
    document = google.root_keys_document()
    document["keys"] += [
        {"keyValue": "bm90IGEga2V5", "protocolVersion": "ECv1"},  # skipped: not a key
        {"keyValue": public_key_b64(new_key()), "protocolVersion": "ECv1"},  # kept, no expiry
        "junk",  # skipped
    ]
    keys = parse_root_keys(document)
    assert [(k.protocol_version, k.key_expiration_millis) for k in keys] == [
        ("ECv2SigningOnly", google.root_key_expiration_millis), ("ECv1", None)]

    with pytest.raises(CallbackError, match='^root keys: expected {"keys": \\[...\\]}'):
        parse_root_keys({"keys": "x"})
    broken = google.root_keys_document()
    broken["keys"][0]["keyValue"] = "bm90IGEga2V5"
    with pytest.raises(CallbackError, match="^root keys: entry 0: keyValue: not a base64 X.509"):
        parse_root_keys(broken)
    broken["keys"][0] = {"keyValue": public_key_b64(new_key()),
                         "protocolVersion": "ECv2SigningOnly", "keyExpiration": "soon"}
    with pytest.raises(CallbackError, match="^root keys: entry 0: keyExpiration: expected"):
        parse_root_keys(broken)


# --- Real callbacks sent by Google --------------------------------------------------------------
#
# Published in public repositories' tests: the EDUTAP project (edutap-eu/edutap.wallet_google,
# tests/test_handler_validate.py and a callback test), a Kotlin project's JsonParsingTest, a
# Python sketch, and the Ecv2DotNet README. None of them publishes Google's root key, and
# https://pay.google.com/gp/m/issuer/keys cannot be fetched offline. GOOGLE_ROOT_KEY below was
# derived from the callbacks themselves by ECDSA public-key recovery on the intermediate-key
# signatures, using our byte layout LV("GooglePayPasses") ‖ LV("ECv2SigningOnly") ‖ LV(signedKey).
# Recovery from one signature always yields *some* key; that the same key comes out of five
# signatures made by Google from 2023 to 2025 for four issuers is what proves the layout (with a
# wrong layout each would give an unrelated key). The message signatures are checked with the
# intermediate keys Google sent, which proves the second layout independently.
GOOGLE_ROOT_KEY = ("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEs/J7ghdwu4/b6NvqzQebS+Z80FEP8ZlGdAdWDUjf"
                   "PeBKaV+YOWW0l6U/4IGXnfY9NrsND1fwxAqRq0unR/LCIg==")

# Exactly as POSTed (JSON text): note the \u003d escapes inside the signed strings.
REAL_CALLBACKS = {
    "del, issuer 3388000000022141777 (2025-10)": (
        "3388000000022141777",
        r'''{"signature":"MEUCIQC+xKva1ydmNwJJiP2HJJWsteUe02ztTDKExzcWIpmlywIgJwD4HUYvZJg/cr1OL21vVKr0b2ZXt79NblCQ1V18zsc=","intermediateSigningKey":{"signedKey":"{\"keyValue\":\"MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKb256ssDdmf7DokZ7jsMtAvjiTX2HF1ay8QR1sSA+gFpC/ChhRwVdMEVJTaoAP1MIH38QWtqShiQ63zROaKtgQ\\u003d\\u003d\",\"keyExpiration\":\"1759996807000\"}","signatures":["MEUCIDd7rXh7qgJZ7YSlQiXG2zOdZUT5XlMSUPu3RfyV3p2CAiEApxrIwTmRVig93FVJUC6bSWdQXMqata5sHenKsVYreUk="]},"protocolVersion":"ECv2SigningOnly","signedMessage":"{\"classId\":\"3388000000022141777.lib.edutap.eu\",\"objectId\":\"3388000000022141777.6b4cbd15-0de7-4fe8-95f6-995a51b4595e.object\",\"eventType\":\"del\",\"expTimeMillis\":1759331348143,\"count\":1,\"nonce\":\"1a9e3df0-ec10-4a17-8b39-89d2d7f48e3b\"}"}''',
        CallbackMessage("3388000000022141777.lib.edutap.eu",
                        "3388000000022141777.6b4cbd15-0de7-4fe8-95f6-995a51b4595e.object",
                        "del", "1a9e3df0-ec10-4a17-8b39-89d2d7f48e3b", 1759331348143),
    ),
    "save, issuer 3388000000022141777 (2024-12)": (
        "3388000000022141777",
        r'''{"signature":"MEYCIQCyuBQo/Dao7yUBDUWK12ATFBDkUfJUnropjOaPbPiKEwIhAKXNiVrbNmydpEVIxXRz5z36f8HV2Meq/Td6tqt2+DYO","intermediateSigningKey":{"signedKey":"{\"keyValue\":\"MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE3JpSX3AU53vH+IpWBdsbqrL7Ey67QSERsDUztFt8q7t7PzVkh14SeYeokI1zSZiVAWnx4tXD1tCPbrvfFGB8OA\\u003d\\u003d\",\"keyExpiration\":\"1735023986000\"}","signatures":["MEUCIQD3IBTpRM45gpno9Remtx/FiDCOJUp45+C+Qzw6IrgphwIgJijXISc+Ft8Sj9eXNowzuYyXyWlgKAE+tVnN24Sek5M="]},"protocolVersion":"ECv2SigningOnly","signedMessage":"{\"classId\":\"3388000000022141777.pass.gift.dev.edutap.eu\",\"objectId\":\"3388000000022141777.9fd4e525-777c-4e0d-878a-b7993e211997\",\"eventType\":\"save\",\"expTimeMillis\":1734366082269,\"count\":1,\"nonce\":\"c1359b53-f2bb-4e8f-b392-9a560a21a9a0\"}"}''',
        CallbackMessage("3388000000022141777.pass.gift.dev.edutap.eu",
                        "3388000000022141777.9fd4e525-777c-4e0d-878a-b7993e211997",
                        "save", "c1359b53-f2bb-4e8f-b392-9a560a21a9a0", 1734366082269),
    ),
    "activate, issuer 3388000000022335801 (2024-08)": (
        "3388000000022335801",
        r'''{"signature":"MEUCIQCpYXep9bIFAT/PMe2kekpGdsWBPSIXZRFe2//QICWOFAIgCGPUJ6BnLDxvuJnMFz7IFkIV8jnIK0FQnKbNJw1i7oQ\u003d","intermediateSigningKey":{"signedKey":"{\"keyValue\":\"MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAElMAF/BuFhKQzFwpbZDWmpFRGsW8Ow4QZE31CbT4Y0O15xQ8AAMD8y698okEifN6UQlEh4et3hth9BDH81/Rkaw\\u003d\\u003d\",\"keyExpiration\":\"1723850860000\"}","signatures":["MEUCIGU5NAJcFcg03FWUq04gC0hYzVmRLHbwvlSCz6BTqTHGAiEAsRG9gdW5r5Gds4vk+Dj3V8X3iwF1aeflCiSCTi5qkgQ\u003d"]},"protocolVersion":"ECv2SigningOnly","signedMessage":"{\"classId\":\"3388000000022335801.eth-motics-with-link\",\"objectIds\":[\"3388000000022335801.efd427a7-05a4-439d-b314-e4b999c8509b\"],\"eventType\":\"activate\",\"expTimeMillis\":1723181833549,\"count\":1,\"nonce\":\"0cfe3927-7ce2-4471-bc27-c819c2910901\",\"deviceContext\":\"49776974-bcf3-4445-9c01-2c9467ef87ff\"}"}''',
        CallbackMessage("3388000000022335801.eth-motics-with-link",
                        "3388000000022335801.efd427a7-05a4-439d-b314-e4b999c8509b",
                        "activate", "0cfe3927-7ce2-4471-bc27-c819c2910901", 1723181833549),
    ),
    "save, issuer 3388000000022211970 (2023-08)": (
        "3388000000022211970",
        r'''{"signature":"MEQCICNRcl4MLW0d5hcFi/h2OijYW2boEU5IS9I37wOJO0v8AiB0et62sYYI00gO4QeXS0ZlLCjpkLqvLk4SsCx6f5jfyQ==","intermediateSigningKey":{"signedKey":"{\"keyValue\":\"MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEIQab9kGfAsSgBnFPMXGXlOpL7WhWqCYC/FjS70H4bhp/qbyaBIMR3R98cEylL4jCJiVFQ8dtltpr3NCzq/iTgg\\u003d\\u003d\",\"keyExpiration\":\"1692688147000\"}","signatures":["MEYCIQCOhXCleCo64oKagwmJWUGmvODW5iAeZzQAocRcMiceIAIhAJENpGpyKYgSNybrA68pLFFsGTNFiQ4i4qL0bRnpgIDd"]},"protocolVersion":"ECv2SigningOnly","signedMessage":"{\"classId\":\"3388000000022211970.membercard\",\"objectId\":\"3388000000022211970.20233587\",\"eventType\":\"save\",\"expTimeMillis\":1692032148434,\"count\":1,\"nonce\":\"22729f93-640a-40fc-9679-02d6fab107a0\"}"}''',
        CallbackMessage("3388000000022211970.membercard", "3388000000022211970.20233587",
                        "save", "22729f93-640a-40fc-9679-02d6fab107a0", 1692032148434),
    ),
}
# The Ecv2DotNet README's example: a real save callback whose ids were edited ("xxxx") before it
# was published. Google's signature on its intermediate key still holds; its message's does not.
EDITED_REAL_CALLBACK = (
    "3388000000022025937",
    r'''{"signature":"MEUCIQCJi26vl+ak17dsHDbZZnRZxm51duUAPiYLwOIr9rVvAAIgGUfR18gpKTq1+Msav0vPrWvC6x9dDRwWFX/b85+jE1k\u003d","intermediateSigningKey":{"signedKey":"{\"keyValue\":\"MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEVsEtOdPMaE+DJDzuCJaO7EJXaHor4Kyklp411iwfBa+5TmdbiEWUXzewA79H0PXjdyRMhKBY99+sh056JB75LQ\\u003d\\u003d\",\"keyExpiration\":\"1754778096000\"}","signatures":["MEUCIC29Ju3bt9kklbbA9QAJZW0hh2zecbHDzGo4hF1zRi1zAiEA6e201l1TEl85Row6XHybfDoewIKC4vYpnrlmUT9WbrE\u003d"]},"protocolVersion":"ECv2SigningOnly","signedMessage":"{\"classId\":\"1388000000022025937.LOYALTY_CLASS_dada6069-0799-44ec-a38d-c482484902e1\",\"objectId\":\"3388000000022025937.LOYALTY_OBJECT_xxxxxxxxxxxxx\",\"eventType\":\"save\",\"expTimeMillis\":1754114831806,\"count\":1,\"nonce\":\"40a8e5af-5b7f-4ea4-b152-63d96858550e\"}"}''',
    1754114831806,
)


def _google_root_keys() -> list:  # type: ignore[type-arg]
    # Its real keyExpiration is unknown offline; any date after the callbacks will do.
    return parse_root_keys({"keys": [{"keyValue": GOOGLE_ROOT_KEY,
                                      "protocolVersion": "ECv2SigningOnly",
                                      "keyExpiration": "4102444800000"}]})


@pytest.mark.parametrize("name", list(REAL_CALLBACKS))
def test_real_google_callback_verifies(name: str) -> None:
    issuer, text, expected = REAL_CALLBACKS[name]
    at = expected.exp_time_millis - 60_000  # while it was fresh
    assert verify_callback(text.encode(), issuer, _google_root_keys(), now_millis=at) == expected

    with pytest.raises(CallbackError, match="^signature: "):
        verify_callback(text, "3388000000022141778", _google_root_keys(), now_millis=at)
    with pytest.raises(CallbackError, match="^signedMessage: expired"):
        verify_callback(text, issuer, _google_root_keys(), now_millis=expected.exp_time_millis)
    with pytest.raises(CallbackError, match="^intermediateSigningKey: no signature verifies"):
        verify_callback(text, issuer, GoogleSigner(issuer).root_keys(), now_millis=at)
    edited = text.replace(expected.nonce[:8], "00000000", 1)
    with pytest.raises(CallbackError, match="^signature: "):
        verify_callback(edited, issuer, _google_root_keys(), now_millis=at)


def test_real_google_callback_edited_before_publishing_fails_at_the_message() -> None:
    issuer, text, exp = EDITED_REAL_CALLBACK
    with pytest.raises(CallbackError, match="^signature: "):
        verify_callback(text, issuer, _google_root_keys(), now_millis=exp - 60_000)


def test_real_message_signature_needs_little_endian_byte_lengths() -> None:
    # Independent of verify_callback: the message layout alone, big- vs little-endian.
    from base64 import b64decode

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    issuer, text, _ = REAL_CALLBACKS["del, issuer 3388000000022141777 (2025-10)"]
    body = json.loads(text)
    key = load_der_public_key(b64decode(json.loads(body["intermediateSigningKey"]["signedKey"])
                                        ["keyValue"]))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    parts = ("GooglePayPasses", issuer, "ECv2SigningOnly", body["signedMessage"])
    key.verify(b64decode(body["signature"]), length_values(*parts), ec.ECDSA(hashes.SHA256()))
    big_endian = b"".join(struct.pack(">I", len(p)) + p.encode() for p in parts)
    with pytest.raises(InvalidSignature):
        key.verify(b64decode(body["signature"]), big_endian, ec.ECDSA(hashes.SHA256()))


# --- RootKeyStore against a local key server ----------------------------------------------------

class KeyServer:
    """Serves a root key document on 127.0.0.1 like pay.google.com does; counts requests."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.headers: dict[str, str] = {}
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(server.body)))
                for name, value in server.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/gp/m/issuer/keys"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, document: dict, cache_control: str | None = None, **headers: str) -> None:
        self.status, self.body = 200, json.dumps(document).encode()
        self.headers = dict(headers)
        if cache_control is not None:
            self.headers["Cache-Control"] = cache_control

    def fail(self, status: int = 503) -> None:
        self.status, self.body, self.headers = status, b'{"error": "unavailable"}', {}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def key_server() -> Iterator[KeyServer]:
    server = KeyServer()
    yield server
    server.close()


@pytest.fixture()
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # no proxy from the environment for 127.0.0.1
        yield s


def _der(keys: list) -> list[bytes]:  # type: ignore[type-arg]
    from cryptography.hazmat.primitives import serialization

    return [k.public_key.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
            for k in keys]


def test_default_keys_url() -> None:
    assert GOOGLE_KEYS_URL == "https://pay.google.com/gp/m/issuer/keys"
    assert RootKeyStore().keys_url == GOOGLE_KEYS_URL


def test_store_caches_per_max_age(key_server: KeyServer, session: requests.Session) -> None:
    google = GoogleSigner(ISSUER)
    key_server.serve(google.root_keys_document(), "public, max-age=3600, must-revalidate")
    clock = FakeClock()
    store = RootKeyStore(key_server.url, session=session, clock=clock)

    keys = store.keys()
    assert _der(keys) == _der(google.root_keys()) and key_server.requests == 1
    verify_callback(google.callback(CLASS_ID, OBJECT_ID), ISSUER, keys)

    clock.now += 3599
    assert store.keys() is keys and key_server.requests == 1  # still fresh

    rotated = GoogleSigner(ISSUER)
    key_server.serve(rotated.root_keys_document(), "max-age=600", Age="100")
    clock.now += 1
    assert _der(store.keys()) == _der(rotated.root_keys()) and key_server.requests == 2
    clock.now += 499  # max-age 600 minus Age 100: fresh for 500 s
    store.keys()
    assert key_server.requests == 2
    clock.now += 1
    store.keys()
    assert key_server.requests == 3


def test_store_without_max_age_fetches_every_time(key_server: KeyServer,
                                                  session: requests.Session) -> None:
    key_server.serve(GoogleSigner(ISSUER).root_keys_document())  # no Cache-Control
    store = RootKeyStore(key_server.url, session=session, clock=FakeClock())
    store.keys()
    store.keys()
    assert key_server.requests == 2
    key_server.serve(GoogleSigner(ISSUER).root_keys_document(), "no-cache, max-age=60")
    store.keys()
    store.keys()
    assert key_server.requests == 4


@pytest.mark.parametrize("failure", ["status", "not json", "no ECv2SigningOnly key", "down"])
def test_store_falls_back_to_the_last_good_set(key_server: KeyServer, session: requests.Session,
                                               failure: str) -> None:
    google = GoogleSigner(ISSUER)
    key_server.serve(google.root_keys_document(), "max-age=60")
    clock = FakeClock()
    store = RootKeyStore(key_server.url, session=session, clock=clock,
                         preloaded=GoogleSigner(ISSUER).root_keys())
    good = store.keys()

    if failure == "status":
        key_server.fail(500)
    elif failure == "not json":
        key_server.serve({})
        key_server.body = b"<html>maintenance</html>"
    elif failure == "no ECv2SigningOnly key":
        key_server.serve(GoogleSigner(ISSUER, root_protocol_version="ECv1").root_keys_document())
    else:
        key_server.close()
    clock.now += 61
    assert store.keys() is good  # the last good set, not the preloaded one
    verify_callback(google.callback(CLASS_ID, OBJECT_ID), ISSUER, store.keys())

    if failure == "down":
        key_server.__init__()  # type: ignore[misc]  # a new server on a new port
        store.keys_url = key_server.url
    key_server.serve(GoogleSigner(ISSUER).root_keys_document(), "max-age=60")
    requests_before = key_server.requests
    store.keys()
    assert key_server.requests == requests_before  # no retry right after a failure
    clock.now += RETRY_AFTER_FAILURE_SECONDS
    assert _der(store.keys()) != _der(good)  # recovered
    assert key_server.requests == requests_before + 1


def test_store_uses_the_preloaded_set_until_a_fetch_succeeds(key_server: KeyServer,
                                                             session: requests.Session) -> None:
    google = GoogleSigner(ISSUER)
    key_server.fail(503)
    clock = FakeClock()
    store = RootKeyStore(key_server.url, session=session, clock=clock,
                         preloaded=google.root_keys())
    keys = store.keys()
    assert _der(keys) == _der(google.root_keys()) and key_server.requests == 1
    verify_callback(google.callback(CLASS_ID, OBJECT_ID), ISSUER, keys)

    fetched = GoogleSigner(ISSUER)
    key_server.serve(fetched.root_keys_document(), "max-age=60")
    clock.now += RETRY_AFTER_FAILURE_SECONDS
    assert _der(store.keys()) == _der(fetched.root_keys())


def test_store_without_any_keys_raises(key_server: KeyServer, session: requests.Session) -> None:
    key_server.fail(503)
    store = RootKeyStore(key_server.url, session=session, clock=FakeClock())
    with pytest.raises(CallbackError, match="^root keys: none fetched from Google and none "
                                            "preloaded"):
        store.keys()


def test_callback_signed_after_key_expiration_default_is_a_week(google: GoogleSigner) -> None:
    # The helper's defaults stay valid for a test run, and expire as Google's do (days).
    body = google.callback(CLASS_ID, OBJECT_ID)
    expiration = int(json.loads(body["intermediateSigningKey"]["signedKey"])["keyExpiration"])
    assert 6 * DAY_MILLIS < expiration - now_millis() <= 7 * DAY_MILLIS
    assert "\\u003d" in body["intermediateSigningKey"]["signedKey"]

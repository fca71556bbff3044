"""Google Wallet save/delete callbacks: ECv2SigningOnly verification and root keys.

Google POSTs a JSON body to a class's ``callbackOptions.url`` when a user saves
("save") or removes ("del") one of its objects:

    {"signature": "<b64 DER>", "protocolVersion": "ECv2SigningOnly",
     "intermediateSigningKey": {"signedKey": "<JSON string>", "signatures": ["<b64 DER>", ...]},
     "signedMessage": "<JSON string>"}

The chain is the one of Tink's ``PaymentMethodTokenRecipient`` with sender
"GooglePayPasses" (docs: shared/reference/google.md §4.4):

1. a root key from https://pay.google.com/gp/m/issuer/keys signs the intermediate key:
   ``LV("GooglePayPasses") ‖ LV("ECv2SigningOnly") ‖ LV(signedKey)``;
2. the intermediate key signs the message for one issuer:
   ``LV("GooglePayPasses") ‖ LV(issuerId) ‖ LV("ECv2SigningOnly") ‖ LV(signedMessage)``;

where LV is a 4-byte little-endian *byte* length then the UTF-8 bytes. ECDSA
P-256 / SHA-256, DER signatures, keys as base64 X.509 SubjectPublicKeyInfo.
Signatures cover the exact received strings, never re-serialized JSON.

The nonce is returned, not stored: deduplication is the caller's job
(app/google/wallet.py ``apply_callback``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key

from app.infra.http import new_session

log = logging.getLogger(__name__)
USER_AGENT = "Passerelle-Google/1"

GOOGLE_KEYS_URL = "https://pay.google.com/gp/m/issuer/keys"
SENDER_ID = "GooglePayPasses"  # Wallet's sender id; Tink's default "Google" is Google Pay's
PROTOCOL_VERSION = "ECv2SigningOnly"

# A failed fetch is not retried for this long: while Google's key URL is down,
# each callback would otherwise wait for a timeout before being answered.
RETRY_AFTER_FAILURE_SECONDS = 60.0
FETCH_TIMEOUT_SECONDS = 10.0

_BODY_FIELDS = {"signature", "intermediateSigningKey", "protocolVersion", "signedMessage"}
_INTERMEDIATE_FIELDS = {"signedKey", "signatures"}
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


class CallbackError(ValueError):
    """A callback (or the root key set) failed one check; the message names it."""


@dataclass(frozen=True)
class CallbackMessage:
    """The verified content of a callback's signedMessage."""

    class_id: str
    object_id: str
    event_type: str  # "save", "del", or another type reported as Google sent it
    nonce: str  # unique per event; Google may deliver an event more than once
    exp_time_millis: int


@dataclass(frozen=True)
class RootKey:
    """One of Google's root signing keys.

    ``key_expiration_millis`` None means the entry had no keyExpiration; like
    Tink, such a key is not trusted for ECv2SigningOnly.
    """

    public_key: EllipticCurvePublicKey
    protocol_version: str
    key_expiration_millis: int | None


def parse_root_keys(document: dict[str, Any]) -> list[RootKey]:
    """Root keys from Google's ``{"keys": [{"keyValue", "protocolVersion", "keyExpiration"?}]}``.

    A malformed ECv2SigningOnly entry fails the whole document; any other
    malformed entry (a protocol we never use) is skipped, so that it cannot lock
    us out of the keys we need.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise CallbackError('root keys: expected {"keys": [...]}')
    keys: list[RootKey] = []
    for index, entry in enumerate(document["keys"]):
        protocol = entry.get("protocolVersion") if isinstance(entry, dict) else None
        try:
            if not isinstance(protocol, str):
                raise CallbackError("protocolVersion: expected a string")
            expiration = entry.get("keyExpiration")
            keys.append(RootKey(
                public_key=_load_p256(entry.get("keyValue"), "keyValue"),
                protocol_version=protocol,
                key_expiration_millis=None if expiration is None
                else _millis(expiration, "keyExpiration"),
            ))
        except CallbackError as exc:
            if protocol == PROTOCOL_VERSION:
                raise CallbackError(f"root keys: entry {index}: {exc}") from None
            log.info("skipped root key entry %d (%r): %s", index, protocol, exc)
    return keys


class RootKeyStore:
    """Google's root keys, fetched from ``keys_url`` and cached per Cache-Control max-age.

    When a fetch fails, the last good set is used, else the ``preloaded`` set
    (for offline use or a Google outage at start-up). Expired keys are left in
    the set: :func:`verify_callback` skips them.
    """

    def __init__(self, keys_url: str = GOOGLE_KEYS_URL, *, preloaded: list[RootKey] | None = None,
                 session: requests.Session | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.keys_url = keys_url
        self._preloaded = list(preloaded) if preloaded else None
        self._session = session
        self._clock = clock
        self._lock = threading.Lock()  # one fetch at a time; the others wait for its result
        self._last_good: list[RootKey] | None = None
        self._fresh_until = float("-inf")  # the last good set is fresh until then
        self._next_attempt = float("-inf")  # no fetch before then, after a failure

    def keys(self) -> list[RootKey]:
        with self._lock:
            now = self._clock()
            if self._last_good is not None and now < self._fresh_until:
                return self._last_good
            if now >= self._next_attempt:
                try:
                    keys, max_age = self._fetch()
                except (requests.RequestException, ValueError) as exc:
                    # CallbackError is a ValueError, and so is a JSON decoding error.
                    self._next_attempt = now + RETRY_AFTER_FAILURE_SECONDS
                    log.warning("could not fetch Google's root keys from %s: %s",
                                self.keys_url, exc)
                else:
                    self._last_good = keys
                    self._fresh_until = now + max_age
                    self._next_attempt = float("-inf")
                    return keys
            if self._last_good is not None:
                return self._last_good
            if self._preloaded is not None:
                return self._preloaded
            raise CallbackError("root keys: none fetched from Google and none preloaded")

    def _fetch(self) -> tuple[list[RootKey], float]:
        if self._session is None:
            self._session = new_session(USER_AGENT)
        response = self._session.get(self.keys_url, timeout=FETCH_TIMEOUT_SECONDS)
        response.raise_for_status()
        keys = parse_root_keys(response.json())
        if not any(key.protocol_version == PROTOCOL_VERSION for key in keys):
            raise CallbackError(f"root keys: no {PROTOCOL_VERSION} key in the document")
        return keys, _freshness(response.headers)


def verify_callback(body: bytes | str | dict[str, Any], issuer_id: str, root_keys: list[RootKey],
                    now_millis: int | None = None) -> CallbackMessage:
    """Verify a callback body for ``issuer_id`` and return its message.

    Raises :class:`CallbackError` naming the first failed check.
    """
    if not issuer_id or not isinstance(issuer_id, str):
        raise ValueError("issuer_id must be the issuer's id")  # our configuration, not Google's
    now = int(time.time() * 1000) if now_millis is None else now_millis

    # 1. Shape and protocol version (Tink validateECV2: exactly these fields).
    data = _as_json_object(body, "body")
    if set(data) != _BODY_FIELDS:
        raise CallbackError("body: expected exactly the fields " + ", ".join(sorted(_BODY_FIELDS)))
    if data["protocolVersion"] != PROTOCOL_VERSION:
        raise CallbackError(f"protocolVersion: expected {PROTOCOL_VERSION}")
    intermediate = data["intermediateSigningKey"]
    if not isinstance(intermediate, dict) or set(intermediate) != _INTERMEDIATE_FIELDS:
        raise CallbackError("intermediateSigningKey: expected exactly signedKey, signatures")
    signed_key, signatures = intermediate["signedKey"], intermediate["signatures"]
    signed_message, signature = data["signedMessage"], data["signature"]
    if not isinstance(signed_key, str) or not isinstance(signed_message, str):
        raise CallbackError("body: signedKey and signedMessage must be JSON strings")
    if (not isinstance(signatures, list) or not signatures
            or not all(isinstance(s, str) for s in signatures) or not isinstance(signature, str)):
        raise CallbackError("body: signatures must be a non-empty list of strings, "
                            "signature a string")

    # 2. Intermediate key: any signature valid under any usable root key.
    trusted = [key.public_key for key in root_keys
               if key.protocol_version == PROTOCOL_VERSION
               and key.key_expiration_millis is not None and key.key_expiration_millis > now]
    if not trusted:
        raise CallbackError(f"root keys: no non-expired {PROTOCOL_VERSION} root key")
    signed_bytes = _length_values(SENDER_ID, PROTOCOL_VERSION, signed_key)
    if not any(_verifies(root, sig, signed_bytes) for sig in signatures for root in trusted):
        raise CallbackError("intermediateSigningKey: no signature verifies under a trusted root key")

    # 3. Intermediate key expiration (signedKey is authentic from here on).
    key_data = _as_json_object(signed_key, "signedKey")
    if "keyValue" not in key_data or "keyExpiration" not in key_data:
        raise CallbackError("signedKey: keyValue and keyExpiration are required")
    if _millis(key_data["keyExpiration"], "signedKey.keyExpiration") <= now:
        raise CallbackError("signedKey: the intermediate signing key has expired")
    intermediate_key = _load_p256(key_data["keyValue"], "signedKey.keyValue")

    # 4. Message signature, bound to our issuer id as the recipient.
    if not _verifies(intermediate_key, signature,
                     _length_values(SENDER_ID, issuer_id, PROTOCOL_VERSION, signed_message)):
        raise CallbackError("signature: the message signature does not verify for this issuer")

    # 5. The message itself.
    message = _as_json_object(signed_message, "signedMessage")
    class_id = _string(message, "classId")
    object_id = _object_id(message)
    event_type = _string(message, "eventType")
    nonce = _string(message, "nonce")
    if "expTimeMillis" not in message:
        raise CallbackError("signedMessage: expTimeMillis is required")
    exp_time_millis = _millis(message["expTimeMillis"], "signedMessage.expTimeMillis")

    # 6. Expiry: Tink only knows messageExpiration, which Wallet messages lack.
    if exp_time_millis <= now:
        raise CallbackError("signedMessage: expired (expTimeMillis has passed)")

    # 7. Ours: a message signed for us about another issuer's pass is still not ours.
    prefix = f"{issuer_id}."
    if not class_id.startswith(prefix) or not object_id.startswith(prefix):
        raise CallbackError(f"signedMessage: classId or objectId is not under issuer {issuer_id}")
    return CallbackMessage(class_id=class_id, object_id=object_id, event_type=event_type,
                           nonce=nonce, exp_time_millis=exp_time_millis)


def _length_values(*parts: str) -> bytes:
    """Tink's toLengthValue: per part, a 4-byte little-endian byte length and the UTF-8 bytes."""
    out = bytearray()
    for part in parts:
        data = part.encode("utf-8")  # the length counts bytes, not characters
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def _verifies(key: EllipticCurvePublicKey, signature_b64: str, data: bytes) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def _load_p256(value: Any, what: str) -> EllipticCurvePublicKey:
    if not isinstance(value, str):
        raise CallbackError(f"{what}: expected a base64 string")
    try:
        key = load_der_public_key(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError, TypeError):
        raise CallbackError(f"{what}: not a base64 X.509 public key") from None
    if not isinstance(key, EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CallbackError(f"{what}: not a P-256 public key")
    return key


def _millis(value: Any, what: str) -> int:
    """Epoch milliseconds, as Google writes them: a JSON number or a string of digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise CallbackError(f"{what}: expected epoch milliseconds")


def _as_json_object(value: bytes | str | dict[str, Any], what: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        parsed = json.loads(value)
    except (UnicodeDecodeError, ValueError, TypeError):
        raise CallbackError(f"{what}: not valid UTF-8 JSON") from None
    if not isinstance(parsed, dict):
        raise CallbackError(f"{what}: expected a JSON object")
    return parsed


def _string(message: dict[str, Any], field: str) -> str:
    value = message.get(field)
    if not isinstance(value, str) or not value:
        raise CallbackError(f"signedMessage: {field} is required (a non-empty string)")
    return value


def _object_id(message: dict[str, Any]) -> str:
    # Save/del carry objectId; real activation callbacks carry objectIds instead.
    if "objectId" in message or "objectIds" not in message:
        return _string(message, "objectId")
    ids = message["objectIds"]
    if not isinstance(ids, list) or len(ids) != 1 or not isinstance(ids[0], str) or not ids[0]:
        raise CallbackError("signedMessage: objectIds must hold exactly one object id")
    return ids[0]


def _freshness(headers: Any) -> float:
    """Seconds the response may be cached: Cache-Control max-age minus Age, 0 if absent."""
    control = headers.get("Cache-Control", "")
    if re.search(r"\b(no-store|no-cache)\b", control, re.IGNORECASE):
        return 0.0
    match = _MAX_AGE.search(control)
    if match is None:
        return 0.0
    age = headers.get("Age", "0")
    return max(0.0, float(int(match.group(1)) - (int(age) if age.isdigit() else 0)))

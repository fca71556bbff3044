"""Plays Google for callback tests: root and intermediate P-256 keys, signed callback bodies.

    google = GoogleSigner("3388000000012345678")
    keys = google.root_keys()                       # or serve google.root_keys_document()
    body = google.callback("3388000000012345678.gold", "3388000000012345678.card-1")
    verify_callback(body, "3388000000012345678", keys)

Bodies are built the way Google builds them (same layout as app/google/callbacks.py
verifies, checked there against real callbacks): ``signedKey`` and
``signedMessage`` are compact JSON strings, ``=`` in the key is escaped as
``\\u003d`` like Google's Gson does, and non-ASCII stays raw UTF-8.
Knobs make the bad variants: another root or issuer for the signatures, expired
keys or messages, a wrong protocol version, and :func:`tampered` for edits made
after signing.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
import time
import uuid
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.tracking.google_callbacks import RootKey, parse_root_keys

SENDER_ID = "GooglePayPasses"
PROTOCOL = "ECv2SigningOnly"
DAY_MILLIS = 86_400_000


def now_millis() -> int:
    return int(time.time() * 1000)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def length_values(*parts: str) -> bytes:
    """Written independently of the code under test: 4-byte LE byte length + UTF-8."""
    return b"".join(struct.pack("<I", len(p.encode("utf-8"))) + p.encode("utf-8") for p in parts)


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode("ascii")


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class GoogleSigner:
    """One Google: root keys (served or preloaded) and an intermediate key signing callbacks."""

    def __init__(self, issuer_id: str, *, root_count: int = 1,
                 root_protocol_version: str = PROTOCOL,
                 root_key_expiration_millis: int | None = None) -> None:
        self.issuer_id = issuer_id
        self.root_private_keys = [new_key() for _ in range(root_count)]
        self.root_protocol_version = root_protocol_version
        self.root_key_expiration_millis = (now_millis() + 365 * DAY_MILLIS
                                           if root_key_expiration_millis is None
                                           else root_key_expiration_millis)
        self.intermediate_private_key = new_key()

    def root_keys_document(self) -> dict:
        """The ``{"keys": [...]}`` JSON served at https://pay.google.com/gp/m/issuer/keys."""
        return {"keys": [{"keyValue": public_key_b64(key),
                          "protocolVersion": self.root_protocol_version,
                          "keyExpiration": str(self.root_key_expiration_millis)}
                         for key in self.root_private_keys]}

    def root_keys(self) -> list[RootKey]:
        return parse_root_keys(self.root_keys_document())

    def callback(self, class_id: str, object_id: str, event_type: str = "save",
                 nonce: str | None = None, exp_time_millis: int | None = None,
                 key_expiration_millis: int | None = None, *,
                 signed_message: str | None = None,
                 recipient_id: str | None = None,
                 root_signers: list[ec.EllipticCurvePrivateKey] | None = None,
                 message_signer: ec.EllipticCurvePrivateKey | None = None,
                 protocol_version: str = PROTOCOL) -> dict:
        """A callback body as Google POSTs it (a dict; ``json.dumps`` it for the wire).

        ``signed_message`` replaces the message JSON string (signed as given);
        ``recipient_id`` signs the message for another issuer id;
        ``root_signers`` sign the intermediate key (default: the first root key),
        one signature each; ``message_signer`` signs the message instead of the
        intermediate key; ``protocol_version`` is written in the body only (the
        signatures always use ECv2SigningOnly).
        """
        if signed_message is None:
            signed_message = compact_json({
                "classId": class_id, "objectId": object_id, "eventType": event_type,
                "expTimeMillis": (now_millis() + 60_000 if exp_time_millis is None
                                  else exp_time_millis),
                "count": 1, "nonce": nonce if nonce is not None else str(uuid.uuid4()),
            })
        expiration = (now_millis() + 7 * DAY_MILLIS if key_expiration_millis is None
                      else key_expiration_millis)
        signed_key = compact_json({
            "keyValue": public_key_b64(self.intermediate_private_key),
            "keyExpiration": str(expiration),
        }).replace("=", "\\u003d")  # Gson's HTML-safe escaping, as in real callbacks
        signers = self.root_private_keys[:1] if root_signers is None else root_signers
        key_bytes = length_values(SENDER_ID, PROTOCOL, signed_key)
        message_bytes = length_values(SENDER_ID, recipient_id or self.issuer_id, PROTOCOL,
                                      signed_message)
        return {
            "signature": sign(message_signer or self.intermediate_private_key, message_bytes),
            "intermediateSigningKey": {
                "signedKey": signed_key,
                "signatures": [sign(key, key_bytes) for key in signers],
            },
            "protocolVersion": protocol_version,
            "signedMessage": signed_message,
        }


def tampered(body: dict, field: Literal["signedMessage", "signedKey", "signature"]) -> dict:
    """A copy of ``body`` edited after signing, still well-formed JSON throughout.

    signedMessage: "save" becomes "del" (or the reverse); signedKey: its expiration
    moves a year later; signature: one byte of the DER signature changes.
    """
    body = copy.deepcopy(body)
    if field == "signedMessage":
        message = json.loads(body["signedMessage"])
        message["eventType"] = "del" if message.get("eventType") == "save" else "save"
        body["signedMessage"] = compact_json(message)
    elif field == "signedKey":
        key = json.loads(body["intermediateSigningKey"]["signedKey"])
        key["keyExpiration"] = str(int(key["keyExpiration"]) + 365 * DAY_MILLIS)
        body["intermediateSigningKey"]["signedKey"] = compact_json(key)
    else:
        raw = bytearray(base64.b64decode(body["signature"]))
        raw[-1] ^= 0x01
        body["signature"] = base64.b64encode(bytes(raw)).decode("ascii")
    return body

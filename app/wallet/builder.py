"""Turn one card's data into pass.json and a signed .pkpass.

Inputs are plain, picklable values (:class:`CardInput`) so that bulk builds can
hand them to worker processes; no database or Flask object reaches this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from app.wallet import schema
from app.wallet.package import PassPackager, Signer
from app.wallet.template import BARCODE_FORMATS, PassTemplate, TemplateError


@dataclass(frozen=True)
class CardInput:
    serial_number: str
    authentication_token: str
    pass_type_identifier: str
    team_identifier: str
    organization_name: str
    member_id: str
    locale: str | None
    values: dict[str, Any]
    web_service_url: str | None
    voided: bool = False
    expiration_date: str | None = None  # ISO 8601 with time zone
    barcode_format: str | None = None   # program override of the template's format


class PassBuilder:
    """Builds passes of one template; reuse it for many cards."""

    def __init__(self, template: PassTemplate, signer: Signer) -> None:
        self.template = template
        self.signer = signer
        self.packager = PassPackager(template.static_files)

    def pass_dict(self, card: CardInput) -> dict[str, Any]:
        data = self.template.render(card.values, card.locale)
        data.update(
            formatVersion=1,
            passTypeIdentifier=card.pass_type_identifier,
            teamIdentifier=card.team_identifier,
            serialNumber=card.serial_number,
            barcodes=[self._barcode(card)],
        )
        data.setdefault("organizationName", card.organization_name)
        if card.voided:
            # A voided pass without web service keys makes Wallet stop polling.
            data["voided"] = True
        elif card.web_service_url:
            data["webServiceURL"] = card.web_service_url
            data["authenticationToken"] = card.authentication_token
        if card.expiration_date:
            data["expirationDate"] = card.expiration_date
        try:
            schema.validate_pass(data, self.template.strings)
        except schema.PassSchemaError as exc:
            raise TemplateError(f"template {self.template.name!r}: {exc}") from exc
        return data

    def pass_json(self, card: CardInput) -> bytes:
        return json.dumps(self.pass_dict(card), ensure_ascii=False, sort_keys=True,
                          separators=(",", ":")).encode("utf-8")

    def content_hash(self, pass_json: bytes) -> str:
        """Identifies what the holder sees: template files plus this card's pass.json."""
        return hashlib.sha256(self.template.digest.encode() + pass_json).hexdigest()

    def build(self, card: CardInput) -> bytes:
        return self.packager.build(self.pass_json(card), self.signer)

    def _barcode(self, card: CardInput) -> dict[str, str]:
        fmt = (card.barcode_format or self.template.barcode_format).lower()
        if fmt not in BARCODE_FORMATS:
            raise TemplateError(f"unknown barcode format {fmt!r}; use one of "
                                f"{', '.join(BARCODE_FORMATS)}")
        barcode = {
            "format": BARCODE_FORMATS[fmt],
            "message": card.member_id,
            # Code 128 readers need Latin-1; member ids are ASCII in practice.
            "messageEncoding": "iso-8859-1" if fmt == "code128" else "utf-8",
        }
        if self.template.barcode_alt_text:
            barcode["altText"] = card.member_id
        return barcode

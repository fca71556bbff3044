"""Google Wallet classes and objects rendered from a pass template's ``[google]`` part.

Pure functions of plain values (like app/passes/builder.py): no database, no
network. Ids follow Google's rule ``<issuerId>.<suffix>`` with the suffix in
``[A-Za-z0-9._-]``; an object's suffix is the card's serial number (random,
stable, already in that alphabet), a class's is ``<tenant>-<program>``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from babel.dates import format_date
from babel.numbers import format_decimal

from app.wallet.builder import CardInput
from app.wallet.template import PassTemplate, TemplateError, parse_locale

INT32_MAX = 2**31 - 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
BARCODE_TYPES = {"qr": "QR_CODE", "pdf417": "PDF_417", "aztec": "AZTEC", "code128": "CODE_128"}
DEFAULT_LANGUAGE = "en"


def safe_suffix(value: str) -> str:
    return _UNSAFE.sub("_", value)


def class_id(issuer_id: str, tenant_slug: str, program_slug: str) -> str:
    return f"{issuer_id}.{safe_suffix(tenant_slug)}-{safe_suffix(program_slug)}"


def object_id(issuer_id: str, serial_number: str) -> str:
    return f"{issuer_id}.{safe_suffix(serial_number)}"


def kind_of(template: PassTemplate) -> str:
    kind: str = template.google.get("kind", "loyalty")
    if kind not in ("loyalty", "generic"):
        raise TemplateError(f"{template.path / 'template.toml'}: google.kind must be "
                            f"'loyalty' or 'generic'")
    return kind


def resources(template: PassTemplate) -> tuple[str, str]:
    """REST collections for this template: (class resource, object resource)."""
    return ("loyaltyClass", "loyaltyObject") if kind_of(template) == "loyalty" \
        else ("genericClass", "genericObject")


def localized(template: PassTemplate, key: str) -> dict[str, Any]:
    """A LocalizedString from a pass.strings key (or the text itself if no such key)."""
    tables = template.strings
    default = tables.get(DEFAULT_LANGUAGE, {}).get(key) or next(
        (t[key] for t in tables.values() if key in t), key)
    result: dict[str, Any] = {"defaultValue": {"language": DEFAULT_LANGUAGE, "value": default}}
    translated = [{"language": lang, "value": table[key]} for lang, table in sorted(tables.items())
                  if lang != DEFAULT_LANGUAGE and key in table]
    if translated:
        result["translatedValues"] = translated
    return result


def _text(template: PassTemplate, key: str) -> str:
    return str(localized(template, key)["defaultValue"]["value"])


def display(value: Any, locale: str | None) -> str:
    """A value as the customer reads it (numbers and dates in their locale)."""
    babel_locale = parse_locale(locale)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return format_decimal(value, locale=babel_locale)
    if isinstance(value, dt.date):
        return format_date(value, format="medium", locale=babel_locale)
    return str(value)


def image(public_url: str, template: PassTemplate, role: str, description: str) -> dict[str, Any]:
    return {"sourceUri": {"uri": f"{public_url}/google/images/{template.name}/{role}.png"},
            "contentDescription": {"defaultValue": {"language": DEFAULT_LANGUAGE,
                                                    "value": description}}}


@dataclass(frozen=True)
class ClassContext:
    issuer_id: str
    tenant_slug: str
    tenant_name: str
    program_slug: str
    program_name: str
    public_url: str  # https in production: Google fetches images and callbacks from it


def render_class(template: PassTemplate, ctx: ClassContext) -> dict[str, Any]:
    google = template.google
    body: dict[str, Any] = {
        "id": class_id(ctx.issuer_id, ctx.tenant_slug, ctx.program_slug),
        "callbackOptions": {"url": f"{ctx.public_url}/google/callback/{ctx.issuer_id}"},
        "multipleDevicesAndHoldersAllowedStatus": "ONE_USER_ALL_DEVICES",
    }
    if kind_of(template) == "loyalty":
        # GenericClass has no colour, logo or hero fields: a generic card carries them on
        # its objects (render_object); sending them on the class is a 400 from Google.
        if google.get("background"):
            body["hexBackgroundColor"] = google["background"]
        body.update({
            "issuerName": ctx.tenant_name[:60],
            "programName": ctx.program_name[:60],
            "programLogo": image(ctx.public_url, template, google.get("logo", "icon"),
                                 ctx.program_name),
            # Google requires UNDER_REVIEW (or DRAFT) on insert and on every update.
            "reviewStatus": "UNDER_REVIEW",
        })
        if google.get("hero"):
            body["heroImage"] = image(ctx.public_url, template, google["hero"], ctx.program_name)
    return body


def render_object(template: PassTemplate, card: CardInput, *, issuer_id: str, class_ref: str,
                  public_url: str, expired: bool = False) -> dict[str, Any]:
    google = template.google
    values = card.values
    fmt = (card.barcode_format or template.barcode_format).lower()
    state = "INACTIVE" if card.voided else "EXPIRED" if expired else "ACTIVE"
    body: dict[str, Any] = {
        "id": object_id(issuer_id, card.serial_number),
        "classId": class_ref,
        "state": state,
        # The same value as the Apple card's barcode: the member id, never the email.
        "barcode": {"type": BARCODE_TYPES[fmt], "value": card.member_id,
                    "alternateText": card.member_id},
    }
    modules = [{"id": safe_suffix(m["id"]).replace(".", "_"),
                "header": _text(template, m["header"]),
                "body": display(values.get(m["value"], ""), card.locale),
                "localizedHeader": localized(template, m["header"])}
               for m in google.get("text_modules", []) if m.get("value") in values]
    if modules:
        body["textModulesData"] = modules
    links = google.get("links", [])
    if links:
        body["linksModuleData"] = {"uris": [{"uri": link["uri"],
                                             "description": _text(template, link["description"])}
                                            for link in links]}
    if card.expiration_date:
        body["validTimeInterval"] = {"end": {"date": card.expiration_date}}
    name = str(values.get("full_name") or "")
    if kind_of(template) == "loyalty":
        body["accountId"] = card.member_id
        if name:
            body["accountName"] = name
        points_var = google.get("points")
        if points_var and points_var in values:
            body["loyaltyPoints"] = {"label": _text(template, google.get("points_label", "Points")),
                                     "balance": balance(values[points_var])}
    else:
        body["cardTitle"] = {"defaultValue": {"language": DEFAULT_LANGUAGE,
                                              "value": str(values.get("program_name") or "-")}}
        header_var = google.get("header", "full_name")
        body["header"] = {"defaultValue": {"language": DEFAULT_LANGUAGE,
                                           "value": str(values.get(header_var) or name or "-")}}
        if google.get("subheader"):
            body["subheader"] = localized(template, google["subheader"])
        if google.get("background"):
            body["hexBackgroundColor"] = google["background"]
        body["logo"] = image(public_url, template, google.get("logo", "icon"), "logo")
        if google.get("hero"):
            body["heroImage"] = image(public_url, template, google["hero"], "hero")
    return body


def save_payload(template: PassTemplate, body: dict[str, Any]) -> dict[str, Any]:
    """A save JWT's ``payload``: the object (whole, or just ``{id, classId}``) under the
    plural name of its kind, as in walletobjects' ``Resources``."""
    plural = "loyaltyObjects" if kind_of(template) == "loyalty" else "genericObjects"
    return {plural: [body]}


def patch_body(body: dict[str, Any]) -> dict[str, Any]:
    """What an object PATCH sends: the whole rendering, with ``messages`` emptied.

    PATCH replaces arrays whole, so every array is sent in full; an empty messages
    list keeps Google's 10-message cap from ever being reached.
    """
    return {**body, "messages": []}


def message(message_id: str, header: str, text: str, *, notify: bool) -> dict[str, Any]:
    """An ``addMessage`` Message: TEXT_AND_NOTIFY shows on the lock screen, TEXT does not."""
    return {"id": message_id, "header": header[:35], "body": text[:500],
            "messageType": "TEXT_AND_NOTIFY" if notify else "TEXT"}


def balance(value: Any) -> dict[str, Any]:
    """Google's balance is an int32 when it fits, else a string."""
    if isinstance(value, int) and not isinstance(value, bool) and -INT32_MAX - 1 <= value <= INT32_MAX:
        return {"int": value}
    if isinstance(value, float):
        return {"double": value}
    return {"string": str(value)}


def content_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def notify_text(template: PassTemplate, card: CardInput) -> str | None:
    """The lock-screen message for a change, from the template's notify_message key."""
    key = template.google.get("notify_message")
    if not key:
        return None
    value_var = template.google.get("points") or next(iter(template.google.get("notify", [])), None)
    value = display(card.values.get(value_var, ""), card.locale) if value_var else ""
    table = template.strings.get((card.locale or "en").split("-")[0]) or \
        template.strings.get(DEFAULT_LANGUAGE, {})
    return table.get(key, _text(template, key)).replace("%@", value)

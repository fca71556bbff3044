"""Apple's documented pass.json keys and types, checked on every rendered pass.

Wallet refuses a pass silently when a key has the wrong type, so we check
the rendered dictionary against the documented set (Apple "Pass" and
"PassFieldContent" reference) before signing, and say exactly what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

STYLES = ("boardingPass", "coupon", "eventTicket", "generic", "storeCard")
FIELD_GROUPS = (
    "headerFields", "primaryFields", "secondaryFields", "auxiliaryFields", "backFields",
)
BARCODE_FORMATS = (
    "PKBarcodeFormatQR", "PKBarcodeFormatPDF417", "PKBarcodeFormatAztec", "PKBarcodeFormatCode128",
)
TEXT_ALIGNMENTS = (
    "PKTextAlignmentLeft", "PKTextAlignmentCenter", "PKTextAlignmentRight", "PKTextAlignmentNatural",
)
DATE_STYLES = (
    "PKDateStyleNone", "PKDateStyleShort", "PKDateStyleMedium", "PKDateStyleLong", "PKDateStyleFull",
)
NUMBER_STYLES = (
    "PKNumberStyleDecimal", "PKNumberStylePercent", "PKNumberStyleScientific", "PKNumberStyleSpellOut",
)
TRANSIT_TYPES = (
    "PKTransitTypeAir", "PKTransitTypeBoat", "PKTransitTypeBus", "PKTransitTypeGeneric",
    "PKTransitTypeTrain",
)

STR, INT, NUM, BOOL, LIST, DICT = str, int, (int, float), bool, list, dict

TOP_LEVEL: dict[str, Any] = {
    "formatVersion": INT,
    "passTypeIdentifier": STR,
    "serialNumber": STR,
    "teamIdentifier": STR,
    "organizationName": STR,
    "description": STR,
    "webServiceURL": STR,
    "authenticationToken": STR,
    "backgroundColor": STR,
    "foregroundColor": STR,
    "labelColor": STR,
    "logoText": STR,
    "suppressStripShine": BOOL,
    "groupingIdentifier": STR,
    "barcodes": LIST,
    "barcode": DICT,
    "locations": LIST,
    "maxDistance": NUM,
    "beacons": LIST,
    "relevantDate": STR,
    "relevantDates": LIST,
    "expirationDate": STR,
    "voided": BOOL,
    "sharingProhibited": BOOL,
    "associatedStoreIdentifiers": LIST,
    "appLaunchURL": STR,
    "userInfo": DICT,
    "semantics": DICT,
    "nfc": DICT,
    **{style: DICT for style in STYLES},
}
REQUIRED = (
    "formatVersion", "passTypeIdentifier", "serialNumber", "teamIdentifier",
    "organizationName", "description",
)
FIELD_KEYS: dict[str, Any] = {
    "key": STR,
    "value": (str, int, float),
    "label": STR,
    "attributedValue": (str, int, float),
    "changeMessage": STR,
    "currencyCode": STR,
    "dateStyle": STR,
    "timeStyle": STR,
    "isRelative": BOOL,
    "ignoresTimeZone": BOOL,
    "numberStyle": STR,
    "textAlignment": STR,
    "dataDetectorTypes": LIST,
    "semantics": DICT,
    "row": INT,
}
BARCODE_KEYS: dict[str, Any] = {"format": STR, "message": STR, "messageEncoding": STR, "altText": STR}
# Field count limits per group (Apple's design guide); boarding passes allow more.
FIELD_LIMITS = {"headerFields": 3, "primaryFields": 1, "secondaryFields": 4, "auxiliaryFields": 4}
FIELD_LIMITS_BOARDING = {"headerFields": 3, "primaryFields": 2, "secondaryFields": 4,
                         "auxiliaryFields": 5}


class PassSchemaError(ValueError):
    """The rendered pass.json breaks Apple's documented format."""


def _type_ok(value: Any, expected: Any) -> bool:
    # bool is an int in Python; Apple's numbers must not be JSON booleans.
    if isinstance(value, bool) and expected is not BOOL and expected != (bool,):
        return False
    return isinstance(value, expected)


def validate_pass(data: dict[str, Any], strings: dict[str, dict[str, str]] | None = None) -> None:
    """Raise PassSchemaError naming the first problem found.

    ``strings`` maps language -> pass.strings table, used to resolve localized
    ``changeMessage`` keys when checking that they contain ``%@``.
    """
    problems = list(iter_problems(data, strings or {}))
    if problems:
        raise PassSchemaError("; ".join(problems[:5]))


def iter_problems(data: dict[str, Any], strings: dict[str, dict[str, str]]) -> Iterator[str]:
    for key, value in data.items():
        expected = TOP_LEVEL.get(key)
        if expected is None:
            yield f"unknown top-level key {key!r}"
        elif not _type_ok(value, expected):
            yield f"{key!r} must be {_type_name(expected)}, got {type(value).__name__}"
    for key in REQUIRED:
        if key not in data:
            yield f"missing required key {key!r}"
    if data.get("formatVersion", 1) != 1:
        yield "formatVersion must be 1"
    token = data.get("authenticationToken")
    if token is not None and len(token) < 16:
        yield "authenticationToken must be at least 16 characters"
    if ("webServiceURL" in data) != ("authenticationToken" in data):
        yield "webServiceURL and authenticationToken go together"
    styles = [s for s in STYLES if s in data]
    if len(styles) != 1:
        yield f"exactly one style key is required ({', '.join(STYLES)}), found {styles or 'none'}"
    else:
        yield from _style_problems(styles[0], data[styles[0]], strings)
    for i, barcode in enumerate(data.get("barcodes", [])):
        yield from _barcode_problems(f"barcodes[{i}]", barcode)
    if "barcode" in data:
        yield from _barcode_problems("barcode", data["barcode"])
    for color in ("backgroundColor", "foregroundColor", "labelColor"):
        if color in data and not _is_rgb(data[color]):
            yield f"{color} must look like 'rgb(12, 34, 56)', got {data[color]!r}"


def _style_problems(style: str, body: dict[str, Any], strings: dict[str, dict[str, str]]) -> Iterator[str]:
    seen_keys: set[str] = set()
    limits = FIELD_LIMITS_BOARDING if style == "boardingPass" else FIELD_LIMITS
    if style == "boardingPass" and body.get("transitType") not in TRANSIT_TYPES:
        yield f"boardingPass.transitType must be one of {', '.join(TRANSIT_TYPES)}"
    for group, fields in body.items():
        if group == "transitType":
            continue
        if group not in FIELD_GROUPS:
            yield f"unknown key {style}.{group!r}"
            continue
        if not isinstance(fields, list):
            yield f"{style}.{group} must be a list"
            continue
        limit = limits.get(group)
        if limit is not None and len(fields) > limit:
            yield f"{style}.{group} has {len(fields)} fields; Apple shows at most {limit}"
        for field in fields:
            yield from _field_problems(f"{style}.{group}", field, seen_keys, strings)


def _field_problems(where: str, field: Any, seen: set[str],
                    strings: dict[str, dict[str, str]]) -> Iterator[str]:
    if not isinstance(field, dict):
        yield f"{where} entries must be objects"
        return
    key = field.get("key")
    label = f"{where}[{key!r}]"
    if not isinstance(key, str) or not key:
        yield f"{where}: every field needs a string 'key'"
    elif key in seen:
        yield f"field key {key!r} is used twice (keys must be unique in the pass)"
    else:
        seen.add(key)
    if "value" not in field:
        yield f"{label} has no 'value'"
    for name, value in field.items():
        expected = FIELD_KEYS.get(name)
        if expected is None:
            yield f"{label}: unknown field key {name!r}"
        elif not _type_ok(value, expected):
            yield f"{label}.{name} must be {_type_name(expected)}, got {type(value).__name__}"
    message = field.get("changeMessage")
    if isinstance(message, str):
        for text in _localized(message, strings):
            if "%@" not in text:
                yield f"{label}.changeMessage must contain %@ (got {text!r})"
                break
    for name, allowed in (("dateStyle", DATE_STYLES), ("timeStyle", DATE_STYLES),
                          ("numberStyle", NUMBER_STYLES), ("textAlignment", TEXT_ALIGNMENTS)):
        if name in field and field[name] not in allowed:
            yield f"{label}.{name} must be one of {', '.join(allowed)}"


def _localized(text: str, strings: dict[str, dict[str, str]]) -> list[str]:
    """The text as shown in each language (a strings key resolves per language)."""
    resolved = [table[text] for table in strings.values() if text in table]
    return resolved or [text]


def _barcode_problems(where: str, barcode: Any) -> Iterator[str]:
    if not isinstance(barcode, dict):
        yield f"{where} must be an object"
        return
    for name, value in barcode.items():
        expected = BARCODE_KEYS.get(name)
        if expected is None:
            yield f"{where}: unknown key {name!r}"
        elif not _type_ok(value, expected):
            yield f"{where}.{name} must be a string"
    for name in ("format", "message", "messageEncoding"):
        if name not in barcode:
            yield f"{where} is missing {name!r}"
    if barcode.get("format") not in BARCODE_FORMATS:
        yield f"{where}.format must be one of {', '.join(BARCODE_FORMATS)}"


def _is_rgb(value: str) -> bool:
    if not (value.startswith("rgb(") and value.endswith(")")):
        return False
    parts = value[4:-1].split(",")
    try:
        return len(parts) == 3 and all(0 <= int(p) <= 255 for p in parts)
    except ValueError:
        return False


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return " or ".join(t.__name__ for t in expected)
    return str(expected.__name__)

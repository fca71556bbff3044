"""Rendering Google Wallet classes and objects from templates (no network)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import pytest

from app.infra.config import REPO_ROOT
from app.wallet import google_objects as objects
from app.wallet.builder import CardInput
from app.wallet.images import ImageCache
from app.wallet.template import PassTemplate, TemplateError, TemplateLibrary
from tests.google_standin import validate
from tests.wallet.test_templates import make_template

ISSUER = "3388000000012345678"
LIB = TemplateLibrary(REPO_ROOT / "pass_templates", ImageCache())
BUILTINS = {"member_id": "M-1", "external_id": "M-1", "first_name": "Zoë", "last_name": "Ó Briain",
            "full_name": "Zoë Ó Briain", "locale": "fr-FR", "program_name": "Aurore Rewards",
            "organization_name": "Maison Aurore"}
CTX = objects.ClassContext(ISSUER, "demo", "Maison Aurore", "rewards", "Aurore Rewards",
                           "https://wallet.example.test")


def card(template_name: str, attributes: dict, **kw) -> CardInput:  # type: ignore[no-untyped-def]
    template = LIB.get(template_name)
    values = template.resolve(BUILTINS, attributes)
    return CardInput(serial_number=kw.pop("serial", "AbC-123_xyz"), authentication_token="t" * 43,
                     pass_type_identifier="pass.x", team_identifier="T",
                     organization_name="Maison Aurore", member_id="M-1", locale="fr-FR",
                     values=values, web_service_url="https://w/passkit", **kw)


def test_ids_follow_googles_alphabet() -> None:
    assert objects.class_id(ISSUER, "my brand", "gold/club") == f"{ISSUER}.my_brand-gold_club"
    assert objects.object_id(ISSUER, "AbC-123_xyz") == f"{ISSUER}.AbC-123_xyz"
    assert objects.safe_suffix("a+b=c/é") == "a_b_c__"


@pytest.mark.parametrize("value, expected", [(12, {"int": 12}), (2**31 - 1, {"int": 2**31 - 1}),
                                             (2**31, {"string": "2147483648"}),
                                             (-5, {"int": -5}), (1.5, {"double": 1.5}),
                                             ("12a", {"string": "12a"})])
def test_balance_is_int32_or_string(value, expected) -> None:  # type: ignore[no-untyped-def]
    assert objects.balance(value) == expected


def test_loyalty_object_matches_the_apple_card() -> None:
    template = LIB.get("loyalty")
    body = objects.render_object(template, card("loyalty", {"points": 2**40, "tier": "Gold"}),
                                 issuer_id=ISSUER, class_ref=f"{ISSUER}.demo-rewards",
                                 public_url="https://wallet.example.test")
    assert body["id"] == f"{ISSUER}.AbC-123_xyz" and body["state"] == "ACTIVE"
    assert body["barcode"] == {"type": "QR_CODE", "value": "M-1", "alternateText": "M-1"}
    assert body["loyaltyPoints"]["balance"] == {"string": str(2**40)}
    assert body["accountName"] == "Zoë Ó Briain" and body["accountId"] == "M-1"
    tier = next(m for m in body["textModulesData"] if m["id"] == "tier")
    assert tier["body"] == "Gold"
    languages = {t["language"] for t in tier["localizedHeader"]["translatedValues"]}
    assert languages == {"cs", "de", "fr"}


def test_state_follows_the_card() -> None:
    template = LIB.get("membership")
    voided = objects.render_object(template, card("membership", {}, voided=True), issuer_id=ISSUER,
                                   class_ref="c", public_url="https://w")
    expired = objects.render_object(template, card("membership", {}), issuer_id=ISSUER,
                                    class_ref="c", public_url="https://w", expired=True)
    assert voided["state"] == "INACTIVE" and expired["state"] == "EXPIRED"
    assert voided["barcode"]["type"] == "CODE_128"
    assert voided["cardTitle"]["defaultValue"]["value"] == "Aurore Rewards"


def test_class_points_at_our_callback_and_images() -> None:
    body = objects.render_class(LIB.get("loyalty"), CTX)
    assert body["callbackOptions"]["url"] == f"https://wallet.example.test/google/callback/{ISSUER}"
    assert body["programLogo"]["sourceUri"]["uri"] == \
        "https://wallet.example.test/google/images/loyalty/icon.png"
    assert body["reviewStatus"] == "UNDER_REVIEW" and body["hexBackgroundColor"] == "#3a1c40"


def test_notification_text_is_localized() -> None:
    template = LIB.get("loyalty")
    text = objects.notify_text(template, card("loyalty", {"points": 1500}))
    assert text == "Vous avez maintenant 1\u202f500 points"


def test_google_part_must_name_known_variables(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.wallet.test_templates import TOML

    make_template(tmp_path, toml=TOML + '\n[google]\npoints = "pointz"\n')
    with pytest.raises(TemplateError, match=r"\[google\] uses unknown variable.*pointz"):
        TemplateLibrary(tmp_path, ImageCache()).get("t")


# -- the rule: every body Passerelle can send is valid against the discovery document -------
#
# For every shipped template, rendered as both kinds, with each optional part of [google]
# present and absent (every combination), and for cards full, empty, voided and expired:
# the class (insert and PATCH), the object (insert, PATCH, and the whole object a fat save
# JWT carries), the skinny save-JWT reference and both addMessage bodies must be what the
# walletobjects v1 discovery document shipped in google-api-python-client accepts, checked
# by the same validator the Google stand-in answers with.

OPTIONAL = ("background", "logo", "hero", "points", "points_label", "text_modules", "links",
            "header", "subheader")
SCHEMAS = {"loyalty": ("LoyaltyClass", "LoyaltyObject"),
           "generic": ("GenericClass", "GenericObject")}


def _with_every_part(template: PassTemplate, kind: str) -> dict:
    """The template's [google] part as ``kind``, each optional part filled in if missing."""
    google = {**template.google, "kind": kind}
    first_string_key = next(iter(sorted(template.strings.get("en", {}))))
    google.setdefault("background", "#abc")
    google.setdefault("logo", "logo")
    google.setdefault("hero", "logo")
    google.setdefault("points", next(iter(sorted(template.variables))))
    google.setdefault("points_label", first_string_key)
    google.setdefault("header", "full_name")
    google.setdefault("subheader", first_string_key)
    google.setdefault("links", [{"uri": "https://wallet.example.test/help",
                                 "description": first_string_key},
                                {"uri": "tel:+33100000000", "description": "Call us"}])
    assert template.google.get("text_modules"), "shipped templates have text modules"
    return google


def _variants(template: PassTemplate, kind: str) -> Iterator[tuple[tuple[str, ...], PassTemplate]]:
    full = _with_every_part(template, kind)
    for size in range(len(OPTIONAL) + 1):
        for absent in itertools.combinations(OPTIONAL, size):
            google = {k: v for k, v in full.items() if k not in absent}
            yield absent, dataclasses.replace(template, google=google)


def _cards(template: PassTemplate) -> list[CardInput]:
    base = dict(serial_number="AbC-123_xyz", authentication_token="t" * 43,
                pass_type_identifier="pass.x", team_identifier="T", web_service_url="https://w")
    full = template.resolve(BUILTINS, {"points": 2**40, "tier": "Gold & <Platinum> \u00e9\u00e9"})
    empty = template.resolve({**BUILTINS, "full_name": "", "first_name": "", "last_name": "",
                              "program_name": ""}, {})
    formats = sorted(objects.BARCODE_TYPES)
    return [
        CardInput(**base, organization_name="Maison Aurore", member_id="M-1", locale="fr-FR",
                  values=full, expiration_date="2027-12-31T23:59:59+00:00"),
        *[CardInput(**base, organization_name="", member_id="0" * 40, locale=None,
                    values=empty, voided=True, barcode_format=fmt) for fmt in formats],
        CardInput(**base, organization_name="X", member_id="M-2", locale="de-DE",
                  values={**full, "points": 12.5}, expiration_date="2020-01-01T00:00:00+01:00"),
    ]


def _problems(schema: str, body: dict, *, require: bool) -> list[str]:
    return [p.message for p in validate(schema, body, require=require)]


@pytest.mark.parametrize("kind", ["loyalty", "generic"])
@pytest.mark.parametrize("template_name", LIB.names())
def test_every_body_is_valid_against_the_discovery_document(template_name: str, kind: str) -> None:
    template = LIB.get(template_name)
    class_schema, object_schema = SCHEMAS[kind]
    contexts = [CTX, objects.ClassContext(ISSUER, "a b/c", "Ž" * 80, "p.q", "Ω" * 80, "https://w")]
    cards = _cards(template)
    checked = 0
    for absent, variant in _variants(template, kind):
        assert objects.kind_of(variant) == kind
        assert objects.resources(variant) == (class_schema[0].lower() + class_schema[1:],
                                              object_schema[0].lower() + object_schema[1:])
        for ctx in contexts:
            body = objects.render_class(variant, ctx)
            assert _problems(class_schema, body, require=True) == [], (absent, body)
        for i, card_input in enumerate(cards):
            expired = i == len(cards) - 1
            body = objects.render_object(variant, card_input, issuer_id=ISSUER,
                                         class_ref=f"{ISSUER}.demo-rewards",
                                         public_url="https://wallet.example.test",
                                         expired=expired)
            assert _problems(object_schema, body, require=True) == [], (absent, body)
            assert _problems(object_schema, objects.patch_body(body), require=False) == []
            skinny = {"id": body["id"], "classId": body["classId"]}
            # Save JWT payloads, skinny and fat: walletobjects' Resources.
            assert _problems("Resources", objects.save_payload(variant, skinny),
                             require=False) == []
            assert _problems("Resources", objects.save_payload(variant, body),
                             require=False) == []
            text = objects.notify_text(variant, card_input) or "x"
            for notify in (True, False):
                request = {"message": objects.message("n1", "Ω" * 50, text * 100, notify=notify)}
                assert _problems("AddMessageRequest", request, require=False) == []
            checked += 1
    assert checked == 2 ** len(OPTIONAL) * len(cards)


def test_the_rule_test_would_see_a_class_field_google_lacks() -> None:
    """The validator refuses what Google refuses: a colour on a GenericClass (issue 11)."""
    body = objects.render_class(LIB.get("membership"), CTX)
    assert _problems("GenericClass", {**body, "hexBackgroundColor": "#123456"}, require=True)
    assert _problems("LoyaltyClass", {**objects.render_class(LIB.get("loyalty"), CTX),
                                      "header": {}}, require=True)

"""Rendering Google Wallet classes and objects from templates (no network)."""

from __future__ import annotations

import pytest

from app.config import REPO_ROOT
from app.google import objects
from app.passes.builder import CardInput
from app.passes.images import ImageCache
from app.passes.template import TemplateError, TemplateLibrary
from tests.test_templates import make_template

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
    from tests.test_templates import TOML

    make_template(tmp_path, toml=TOML + '\n[google]\npoints = "pointz"\n')
    with pytest.raises(TemplateError, match=r"\[google\] uses unknown variable.*pointz"):
        TemplateLibrary(tmp_path, ImageCache()).get("t")

"""End to end: customer data in the database -> signed .pkpass, checked independently."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from app.cards import cards
from app.infra.models import Card
from app.wallet.template import MissingAttributeError
from tests import factories
from tests.pkpass_check import verify_pkpass


def _root_ca(services) -> Path:  # type: ignore[no-untyped-def]
    return services.settings.certs_path / "dev" / "root-ca.pem"


@pytest.mark.parametrize("program", ["rewards", "club"])
def test_demo_cards_verify_with_openssl(services, demo, tmp_path, program) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        for i, card in enumerate(session.scalars(
                select(Card).where(Card.program_id == demo["program_ids"][program])).all()):
            data = cards.build_pkpass(session, card, services)
            pass_json = verify_pkpass(data, _root_ca(services), tmp_path / str(i))
            assert pass_json["serialNumber"] == card.serial_number
            assert pass_json["authenticationToken"] == card.authentication_token
            assert len(card.authentication_token) >= 32
            assert pass_json["webServiceURL"] == "https://wallet.example.test/passkit"
            assert pass_json["passTypeIdentifier"] == "pass.dev.passerelle.demo"
            barcode = pass_json["barcodes"][0]
            assert barcode["message"] == card.customer.external_id
            assert "@" not in barcode["message"]  # never the email


def test_loyalty_card_content_and_locale(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        card = factories.card(session, "C-1003", "rewards")  # Lena Müller, de-DE, 15420 points
        pass_json = verify_pkpass(cards.build_pkpass(session, card, services),
                                  _root_ca(services), tmp_path)
    fields = {f["key"]: f for group in pass_json["storeCard"].values() for f in group}
    assert fields["points"]["value"] == "15.420"  # German grouping
    assert fields["member"]["value"] == "Lena Müller"
    assert fields["tier"]["value"] == "Platinum"
    assert "%@" in "You now have %@ points"  # sanity of the fixture text below
    assert fields["points"]["changeMessage"] == "points_changed"
    assert fields["tier"]["changeMessage"] == "tier_changed"
    assert pass_json["barcodes"][0]["format"] == "PKBarcodeFormatQR"


def test_localized_strings_are_utf16_and_carry_change_messages(services, demo) -> None:  # type: ignore[no-untyped-def]
    template = services.templates.get("loyalty")
    for lang in ("en", "fr", "cs", "de"):
        raw = template.static_files[f"{lang}.lproj/pass.strings"]
        text = raw.decode("utf-16")
        assert '"points_changed" = "' in text and "%@" in text
    assert "Věrnostní" in template.static_files["cs.lproj/pass.strings"].decode("utf-16")


def test_unchanged_data_keeps_version_changed_data_moves_it(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        card = factories.card(session, "C-1001", "rewards")
        cards.build_pkpass(session, card, services)
        session.commit()
        version, modified = card.version, card.last_modified
        cards.build_pkpass(session, card, services)
        assert (card.version, card.last_modified) == (version, modified)
        card.customer.attributes["points"] = 1300
        session.commit()
        cards.build_pkpass(session, card, services)
        assert card.version == version + 1
        assert card.last_modified > modified


@pytest.mark.parametrize("fmt, apple", [("pdf417", "PKBarcodeFormatPDF417"),
                                        ("aztec", "PKBarcodeFormatAztec"),
                                        ("code128", "PKBarcodeFormatCode128")])
def test_barcode_format_option(services, demo, tmp_path, fmt, apple) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        card = factories.card(session, "C-1002", "rewards")
        card.program.options = {"barcode_format": fmt}
        pass_json = verify_pkpass(cards.build_pkpass(session, card, services),
                                  _root_ca(services), tmp_path)
    barcode = pass_json["barcodes"][0]
    assert barcode == {"format": apple, "message": "C-1002", "altText": "C-1002",
                       "messageEncoding": "iso-8859-1" if fmt == "code128" else "utf-8"}


def test_voided_and_expiring_card(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        card = factories.card(session, "C-1004", "club")
        card.voided = True
        card.expires_at = dt.datetime(2027, 6, 30, 22, 0, tzinfo=dt.UTC)
        pass_json = verify_pkpass(cards.build_pkpass(session, card, services),
                                  _root_ca(services), tmp_path)
    assert pass_json["voided"] is True
    assert "webServiceURL" not in pass_json and "authenticationToken" not in pass_json
    assert pass_json["expirationDate"] == "2027-06-30T22:00:00+00:00"


def test_hostile_customer_values_stay_valid_json(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hostile = '"}{\n</script>'
    with services.db.tenant_session(demo["tenant_id"]) as session:
        card = factories.card(session, "C-1005", "rewards")
        card.customer.first_name = hostile
        card.customer.last_name = "Ωμέγα 漢字 🎉"
        card.customer.attributes["tier"] = hostile
        pass_json = verify_pkpass(cards.build_pkpass(session, card, services),
                                  _root_ca(services), tmp_path)
    fields = {f["key"]: f["value"] for g in pass_json["storeCard"].values() for f in g}
    assert fields["member"] == hostile + " Ωμέγα 漢字 🎉"
    assert fields["tier"] == hostile


def test_missing_required_attribute_names_template_field_and_attribute(services, demo) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        card = factories.card(session, "C-1001", "rewards")
        # Point the "points" variable at an attribute nobody has; the template default
        # still applies, so map member_id (no default) to a missing attribute instead.
        card.program.field_mapping = {"member_id": "loyalty_number"}
        with pytest.raises(MissingAttributeError) as err:
            cards.build_pkpass(session, card, services)
    message = str(err.value)
    assert "'loyalty'" in message and "'member_id'" in message and "'loyalty_number'" in message


def test_field_mapping_renames_attributes(services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with services.db.tenant_session(demo["tenant_id"]) as session:
        card = factories.card(session, "C-1001", "rewards")
        card.program.field_mapping = {"points": "balance"}
        card.customer.attributes["balance"] = "99"
        pass_json = verify_pkpass(cards.build_pkpass(session, card, services),
                                  _root_ca(services), tmp_path)
    fields = {f["key"]: f["value"] for g in pass_json["storeCard"].values() for f in g}
    assert fields["points"] == "99"


def test_pass_json_bytes_are_what_the_manifest_hashes(services, demo) -> None:  # type: ignore[no-untyped-def]
    import hashlib
    import io
    import zipfile

    with services.db.tenant_session(demo["tenant_id"]) as session:
        data = cards.build_pkpass(session, factories.card(session, "C-1001", "rewards"), services)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        assert manifest["pass.json"] == hashlib.sha1(zf.read("pass.json")).hexdigest()

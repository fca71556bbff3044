"""The template format: loading errors, escaping, defaults, locale formatting."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from app.infra.config import REPO_ROOT
from app.wallet import strings
from app.wallet.images import ImageCache
from app.wallet.template import (
    AttributeValueError,
    MissingAttributeError,
    TemplateError,
    TemplateLibrary,
)

TOML = """
name = "Test card"
style = "storeCard"
[barcode]
format = "qr"
[variables]
points = { type = "int" }
tier = { default = "Member" }
joined = { type = "date", default = "2024-03-05" }
"""

PASS_JSON = """{
  "description": "desc",
  "organizationName": {{ organization_name }},
  "storeCard": {
    "primaryFields": [
      {"key": "points", "label": "points_label", "value": {{ points | number }},
       "changeMessage": "points_changed"}
    ],
    "secondaryFields": [
      {"key": "tier", "value": {{ tier }}},
      {"key": "joined", "value": {{ joined | date }}},
      {"key": "name", "value": {{ full_name }}}
    ]
  }
}
"""


def _png(size: tuple[int, int] = (200, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (200, 30, 60, 255)).save(buf, "PNG")
    return buf.getvalue()


def make_template(root: Path, name: str = "t", *, toml: str = TOML, pass_json: str = PASS_JSON,
                  strings_en: str = '"points_changed" = "Now %@ points";\n"points_label" = "Points";',
                  icon: bool = True) -> Path:
    folder = root / name
    (folder / "images").mkdir(parents=True)
    (folder / "template.toml").write_text(toml)
    (folder / "pass.json").write_text(pass_json)
    (folder / "en.lproj").mkdir()
    (folder / "en.lproj" / "pass.strings").write_text(strings_en, encoding="utf-8")
    if icon:
        (folder / "images" / "icon.png").write_bytes(_png())
    return folder


def library(root: Path) -> TemplateLibrary:
    return TemplateLibrary(root, ImageCache())


BUILTINS = {"organization_name": "Brand", "full_name": "Ann Lee", "member_id": "M1"}


def test_render_formats_numbers_and_dates_for_the_locale(tmp_path: Path) -> None:
    make_template(tmp_path)
    template = library(tmp_path).get("t")
    values = template.resolve(BUILTINS, {"points": "1234567"})
    fr = template.render(values, "fr-FR")
    en = template.render(values, "en-US")
    cs = template.render(values, "cs")
    assert en["storeCard"]["primaryFields"][0]["value"] == "1,234,567"
    assert fr["storeCard"]["primaryFields"][0]["value"] == "1\u202f234\u202f567"
    assert cs["storeCard"]["primaryFields"][0]["value"] == "1\xa0234\xa0567"
    assert en["storeCard"]["secondaryFields"][1]["value"] == "Mar 5, 2024"
    assert fr["storeCard"]["secondaryFields"][1]["value"] == "5 mars 2024"


def test_unknown_locale_falls_back_to_english(tmp_path: Path) -> None:
    make_template(tmp_path)
    template = library(tmp_path).get("t")
    data = template.render(template.resolve(BUILTINS, {"points": 1000}), "xx-NOPE")
    assert data["storeCard"]["primaryFields"][0]["value"] == "1,000"


@pytest.mark.parametrize("hostile", ['"}{\n</script>', "\\", "\u2028\u2029", "{{ 7*7 }}",
                                     "{% raw %}", "\x00\x1f"])
def test_values_are_json_escaped(tmp_path: Path, hostile: str) -> None:
    make_template(tmp_path)
    template = library(tmp_path).get("t")
    data = template.render(template.resolve({**BUILTINS, "full_name": hostile},
                                            {"points": 1, "tier": hostile}), "en")
    assert data["storeCard"]["secondaryFields"][0]["value"] == hostile
    assert data["storeCard"]["secondaryFields"][2]["value"] == hostile


def test_missing_attribute_without_default_names_template_field_attribute(tmp_path: Path) -> None:
    make_template(tmp_path)
    template = library(tmp_path).get("t")
    with pytest.raises(MissingAttributeError) as err:
        template.resolve(BUILTINS, {})
    assert (err.value.template, err.value.field, err.value.attribute) == ("t", "points", "points")
    assert "template 't', field 'points'" in str(err.value)


def test_defaults_apply_and_mapping_renames(tmp_path: Path) -> None:
    make_template(tmp_path)
    template = library(tmp_path).get("t")
    values = template.resolve(BUILTINS, {"balance": "12"}, {"points": "balance"})
    assert values["points"] == 12 and values["tier"] == "Member"


def test_bad_typed_value_is_a_clear_error(tmp_path: Path) -> None:
    make_template(tmp_path)
    template = library(tmp_path).get("t")
    with pytest.raises(AttributeValueError, match="field 'points'.*'lots' is not a valid int"):
        template.resolve(BUILTINS, {"points": "lots"})


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    make_template(tmp_path, pass_json=PASS_JSON.replace("{{ tier }}", "{{ tier "))
    with pytest.raises(TemplateError, match=r"pass\.json, line \d+"):
        library(tmp_path).get("t")


def test_unknown_variable_is_refused_at_load(tmp_path: Path) -> None:
    make_template(tmp_path, pass_json=PASS_JSON.replace("{{ tier }}", "{{ tierr }}"))
    with pytest.raises(TemplateError, match="unknown variable.*tierr"):
        library(tmp_path).get("t")


def test_expression_inside_quotes_is_refused(tmp_path: Path) -> None:
    make_template(tmp_path, pass_json=PASS_JSON.replace("{{ tier }}", '"Tier: {{ tier }}"'))
    with pytest.raises(TemplateError, match="outside quotes"):
        library(tmp_path).get("t")


def test_change_message_needs_placeholder_in_every_language(tmp_path: Path) -> None:
    make_template(tmp_path, strings_en='"points_changed" = "Points changed";')
    with pytest.raises(TemplateError, match="changeMessage must contain %@"):
        library(tmp_path).get("t")


def test_template_may_not_set_builder_keys(tmp_path: Path) -> None:
    make_template(tmp_path, pass_json=PASS_JSON.replace('"description"', '"voided": true,\n"description"'))
    with pytest.raises(TemplateError, match="must not set voided"):
        library(tmp_path).get("t")


def test_icon_is_required(tmp_path: Path) -> None:
    make_template(tmp_path, icon=False)
    with pytest.raises(TemplateError, match="icon.png is required"):
        library(tmp_path).get("t")


def test_bad_toml_and_unknown_template(tmp_path: Path) -> None:
    make_template(tmp_path, toml="name = ")
    with pytest.raises(TemplateError, match="template.toml"):
        library(tmp_path).get("t")
    with pytest.raises(TemplateError, match="no pass template named"):
        library(tmp_path).get("../etc")


def test_too_many_primary_fields_is_refused(tmp_path: Path) -> None:
    broken = PASS_JSON.replace('"primaryFields": [', '"primaryFields": [{"key": "x", "value": 1},')
    make_template(tmp_path, pass_json=broken)
    with pytest.raises(TemplateError, match="primaryFields has 2 fields"):
        library(tmp_path).get("t")


def test_strings_round_trip_utf16() -> None:
    table = {"a": 'quote " and \\ and\nnewline', "é": "Věrnostní"}
    raw = strings.render(table)
    assert raw.startswith(b"\xff\xfe")
    assert strings.parse(strings.decode_source(raw)) == table
    with pytest.raises(strings.StringsError, match="line 2"):
        strings.parse('"a" = "b";\n"broken = "x";')


def test_shipped_templates_load_and_mark_changing_fields() -> None:
    lib = TemplateLibrary(REPO_ROOT / "pass_templates", ImageCache())
    assert set(lib.names()) >= {"loyalty", "membership"}
    loyalty = lib.get("loyalty")
    source = json.loads(json.dumps(loyalty.field_of_variable))
    assert source["points"] == "points" and source["tier"] == "tier"
    for lang in ("en", "fr", "cs", "de"):
        assert "%@" in loyalty.strings[lang]["points_changed"]
        assert "%@" in loyalty.strings[lang]["tier_changed"]
        assert "%@" in lib.get("membership").strings[lang]["level_changed"]
    assert {"icon.png", "icon@2x.png", "icon@3x.png", "logo@3x.png", "strip@2x.png"} <= set(
        loyalty.static_files)
    assert "thumbnail@3x.png" in lib.get("membership").static_files

"""The message catalogue: complete in every language, and every page string goes through it."""

from __future__ import annotations

import re
import string
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog, Message
from babel.messages.frontend import CommandLineInterface
from babel.messages.plurals import get_plural
from babel.messages.pofile import read_po

from app.distribution import i18n

TEMPLATES = Path(i18n.__file__).resolve().parents[1] / "templates"
#: People's pages: every visible word must come from the catalogue.
LOCALIZED_PAGES = ("landing.html", "enroll.html", "details.html", "link_error.html",
                   "_form_fields.html", "_brand.html", "_send_form.html")
#: ``_("key")`` or ``_("key", name=...)``; composed keys (``"page." ~ key``) are tested apart.
KEY_CALL = re.compile(r"""\b_\(\s*["']([A-Za-z0-9_.]+)["']\s*[,)]""")


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_every_language_has_every_key_with_the_same_placeholders() -> None:
    reference = i18n.catalog("en")
    assert len(reference) > 50
    for lang in i18n.SUPPORTED:
        messages = i18n.catalog(lang)
        assert set(messages) == set(reference), (lang, set(reference) ^ set(messages))
        for key, text in messages.items():
            assert text.strip(), (lang, key)
            assert placeholders(text) == placeholders(reference[key]), (lang, key)


def test_translations_are_not_english_copies() -> None:
    english = i18n.catalog("en")
    for lang in ("fr", "cs", "de"):
        same = [k for k, v in i18n.catalog(lang).items() if v == english[k]]
        # Only brand-like words may stay identical ("(optional)" in German).
        assert set(same) <= {"field.optional"}, (lang, same)


def test_translate_formats_and_falls_back() -> None:
    assert i18n.translate("fr", "landing.title", program="Aurore") == "Votre carte Aurore"
    assert i18n.translate("de", "landing.title", program="Aurore") == "Ihre Karte für Aurore"
    assert i18n.translate("xx", "button.apple") == "Add to Apple Wallet"
    with pytest.raises(KeyError):
        i18n.translate("en", "no.such.key")
    assert i18n.translator("cs")("button.google") == "Přidat do Peněženky Google"


@pytest.mark.parametrize("customer, header, expected", [
    ("fr-FR", "en-US,en;q=0.9", "fr"),          # the customer's locale wins
    ("cs_CZ", None, "cs"),
    ("es-ES", "de-DE,de;q=0.9,en;q=0.5", "de"),  # unsupported own locale: the browser's
    (None, "fr-CH, fr;q=0.9, en;q=0.8", "fr"),
    (None, "en;q=0.2, cs;q=0.8", "cs"),          # quality values order the choice
    (None, "es, it", "en"),                      # nothing supported: English
    (None, "", "en"),
    (None, "x" * 500, "en"),                     # garbage is not an error
    ("", "de-AT", "de"),
])
def test_negotiate(customer: str | None, header: str | None, expected: str) -> None:
    assert i18n.negotiate(customer, header) == expected


def test_every_key_used_by_a_template_exists() -> None:
    used: set[str] = set()
    for path in TEMPLATES.glob("*.html"):
        used |= set(KEY_CALL.findall(path.read_text(encoding="utf-8")))
    assert {"button.apple", "button.google", "join.title", "landing.title"} <= used
    missing = used - set(i18n.catalog("en"))
    assert not missing, missing


def test_every_key_built_at_run_time_exists() -> None:
    """Keys templates compose (``"page." ~ key``, ``"field." ~ name``, error keys)."""
    import typing

    from app.distribution import enrollment, platforms
    from app.web import links as pages

    keys = {f"page.{key}.{part}" for key in pages.PAGE_KEYS for part in ("title", "text")}
    keys |= {f"field.{name}" for name in ("email", *enrollment.FIELDS)}
    keys |= {f"consent.{kind}" for kind in enrollment.KNOWN_CONSENTS}
    keys |= set(pages.NOTICES.values())
    # "Not available for this wallet" notices (platforms.Offer.missing) and button keys the
    # templates pass to _send_form.html.
    hint = typing.get_type_hints(platforms.Offer)["missing"]  # Literal[...] | None
    missing = {name for arg in typing.get_args(hint) for name in typing.get_args(arg)}
    keys |= {f"landing.missing_{name}" for name in missing}
    for path in TEMPLATES.glob("*.html"):
        keys |= set(re.findall(r'send_button = "([a-z_.]+)"', path.read_text(encoding="utf-8")))
    assert {"landing.missing_google", "page.fresh_link.button"} <= keys
    source = Path(enrollment.__file__).read_text(encoding="utf-8")
    keys |= set(re.findall(r'"(error\.[a-z_]+)"', source))
    assert "error.consent_required" in keys and "page.csrf.title" in keys
    assert keys - set(i18n.catalog("en")) == set()


class _TextCollector(HTMLParser):
    """Visible text and human-facing attributes, outside <style> and <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = 0
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script"):
            self.skip += 1
        for name, value in attrs:
            if name in ("alt", "title", "placeholder", "aria-label") and value:
                self.texts.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script"):
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.texts.append(data)


def _untranslated(source: str) -> list[str]:
    # Jinja expressions and statements are code; what remains is literal page text.
    literal = re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", " ", source, flags=re.S)
    collector = _TextCollector()
    collector.feed(literal)
    return [t.strip() for t in collector.texts if re.search(r"[^\W\d_]{2,}", t)]


@pytest.mark.parametrize("name", LOCALIZED_PAGES)
def test_no_literal_words_on_localized_pages(name: str) -> None:
    source = (TEMPLATES / name).read_text(encoding="utf-8")
    assert _untranslated(source) == []


def test_the_literal_text_check_can_fail() -> None:
    assert _untranslated("<p>{{ _('button.apple') }}</p><p>Hello there</p>") == ["Hello there"]
    assert _untranslated('<img alt="Logo">') == ["Logo"]
    assert _untranslated("<style>body{color:red}</style><p>{{ x }} *</p>") == []


# -- gettext catalogues (app/translations/<lang>/LC_MESSAGES/messages.po) ---------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """The template `pybabel extract -F babel.cfg` makes from the code, as docs/translations.md says."""
    pot = tmp_path_factory.mktemp("pot") / "messages.pot"
    CommandLineInterface().run(["pybabel", "-q", "extract", "-F", str(REPO / "babel.cfg"),
                                "-o", str(pot), "--no-location", str(REPO)])
    with pot.open("rb") as file:
        return read_po(file)


def _key(message: Message) -> str:
    return str(message.id[0] if message.pluralizable else message.id)


def _forms(message: Message) -> tuple[str, ...]:
    return tuple(message.string) if message.pluralizable else (message.string,)


def test_extraction_finds_every_message_the_code_uses(extracted: Catalog) -> None:
    keys = {_key(m) for m in extracted if m.id}
    # Template calls, Python calls, and N_() marks of composed keys.
    assert {"button.apple", "mail.greeting", "page.csrf.title", "error.required"} <= keys
    assert keys == set(i18n.catalog("en")), keys ^ set(i18n.catalog("en"))
    plural = {_key(m) for m in extracted if m.id and m.pluralizable}
    assert plural == {"mail.card_link.expiry"} == i18n.plural_keys()


@pytest.mark.parametrize("lang", i18n.SUPPORTED)
def test_every_language_has_every_extracted_message_translated(
        lang: str, extracted: Catalog) -> None:
    catalogue = i18n.po_catalog(lang)
    assert catalogue.locale is not None and str(catalogue.locale) == lang
    template = {_key(m): m for m in extracted if m.id}
    messages = {_key(m): m for m in catalogue if m.id}
    assert set(messages) == set(template), (lang, set(messages) ^ set(template))
    assert not catalogue.obsolete, (lang, list(catalogue.obsolete))
    reference = {_key(m): m for m in i18n.po_catalog("en") if m.id}
    for key, message in messages.items():
        assert not message.fuzzy, (lang, key)
        assert message.pluralizable == template[key].pluralizable, (lang, key)
        forms = _forms(message)
        assert len(forms) == catalogue.num_plurals or not message.pluralizable, (lang, key)
        assert all(form.strip() for form in forms), (lang, key)
        expected = placeholders(_forms(reference[key])[0])
        assert all(placeholders(form) == expected for form in forms), (lang, key)


@pytest.mark.parametrize("lang", i18n.SUPPORTED)
def test_plural_forms_are_the_languages_own(lang: str) -> None:
    catalogue = i18n.po_catalog(lang)
    # The header pybabel init writes from CLDR: what translation tools will expect.
    assert catalogue.plural_forms == str(get_plural(lang)), lang
    assert catalogue.num_plurals == {"en": 2, "de": 2, "fr": 3, "cs": 3}[lang]


@pytest.mark.parametrize("lang, counts", [
    ("en", {1: "1 day ", 7: "7 days "}),
    ("de", {1: "1 Tag ", 7: "7 Tage "}),
    ("fr", {1: "1 jour ", 7: "7 jours ", 1000000: "1000000 de jours "}),
    ("cs", {1: "1 den ", 3: "3 dny ", 7: "7 dní "}),
])
def test_counts_take_the_plural_form_of_the_language(lang: str, counts: dict[int, str]) -> None:
    _ = i18n.translator(lang)
    for n, expected in counts.items():
        text = _.ngettext("mail.card_link.expiry", "mail.card_link.expiry", n, days=n)
        assert expected in text, (lang, n, text)
    with pytest.raises(KeyError):
        i18n.translate(lang, "mail.card_link.expiry", days=7)  # a count needs ngettext
    with pytest.raises(KeyError):
        i18n.ntranslate(lang, "button.apple", 2)
    with pytest.raises(ValueError):
        _.ngettext("mail.card_link.expiry", "other.key", 2, days=2)


def test_fuzzy_and_missing_messages_fall_back_to_english(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fuzzy entry is a guess awaiting review: shown in English, as msgfmt leaves it out."""
    for lang in ("en", "fr"):
        (tmp_path / lang / "LC_MESSAGES").mkdir(parents=True)
        (tmp_path / lang / "LC_MESSAGES" / "messages.po").write_bytes(
            i18n.po_path(lang).read_bytes())
    po = tmp_path / "fr" / "LC_MESSAGES" / "messages.po"
    text = po.read_text(encoding="utf-8")
    text = text.replace('msgid "button.apple"', '#, fuzzy\nmsgid "button.apple"')
    text = text.replace('msgid "button.google"\nmsgstr "Ajouter à Google Wallet"',
                        'msgid "button.google"\nmsgstr ""')
    po.write_text(text, encoding="utf-8")
    caches = (i18n.po_catalog, i18n.translations, i18n.catalog, i18n.plural_keys)
    monkeypatch.setattr(i18n, "TRANSLATIONS", tmp_path)
    for cached in caches:
        cached.cache_clear()
    try:
        assert "button.apple" not in i18n.catalog("fr")
        assert "button.google" not in i18n.catalog("fr")
        assert i18n.translate("fr", "button.apple") == "Add to Apple Wallet"
        assert i18n.translate("fr", "button.google") == "Add to Google Wallet"
        assert i18n.translate("fr", "landing.title", program="A") == "Votre carte A"
    finally:
        monkeypatch.undo()
        for cached in caches:
            cached.cache_clear()
    assert i18n.translate("fr", "button.apple") == "Ajouter à Apple Wallet"


def test_catalogues_are_package_data() -> None:
    """A wheel (non-editable install) carries every catalogue: pyproject's package-data globs."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["app"]
    package = TEMPLATES.parent
    shipped = {path for pattern in globs for path in package.glob(pattern) if path.is_file()}
    catalogues = {i18n.po_path(lang) for lang in i18n.SUPPORTED}
    assert all(path.is_file() for path in catalogues)
    assert catalogues <= shipped, catalogues - shipped

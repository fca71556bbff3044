"""The words on people's pages, in their language: gettext catalogues read with Babel.

One catalogue per language, ``app/translations/<lang>/LC_MESSAGES/messages.po``
(docs/translations.md: extract, update, translate). Message ids are stable keys
(``landing.title``) and ``en`` holds the English text, the layout translation
tools call "monolingual gettext": a reworded English sentence does not orphan
every translation. Messages are ``str.format`` templates with named fields
(``"Your {program} card"``), so a translator can move the name where their
grammar wants it; a message with a count is a plural entry (``ngettext``), with
as many forms as the language has (Czech: three).

The ``.po`` files are read at run time (:func:`babel.messages.pofile.read_po`)
and compiled in memory, once per process: the package works from a wheel with
no build step, no ``.mo`` binaries can drift from their source, and fuzzy
entries are skipped as ``msgfmt`` would skip them (English is shown instead).

Language choice (:func:`negotiate`): the customer's own locale from the CRM
wins (a French customer on an English browser still reads French); otherwise
the browser's Accept-Language; otherwise English.
"""

from __future__ import annotations

from functools import cache
from io import BytesIO
from pathlib import Path
from typing import Protocol

from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations
from werkzeug.datastructures import LanguageAccept
from werkzeug.http import parse_accept_header

SUPPORTED: tuple[str, ...] = ("en", "fr", "cs", "de")
DEFAULT = "en"
TRANSLATIONS = Path(__file__).resolve().parents[1] / "translations"  # app/translations
DOMAIN = "messages"


def N_(key: str) -> str:
    """Marks a message id for extraction (``gettext_noop``); the key is translated later."""
    return key


#: Message ids that code composes at run time (``"page." ~ key``, ``_(error)``): written out
#: here so that ``pybabel extract`` (which reads only literal calls) finds them.
#: tests/test_i18n.py checks that every composed key is listed.
COMPOSED: tuple[str, ...] = (
    # app/web/links.py NOTICES and the send-form buttons the templates set
    N_("landing.enrolled"), N_("landing.saved"),
    N_("landing.send_button"), N_("page.fresh_link.button"),
    # platforms.Offer.missing -> "landing.missing_" ~ offer.missing
    N_("landing.missing_apple"), N_("landing.missing_google"), N_("landing.missing_all"),
    # app/web/links.py PAGE_KEYS -> "page." ~ key ~ ".title" / ".text"
    N_("page.link_invalid.title"), N_("page.link_invalid.text"),
    N_("page.link_expired.title"), N_("page.link_expired.text"),
    N_("page.link_revoked.title"), N_("page.link_revoked.text"),
    N_("page.link_used_up.title"), N_("page.link_used_up.text"),
    N_("page.link_sent.title"), N_("page.link_sent.text"),
    N_("page.apple_missing.title"), N_("page.apple_missing.text"),
    N_("page.crm_stale.title"), N_("page.crm_stale.text"),
    N_("page.google_unavailable.title"), N_("page.google_unavailable.text"),
    N_("page.google_missing.title"), N_("page.google_missing.text"),
    N_("page.card_unavailable.title"), N_("page.card_unavailable.text"),
    N_("page.csrf.title"), N_("page.csrf.text"),
    N_("page.rate_limited.title"), N_("page.rate_limited.text"),
    N_("page.not_found.title"), N_("page.not_found.text"),
    N_("page.bad_request.title"), N_("page.bad_request.text"),
    N_("page.error.title"), N_("page.error.text"),
    # "field." ~ name for the enrollment fields
    N_("field.email"), N_("field.first_name"), N_("field.last_name"), N_("field.phone"),
    N_("field.birthday"), N_("field.postal_code"),
    # app/enrollment.py: "consent." + kind, and the error keys it returns
    N_("consent.marketing_email"), N_("consent.sms"), N_("consent.terms"),
    N_("error.required"), N_("error.email"), N_("error.too_long"), N_("error.phone"),
    N_("error.birthday"), N_("error.postal_code"), N_("error.consent_required"),
    N_("error.form_changed"),
    # app/card_mail.py: the body depends on the kind of mail
    N_("mail.card_link.body"), N_("mail.requested_link.body"),
)


class Translator(Protocol):
    """``_`` for templates and mails: ``_("landing.title", program=name)``."""

    def __call__(self, key: str, /, **params: object) -> str: ...

    def ngettext(self, key: str, plural: str, n: int, /, **params: object) -> str: ...


def po_path(lang: str) -> Path:
    return TRANSLATIONS / lang / "LC_MESSAGES" / f"{DOMAIN}.po"


@cache
def po_catalog(lang: str) -> Catalog:
    """The parsed ``.po`` file of one supported language (Babel's :class:`Catalog`)."""
    if lang not in SUPPORTED:
        raise KeyError(f"unsupported language {lang!r}")
    with po_path(lang).open("rb") as file:
        return read_po(file, locale=lang, domain=DOMAIN)


@cache
def translations(lang: str) -> Translations:
    """The compiled catalogue, falling back to English for a message a language lacks."""
    buffer = BytesIO()
    write_mo(buffer, po_catalog(lang))  # fuzzy entries are left out, as msgfmt does
    buffer.seek(0)
    compiled = Translations(buffer, domain=DOMAIN)
    if lang != DEFAULT:
        compiled.add_fallback(translations(DEFAULT))
    return compiled


@cache
def catalog(lang: str) -> dict[str, str]:
    """The usable messages of one language, key -> text (loaded once per process).

    A plural message appears with its last form, the one for most counts; fuzzy and
    untranslated entries are absent.
    """
    messages: dict[str, str] = {}
    for message in po_catalog(lang):
        if not message.id or message.fuzzy:
            continue
        key = message.id[0] if message.pluralizable else message.id
        string = message.string  # a tuple of plural forms for a pluralizable message
        text = string[-1] if isinstance(string, tuple | list) else string
        if text:
            messages[str(key)] = str(text)
    return messages


def primary(tag: str | None) -> str | None:
    """``fr-FR`` / ``fr_CA`` -> ``fr`` if supported, else None."""
    if not tag:
        return None
    language = tag.strip().replace("_", "-").split("-", 1)[0].lower()
    return language if language in SUPPORTED else None


def negotiate(customer_locale: str | None, accept_language: str | None) -> str:
    """The page language: the customer's locale, else the browser's best match, else English."""
    own = primary(customer_locale)
    if own:
        return own
    if accept_language:
        accepted = parse_accept_header(accept_language, LanguageAccept)
        # best_match falls back to primary subtags: "fr-CH" matches "fr".
        match = accepted.best_match(SUPPORTED)
        if match:
            return match
    return DEFAULT


@cache
def plural_keys() -> frozenset[str]:
    """Ids of the messages with a count (plural entries of the English catalogue)."""
    return frozenset(str(m.id[0]) for m in po_catalog(DEFAULT) if m.pluralizable)


def _known(key: str, *, plural: bool) -> None:
    # gettext answers an unknown id with the id itself: a typo must fail loudly instead.
    if key not in catalog(DEFAULT):
        raise KeyError(f"no message {key!r}")
    if (key in plural_keys()) != plural:
        raise KeyError(f"message {key!r} is {'not ' if plural else ''}a plural message")


def translate(lang: str, key: str, **params: object) -> str:
    """The message for ``key`` in ``lang`` (English if the language lacks it), formatted."""
    _known(key, plural=False)
    text = translations(lang if lang in SUPPORTED else DEFAULT).gettext(key)
    return text.format(**params) if params else text


def ntranslate(lang: str, key: str, n: int, **params: object) -> str:
    """The plural message for ``key`` in the form that fits ``n``, formatted."""
    _known(key, plural=True)
    text = translations(lang if lang in SUPPORTED else DEFAULT).ngettext(key, key, n)
    return text.format(**params)


class _LanguageTranslator:
    def __init__(self, lang: str) -> None:
        self.lang = lang

    def __call__(self, key: str, /, **params: object) -> str:
        return translate(self.lang, key, **params)

    def ngettext(self, key: str, plural: str, n: int, /, **params: object) -> str:
        # gettext's signature, so that `pybabel extract` reads the call; a keyed catalogue
        # names both forms with the same id.
        if plural != key:
            raise ValueError(f"plural id {plural!r} differs from {key!r}")
        return ntranslate(self.lang, key, n, **params)


def translator(lang: str) -> Translator:
    """``_`` for templates and mails: ``_("landing.title", program=name)``, and
    ``_.ngettext("mail.card_link.expiry", "mail.card_link.expiry", days, days=days)`` where
    a count appears."""
    return _LanguageTranslator(lang)

"""The words on people's pages, in their language: a small message catalogue.

One flat JSON file per language in ``app/translations/`` (``en`` is the
reference; every language has every key, which a test checks). Messages are
``str.format`` templates with named fields (``"Your {program} card"``), so a
translator can move the name where their grammar wants it.

Why not gettext: the pages have a few dozen sentences, translators edit JSON
easily, and a missing key is caught by a test rather than shown in English.

Language choice (:func:`negotiate`): the customer's own locale from the CRM
wins (a French customer on an English browser still reads French); otherwise
the browser's Accept-Language; otherwise English.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

from werkzeug.datastructures import LanguageAccept
from werkzeug.http import parse_accept_header

SUPPORTED: tuple[str, ...] = ("en", "fr", "cs", "de")
DEFAULT = "en"
TRANSLATIONS = Path(__file__).resolve().parent / "translations"

Translator = Callable[..., str]


@cache
def catalog(lang: str) -> dict[str, str]:
    """The messages of one supported language (loaded once per process)."""
    if lang not in SUPPORTED:
        raise KeyError(f"unsupported language {lang!r}")
    data = json.loads((TRANSLATIONS / f"{lang}.json").read_text(encoding="utf-8"))
    return {str(key): str(value) for key, value in data.items()}


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


def translate(lang: str, key: str, **params: object) -> str:
    """The message for ``key`` in ``lang`` (English if the language lacks it), formatted."""
    text = catalog(lang).get(key) if lang in SUPPORTED else None
    if text is None:
        text = catalog(DEFAULT).get(key)
    if text is None:
        raise KeyError(f"no message {key!r}")
    return text.format(**params) if params else text


def translator(lang: str) -> Translator:
    """``_`` for templates: ``_("landing.title", program=name)``."""
    def _(key: str, **params: object) -> str:
        return translate(lang, key, **params)
    return _

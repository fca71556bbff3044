"""Pass templates: one folder per template under ``pass_templates/``.

A template folder holds (see pass_templates/README.md for the full format):

- ``template.toml``: name, style, barcode, the variables the card uses with
  their types and defaults, and a ``[google]`` part for Google Wallet;
- ``pass.json``: a Jinja template of Apple's pass.json (without the
  identifiers, web service and barcode keys, which the builder adds);
- ``images/<role>.png``: one source image per role, resized by the builder;
- ``<lang>.lproj/pass.strings``: UTF-8 sources, written as UTF-16 into passes.

Every ``{{ expression }}`` in pass.json is emitted as a JSON literal
(``finalize=json.dumps``), so customer values are always escaped and an
expression placed inside quotes is caught as a template error.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency, format_decimal

from app.wallet import images, schema, strings

BARCODE_FORMATS = {
    "qr": "PKBarcodeFormatQR",
    "pdf417": "PKBarcodeFormatPDF417",
    "aztec": "PKBarcodeFormatAztec",
    "code128": "PKBarcodeFormatCode128",
}
VARIABLE_TYPES = ("string", "int", "number", "date")
# Keys the builder owns; a template must not set them.
RESERVED_KEYS = (
    "formatVersion", "passTypeIdentifier", "serialNumber", "teamIdentifier", "webServiceURL",
    "authenticationToken", "barcodes", "barcode", "voided", "expirationDate",
)
#: Variables every template can use without declaring them.
BUILTIN_VARIABLES = (
    "member_id", "external_id", "first_name", "last_name", "full_name", "locale",
    "program_name", "organization_name",
)
_KEY_LINE = re.compile(r'"key"\s*:\s*"([^"]+)"')


class TemplateError(ValueError):
    """A template is broken: the message names the template file and the problem."""


class MissingAttributeError(TemplateError):
    """Customer data lacks a value the template needs and has no default for."""

    def __init__(self, template: str, field: str, attribute: str) -> None:
        self.template, self.field, self.attribute = template, field, attribute
        super().__init__(
            f"template {template!r}, field {field!r}: the customer has no {attribute!r} "
            f"attribute and the template declares no default for it"
        )


class AttributeValueError(TemplateError):
    def __init__(self, template: str, field: str, attribute: str, value: Any, kind: str) -> None:
        self.template, self.field, self.attribute = template, field, attribute
        super().__init__(
            f"template {template!r}, field {field!r}: attribute {attribute!r} = {value!r} "
            f"is not a valid {kind}"
        )


@dataclass(frozen=True)
class Variable:
    name: str
    type: str = "string"
    default: Any = None
    has_default: bool = False


@dataclass
class PassTemplate:
    name: str
    path: Path
    title: str
    style: str
    barcode_format: str
    barcode_alt_text: bool
    variables: dict[str, Variable]
    used_variables: frozenset[str]
    field_of_variable: dict[str, str]
    strings: dict[str, dict[str, str]]
    static_files: dict[str, bytes]
    google: dict[str, Any]
    digest: str
    _jinja: jinja2.Template = field(repr=False)

    # -- data -------------------------------------------------------------
    def resolve(self, builtins: dict[str, Any], attributes: dict[str, Any],
                mapping: dict[str, str] | None = None) -> dict[str, Any]:
        """Collect the values this template uses, typed, with defaults applied.

        ``mapping`` renames: template variable -> customer attribute name.
        """
        mapping = mapping or {}
        values: dict[str, Any] = {}
        for name in self.used_variables:
            source = mapping.get(name, name)
            declared = self.variables.get(name)
            raw = builtins.get(source) if source in builtins else attributes.get(source)
            if raw is None or raw == "":
                if declared is not None and declared.has_default:
                    raw = declared.default
                elif name in BUILTIN_VARIABLES and name not in ("member_id",):
                    raw = ""
                else:
                    raise MissingAttributeError(self.name, self._field(name), source)
            values[name] = self._coerce(name, source, raw, declared)
        return values

    def render(self, values: dict[str, Any], locale: str | None) -> dict[str, Any]:
        """Render pass.json (without builder-owned keys) for one customer."""
        env_locale = parse_locale(locale)
        try:
            text = self._jinja.render(values, _locale=env_locale)
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{self.path / 'pass.json'}: {exc.message}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TemplateError(
                f"{self.path / 'pass.json'}: rendered output is not JSON (line {exc.lineno}: "
                f"{exc.msg}); put {{{{ expressions }}}} outside quotes"
            ) from exc
        if not isinstance(data, dict):
            raise TemplateError(f"{self.path / 'pass.json'}: must render to a JSON object")
        return data

    def _field(self, variable: str) -> str:
        return self.field_of_variable.get(variable, "(pass.json)")

    def _coerce(self, name: str, source: str, raw: Any, declared: Variable | None) -> Any:
        kind = declared.type if declared else "string"
        try:
            if kind == "int":
                if isinstance(raw, bool):
                    raise ValueError
                if isinstance(raw, float) and not raw.is_integer():
                    raise ValueError
                return int(Decimal(str(raw).strip()))
            if kind == "number":
                value = Decimal(str(raw).strip())
                return int(value) if value == value.to_integral_value() else float(value)
            if kind == "date":
                if isinstance(raw, dt.date):
                    return raw
                return dt.date.fromisoformat(str(raw).strip()[:10])
        except (ValueError, InvalidOperation, ArithmeticError):
            raise AttributeValueError(self.name, self._field(name), source, raw, kind) from None
        return raw if isinstance(raw, str) else str(raw)


@functools.lru_cache(maxsize=256)
def parse_locale(tag: str | None) -> Locale:
    """Babel locale for a customer's tag; English when unknown. Cached: parsing is slow."""
    if tag:
        try:
            return Locale.parse(tag.replace("-", "_"))
        except (UnknownLocaleError, ValueError, TypeError):
            pass
    return Locale("en")


# -- Jinja environment: JSON-literal output and locale-aware filters ---------------

def _json_literal(value: Any) -> str:
    if isinstance(value, dt.datetime):
        value = value.isoformat()
    elif isinstance(value, dt.date):
        value = value.isoformat()
    elif isinstance(value, Decimal):
        value = float(value)
    return json.dumps(value, ensure_ascii=False)


@jinja2.pass_context
def _number(ctx: jinja2.runtime.Context, value: Any) -> str:
    return format_decimal(value, locale=ctx["_locale"])


@jinja2.pass_context
def _date(ctx: jinja2.runtime.Context, value: Any, style: str = "medium") -> str:
    if isinstance(value, str):
        value = dt.date.fromisoformat(value[:10])
    return format_date(value, format=style, locale=ctx["_locale"])


@jinja2.pass_context
def _currency(ctx: jinja2.runtime.Context, value: Any, code: str) -> str:
    return format_currency(value, code, locale=ctx["_locale"])


def _environment(folder: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        finalize=_json_literal,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters.update(number=_number, date=_date, currency=_currency)
    return env


# -- loading -------------------------------------------------------------------------

class TemplateLibrary:
    """Loads templates once per process and keeps them (with derived images) in memory."""

    def __init__(self, root: Path, image_cache: images.ImageCache | None = None) -> None:
        self.root = Path(root)
        self.image_cache = image_cache or images.ImageCache()
        self._loaded: dict[str, PassTemplate] = {}

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if (p / "template.toml").is_file() and not p.name.startswith(("_", ".")))

    def get(self, name: str) -> PassTemplate:
        if name not in self._loaded:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not (self.root / name).is_dir():
                raise TemplateError(f"no pass template named {name!r} in {self.root}")
            self._loaded[name] = load_template(self.root / name, self.image_cache)
        return self._loaded[name]


def load_template(folder: Path, image_cache: images.ImageCache) -> PassTemplate:
    name = folder.name
    meta = _read_toml(folder / "template.toml")
    style = meta.get("style")
    if style not in schema.STYLES:
        raise TemplateError(f"{folder / 'template.toml'}: style must be one of {schema.STYLES}")
    variables = _read_variables(folder / "template.toml", meta.get("variables", {}))
    barcode = meta.get("barcode", {})
    barcode_format = str(barcode.get("format", "qr")).lower()
    if barcode_format not in BARCODE_FORMATS:
        raise TemplateError(f"{folder / 'template.toml'}: barcode.format must be one of "
                            f"{', '.join(BARCODE_FORMATS)}")

    source_path = folder / "pass.json"
    try:
        source = source_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{source_path}: missing") from None
    env = _environment(folder)
    try:
        used = jinja2.meta.find_undeclared_variables(env.parse(source))
        jinja_template = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{source_path}, line {exc.lineno}: {exc.message}") from exc
    used.discard("_locale")
    unknown = sorted(used - set(variables) - set(BUILTIN_VARIABLES))
    if unknown:
        raise TemplateError(f"{source_path}: unknown variable(s) {', '.join(unknown)}; declare "
                            f"them under [variables] in template.toml")
    google_vars = _google_variables(meta.get("google", {}))
    unknown = sorted(google_vars - set(variables) - set(BUILTIN_VARIABLES))
    if unknown:
        raise TemplateError(f"{folder / 'template.toml'}: [google] uses unknown variable(s) "
                            f"{', '.join(unknown)}")
    used |= google_vars

    string_tables = _read_strings(folder)
    static_files: dict[str, bytes] = {}
    for role in images.ROLES:
        src = folder / "images" / f"{role}.png"
        if src.exists():
            static_files.update(image_cache.role_images(src, role, style))
    if "icon.png" not in static_files:
        raise TemplateError(f"{folder / 'images'}: icon.png is required by Apple Wallet")
    for lang, table in string_tables.items():
        static_files[f"{lang}.lproj/pass.strings"] = strings.render(table)

    digest = hashlib.sha256()
    digest.update((folder / "template.toml").read_bytes())
    digest.update(source.encode())
    for file_name in sorted(static_files):
        digest.update(file_name.encode() + b"\0" + hashlib.sha256(static_files[file_name]).digest())

    template = PassTemplate(
        name=name, path=folder, title=str(meta.get("name", name)), style=style,
        barcode_format=barcode_format, barcode_alt_text=bool(barcode.get("alt_text", True)),
        variables=variables, used_variables=frozenset(used),
        field_of_variable=_fields_of_variables(source), strings=string_tables,
        static_files=static_files, google=dict(meta.get("google", {})),
        digest=digest.hexdigest(), _jinja=jinja_template,
    )
    _self_check(template)
    return template


def _google_variables(google: dict[str, Any]) -> set[str]:
    """Variables the Google Wallet part of a template reads (they must resolve too)."""
    names = {google.get("points"), google.get("header")} | set(google.get("notify", []))
    names |= {module.get("value") for module in google.get("text_modules", [])}
    names |= {"full_name", "program_name"}
    return {name for name in names if isinstance(name, str) and name}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateError(f"{path}: missing") from None
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"{path}: {exc}") from exc


def _read_variables(path: Path, table: dict[str, Any]) -> dict[str, Variable]:
    result: dict[str, Variable] = {}
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise TemplateError(f"{path}: variables.{name} must be a table, e.g. {{ type = 'int' }}")
        kind = spec.get("type", "string")
        if kind not in VARIABLE_TYPES:
            raise TemplateError(f"{path}: variables.{name}.type must be one of {VARIABLE_TYPES}")
        result[name] = Variable(name, kind, spec.get("default"), "default" in spec)
    return result


def _read_strings(folder: Path) -> dict[str, dict[str, str]]:
    tables: dict[str, dict[str, str]] = {}
    for lproj in sorted(folder.glob("*.lproj")):
        path = lproj / "pass.strings"
        if not path.is_file():
            continue
        try:
            text = strings.decode_source(path.read_bytes())
            tables[lproj.name[: -len(".lproj")]] = strings.parse(text, name=str(path))
        except (UnicodeDecodeError, strings.StringsError) as exc:
            raise TemplateError(f"{path}: {exc}") from exc
    return tables


def _fields_of_variables(source: str) -> dict[str, str]:
    """Map each variable to the pass field whose definition uses it (for error messages)."""
    result: dict[str, str] = {}
    current_key = "(pass.json)"
    for line in source.splitlines():
        key_match = _KEY_LINE.search(line)
        if key_match:
            current_key = key_match.group(1)
        for expression in re.findall(r"\{[{%](.*?)[%}]\}", line):
            for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression):
                result.setdefault(word, current_key)
    return result


def _self_check(template: PassTemplate) -> None:
    """Render once with sample values so a broken template fails at load, not per customer."""
    samples: dict[str, Any] = {}
    for name in template.used_variables:
        declared = template.variables.get(name)
        if declared and declared.has_default:
            samples[name] = declared.default
        else:
            samples[name] = {"int": 1, "number": 1.5, "date": dt.date(2000, 1, 1)}.get(
                declared.type if declared else "string", "Sample")
    values = template.resolve(samples, {})
    data = template.render(values, "en")
    reserved = [k for k in RESERVED_KEYS if k in data]
    if reserved:
        raise TemplateError(f"{template.path / 'pass.json'}: must not set {', '.join(reserved)} "
                            f"(the builder sets them)")
    if template.style not in data:
        raise TemplateError(f"{template.path / 'pass.json'}: declares style {template.style!r} in "
                            f"template.toml but has no {template.style!r} key")
    probe = {"formatVersion": 1, "passTypeIdentifier": "pass.x", "serialNumber": "x",
             "teamIdentifier": "x", **data}
    try:
        schema.validate_pass(probe, template.strings)
    except schema.PassSchemaError as exc:
        raise TemplateError(f"{template.path / 'pass.json'}: {exc}") from exc

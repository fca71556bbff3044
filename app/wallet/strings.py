"""Apple ``.strings`` files: read the UTF-8 sources we keep, write what Wallet wants.

Apple asks for UTF-16 when the text is not ASCII; we always write UTF-16LE
with a BOM, the encoding that fixed localized passes in other projects.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r'\s*(?:/\*.*?\*/|//[^\n]*)\s*'            # comments
    r'|\s*"((?:[^"\\]|\\.)*)"\s*=\s*"((?:[^"\\]|\\.)*)"\s*;',
    re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


class StringsError(ValueError):
    pass


def decode_source(raw: bytes) -> str:
    """Sources may be UTF-8 (with or without BOM) or UTF-16 with a BOM."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def parse(text: str, *, name: str = "pass.strings") -> dict[str, str]:
    table: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            start = len(text) - len(text[pos:].lstrip())
            line = text.count("\n", 0, start) + 1
            raise StringsError(f'{name}, line {line}: expected "key" = "value";')
        if match.group(1) is not None:
            table[_unescape(match.group(1))] = _unescape(match.group(2))
        pos = match.end()
    return table


def render(table: dict[str, str]) -> bytes:
    """Serialize a table as UTF-16LE with a BOM, one entry per line."""
    lines = [f'"{_escape(k)}" = "{_escape(v)}";' for k, v in table.items()]
    return ("\ufeff" + "\n".join(lines) + "\n").encode("utf-16-le")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), value)


def _escape(value: str) -> str:
    return (value.replace("\\", "\\\\").replace('"', '\\"')
            .replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r"))

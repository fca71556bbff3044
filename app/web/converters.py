"""URL converters shared by every blueprint.

``<id:name>`` is the one way a route takes a row id: ASCII digits within the
bounds of the id columns (``app.infra.bounds``). Anything else does not match the
route, so the answer is the usual 404 (problem JSON under /api), decided before
any query. ``tests/test_bounds.py`` walks the URL map to keep every numeric path
argument on it.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from werkzeug.routing import Map
from werkzeug.routing.converters import IntegerConverter, ValidationError

from app.infra import bounds


def up_to(high: int) -> str:
    """A regular expression for the decimal numbers 1..``high`` (no sign, no leading zero).

    The range is decided by the pattern, not after it: a rule that matched its pattern
    and then refused the value would make werkzeug answer 405 instead of 404 when
    another method shares the path.
    """
    digits = str(high)
    choices = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    for position, digit in enumerate(digits):
        lowest = 1 if position == 0 else 0
        if int(digit) - 1 >= lowest:
            rest = len(digits) - position - 1
            choices.append(digits[:position] + f"[{lowest}-{int(digit) - 1}]"
                           + (f"[0-9]{{{rest}}}" if rest else ""))
    choices.append(digits)
    return "(?:" + "|".join(choices) + ")"


class RowIdConverter(IntegerConverter):
    """A row id: 1 to ``bounds.ROW_ID_MAX``, no sign, no leading zero, no other digits."""

    regex = up_to(bounds.ROW_ID_MAX)

    def __init__(self, map: Map) -> None:  # werkzeug's name
        super().__init__(map, min=bounds.ROW_ID_MIN, max=bounds.ROW_ID_MAX)

    def to_python(self, value: str) -> Any:
        parsed = bounds.parse_row_id(value)
        if parsed is None:  # the pattern already refused it; kept as a second guard
            raise ValidationError()
        return parsed

    def json_schema(self) -> dict[str, Any]:
        """How the OpenAPI document describes this argument."""
        return {"type": "integer",
                "format": "int64" if bounds.ROW_ID_MAX > 2**31 - 1 else "int32",
                "minimum": bounds.ROW_ID_MIN, "maximum": bounds.ROW_ID_MAX}


def register(app: Flask) -> None:
    """Before any blueprint: rules look their converters up when they are added."""
    app.url_map.converters["id"] = RowIdConverter

"""Numeric inputs are bounded by the columns that hold them.

A number from outside (a path id, a cursor, a query parameter, a device's update
tag, a command's argument) that its column cannot hold names nothing: it is
refused before any query (404 for an id, 400 or 422 for a parameter), never sent
to the database, where PostgreSQL would fail the statement (``integer out of
range``) and SQLite the driver (``Python int too large``).

The bounds are read from the column types of ``app.infra.models`` (Integer: 32 bits,
BigInteger: 64), so changing a column's type moves every bound that depends on it.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, SmallInteger
from sqlalchemy.types import TypeEngine

from app.infra.models import Base, Card

#: Subclasses first: BigInteger and SmallInteger are Integers too.
_BITS: tuple[tuple[type[Integer], int], ...] = ((BigInteger, 64), (SmallInteger, 16),
                                                  (Integer, 32))


def int_range(type_: TypeEngine[Any]) -> tuple[int, int]:
    """The signed range a SQL integer type holds (the SQL standard's, which PostgreSQL uses)."""
    for cls, bits in _BITS:
        if isinstance(type_, cls):
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    raise TypeError(f"{type_!r} is not an integer type")


def column_max(column: ColumnElement[Any]) -> int:
    return int_range(column.type)[1]


def _row_id_max() -> int:
    """The largest value every table's ``id`` primary key can hold: one id type for all."""
    bounds = {int_range(table.c.id.type)[1] for table in Base.metadata.tables.values()
              if "id" in table.c and table.c.id.primary_key
              and isinstance(table.c.id.type, Integer)}
    return min(bounds)


#: Row ids are numbered from 1 by the database.
ROW_ID_MIN = 1
ROW_ID_MAX = _row_id_max()
#: Update tags a device may send back (``passesUpdatedSince``): 0 up to the column's bound.
UPDATE_TAG_MAX = column_max(Card.__table__.c.update_tag)

_DIGITS = re.compile(r"[0-9]+")


def parse_int(text: str, low: int, high: int) -> int | None:
    """ASCII decimal ``text`` within [low, high], else None (never a huge or odd int:
    no signs, spaces, underscores or non-ASCII digits, which ``int()`` would take)."""
    negative = text.startswith("-") and low < 0
    digits = text[1:] if negative else text
    if (not _DIGITS.fullmatch(digits) or len(digits) > len(str(max(abs(low), abs(high))))
            or (negative and digits.strip("0") == "")):
        return None
    value = -int(digits) if negative else int(digits)
    return value if low <= value <= high else None


def parse_row_id(text: str) -> int | None:
    return parse_int(text, ROW_ID_MIN, ROW_ID_MAX)


def is_row_id(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and ROW_ID_MIN <= value <= ROW_ID_MAX)

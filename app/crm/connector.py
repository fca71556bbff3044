"""The one interface every CRM connector implements, the record it returns, its errors.

Why an interface: a tenant either lets Passerelle's own ``customers`` table be
the CRM (:mod:`app.crm.builtin`) or keeps its customer data in an external
system reached over HTTP (:mod:`app.crm.http`). Everything above this layer
(links, forms, the outbox) codes against :class:`Connector` and never asks
which one it has, except through ``kind``.

Error messages never carry personal data: they name ids, HTTP statuses and
field names only, because they end up in logs and in ``crm_outbox.last_error``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Protocol

#: The customer fields a CRM record can carry besides ``attributes.*`` and ``consents.*``.
STANDARD_FIELDS = ("email", "first_name", "last_name", "locale", "phone", "birthday")


class CrmError(Exception):
    """Base of the connector errors; messages hold ids and statuses, never personal data."""


class CrmUnavailable(CrmError):
    """Network error, timeout, 5xx, 429 (or a misconfiguration an operator can fix):
    try again later. ``retry_after``: seconds the CRM asked us to wait, if it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CrmRejected(CrmError):
    """The CRM refuses this write (a 4xx about the request itself): retrying will not help."""


class CrmNotFound(CrmError):
    """An update named a customer the CRM does not have (HTTP 404 on PATCH)."""


class CrmStale(CrmError):
    """The CRM is down and our copy is older than the tenant's staleness limit (or absent)."""


@dataclass
class CrmRecord:
    """Customer data as the CRM has it, already mapped to our field names.

    ``present`` names the fields the CRM's answer actually contained (``email``,
    ``attributes.points``, ``consents.marketing_email``...), a null value
    included: a present ``None`` means "the CRM has no value", an absent field
    means "not mapped or not sent, leave ours alone". Left empty by a producer
    that does not know, every non-None value counts as present.
    """

    external_id: str
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    locale: str | None = None
    phone: str | None = None
    birthday: dt.date | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    consents: dict[str, bool] = field(default_factory=dict)
    present: frozenset[str] = frozenset()

    def provided(self) -> frozenset[str]:
        """The field names to apply to a local copy (see ``present``)."""
        if self.present:
            return self.present
        names = {name for name in STANDARD_FIELDS if getattr(self, name) is not None}
        names |= {f"attributes.{name}" for name in self.attributes}
        names |= {f"consents.{kind}" for kind in self.consents}
        return frozenset(names)


class Connector(Protocol):
    """Reads customers from a CRM and writes enrollments and updates back."""

    kind: str  # "builtin" | "http"

    def fetch(self, external_id: str) -> CrmRecord | None:
        """The CRM's current record, or None if it does not know this id.
        Raises CrmUnavailable."""
        ...

    def find_by_email(self, email: str) -> CrmRecord | None:
        """The CRM's record holding this email (for enrolling someone it already has)."""
        ...

    def write(self, operation: str, payload: dict[str, Any], *,
              idempotency_key: str | None = None) -> str | None:
        """Apply a ``create`` or ``update`` (payload from ``customer_payload``).
        Returns the CRM's id for a create if it assigns one. Raises CrmUnavailable,
        CrmRejected, or CrmNotFound (update of a customer the CRM does not have)."""
        ...

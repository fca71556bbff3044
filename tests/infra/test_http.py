"""The shared outbound HTTP policy (app/http.py): Retry-After in both of its forms."""

from __future__ import annotations

import email.utils

import pytest

from app.crm import CrmUnavailable, connector_for
from app.infra import http
from tests.crm.test_crm import crm  # noqa: F401 - the CRM stand-in fixture

NOW = 1_700_000_000.0


@pytest.mark.parametrize("value, seconds", [
    ("120", 120.0), (" 7 ", 7.0),
    (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),  # an HTTP date
    (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),  # already past: at once
    ("", None), ("soon", None), ("-5", None), ("1.5", None),
])
def test_retry_after_takes_seconds_and_http_dates(value: str, seconds: float | None) -> None:
    assert http.retry_after({"Retry-After": value}, now=NOW) == seconds


def test_transient_statuses() -> None:
    assert [s for s in (None, 200, 400, 403, 404, 409, 429, 500, 503) if http.transient(s)] \
        == [None, 429, 500, 503]


def test_the_crm_connector_honours_a_retry_after_date(services, demo, crm) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    crm.fail_next(503, retry_after=email.utils.formatdate(usegmt=True))  # "now": no wait
    crm.fail_next(503, retry_after="Wed, 21 Oct 2099 07:28:00 GMT")
    with services.db.session() as session:
        connector = connector_for(session, services, demo["tenant_id"])
        with pytest.raises(CrmUnavailable) as now:
            connector.fetch("C-1001")
        with pytest.raises(CrmUnavailable) as later:
            connector.fetch("C-1001")
    assert now.value.retry_after is not None and now.value.retry_after <= 1
    assert later.value.retry_after is not None and later.value.retry_after > 3600

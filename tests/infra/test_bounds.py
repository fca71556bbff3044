"""Every numeric input is bounded by the column that holds it: 404 or 400, never 500.

Ids in paths are walked from the URL map itself, so a route added later is probed
too; the probes run on PostgreSQL in CI, where an id beyond a 32-bit column used to
reach the database and fail there (``integer out of range``).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from werkzeug.routing import Rule
from werkzeug.routing.converters import NumberConverter

from app.admin import users as admin_users
from tests.api_helpers import auth, is_problem, make_key

#: Beyond a 32-bit column, at and beyond a 64-bit one, far beyond, and below any id.
PROBES = (2**31, 2**63 - 1, 2**63, 10**30, -1, 0)
_ARGUMENT = re.compile(r"<(?:[^<>]*:)?([A-Za-z_][A-Za-z0-9_]*)>")
ADMIN_EMAIL, ADMIN_PASSWORD = "bounds@a.example", "correct horse battery"


def int_like_rules(app) -> list[tuple[Rule, str]]:  # type: ignore[no-untyped-def]
    """(rule, argument) for every path argument a numeric converter parses."""
    found = []
    for rule in app.url_map.iter_rules():
        for name, converter in rule._converters.items():  # the map's own view
            if isinstance(converter, NumberConverter):
                found.append((rule, name))
    return found


def url_for_probe(rule: Rule, name: str, value: int) -> str:
    """The rule's path with ``value`` written in for ``name`` (other arguments: ``x``)."""
    return _ARGUMENT.sub(lambda m: str(value) if m.group(1) == name else "x", rule.rule)


@pytest.fixture()
def signed_in_everywhere(app, services, demo):  # type: ignore[no-untyped-def]
    """A client with an admin API key and an admin dashboard session (forms without CSRF
    tokens: the probes are about ids, not about forgery)."""
    app.config["WTF_CSRF_ENABLED"] = False
    with services.db.transaction() as session:
        admin_users.create_user(session, demo["tenant_id"], ADMIN_EMAIL, ADMIN_PASSWORD, "admin")
    client = app.test_client()
    signed = client.post("/admin/login", data={"tenant": "demo", "email": ADMIN_EMAIL,
                                               "password": ADMIN_PASSWORD})
    assert signed.status_code == 302, signed.get_data(as_text=True)
    return client, auth(make_key(services, demo["tenant_id"], "admin", "bounds"))


def test_every_numeric_path_argument_is_bounded(app, signed_in_everywhere) -> None:  # type: ignore[no-untyped-def]
    client, headers = signed_in_everywhere
    rules = int_like_rules(app)
    assert {rule.rule.split("/")[1] for rule, _ in rules} >= {"api", "admin"}
    failures: list[str] = []
    for rule, name in rules:
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            for value in PROBES:
                url = url_for_probe(rule, name, value)
                kwargs: dict[str, Any] = {"headers": headers}
                if method in ("POST", "PUT", "PATCH"):
                    kwargs["json" if url.startswith("/api/") else "data"] = {}
                response = client.open(url, method=method, **kwargs)
                status = response.status_code
                if status not in (400, 404):
                    failures.append(f"{method} {url}: {status}")
                elif url.startswith("/api/") and not is_problem(response, status):
                    failures.append(f"{method} {url}: {status} without a problem body")
    assert not failures, "\n".join(failures)


def test_every_numeric_path_argument_takes_a_row_id(app) -> None:  # type: ignore[no-untyped-def]
    """The rule behind the probes: one id type, bounded by the id columns."""
    from app.infra.bounds import ROW_ID_MAX
    from app.web.converters import RowIdConverter

    others = [f"{rule.rule} <{name}>" for rule, name in int_like_rules(app)
              if not isinstance(rule._converters[name], RowIdConverter)]
    assert not others
    assert ROW_ID_MAX == 2**31 - 1  # every id column is an Integer today


def test_openapi_states_the_id_bounds(client) -> None:  # type: ignore[no-untyped-def]
    document = client.get("/api/v1/openapi.json").get_json()
    ids = [parameter["schema"] for operations in document["paths"].values()
           for operation in operations.values()
           for parameter in operation.get("parameters", [])
           if parameter["in"] == "path" and parameter["name"].endswith("_id")
           and parameter["name"] != "external_id"]
    assert len(ids) >= 7
    assert all(schema == {"type": "integer", "format": "int32", "minimum": 1,
                          "maximum": 2**31 - 1} for schema in ids), ids


# -- query parameters ------------------------------------------------------------------------

@pytest.mark.parametrize("since", [str(2**63), "9" * 19, "1" + "0" * 30, "٣", "+1", " 1",
                                   "1_000", "-0"])
def test_update_tag_beyond_its_column_is_400(client, demo, since) -> None:  # type: ignore[no-untyped-def]
    """19 digits above 2**63-1 used to reach the database (500 on both)."""
    response = client.get("/passkit/v1/devices/a1b2c3d4e5f60718293a4b5c6d7e8f90/registrations/"
                          f"pass.dev.passerelle.demo?passesUpdatedSince={since}")
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"


def test_largest_update_tag_is_accepted(client, demo) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/passkit/v1/devices/a1b2c3d4e5f60718293a4b5c6d7e8f90/registrations/"
                          f"pass.dev.passerelle.demo?passesUpdatedSince={2**63 - 1}")
    assert response.status_code == 204  # nothing newer than the largest tag


@pytest.mark.parametrize("after", [2**31, 2**63 - 1, 2**63, 10**30, -1])
def test_cursors_beyond_the_id_columns_are_400(client, services, demo, after) -> None:  # type: ignore[no-untyped-def]
    from app.api.core import encode_cursor

    headers = auth(make_key(services, demo["tenant_id"], "admin", "cursors"))
    cursor = encode_cursor(after)
    for path in ("/customers", "/programs", "/keys", "/audit", "/webhooks", "/device-logs",
                 "/programs/rewards/segment/customers"):
        response = client.get(f"/api/v1{path}?cursor={cursor}", headers=headers)
        assert is_problem(response, 400), (path, response.status_code)


def test_largest_cursor_is_an_empty_last_page(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    from app.api.core import encode_cursor

    headers = auth(make_key(services, demo["tenant_id"], "read", "cursors"))
    response = client.get(f"/api/v1/customers?cursor={encode_cursor(2**31 - 1)}",
                          headers=headers)
    assert response.status_code == 200
    assert response.get_json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("value", [str(2**31), str(2**63), "1" + "0" * 30, "-1", "0", "٣",
                                   "9" * 5000])
def test_dashboard_numeric_parameters_are_bounded(app, signed_in_everywhere, value) -> None:  # type: ignore[no-untyped-def]
    client, _ = signed_in_everywhere
    for response in (client.get(f"/admin/webhooks?before={value}"),
                     client.get(f"/admin/audit?before={value}"),
                     client.post("/admin/customers", data={"q": "a", "after_id": value}),
                     client.post("/admin/segments/export", data={"program": "rewards",
                                                                 "link_days": value})):
        assert response.status_code == 400, (response.request.path, response.status_code)


@pytest.mark.parametrize("points", ["1e400", "inf", "-inf", "nan", "1e16", "-1e16",
                                    "9" * 400])
def test_points_ranges_are_bounded(app, client, services, demo, signed_in_everywhere,
                                   points) -> None:  # type: ignore[no-untyped-def]
    """Points are attributes, bounded at ±10^15 (``imports.MAX_ATTRIBUTE_NUMBER``)."""
    admin, headers = signed_in_everywhere
    for name in ("points_min", "points_max"):
        api = client.get(f"/api/v1/programs/rewards/segment?{name}={points}", headers=headers)
        assert api.status_code in (400, 422) and is_problem(api, api.status_code)
        page = admin.get(f"/admin/segments?program=rewards&{name}={points}")
        assert page.status_code == 400
        count = admin.get(f"/admin/segments/count?program=rewards&{name}={points}")
        assert count.status_code == 400


@pytest.mark.parametrize("bound", ["created_to=9999-12-31", "installed_to=9999-12-31",
                                   "created_from=9999-12-31T23:59:59-01:00",
                                   "created_to=0001-01-01T00:00:00%2B01:00"])
def test_date_bounds_at_the_edge_of_the_calendar(client, services, demo, bound) -> None:  # type: ignore[no-untyped-def]
    """A bound that does not exist in UTC (a day after 9999-12-31) is a 422, not a 500."""
    headers = auth(make_key(services, demo["tenant_id"], "read", "dates"))
    response = client.get(f"/api/v1/programs/rewards/segment?{bound}", headers=headers)
    assert is_problem(response, 422), response.status_code

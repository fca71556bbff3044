"""Request values are taken as their own type or refused, never converted; and no URL
names two things (a literal path segment that a variable segment would also take).

The rules are walked over every request model the API declares and every rule of
the URL map, so a field or route added later is held to them too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect

from app.api import schemas
from app.api.core import spec
from app.infra.models import Customer, ImportJob
from tests.api_helpers import auth, is_problem, make_key

API = "/api/v1"
#: JSON values of every type; a field takes those of its declared types only.
JSON_VALUES: list[Any] = [0, 1, 1.5, True, False, "1", "true", "2026-01-01", "86400", [], {}]
#: Query-string spellings a lax parser would take and convert.
LAX_QUERY = {"integer": ["5_0", " 5", "+5", "5.0", "1e1", "٥"],
             "number": ["1_0", "nan", "inf", " 1", "0x10", "false"],
             "boolean": ["yes", "1", "on", "True", "t"]}


def _request_models(app, kind: str) -> list[type[BaseModel]]:  # type: ignore[no-untyped-def]
    models = set()
    for endpoint, view in app.view_functions.items():
        metadata = spec.get_function_metadata(view) if endpoint.startswith("api.") else None
        name = getattr(metadata, kind, None) if metadata is not None else None
        if name is not None:  # spectree keeps the model's name (app.api.core's naming)
            models.add(getattr(schemas, name))
    return sorted(models, key=lambda m: m.__name__)


def _json_types(schema: dict[str, Any], definitions: dict[str, Any]) -> set[str]:
    if "$ref" in schema:
        return _json_types(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
    if "anyOf" in schema:
        return set().union(*(_json_types(s, definitions) for s in schema["anyOf"]))
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        return {_type_of(v) for v in values}
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else set(kind or ())
    return types | ({"integer"} if "number" in types else set())


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}[type(value)]


def _errors_at(model: type[BaseModel], data: dict[str, Any], name: str) -> bool:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return any(error["loc"] and error["loc"][0] == name for error in exc.errors())
    return False


def test_every_json_body_field_refuses_other_json_types(app) -> None:  # type: ignore[no-untyped-def]
    """``{"birthday": 0}`` was 1970-01-01, ``{"points_min": false}`` a number."""
    models = _request_models(app, "json")
    assert len(models) >= 12
    converted = []
    for model in models:
        schema = model.model_json_schema()
        definitions = schema.get("$defs", {})
        for name, field in model.model_fields.items():
            key = field.alias or name
            allowed = _json_types(schema["properties"][key], definitions)
            for value in JSON_VALUES:
                if _type_of(value) not in allowed and not _errors_at(model, {key: value}, key):
                    converted.append(f"{model.__name__}.{key} took {value!r}")
            text_format = schema["properties"][key]
            formats = {s.get("format") for s in text_format.get("anyOf", [text_format])}
            if formats & {"date", "date-time"} and not _errors_at(model, {key: "86400"}, key):
                converted.append(f"{model.__name__}.{key} took '86400' as a date")
    assert not converted, "\n".join(converted)


def test_every_query_parameter_has_one_spelling(app) -> None:  # type: ignore[no-untyped-def]
    models = _request_models(app, "query")
    assert len(models) >= 6
    converted = []
    for model in models:
        schema = model.model_json_schema()
        for name, field in model.model_fields.items():
            key = field.alias or name
            kinds = _json_types(schema["properties"][key], schema.get("$defs", {}))
            for kind in kinds - ({"integer"} if "number" in kinds else set()):
                for text in LAX_QUERY.get(kind, []):
                    if not _errors_at(model, {key: text}, key):
                        converted.append(f"{model.__name__}.{key} took {text!r}")
    assert not converted, "\n".join(converted)


@pytest.fixture()
def write(services, demo) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return auth(make_key(services, demo["tenant_id"], "write", "strict"))


@pytest.mark.parametrize("birthday", [0, 86400, "86400", True, 19700101, "1970-01-01T00:00:00"])
def test_a_birthday_is_a_date_or_refused(client, services, write, birthday) -> None:  # type: ignore[no-untyped-def]
    response = client.put(f"{API}/customers/STRICT-1", json={"birthday": birthday},
                          headers=write)
    assert is_problem(response, 422), response.get_json()
    assert response.get_json()["errors"][0]["loc"] == "birthday"
    with services.db.session() as session:
        assert session.scalar(select(Customer).where(Customer.external_id == "STRICT-1")) is None
    ok = client.put(f"{API}/customers/STRICT-1", json={"birthday": "1990-04-01"}, headers=write)
    assert ok.status_code == 201 and ok.get_json()["birthday"] == "1990-04-01"


@pytest.mark.parametrize("body", [{"points_min": False}, {"points_max": True},
                                  {"points_min": "10"}, {"include_without_consent": "yes"},
                                  {"include_without_consent": 1}, {"limit": 5.0},
                                  {"link_expires_at": 1767225600}])
def test_segment_export_values_are_strict(client, write, body) -> None:  # type: ignore[no-untyped-def]
    response = client.post(f"{API}/programs/rewards/segment/export", json=body, headers=write)
    assert is_problem(response, 422), response.status_code


def test_points_zero_is_a_filter(client, write) -> None:  # type: ignore[no-untyped-def]
    """0 == False: a zero bound used to be dropped as if absent."""
    for name in ("points_min", "points_max"):
        answer = client.get(f"{API}/programs/rewards/segment?{name}=0", headers=write)
        assert answer.status_code == 200
        assert answer.get_json()["segment"][name] == 0
    everyone = client.get(f"{API}/programs/rewards/segment?include_without_consent=true",
                          headers=write).get_json()["count"]
    none_above = client.get(f"{API}/programs/rewards/segment?include_without_consent=true"
                            "&points_max=0", headers=write).get_json()["count"]
    assert none_above < everyone  # demo customers all have points above 0


@pytest.mark.parametrize("body", [b"null", b"[]", b"1", b'"C-1"', b"true",
                                  b'{"external_id": "ND-1"}\n[{"external_id": "ND-2"}]',
                                  b'{"external_id": "ND-1"}\n{broken', b"\xff\xfe{}"])
def test_ndjson_lines_must_be_objects(client, services, write, body) -> None:  # type: ignore[no-untyped-def]
    response = client.post(f"{API}/customer-imports", data=body,
                           content_type="application/x-ndjson", headers=write)
    assert is_problem(response, 422), response.status_code
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(ImportJob)) == 0


# -- no URL names two things -------------------------------------------------------------

def _sample_path(rule) -> str:  # type: ignore[no-untyped-def]
    """A path the rule matches: each argument written as a value its converter takes."""
    import re

    from app.web.converters import RowIdConverter

    def value(match: re.Match[str]) -> str:
        converter = rule._converters[match.group(1)]
        return "1" if isinstance(converter, RowIdConverter) else "x"

    return re.sub(r"<(?:[^<>]*:)?([A-Za-z_][A-Za-z0-9_]*)>", value, rule.rule)


def overlapping_rules(app) -> list[str]:  # type: ignore[no-untyped-def]
    """Rules whose paths another rule (of any method) would also take: remove the rule,
    and its path would still lead somewhere (e.g. /customers/imports to a customer
    named "imports")."""
    rules = list(app.url_map.iter_rules())
    found = []
    for rule in rules:
        others = Map([r.empty() for r in rules if r.rule != rule.rule],
                     converters=app.url_map.converters, strict_slashes=app.url_map.strict_slashes)
        adapter = others.bind("localhost")
        path = _sample_path(rule)
        try:
            other, _ = adapter.match(path, method="OPTIONS", return_rule=True)
        except (NotFound, RequestRedirect):
            continue
        except MethodNotAllowed:
            other = None
        found.append(f"{rule.rule} is also {other.rule if other else 'another rule'} ({path})")
    return found


def test_no_literal_segment_is_also_a_variable_segment(app) -> None:  # type: ignore[no-untyped-def]
    assert len(list(app.url_map.iter_rules())) > 50
    assert not overlapping_rules(app)


def test_reserved_words_are_no_customers(client, services, write) -> None:  # type: ignore[no-untyped-def]
    """PUT /customers/imports made a customer named "imports"; the import collection
    now lives at /customer-imports, so /customers/{anything} is a customer."""
    created = client.put(f"{API}/customers/imports", json={"first_name": "Im"}, headers=write)
    assert created.status_code == 201 and created.get_json()["external_id"] == "imports"
    assert client.get(f"{API}/customers/imports", headers=write).get_json()["first_name"] == "Im"
    assert client.post(f"{API}/customers/imports", data=b"external_id\nX\n",
                       content_type="text/csv", headers=write).status_code == 405
    job = client.post(f"{API}/customer-imports", data=json.dumps(
        {"external_id": "ND-9"}).encode(), content_type="application/x-ndjson", headers=write)
    assert job.status_code == 202 and job.headers["Location"].startswith(f"{API}/customer-imports/")


def test_times_that_do_not_exist_in_utc_are_refused(client, write) -> None:  # type: ignore[no-untyped-def]
    response = client.post(f"{API}/programs/rewards/links",
                           json={"purpose": "enroll", "expires_at": "9999-12-31T23:30:00-01:00"},
                           headers=write)
    assert is_problem(response, 422), response.status_code

"""Property-based testing of the whole API against its own OpenAPI document.

schemathesis generates requests for every operation from the document the app
serves, sends them in-process (WSGI) with a valid write key, and checks that no
answer is a 5xx, that every status code is documented, and that every body
matches its documented schema. Bounded and deterministic so CI stays fast.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from app.admin import apikeys
from app.infra.db import WEBHOOK_DISPATCH_KEY
from app.infra.models import (
    ApiKey,
    Card,
    Customer,
    ImportJob,
    WebhookDelivery,
    WebhookSubscription,
)
from tests.api_helpers import auth, make_key


@schemathesis.serializer("text/csv", "application/x-ndjson")
def _text_file(_ctx, value):  # type: ignore[no-untyped-def]
    """File bodies of the import operation: schemathesis generates their text."""
    if value is None:
        return None
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


@pytest.fixture()
def api_schema(app, services, demo):  # type: ignore[no-untyped-def]
    services.jobs.huey.immediate = True  # imports run in-process, so their failures show
    # ...but webhook deliveries to fuzzed URLs must not leave the machine: they stay queued.
    services.db.dispatchers[WEBHOOK_DISPATCH_KEY] = None
    app.config["PASSERELLE_API_RATE_LIMIT"] = "100000 per minute"
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)


CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
#: Bounded and deterministic: same examples every run, a couple of minutes at most.
SETTINGS = settings(max_examples=12, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.generate])


def _known_ids(services, demo) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Real ids of the demo tenant, so generated requests also reach existing rows."""
    with services.db.session() as session:
        serial = session.scalar(select(Card.serial_number).join(Card.customer).where(
            Customer.external_id == "C-1002"))
        job = ImportJob(tenant_id=demo["tenant_id"], format="csv", source_path="/nonexistent",
                        status="done", errors=[{"line": 2, "message": "bad email"}])
        subscription = WebhookSubscription(tenant_id=demo["tenant_id"], url="https://h.example/",
                                           event_types=["card.installed"])
        session.add_all([job, subscription])
        session.flush()
        delivery = WebhookDelivery(tenant_id=demo["tenant_id"], subscription_id=subscription.id,
                                   event_id="evt-1", event_type="card.installed", payload={})
        session.add(delivery)
        session.commit()
        job_id, subscription_id, delivery_id = job.id, subscription.id, delivery.id
    spare = make_key(services, demo["tenant_id"], "read", "revoked-by-the-fuzzer")
    with services.db.session() as session:
        spare_id = session.scalar(select(ApiKey.id).where(
            ApiKey.prefix == apikeys.prefix_of(spare)))
    return {"slug": "rewards", "external_id": "C-1002", "serial": serial, "job_id": job_id,
            "key_id": spare_id, "subscription_id": subscription_id, "delivery_id": delivery_id}


def _runner(operation, mode, fixed, headers, seen):  # type: ignore[no-untyped-def]
    """One hypothesis test for one operation, generation mode and choice of ids."""

    @SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    def run(case):  # type: ignore[no-untyped-def]
        seen.add(case.call_and_validate(headers=headers, checks=CHECKS).status_code)

    return run


def test_api_conforms_to_its_openapi_document(api_schema, services, demo):  # type: ignore[no-untyped-def]
    """Every operation, with generated and with real ids, valid and invalid requests alike.

    schemathesis' pytest plugin does not support pytest 9 yet, so its operations are
    driven here with hypothesis directly. Write operations use a write key (the brief
    of the fuzz run), admin ones an admin key.
    """
    tenant = demo["tenant_id"]
    headers = {"write": auth(make_key(services, tenant, "write", "schemathesis")),
               "admin": auth(make_key(services, tenant, "admin", "schemathesis-admin"))}
    known = _known_ids(services, demo)
    failures: list[str] = []
    statuses: dict[str, set[int]] = defaultdict(set)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    # Numbers are generated inside and outside the bounds the document states (the id
    # columns' range for path ids): every integer parameter must state both.
    unbounded = [f"{op.label} {p.name}" for op in operations for p in op.path_parameters
                 if p.definition["schema"].get("type") == "integer"
                 and not {"minimum", "maximum"} <= set(p.definition["schema"])]
    assert not unbounded, unbounded
    # Deletions last (a generated key id may be the fuzzer's own key), keys very last.
    operations.sort(key=lambda op: (op.method.upper() == "DELETE", "/keys/" in op.path))
    for operation in operations:
        scope = operation.definition.raw.get("x-required-scope", "read")
        send = headers["admin" if scope == "admin" else "write"]
        names = [p.name for p in operation.path_parameters]
        variants: list[dict[str, object] | None] = [None]
        if names:
            variants.append({name: known[name] for name in names})
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for fixed in variants:

                run = _runner(operation, mode, fixed, send, statuses[operation.label])
                try:
                    run()
                except Unsatisfiable:
                    continue  # no invalid request exists (e.g. only free-text path parameters)
                except Exception as exc:  # noqa: BLE001 - report every operation, then fail
                    failures.append(f"{operation.label} ({mode.value}, ids {fixed}): {exc}")
    assert not failures, "\n\n".join(failures)
    # The run means something only if the keys worked and requests reached the rows
    # (negative cases also send bad credentials on purpose, hence 401s in the mix).
    succeeded = {label for label, codes in statuses.items() if any(c < 300 for c in codes)}
    assert len(succeeded) >= len(operations) - 3, sorted(set(statuses) - succeeded)

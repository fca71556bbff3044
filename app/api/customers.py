"""/customers: upsert by external id, attribute merges, reads, and bulk imports as jobs."""

from __future__ import annotations

from typing import Any

from flask import request
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.api.core import (
    ApiProblem,
    bp,
    db,
    not_found,
    page,
    query,
    record,
    reply,
    require,
    responses,
    services,
    spec,
    tenant_id,
)
from app.api.core import body as json_body
from app.api.schemas import (
    ConsentOut,
    CustomerCard,
    CustomerChanged,
    CustomerOut,
    CustomerPage,
    CustomerPatch,
    CustomerPut,
    CustomerWrite,
    ImportJobOut,
    ImportQuery,
    PageQuery,
    RowError,
)
from app.customers import customers, imports
from app.customers.customers import STANDARD_FIELDS, CustomerDataError, ImportFileError
from app.infra.models import Card, Customer, ImportJob
from app.updates import refresh as updates

TAG = "customers"
IMPORT_TYPES = {"text/csv": "csv", "application/csv": "csv", "application/x-ndjson": "ndjson",
                "application/ndjson": "ndjson", "application/jsonl": "ndjson"}


def customer_out(customer: Customer, cls: type[CustomerOut] = CustomerOut,
                 **extra: Any) -> CustomerOut:
    consents = {kind: ConsentOut(granted=c.granted, source=c.source, recorded_at=c.recorded_at)
                for kind, c in customer.current_consents().items()}
    cards = [CustomerCard(program=card.program.slug, serial_number=card.serial_number)
             for card in sorted(customer.cards, key=lambda c: c.id)]
    return cls(external_id=customer.external_id, email=customer.email,
               first_name=customer.first_name, last_name=customer.last_name,
               locale=customer.locale, phone=customer.phone, birthday=customer.birthday,
               attributes=dict(customer.attributes or {}), consents=consents, cards=cards,
               created_at=customer.created_at, updated_at=customer.updated_at, **extra)


def load_customer(external_id: str) -> Customer:
    try:
        customers.check_external_id(external_id)
    except CustomerDataError:
        raise not_found("customer") from None
    customer = customers.find_customer(db(), tenant_id(), external_id)
    if customer is None:
        raise not_found("customer")
    return customer


def _changes(data: CustomerWrite, attributes: dict[str, Any] | None,
             replace_attributes: bool) -> customers.CustomerChanges:
    """Standard fields named in the body (null clears); the upsert checks every value."""
    changes = customers.CustomerChanges(replace_attributes=replace_attributes)
    for name in STANDARD_FIELDS:
        if name not in data.model_fields_set:
            continue
        value = getattr(data, name)
        changes.fields[name] = value if value is None or name == "birthday" else str(value)
    changes.attributes = dict(attributes or {})
    changes.consents = dict(data.consents)
    return customers.check_changes(changes)  # a bad value is a 422 before an unknown id's 404


def _write(external_id: str, changes: customers.CustomerChanges, *, create: bool,
           action: str, fields: set[str]) -> Any:
    session = db()
    try:
        customers.check_external_id(external_id)
    except CustomerDataError as exc:
        if not create:
            raise not_found("customer") from None
        raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    try:
        result = customers.upsert_customer(session, tenant_id(), external_id, changes,
                                           source="api", create=create)
    except customers.CustomerConflict as exc:
        session.rollback()
        raise ApiProblem(409, "Conflict", str(exc)) from None
    except CustomerDataError as exc:
        session.rollback()
        raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    if result is None:
        raise not_found("customer")
    problems: list[str] = []
    if result.changed and not result.created:
        problems = updates.customers_changed(session, services(), [result.customer]).errors
    record(action, f"customer:{external_id}",
           {"created": result.created, "changed": result.changed, "fields": sorted(fields)})
    session.commit()
    out = customer_out(result.customer, CustomerChanged, card_problems=problems)
    return reply(out, 201 if result.created else 200)


@bp.get("/customers")
@require("read")
@spec.validate(query=PageQuery, resp=responses({200: CustomerPage}, 400, 422), tags=[TAG],
               operation_id="listCustomers")
def list_customers() -> Any:
    """List customers, oldest first."""
    params = query(PageQuery)
    statement = select(Customer).options(selectinload(Customer.consents),
                                         selectinload(Customer.cards).selectinload(Card.program))
    rows, cursor = page(db(), statement, Customer.id, params.limit, params.cursor)
    return reply(CustomerPage(items=[customer_out(c) for c in rows], next_cursor=cursor))


@bp.get("/customers/<external_id>")
@require("read")
@spec.validate(resp=responses({200: CustomerOut}, 404), tags=[TAG], operation_id="getCustomer")
def get_customer(external_id: str) -> Any:
    """One customer, with current consents and cards."""
    return reply(customer_out(load_customer(external_id)))


@bp.put("/customers/<external_id>")
@require("write")
@spec.validate(json=CustomerPut, resp=responses({200: CustomerChanged, 201: CustomerChanged},
                                                400, 403, 409, 413, 422),
               tags=[TAG], operation_id="upsertCustomer")
def put_customer(external_id: str) -> Any:
    """Create or update a customer by external id (201 when created).

    Standard fields: absent = unchanged, null = cleared. ``attributes``, when
    given, replaces all attributes. Changed cards are re-rendered and pushed.
    """
    data = json_body(CustomerPut)
    changes = _checked(lambda: _changes(data, data.attributes, data.attributes is not None))
    return _write(external_id, changes, create=True, action="customer.upsert",
                  fields=set(data.model_fields_set))


@bp.patch("/customers/<external_id>")
@require("write")
@spec.validate(json=CustomerPatch, resp=responses({200: CustomerChanged}, 400, 403, 404, 409,
                                                  413, 422),
               tags=[TAG], operation_id="patchCustomer")
def patch_customer(external_id: str) -> Any:
    """Change an existing customer: fields named are set, ``attributes`` are merged
    (null removes one). Changed cards are re-rendered and pushed."""
    data = json_body(CustomerPatch)
    changes = _checked(lambda: _changes(data, data.attributes, False))
    return _write(external_id, changes, create=False, action="customer.patch",
                  fields=set(data.model_fields_set))


def _checked(make: Any) -> customers.CustomerChanges:
    try:
        changes: customers.CustomerChanges = make()
    except CustomerDataError as exc:
        raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    return changes


def import_out(job: ImportJob) -> ImportJobOut:
    # Validated from a dict: the columns are plain strings, the model's fields Literals.
    return ImportJobOut.model_validate(dict(
        id=job.id, status=job.status, format=job.format, total_rows=job.total_rows,
        created=job.created, updated=job.updated, unchanged=job.unchanged,
        errors=[RowError(**e) for e in job.errors or []], created_at=job.created_at,
        finished_at=job.finished_at, attempts=job.attempts))


@bp.post("/customer-imports")
@require("write")
@spec.validate(query=ImportQuery, resp=responses({202: ImportJobOut}, 403, 413, 415, 422),
               tags=[TAG], operation_id="importCustomers")
def import_customers() -> Any:
    """Upload a CSV (the `passerelle customers import` format) or NDJSON file (one JSON
    object per line: external_id, standard fields, ``attributes``, ``consents``). The
    import runs in the background; poll the returned job."""
    fmt = query(ImportQuery).format or IMPORT_TYPES.get(request.mimetype or "")
    if fmt is None:
        raise ApiProblem(415, "Unsupported Media Type",
                         "send text/csv or application/x-ndjson (or ?format=csv|ndjson)")
    data = request.get_data(cache=False)
    if not data.strip():
        raise ApiProblem(422, "Unprocessable Content", "the file is empty")
    if fmt == "ndjson":
        try:
            imports.check_ndjson(data)
        except ImportFileError as exc:
            raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    session = db()
    svc = services()
    job = imports.create_job(session, svc, tenant_id(), fmt, data)
    record("customer.import", f"import:{job.id}", {"format": fmt, "bytes": len(data)})
    session.commit()  # queues the job (app/outbox.py: queue_after_commit)
    session.refresh(job)
    return reply(import_out(job), 202, {"Location": f"{request.path}/{job.id}"})


@bp.get("/customer-imports/<id:job_id>")
@require("read")
@spec.validate(resp=responses({200: ImportJobOut}, 404), tags=[TAG],
               operation_id="getCustomerImport")
def get_import(job_id: int) -> Any:
    """An import job: status, counts and per-row errors (line numbers of the file)."""
    job = db().scalar(select(ImportJob).where(ImportJob.id == job_id))
    if job is None:
        raise not_found("import job")
    return reply(import_out(job))

"""/programs: list, create, read, change, delete; card preview; the templates to choose from."""

from __future__ import annotations

from typing import Any

from flask import Response
from sqlalchemy import select

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
    PageQuery,
    PreviewQuery,
    ProgramChanged,
    ProgramCreate,
    ProgramDeleteQuery,
    ProgramOut,
    ProgramPage,
    ProgramPatch,
    TemplateList,
    TemplateOut,
)
from app.cards import cards
from app.customers.imports import find_customer
from app.infra.models import AppleIdentity, Program, Tenant
from app.tenants import tenants
from app.updates import operations
from app.wallet.template import TemplateError

TAG = "programs"


def program_out(program: Program) -> ProgramOut:
    return ProgramOut(slug=program.slug, name=program.name, template=program.template,
                      pass_type_identifier=program.pass_type_identifier,
                      team_identifier=program.team_identifier,
                      field_mapping=dict(program.field_mapping or {}),
                      options=dict(program.options or {}), created_at=program.created_at,
                      updated_at=program.updated_at)


def load_program(slug: str) -> Program:
    program = db().scalar(select(Program).where(Program.slug == slug))
    if program is None:
        raise not_found("program")
    return program


@bp.get("/programs")
@require("read")
@spec.validate(query=PageQuery, resp=responses({200: ProgramPage}, 400, 422), tags=[TAG],
               operation_id="listPrograms")
def list_programs() -> Any:
    """List the tenant's programs."""
    params = query(PageQuery)
    rows, cursor = page(db(), select(Program), Program.id, params.limit, params.cursor)
    return reply(ProgramPage(items=[program_out(p) for p in rows], next_cursor=cursor))


@bp.post("/programs")
@require("write")
@spec.validate(json=ProgramCreate, resp=responses({201: ProgramOut}, 400, 403, 409, 413, 422),
               tags=[TAG], operation_id="createProgram")
def create_program() -> Any:
    """Create a program: a card design (template) for an Apple pass type of the tenant."""
    data = json_body(ProgramCreate)
    session = db()
    tenant = session.get(Tenant, tenant_id())
    assert tenant is not None
    pass_type = data.pass_type_identifier
    if pass_type is None:
        known = session.scalars(select(AppleIdentity.pass_type_identifier).where(
            AppleIdentity.tenant_id == tenant.id)).all()
        if len(known) != 1:
            raise ApiProblem(422, "Unprocessable Content",
                             "pass_type_identifier is required: the tenant has "
                             f"{len(known)} Apple pass types")
        pass_type = known[0]
    if session.scalar(select(Program).where(Program.slug == data.slug)) is not None:
        raise ApiProblem(409, "Conflict", f"program {data.slug!r} already exists")
    try:
        program = tenants.create_program(session, services(), tenant, slug=data.slug,
                                         name=data.name, template=data.template,
                                         pass_type_identifier=pass_type)
    except (tenants.SetupError, TemplateError) as exc:
        raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    program.field_mapping = dict(data.field_mapping)
    program.options = data.options.model_dump(exclude_none=True)
    record("program.create", f"program:{program.slug}", {"template": program.template})
    session.commit()
    return reply(program_out(program), 201)


@bp.get("/programs/<slug>")
@require("read")
@spec.validate(resp=responses({200: ProgramOut}, 404), tags=[TAG], operation_id="getProgram")
def get_program(slug: str) -> Any:
    """One program."""
    return reply(program_out(load_program(slug)))


@bp.patch("/programs/<slug>")
@require("write")
@spec.validate(json=ProgramPatch, resp=responses({200: ProgramChanged}, 400, 403, 404, 413, 422),
               tags=[TAG], operation_id="updateProgram")
def update_program(slug: str) -> Any:
    """Change a program (name, template, field mapping, options); every card is re-rendered
    and those whose content changed are pushed."""
    data = json_body(ProgramPatch)
    session = db()
    program = load_program(slug)
    changes = data.model_dump(exclude_unset=True)
    if changes.get("name") is None:
        changes.pop("name", None)
    if changes.get("template") is None:
        changes.pop("template", None)
    if "field_mapping" in changes and changes["field_mapping"] is None:
        changes["field_mapping"] = {}
    if changes.get("options") is None:
        changes.pop("options", None)
    try:
        result = operations.update_program(session, services(), program, changes)
    except TemplateError as exc:
        session.rollback()
        raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    record("program.update", f"program:{slug}", {"fields": sorted(changes)})
    session.commit()
    out = program_out(result.program).model_dump()
    return reply(ProgramChanged(**out, cards_updated=result.cards_updated,
                                card_problems=result.problems))


@bp.delete("/programs/<slug>")
@require("write")
@spec.validate(query=ProgramDeleteQuery, resp=responses({204: None}, 403, 404, 409, 422),
               tags=[TAG], operation_id="deleteProgram")
def delete_program(slug: str) -> Any:
    """Delete a program. Refused (409) while it has cards, unless cascade=true."""
    session = db()
    program = load_program(slug)
    try:
        deleted = operations.delete_program(session, program,
                                            cascade=query(ProgramDeleteQuery).cascade)
    except operations.ProgramInUse as exc:
        raise ApiProblem(409, "Conflict", str(exc)) from None
    record("program.delete", f"program:{slug}", {"cards_deleted": deleted})
    session.commit()
    return Response(status=204)


@bp.get("/programs/<slug>/preview.png")
@require("read")
@spec.validate(query=PreviewQuery, resp=responses({200: None}, 404, 422), tags=[TAG],
               operation_id="previewProgram")
def preview_program(slug: str) -> Any:
    """A PNG of the card front, with a customer's data or the template's sample values."""
    session = db()
    program = load_program(slug)
    external_id = query(PreviewQuery).customer
    customer = None
    if external_id:
        customer = find_customer(session, external_id)
        if customer is None:
            raise not_found("customer")
    try:
        png = cards.preview_png(services(), program, customer)
    except TemplateError as exc:
        raise ApiProblem(422, "Unprocessable Content", str(exc)) from None
    return Response(png, mimetype="image/png", headers={"Cache-Control": "no-store"})


@bp.get("/templates")
@require("read")
@spec.validate(resp=responses({200: TemplateList}), tags=[TAG], operation_id="listTemplates")
def list_templates() -> Any:
    """The card templates a program can use."""
    library = services().templates
    items = []
    for name in library.names():
        try:
            template = library.get(name)
        except TemplateError:
            continue  # a broken template is not a choice (`passerelle` reports it elsewhere)
        items.append(TemplateOut(name=name, title=template.title, style=template.style,
                                 variables=sorted(template.variables)))
    return reply(TemplateList(items=items))

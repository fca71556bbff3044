"""Apple's PassKit web service endpoints under ``<public_url>/passkit/v1``.

Status codes follow Apple's reference: register 201/200/401, serials 200/204,
unregister 200/401, latest pass 200/304/401 with Last-Modified, log 200.
Malformed input is a 4xx with a problem body, never a 500.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue

from app.updates import apple_service as passkit
from app.web import services
from app.web.errors import problem
from app.web.limits import DEVICE_LOG_LIMIT, limiter

bp = Blueprint("passkit", __name__, url_prefix="/passkit/v1")

PKPASS_MIMETYPE = "application/vnd.apple.pkpass"
MAX_BODY = 64 * 1024


def _json_body() -> object:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise passkit.BadRequest("body too large")
    raw = request.get_data(cache=False)
    if len(raw) > MAX_BODY:
        raise passkit.BadRequest("body too large")
    try:
        return json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise passkit.BadRequest("body is not JSON") from None


@bp.errorhandler(passkit.BadRequest)
def _bad_request(exc: passkit.BadRequest) -> Response:
    return problem(400, "Bad Request", str(exc))


@bp.errorhandler(passkit.NotAuthorized)
def _not_authorized(_exc: passkit.NotAuthorized) -> Response:
    return problem(401, "Unauthorized", "unknown pass or wrong authentication token")


@bp.post("/devices/<device>/registrations/<pass_type>/<serial>")
def register(device: str, pass_type: str, serial: str) -> ResponseReturnValue:
    passkit.check_identifiers(device, pass_type, serial)
    with services().db.transaction() as session:  # the request owns the transaction
        card = passkit.authenticate(session, pass_type, serial,
                                    request.headers.get("Authorization"))
        push_token = passkit.parse_push_token(_json_body())
        created = passkit.register(session, card, device, push_token)
    return Response(status=201 if created else 200)


@bp.delete("/devices/<device>/registrations/<pass_type>/<serial>")
def unregister(device: str, pass_type: str, serial: str) -> ResponseReturnValue:
    passkit.check_identifiers(device, pass_type, serial)
    with services().db.transaction() as session:
        card = passkit.authenticate(session, pass_type, serial,
                                    request.headers.get("Authorization"))
        passkit.unregister(session, card, device)
    return Response(status=200)


@bp.get("/devices/<device>/registrations/<pass_type>")
def serials(device: str, pass_type: str) -> ResponseReturnValue:
    passkit.check_identifiers(device, pass_type)
    # A plain connection, no ORM session: devices ask this in storms after a push.
    with services().db.engine.connect() as connection:
        updated = passkit.serials_since(connection, device, pass_type,
                                        request.args.get("passesUpdatedSince"))
    if updated is None:
        response = Response(status=204)
    else:
        response = jsonify(serialNumbers=updated.serial_numbers, lastUpdated=updated.last_updated)
    response.headers["Cache-Control"] = "no-store"  # a cached answer would hide updates
    return response


@bp.route("/passes/<pass_type>/<serial>", methods=["GET", "HEAD"])
def latest_pass(pass_type: str, serial: str) -> ResponseReturnValue:
    passkit.check_identifiers(pass_type=pass_type, serial=serial)
    svc = services()
    header = request.headers.get("Authorization")
    tags = request.if_none_match
    matching = (tags.as_set(include_weak=True) | ({"*"} if tags.star_tag else set())
                if tags else None)
    # Signed once per version: most fetches are one query and no signature.
    latest = passkit.signed_latest_pass(svc, pass_type, serial, header,
                                        request.if_modified_since, matching)
    if latest is None:
        with svc.db.transaction() as session:
            card = passkit.authenticate(session, pass_type, serial, header)
            latest = passkit.latest_pass(session, svc, card, request.if_modified_since,
                                         matching)
    if latest.data is None:
        response = Response(status=304)
    else:
        response = Response(latest.data, mimetype=PKPASS_MIMETYPE)
    response.last_modified = latest.last_modified  # never later than now (see passkit.py)
    response.set_etag(latest.etag, weak=True)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.post("/log")
@limiter.limit(DEVICE_LOG_LIMIT)
def log() -> ResponseReturnValue:
    messages = passkit.parse_logs(_json_body())
    with services().db.transaction() as session:
        passkit.store_logs(session, messages)
    return Response(status=200)

"""A CRM stand-in: the HTTP JSON contract of docs/crm.md, served on 127.0.0.1.

A real threaded HTTP/1.1 server on a random port, so the connector runs its
whole stack (requests, connection pool, timeouts) against it:

    with CrmStandin(auth_value="Bearer t0ken") as crm:
        crm.add({"id": "C-1", "contact": {"email": "a@example.com"}})
        crm.records["C-1"]             # the stored JSON
        crm.accepted("PATCH")          # requests answered 2xx: method, path, query, body
        crm.down("503")                # every request answered 503
        crm.down("closed")             # listener closed: connections refused
        crm.up()                       # back, on the same port, with the same records
        crm.fail_next(422)             # the next request answered 422

The contract: ``GET /<resource>/<id>`` 200 record / 404; ``GET /<resource>?email=``
200 list of records whose email (at ``email_path``) matches; ``POST /<resource>``
201 with the stored record and a Location (409 if the id exists; the id is
assigned as ``CRM-<n>`` when ``assign_ids``); ``PATCH /<resource>/<id>`` JSON
merge patch (RFC 7396) -> 200 record / 404. Every request must carry
``auth_header: auth_value`` (else 401).
"""

from __future__ import annotations

import copy
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    status: int = 0


def _get(document: Any, path: str) -> Any:
    node = document
    for segment in path.split("."):
        if isinstance(node, dict):
            node = node.get(segment)
        elif isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
            node = node[int(segment)]
        else:
            return None
    return node


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class CrmStandin:
    auth_header: str | None = "Authorization"
    auth_value: str = "Bearer crm-standin-token"
    resource: str = "customers"
    id_path: str = "id"
    email_path: str = "contact.email"
    assign_ids: bool = False
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[Recorded] = field(default_factory=list)  # every request, with its status
    mode: str = "up"  # up | 503 | closed
    # Called in the handler thread before each request is answered: e.g. to look at the
    # caller's database while it waits for the answer.
    on_request: Callable[[Recorded], None] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    _failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    _connections: set[socket.socket] = field(default_factory=set)
    _port: int = 0
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _next_id: int = 0

    # lifecycle

    def start(self) -> CrmStandin:
        standin = self

        class Handler(_Handler):
            state = standin

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._httpd.daemon_threads = True
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="crm-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self.lock:  # kept-alive connections too: "closed" means nothing answers
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> CrmStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # scripting

    def down(self, mode: str = "503") -> None:
        """503: answer every request 503. closed: stop listening (connection refused)."""
        if mode not in ("503", "closed"):
            raise ValueError(mode)
        with self.lock:
            self.mode = mode
        if mode == "closed":
            self.stop()

    def up(self) -> None:
        with self.lock:
            self.mode = "up"
        if self._httpd is None:
            self.start()

    def fail_next(self, status: int, times: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``times`` requests ``status`` (with this ``Retry-After``)."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self.lock:
            self._failures.extend([(status, headers)] * times)

    def add(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.records[str(_get(record, self.id_path))] = copy.deepcopy(record)

    def accepted(self, method: str | None = None) -> list[Recorded]:
        """Requests answered 2xx (optionally of one method)."""
        with self.lock:
            return [r for r in self.log if 200 <= r.status < 300
                    and (method is None or r.method == method)]

    # the contract

    def handle(self, request: Recorded) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            if self.mode == "503":
                return 503, {"error": "maintenance"}, {}
            if self.auth_header and request.headers.get(self.auth_header.lower()) \
                    != self.auth_value:
                return 401, {"error": "unauthorized"}, {}
            if self._failures:
                status, headers = self._failures.pop(0)
                return status, {"error": "scripted failure"}, dict(headers)
            prefix = f"/{self.resource}"
            if request.path == prefix:
                if request.method == "GET":
                    return self._search(request)
                if request.method == "POST":
                    return self._create(request)
            elif request.path.startswith(prefix + "/"):
                external_id = unquote(request.path[len(prefix) + 1:])
                if request.method == "GET":
                    record = self.records.get(external_id)
                    return (200, record, {}) if record is not None else (404, None, {})
                if request.method == "PATCH":
                    return self._update(external_id, request)
            return 404, {"error": "no such endpoint"}, {}

    def _search(self, request: Recorded) -> tuple[int, Any, dict[str, str]]:
        email = (request.query.get("email") or [""])[0].lower()
        found = [r for r in self.records.values()
                 if str(_get(r, self.email_path) or "").lower() == email]
        return 200, found, {}

    def _create(self, request: Recorded) -> tuple[int, Any, dict[str, str]]:
        body = request.body
        if not isinstance(body, dict):
            return 400, {"error": "a JSON object is required"}, {}
        if self.assign_ids:
            self._next_id += 1
            body = merge_patch(body, {self.id_path: f"CRM-{self._next_id}"})
        external_id = _get(body, self.id_path)
        if not external_id:
            return 400, {"error": "id required"}, {}
        if str(external_id) in self.records:
            return 409, {"error": "exists"}, {}
        self.records[str(external_id)] = body
        location = f"{self.url}/{self.resource}/{quote(str(external_id), safe='')}"
        return 201, body, {"Location": location}

    def _update(self, external_id: str, request: Recorded) -> tuple[int, Any, dict[str, str]]:
        if external_id not in self.records:
            return 404, {"error": "unknown customer"}, {}
        if not isinstance(request.body, dict):
            return 400, {"error": "a JSON object is required"}, {}
        self.records[external_id] = merge_patch(self.records[external_id], request.body)
        return 200, self.records[external_id], {}


class _Handler(BaseHTTPRequestHandler):
    state: CrmStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # stdlib name
        pass

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.state._connections.add(self.connection)

    def finish(self) -> None:
        with self.state.lock:
            self.state._connections.discard(self.connection)
        super().finish()

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = "<not json>"
        request = Recorded(self.command, parts.path, parse_qs(parts.query),
                           {k.lower(): v for k, v in self.headers.items()}, body)
        if self.state.on_request is not None:
            self.state.on_request(request)
        status, answer, headers = self.state.handle(request)
        request.status = status
        with self.state.lock:
            self.state.log.append(request)
        data = json.dumps(answer).encode() if answer is not None else b""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _serve

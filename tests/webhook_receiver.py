"""A webhook receiver for tests: a real threaded HTTP server on 127.0.0.1.

It checks every request's ``Passerelle-Signature`` with its own code, written
from docs/webhooks.md and not from app/webhooks_out.py, so a signing bug in
the app cannot be mirrored by the check. It can be scripted to fail: each
entry of ``script`` answers one request (an HTTP status, or ``"timeout"`` to
hang longer than the client waits); when the script is used up it answers 200.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    answered: int | str  # status sent, or "timeout"

    @property
    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded


def signature_ok(secret: str, header: str | None, body: bytes, tolerance: int = 300) -> bool:
    """Stripe-style check, as a receiver following the docs would write it."""
    if not header:
        return False
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.partition("=")
        fields.setdefault(name.strip(), []).append(value.strip())
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    message = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(digest, candidate) for candidate in fields.get("v1", []))


@dataclass
class WebhookReceiver:
    secret: str = ""
    hang_seconds: float = 2.0
    script: list[int | str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver._handle(self, body)

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        ok = signature_ok(self.secret, handler.headers.get("Passerelle-Signature"), body)
        with self._lock:
            answer: int | str = self.script.pop(0) if self.script else 200
            if not ok:
                answer = 401
            self.requests.append(Request(handler.path, dict(handler.headers.items()), body, ok,
                                         answer))
        if answer == "timeout":
            time.sleep(self.hang_seconds)  # the client has given up by now
            return
        try:
            handler.send_response(int(answer))
            handler.send_header("Content-Length", "2")
            handler.end_headers()
            handler.wfile.write(b"ok")
        except OSError:
            pass

    def accepted(self) -> list[Request]:
        """Requests answered 2xx: what the receiver's application actually processed."""
        with self._lock:
            return [r for r in self.requests if isinstance(r.answered, int)
                    and 200 <= r.answered < 300]

    def wait_for(self, count: int, seconds: float = 20.0) -> list[Request]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.requests)} webhook requests, expected {count}")

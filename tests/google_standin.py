"""A Google Wallet stand-in: OAuth token endpoint + walletobjects v1 REST, on 127.0.0.1.

A real threaded HTTP/1.1 server (``http.server.ThreadingHTTPServer``) in a background
thread, on a random port, so clients run their whole stack (google-auth, requests,
connection reuse, retries) against it:

    with GoogleStandin() as server:
        info, key = server.new_service_account()          # registered, token_uri -> server
        client = GoogleWalletClient(info, server.url, backoff=0.01)
        client.insert("loyaltyClass", {...})
        server.objects["loyaltyClass"]["3388000000012345678.gold"]
        server.requests          # accepted API calls: method, path, query, body, status
        server.fail_next("/walletobjects/v1/loyaltyObject", 429, times=2)

What it checks, like Google does:

- ``POST /token`` (JWT-bearer grant): the assertion is verified RS256 with the public key
  of the registered service account named by ``iss`` (and ``kid`` = its private_key_id),
  ``aud`` must be Google's token endpoint (or the stand-in's), ``scope`` must include the
  Wallet scope, ``exp``/``iat`` current and at most one hour apart. Answers a random
  bearer token (``token_lifetime`` seconds). Every other endpoint but ``/keys`` needs a live token (else 401).
- Bodies are validated against the walletobjects v1 discovery document shipped in the
  google-api-python-client wheel: ``$ref`` schemas resolved recursively, unknown fields,
  JSON types (int64/uint64 fields: digit strings or integers; int32 ranges; byte fields
  base64), enum values spelled exactly as the document lists them (the deprecated
  lowercase aliases are accepted because the document lists them). Plus rules the
  document states in prose: "Required." top-level fields on insert/update, image
  ``sourceUri`` xor ``privateImageId``, URIs with a scheme, ``#rgb``/``#rrggbb`` colours,
  a loyalty balance with exactly one form, text-module ids without dots. A refused body
  gets 400 with a Google-shaped error naming the JSON path (``barcode.type``,
  ``textModulesData[0].header``).
- Ids are ``<issuerId>.<suffix>`` with the suffix in ``[A-Za-z0-9._-]`` (else 400) and an
  issuer in ``issuer_ids`` (else 403). An object's class must exist (404) and not be a
  draft (400). Duplicate insert: 409. Unknown id: 404.
- Classes: ``reviewStatus`` may be sent as DRAFT or UNDER_REVIEW only (APPROVED/REJECTED:
  400); UNDER_REVIEW is stored as APPROVED, the way the platform approves at once; a
  class cannot go back to DRAFT.
- PATCH replaces the top-level fields it names (arrays replaced whole; ``null`` clears);
  PUT replaces everything; ``notifyPreference`` is ephemeral (not stored).
- ``addMessage`` with ``TEXT_AND_NOTIFY``: Google's own count of notifying messages per
  pass, :attr:`GoogleStandin.notify_limit` (3) per :attr:`GoogleStandin.notify_window`
  (24 h), kept in :attr:`GoogleStandin.notified` whatever the client believes. Over it,
  the answer is what Google answers (seen in edutap-eu/edutap.wallet_google#3; Google's
  docs call it a QuotaExceededException): 403, ``errors[0].reason`` ``quotaExceeded``,
  domain ``walletobjects``, "Quota exceeded for issuer <id> when adding TEXT_AND_NOTIFY
  message to ...", without a ``status`` word. Nothing is added then; TEXT messages are
  not counted.
- GET of an object adds ``classReference`` (a copy of its class), as Google does, for the
  kinds whose schema has that field (LoyaltyObject has it; GenericObject does not).
- Every collection is checked against its own schema, on every write (insert, PATCH, PUT,
  addMessage): a GenericClass body is a GenericClass, whatever kind was used before.

Also ``GET /keys`` serves :attr:`GoogleStandin.root_keys_json` with the
``Cache-Control`` header :attr:`GoogleStandin.keys_cache_control` (callback root keys).

Endpoints: insert ``POST /walletobjects/v1/<collection>``, list ``GET`` same (classes by
``issuerId``, objects by ``classId``; ``maxResults``, ``token``), get/patch/update
``GET/PATCH/PUT .../<id>``, ``POST .../<id>/addMessage``, ``GET /walletobjects/v1/issuer``
and ``.../issuer/<id>``. Collections: every ``*Class``/``*Object`` of the discovery
document (loyaltyClass, loyaltyObject, genericClass, genericObject, offerClass, ...).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

WALLET_SCOPE = "https://www.googleapis.com/auth/wallet_object.issuer"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
DEFAULT_ISSUER_ID = "3388000000012345678"
DEFAULT_CLIENT_EMAIL = "passerelle@test-project.iam.gserviceaccount.com"
API_PREFIX = "/walletobjects/v1/"

_ID = re.compile(r"^([0-9]+)\.([A-Za-z0-9._-]+)$")
_INT = re.compile(r"^-?[0-9]+$")
_UINT = re.compile(r"^[0-9]+$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEX_COLOR = re.compile(r"^#(?:[0-9A-Fa-f]{3}|[0-9A-Fa-f]{6})$")
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 409: "ALREADY_EXISTS",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 502: "BAD_GATEWAY",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_DEFAULT_MESSAGES = {
    403: "The caller does not have permission",
    429: "Quota exceeded for quota metric 'Requests' of service walletobjects.googleapis.com.",
    500: "Internal error encountered.",
    503: "The service is currently unavailable.",
}
_ERROR_REASONS = {400: "badRequest", 401: "authError", 403: "forbidden", 404: "notFound",
                  409: "duplicate", 429: "rateLimitExceeded", 500: "backendError",
                  503: "backendError"}


# -- the discovery document and body validation -------------------------------------------

@cache
def discovery() -> dict:
    """The walletobjects v1 discovery document bundled with google-api-python-client."""
    from googleapiclient.discovery_cache import get_static_doc

    text = get_static_doc("walletobjects", "v1")
    if not text:
        raise RuntimeError("google-api-python-client lacks the walletobjects v1 document")
    return json.loads(text)


@dataclass(frozen=True)
class Collection:
    name: str             # REST collection: "loyaltyClass"
    schema: str           # discovery schema of its bodies: "LoyaltyClass"
    is_class: bool
    class_collection: str  # "loyaltyClass" for both loyaltyClass and loyaltyObject


@cache
def collections() -> dict[str, Collection]:
    """Every ``*Class``/``*Object`` collection of the discovery document."""
    found: dict[str, Collection] = {}
    for resource in discovery()["resources"].values():
        insert = resource.get("methods", {}).get("insert")
        if not insert:
            continue
        name = insert["path"].rsplit("/", 1)[-1]
        if name.endswith("Class") or name.endswith("Object"):
            is_class = name.endswith("Class")
            base = name[: -len("Class")] if is_class else name[: -len("Object")]
            found[name] = Collection(name, insert["request"]["$ref"], is_class, base + "Class")
    return found


@dataclass(frozen=True)
class Problem:
    path: str      # JSON path of the offending field: "barcode.type", "messages[0].header"
    message: str   # Google-style sentence naming the path

    def __str__(self) -> str:
        return self.message


def validate(schema_name: str, body: Any, *, require: bool = False) -> list[Problem]:
    """What Google would refuse in ``body`` as a ``schema_name``; empty when it is valid.

    ``require`` also demands the top-level fields whose description starts "Required."
    (inserts and full updates).
    """
    problems: list[Problem] = []
    if not isinstance(body, dict):
        return [Problem("", "Invalid JSON payload received. Expected an object.")]
    _check_object(schema_name, body, "", problems)
    if require:
        props = discovery()["schemas"][schema_name]["properties"]
        for name, spec in props.items():
            if spec.get("description", "").startswith("Required.") and body.get(name) in (
                    None, "", [], {}):
                problems.append(Problem(name, f"Missing required field '{name}' "
                                              f"({schema_name}.{name})."))
    return problems


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_object(schema_name: str, value: dict, path: str, problems: list[Problem]) -> None:
    schema = discovery()["schemas"][schema_name]
    props = schema.get("properties", {})
    for name, item in value.items():
        where = _join(path, name)
        spec = props.get(name)
        if spec is None:
            problems.append(Problem(where, f"Invalid JSON payload received. Unknown name "
                                           f"\"{name}\" at '{where}': Cannot find field."))
            continue
        _check_value(spec, item, where, problems)
    _check_prose_rules(schema_name, value, path, problems)


def _check_value(spec: dict, value: Any, path: str, problems: list[Problem]) -> None:
    if value is None:  # proto3 JSON: null means "not set"
        return
    if "$ref" in spec:
        if not isinstance(value, dict):
            problems.append(Problem(path, f"Invalid value at '{path}' ({spec['$ref']}), "
                                          f"{_show(value)}: expected an object."))
            return
        _check_object(spec["$ref"], value, path, problems)
        return
    kind = spec.get("type")
    fmt = spec.get("format")
    bad = False
    if kind == "array":
        if not isinstance(value, list):
            bad = True
        else:
            for i, element in enumerate(value):
                _check_value(spec.get("items", {}), element, f"{path}[{i}]", problems)
    elif kind == "object":
        bad = not isinstance(value, dict)
    elif kind == "boolean":
        bad = not isinstance(value, bool)
    elif kind == "number":
        bad = isinstance(value, bool) or not isinstance(value, int | float)
    elif kind == "integer":
        bad = isinstance(value, bool) or not isinstance(value, int)
        if not bad and fmt in _INT_RANGES:
            low, high = _INT_RANGES[fmt]
            bad = not low <= value <= high
    elif kind == "string":
        if fmt in ("int64", "uint64"):
            pattern = _UINT if fmt == "uint64" else _INT
            if isinstance(value, int) and not isinstance(value, bool):
                bad = fmt == "uint64" and value < 0
            else:
                bad = not (isinstance(value, str) and pattern.match(value))
        elif not isinstance(value, str):
            bad = True
        elif fmt == "byte":
            bad = not _BASE64.match(value)
        elif "enum" in spec and value not in spec["enum"]:
            allowed = [v for v, dep in zip(spec["enum"], spec.get("enumDeprecated", []))
                       if not dep] or spec["enum"]
            problems.append(Problem(path, f"Invalid value at '{path}' (enum), {_show(value)}: "
                                          f"expected one of {', '.join(allowed)}."))
            return
    if bad:
        problems.append(Problem(path, f"Invalid value at '{path}' "
                                      f"({_type_name(kind, fmt)}), {_show(value)}"))


def _type_name(kind: str | None, fmt: str | None) -> str:
    return "TYPE_" + (fmt or {"number": "double", "boolean": "bool"}.get(kind or "", kind)
                      or "unknown").upper()


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_prose_rules(schema_name: str, value: dict, path: str,
                       problems: list[Problem]) -> None:
    """Rules the discovery document states in descriptions rather than in types."""
    def add(name: str, message: str) -> None:
        where = _join(path, name) if name else path
        problems.append(Problem(where, f"Invalid value at '{where or schema_name}': {message}"))

    if schema_name == "Image":
        has_uri = value.get("sourceUri") is not None
        has_private = value.get("privateImageId") is not None
        if has_uri == has_private:
            add("sourceUri", "set exactly one of sourceUri and privateImageId.")
    elif schema_name in ("ImageUri", "Uri"):
        uri = value.get("uri")
        if isinstance(uri, str) and not _SCHEME.match(uri):
            add("uri", f"{_show(uri)}: URIs must have a scheme.")
    elif schema_name == "LoyaltyPoints":
        if value.get("balance") is None:
            add("balance", "balance is a required field of loyaltyPoints.")
    elif schema_name == "LoyaltyPointsBalance":
        forms = [k for k in ("string", "int", "double", "money") if value.get(k) is not None]
        if len(forms) != 1:
            add("", f"set exactly one of string, int, double, money (got {forms or 'none'}).")
    elif schema_name == "TextModuleData":
        module_id = value.get("id")
        if isinstance(module_id, str) and "." in module_id:
            add("id", f"{_show(module_id)}: text module ids cannot include dots.")
    color = value.get("hexBackgroundColor")
    if isinstance(color, str) and not _HEX_COLOR.match(color):
        add("hexBackgroundColor", f"{_show(color)}: expected #rgb or #rrggbb.")


# -- service accounts ---------------------------------------------------------------------

def make_service_account(token_uri: str, client_email: str = DEFAULT_CLIENT_EMAIL
                         ) -> tuple[dict, RSAPrivateKey]:
    """A service-account key JSON (as Google Cloud console downloads it) and its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    project = client_email.split("@", 1)[-1].split(".", 1)[0]
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": client_email,
        "client_id": str(secrets.randbelow(10**21)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    return info, key


# -- the server ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Recorded:
    method: str
    path: str                   # without the query string, percent-decoded
    body: Any                   # parsed JSON (API), form fields (token), or None
    query: dict[str, str] = field(default_factory=dict)
    status: int = 200           # what the stand-in answered


@dataclass
class _Script:
    prefix: str
    status: int
    remaining: int
    retry_after: float | None
    message: str | None
    reason: str | None
    method: str | None


class _Reply(Exception):
    """Answer the current request with ``status`` and a JSON body."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def google_error(status: int, message: str, reason: str | None = None,
                 location: str | None = None, *, domain: str = "global",
                 status_name: bool = True) -> _Reply:
    detail: dict[str, Any] = {"message": message, "domain": domain,
                              "reason": reason or _ERROR_REASONS.get(status, "error")}
    if location:
        detail.update(location=location, locationType="other")
    error: dict[str, Any] = {"code": status, "message": message, "errors": [detail]}
    if status_name:
        error["status"] = _STATUS_NAMES.get(status, "UNKNOWN")
    return _Reply(status, {"error": error})


def notification_limit_error(issuer_id: str, resource_id: str, *, is_class: bool,
                             status: int = 403) -> _Reply:
    """Google's answer to a TEXT_AND_NOTIFY message over the pass's notification limit."""
    message = (f"Quota exceeded for issuer {issuer_id} when adding TEXT_AND_NOTIFY message "
               f"to {'class' if is_class else 'object'} {resource_id}.")
    return google_error(status, message, "quotaExceeded", domain="walletobjects",
                        status_name=False)


class GoogleStandin:
    """The stand-in server; use as a context manager (or start()/stop())."""

    def __init__(self, issuer_ids: set[str] | None = None, *, token_lifetime: int = 3600,
                 keys_cache_control: str = "public, max-age=86400") -> None:
        self.issuer_ids: set[str] = set(issuer_ids or {DEFAULT_ISSUER_ID})
        self.token_lifetime = token_lifetime
        self.root_keys_json: dict | None = None
        self.keys_cache_control = keys_cache_control
        self.objects: dict[str, dict[str, dict]] = {name: {} for name in collections()}
        self.requests: list[Recorded] = []       # passed auth and validation
        self.log: list[Recorded] = []            # every request, with the status answered
        self.token_requests: list[dict] = []     # verified claims of each token issued
        self.service_accounts: dict[str, dict] = {}
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (client email, expiry)
        self.lock = threading.RLock()
        # Google's own count of TEXT_AND_NOTIFY messages: resource id -> times accepted.
        self.notify_limit = 3
        self.notify_window = 24 * 3600.0
        self.notify_limit_status = 403  # what Google answers over the limit
        self.notified: dict[str, list[float]] = {}
        self._scripts: list[_Script] = []
        # Called in the handler thread before each request is answered (method, path):
        # e.g. to look at the caller's database while it waits for the answer.
        self.on_request: Callable[[str, str], None] | None = None
        self._public_keys: dict[str, Any] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> GoogleStandin:
        standin = self

        class Handler(_Handler):
            server_state = standin

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="google-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> GoogleStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("stand-in not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def keys_url(self) -> str:
        return self.url + "/keys"

    # scripting

    def add_service_account(self, info: dict) -> None:
        """Accept token requests signed with this service account's key."""
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        with self.lock:
            self.service_accounts[info["client_email"]] = info
            self._public_keys[info["client_email"]] = key.public_key()

    def new_service_account(self, client_email: str = DEFAULT_CLIENT_EMAIL
                            ) -> tuple[dict, RSAPrivateKey]:
        """make_service_account() pointed at this server, registered."""
        info, key = make_service_account(self.token_url, client_email)
        self.add_service_account(info)
        return info, key

    def fail_next(self, path_prefix: str, status: int, times: int = 1, *,
                  retry_after: float | None = None, message: str | None = None,
                  reason: str | None = None, method: str | None = None) -> None:
        """Answer the next ``times`` requests whose path starts with ``path_prefix``
        (and of ``method``, if given) with a Google-shaped ``status`` error, before any
        other check. ``reason`` sets ``errors[0].reason`` (e.g. "rateLimitExceeded")."""
        with self.lock:
            self._scripts.append(_Script(path_prefix, status, times, retry_after, message,
                                         reason, method.upper() if method else None))

    def expire_tokens(self) -> None:
        """Forget every access token issued (clients get 401 until they fetch a new one)."""
        with self.lock:
            self.tokens.clear()

    def api_requests(self, method: str | None = None, prefix: str = API_PREFIX
                     ) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)
                    and (method is None or r.method == method)]

    # request handling (called from handler threads)

    def _scripted(self, method: str, path: str) -> _Reply | None:
        with self.lock:
            for script in self._scripts:
                if (script.remaining > 0 and path.startswith(script.prefix)
                        and script.method in (None, method)):
                    script.remaining -= 1
                    reply = google_error(script.status, script.message
                                         or _DEFAULT_MESSAGES.get(script.status, "Scripted."),
                                         script.reason)
                    if script.retry_after is not None:
                        reply.headers["Retry-After"] = f"{script.retry_after:g}"
                    return reply
        return None

    def _issue_token(self, form: dict[str, str]) -> _Reply:
        def refuse(error: str, description: str) -> _Reply:
            return _Reply(400, {"error": error, "error_description": description})

        if form.get("grant_type") != JWT_BEARER:
            raise refuse("unsupported_grant_type", "Invalid grant_type: "
                         + str(form.get("grant_type")))
        assertion = form.get("assertion") or ""
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise refuse("invalid_grant", "Invalid JWT: malformed assertion.") from None
        email = unverified.get("iss")
        with self.lock:
            info = self.service_accounts.get(email)
            public_key = self._public_keys.get(email)
        if info is None:
            raise refuse("invalid_grant", "Invalid JWT Signature.")  # what Google says
        if header.get("alg") != "RS256":
            raise refuse("invalid_grant", "Invalid JWT: alg must be RS256.")
        if "kid" in header and header["kid"] != info.get("private_key_id"):
            raise refuse("invalid_grant", "Invalid JWT Signature.")
        try:
            # google-auth always addresses Google's endpoint, whatever token_uri says,
            # and Google accepts it; the stand-in's own URL is accepted too.
            claims = jwt.decode(assertion, public_key, algorithms=["RS256"],
                                audience=[GOOGLE_TOKEN_AUDIENCE, self.token_url],
                                issuer=email, leeway=5,
                                options={"require": ["iss", "aud", "exp", "iat", "scope"]})
        except jwt.InvalidSignatureError:
            raise refuse("invalid_grant", "Invalid JWT Signature.") from None
        except jwt.ExpiredSignatureError:
            raise refuse("invalid_grant", "Invalid JWT: Token must be a short-lived token "
                         "(60 minutes) and in a reasonable timeframe.") from None
        except jwt.InvalidAudienceError:
            raise refuse("invalid_grant", f"Invalid JWT: aud must be {GOOGLE_TOKEN_AUDIENCE}."
                         ) from None
        except jwt.PyJWTError as exc:
            raise refuse("invalid_grant", f"Invalid JWT: {exc}") from None
        if claims["exp"] - claims["iat"] > 3600:
            raise refuse("invalid_grant", "Invalid JWT: Token must be a short-lived token "
                         "(60 minutes) and in a reasonable timeframe.")
        if WALLET_SCOPE not in str(claims.get("scope", "")).split():
            raise refuse("invalid_scope", f"Scope {WALLET_SCOPE} is missing.")
        token = "ya29.standin-" + secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[token] = (email, time.time() + self.token_lifetime)
            self.token_requests.append(claims)
        return _Reply(200, {"access_token": token, "expires_in": self.token_lifetime,
                            "token_type": "Bearer"})

    def _authenticate(self, authorization: str | None) -> str:
        token = (authorization or "")[len("Bearer "):] if (
            authorization or "").startswith("Bearer ") else None
        with self.lock:
            entry = self.tokens.get(token) if token else None
        if entry is None or entry[1] < time.time():
            raise google_error(401, "Request had invalid authentication credentials. Expected "
                               "OAuth 2 access token, login cookie or other valid "
                               "authentication credential.", "authError")
        return entry[0]

    def _check_id(self, value: Any, what: str = "resource ID") -> str:
        match = _ID.match(value) if isinstance(value, str) else None
        if match is None:
            raise google_error(400, f"Invalid {what}: {value!r}. Ids are <issuerId>.<suffix> "
                               "with only alphanumerics, '.', '_' or '-' in the suffix.",
                               "invalidResource")
        self._check_issuer(match.group(1))
        return value

    def _check_issuer(self, issuer_id: str) -> None:
        if issuer_id not in self.issuer_ids:
            raise google_error(403, f"The caller does not have permission for issuer "
                               f"{issuer_id}.", "forbidden")

    def _validated(self, schema: str, body: Any, *, require: bool) -> dict:
        problems = validate(schema, body, require=require)
        if problems:
            first = problems[0]
            message = " ".join(p.message for p in problems[:5])
            raise google_error(400, message, "invalid", first.path)
        return body

    def api(self, method: str, path: str, query: dict[str, str], body: Any,
            state: dict | None = None) -> _Reply:
        state = state if state is not None else {}
        state["accepted"] = True  # from here on, 400/403 answers take it back
        parts = [unquote(p) for p in path[len(API_PREFIX):].split("/")]
        name = parts[0]
        if name == "issuer":
            return self._issuer(method, parts[1:])
        collection = collections().get(name)
        if collection is None or len(parts) > 3 or (len(parts) == 3 and
                                                     parts[2] != "addMessage"):
            raise google_error(404, f"Method not found: {method} {path}", "notFound")
        store = self.objects[name]
        if len(parts) == 1:
            if method == "POST":
                return self._insert(collection, store, body)
            if method == "GET":
                return self._list(collection, store, query)
        elif len(parts) == 2:
            resource_id = self._check_id(parts[1])
            if method == "GET":
                return _Reply(200, self._present(collection, self._find(store, resource_id)))
            if method == "PATCH":
                return self._update(collection, store, resource_id, body, replace=False)
            if method == "PUT":
                return self._update(collection, store, resource_id, body, replace=True)
        elif method == "POST":
            return self._add_message(collection, store, self._check_id(parts[1]), body)
        raise google_error(405, f"Method {method} not allowed on {path}", "methodNotAllowed")

    def _find(self, store: dict[str, dict], resource_id: str) -> dict:
        found = store.get(resource_id)
        if found is None:
            raise google_error(404, f"Resource not found: {resource_id}", "resourceNotFound")
        return found

    def _present(self, collection: Collection, stored: dict) -> dict:
        answer = copy.deepcopy(stored)
        props = discovery()["schemas"][collection.schema]["properties"]
        if not collection.is_class and "classReference" in props:
            parent = self.objects[collection.class_collection].get(stored.get("classId"))
            if parent is not None:
                answer["classReference"] = copy.deepcopy(parent)
        return answer

    def _check_class_rules(self, collection: Collection, body: dict,
                           current: dict | None) -> None:
        if collection.is_class:
            status = body.get("reviewStatus")
            if status is not None and status.upper().replace("_", "") not in (
                    "DRAFT", "UNDERREVIEW"):
                raise google_error(400, f"Invalid reviewStatus {status!r}: classes may only be "
                                   "set to DRAFT or UNDER_REVIEW (Google approves them).",
                                   "invalid", "reviewStatus")
            if (current is not None and status is not None and status.upper() == "DRAFT"
                    and current.get("reviewStatus") != "DRAFT"):
                raise google_error(400, "reviewStatus cannot change back to DRAFT.",
                                   "invalid", "reviewStatus")
            return
        class_id = body.get("classId")
        if class_id is None:
            return
        if current is not None and class_id != current.get("classId"):
            raise google_error(400, "classId of an existing object cannot change.",
                               "invalid", "classId")
        self._check_id(class_id, "class ID")
        parent = self.objects[collection.class_collection].get(class_id)
        if parent is None:
            raise google_error(404, f"Class not found: {class_id} (insert the "
                               f"{collection.class_collection} first).", "classNotFound",
                               "classId")
        if parent.get("reviewStatus") == "DRAFT":
            raise google_error(400, f"Class {class_id} is a DRAFT; draft classes cannot be "
                               "used to create objects.", "invalid", "classId")

    @staticmethod
    def _store_form(collection: Collection, body: dict) -> dict:
        stored = {k: copy.deepcopy(v) for k, v in body.items()
                  if v is not None and k != "notifyPreference"}
        if collection.is_class and str(stored.get("reviewStatus", "")).upper().replace(
                "_", "") == "UNDERREVIEW":
            stored["reviewStatus"] = "APPROVED"
        elif collection.is_class and stored.get("reviewStatus") == "draft":
            stored["reviewStatus"] = "DRAFT"
        return stored

    def _insert(self, collection: Collection, store: dict[str, dict], body: Any) -> _Reply:
        body = self._validated(collection.schema, body, require=True)
        resource_id = self._check_id(body["id"])
        with self.lock:
            if resource_id in store:
                kind = "Class" if collection.is_class else "Object"
                raise google_error(409, f"Resource already exists: Wallet Object {kind} "
                                   f"{resource_id} already exists.", "duplicate")
            self._check_class_rules(collection, body, None)
            store[resource_id] = self._store_form(collection, body)
            return _Reply(200, copy.deepcopy(store[resource_id]))

    def _update(self, collection: Collection, store: dict[str, dict], resource_id: str,
                body: Any, *, replace: bool) -> _Reply:
        body = self._validated(collection.schema, body, require=replace)
        if body.get("id") not in (None, resource_id):
            raise google_error(400, f"id {body['id']!r} in the body does not match the "
                               f"resource id {resource_id!r}.", "invalid", "id")
        with self.lock:
            current = self._find(store, resource_id)
            self._check_class_rules(collection, body, current)
            changes = self._store_form(collection, body)
            if replace:
                updated = changes
            else:
                updated = copy.deepcopy(current)
                for key, value in body.items():
                    if value is None:
                        updated.pop(key, None)
                    elif key in changes:
                        updated[key] = changes[key]
            updated["id"] = resource_id
            store[resource_id] = updated
            return _Reply(200, copy.deepcopy(updated))

    def _add_message(self, collection: Collection, store: dict[str, dict], resource_id: str,
                     body: Any) -> _Reply:
        body = self._validated("AddMessageRequest", body, require=False)
        message = body.get("message")
        if not message:
            raise google_error(400, "Missing required field 'message'.", "required", "message")
        with self.lock:
            current = self._find(store, resource_id)
            if str(message.get("messageType", "")).upper() == "TEXT_AND_NOTIFY":
                now = time.time()
                recent = [t for t in self.notified.get(resource_id, [])
                          if t > now - self.notify_window]
                if len(recent) >= self.notify_limit:
                    raise notification_limit_error(resource_id.split(".", 1)[0], resource_id,
                                                   is_class=collection.is_class,
                                                   status=self.notify_limit_status)
                self.notified[resource_id] = [*recent, now]
            current.setdefault("messages", []).append(copy.deepcopy(message))
            return _Reply(200, {"resource": copy.deepcopy(current)})

    def _list(self, collection: Collection, store: dict[str, dict],
              query: dict[str, str]) -> _Reply:
        if collection.is_class:
            issuer_id = query.get("issuerId")
            if not issuer_id or not _INT.match(issuer_id):
                raise google_error(400, "issuerId is required.", "required", "issuerId")
            self._check_issuer(issuer_id)
            prefix = issuer_id + "."
            with self.lock:
                found = [v for k, v in store.items() if k.startswith(prefix)]
        else:
            class_id = self._check_id(query.get("classId"), "class ID")
            with self.lock:
                found = [self._present(collection, v) for v in store.values()
                         if v.get("classId") == class_id]
        try:
            start = int(query.get("token") or 0)
            size = int(query.get("maxResults") or 0) or len(found) or 1
        except ValueError:
            raise google_error(400, "Invalid token or maxResults.", "invalid") from None
        page = found[start:start + size]
        pagination: dict[str, Any] = {"kind": "walletobjects#pagination",
                                      "resultsPerPage": len(page)}
        if start + size < len(found):
            pagination["nextPageToken"] = str(start + size)
        return _Reply(200, {"resources": copy.deepcopy(page), "pagination": pagination})

    def _issuer(self, method: str, parts: list[str]) -> _Reply:
        if method != "GET" or len(parts) > 1:
            raise google_error(405, "Only issuer.get and issuer.list are served here.",
                               "methodNotAllowed")
        if not parts:
            return _Reply(200, {"resources": [{"issuerId": i, "name": f"Issuer {i}"}
                                              for i in sorted(self.issuer_ids)]})
        if not _INT.match(parts[0]):
            raise google_error(400, f"Invalid issuer id: {parts[0]!r}", "invalid")
        self._check_issuer(parts[0])
        return _Reply(200, {"issuerId": parts[0], "name": f"Issuer {parts[0]}"})

    def handle(self, method: str, target: str, headers: Any, raw: bytes) -> _Reply:
        """Answer one request; record it in ``log`` and, when accepted, in ``requests``."""
        split = urlsplit(target)
        path = unquote(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        state = {"body": None, "accepted": False}
        try:
            reply = self._answer(method, split.path, query, headers, raw, state)
        except _Reply as refused:
            reply = refused
        entry = Recorded(method, path, state["body"], query, reply.status)
        with self.lock:
            self.log.append(entry)
            # Accepted: authenticated and valid; 404/409 are answers about stored data.
            if state["accepted"] and (reply.status < 300 or reply.status in (404, 409)):
                self.requests.append(entry)
        return reply

    def _answer(self, method: str, path: str, query: dict[str, str], headers: Any,
                raw: bytes, state: dict) -> _Reply:
        scripted = self._scripted(method, unquote(path))
        if scripted is not None:
            return scripted
        if path == "/token":
            if method != "POST":
                raise google_error(405, "POST only", "methodNotAllowed")
            form = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
            state["body"] = {"grant_type": form.get("grant_type")}  # the assertion stays out
            return self._issue_token(form)
        if path == "/keys":
            if method != "GET":
                raise google_error(405, "GET only", "methodNotAllowed")
            state["accepted"] = True
            if self.root_keys_json is None:
                raise google_error(404, "No root keys configured in the stand-in.")
            return _Reply(200, self.root_keys_json, {"Cache-Control": self.keys_cache_control})
        if not path.startswith(API_PREFIX):
            raise google_error(404, f"Not found: {path}", "notFound")
        self._authenticate(headers.get("Authorization"))
        if raw:
            try:
                state["body"] = json.loads(raw)
            except ValueError:
                raise google_error(400, "Invalid JSON payload received.", "parseError"
                                   ) from None
        return self.api(method, path, query, state["body"], state)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "GoogleStandin/1"
    server_state: GoogleStandin

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.server_state.on_request is not None:
            self.server_state.on_request(self.command, urlsplit(self.path).path)
        reply = self.server_state.handle(self.command, self.path, self.headers, raw)
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Date", dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT"))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


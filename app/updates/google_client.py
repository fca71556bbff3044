"""Google Wallet REST client (walletobjects v1) authenticated as a service account.

    client = GoogleWalletClient.from_file(Path("instance/google/service-account.json"))
    client.check_issuer("3388000000012345678")
    cls, created = client.ensure("loyaltyClass", {"id": "3388000000012345678.gold", ...})
    client.patch("loyaltyObject", "3388000000012345678.card-42", {"loyaltyPoints": {...}})

Authentication is google-auth's service-account credentials: a JWT signed with the
account's key is exchanged at the JSON's ``token_uri`` for an access token (scope
``wallet_object.issuer``), which is kept and reused until it is about to expire, then
refreshed. The same ``requests.Session`` carries token requests and API calls, so
connections are reused (docs: shared/reference/google.md §3.3).

Retries: 429 (unless its reason is ``quotaExceeded``: a used-up quota such as a pass's
three notifications a day), 5xx, 403 ``rateLimitExceeded`` and connection errors are retried with
exponential backoff (``backoff * 2**attempt``, jittered), or after ``Retry-After`` when
Google sends one; other 4xx are the caller's problem and raise at once. A 401 makes
the client fetch a new token once. Every failure surfaces as :class:`GoogleApiError`
with Google's own message (``{"error": {"code", "message", "status"}}``).

The private key and access tokens never reach the logs or exception messages.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import quote

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.oauth2 import service_account

from app.infra import instruments
from app.infra.http import new_session, retry_after, transient

USER_AGENT = "Passerelle-Google/1"

log = logging.getLogger(__name__)

WALLET_SCOPE = "https://www.googleapis.com/auth/wallet_object.issuer"
GOOGLE_API_URL = "https://walletobjects.googleapis.com"
_API_PATH = "/walletobjects/v1"

#: The collections this client is meant for (any walletobjects collection name works).
RESOURCES = ("loyaltyClass", "loyaltyObject", "genericClass", "genericObject")
_RESOURCE_NAME = re.compile(r"^[a-z][A-Za-z]+$")
_ISSUER_ID = re.compile(r"^[0-9]{1,20}$")
#: Longest Retry-After we are willing to sleep through inside one call.
MAX_RETRY_AFTER = 60.0
_RETRYABLE_403_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
#: 403 reasons that are about a quota, not about access: no "add the service account" hint.
_QUOTA_403_REASONS = _RETRYABLE_403_REASONS | {"quotaExceeded"}
_SERVICE_ACCOUNT_FIELDS = ("type", "client_email", "private_key", "token_uri")


class GoogleApiError(Exception):
    """A Google Wallet API call failed.

    ``status`` is the HTTP status (None when no HTTP answer came: network, token or
    credential problems), ``reason`` a short machine-readable word (Google's
    ``error.status`` such as ``PERMISSION_DENIED``, or ours), ``message`` one line
    for people.
    """

    def __init__(self, status: int | None, reason: str, message: str,
                 reasons: frozenset[str] = frozenset()) -> None:
        self.status = status
        self.reason = reason
        self.message = " ".join(str(message).split())  # one line
        self.reasons = reasons  # Google's errors[].reason words, e.g. {"quotaExceeded"}
        super().__init__(self.message)

    def __str__(self) -> str:
        prefix = f"Google Wallet API {self.status}" if self.status else "Google Wallet API"
        return f"{prefix} ({self.reason}): {self.message}"


class GoogleCredentialsError(GoogleApiError):
    """The service-account JSON is missing, unreadable or not a service-account key."""

    def __init__(self, message: str) -> None:
        super().__init__(None, "invalid_credentials", message)


class GoogleClientOptions(TypedDict, total=False):
    """GoogleWalletClient's keyword arguments (Services.google_client_options)."""

    session: requests.Session
    max_retries: int
    backoff: float
    timeout: float


class GoogleWalletClient:
    """Synchronous client for walletobjects v1 collections; safe to share between threads."""

    def __init__(self, service_account_info: dict[str, Any], api_url: str = GOOGLE_API_URL, *,
                 session: requests.Session | None = None, max_retries: int = 4,
                 backoff: float = 0.5, timeout: float = 10.0) -> None:
        if not isinstance(service_account_info, dict):
            raise GoogleCredentialsError("service-account info must be a JSON object")
        missing = [k for k in _SERVICE_ACCOUNT_FIELDS if not service_account_info.get(k)]
        if missing:
            raise GoogleCredentialsError(
                "service-account JSON lacks " + ", ".join(missing)
                + " (download a key of type JSON for the service account in Google Cloud"
                " console > IAM > Service accounts > Keys)")
        if service_account_info.get("type") != "service_account":
            raise GoogleCredentialsError(
                f"JSON of type {service_account_info.get('type')!r} is not a service-account "
                "key (expected \"type\": \"service_account\")")
        try:
            self._credentials = service_account.Credentials.from_service_account_info(
                service_account_info, scopes=[WALLET_SCOPE])
        except (ValueError, TypeError) as exc:  # MalformedError is a ValueError
            # The message of a key-parsing error never contains the key itself.
            raise GoogleCredentialsError(
                f"service-account private key cannot be loaded: {type(exc).__name__}") from None
        self.service_account_email: str = self._credentials.service_account_email
        self.token_uri: str = service_account_info["token_uri"]
        self.api_url = api_url.rstrip("/")
        self.session = session if session is not None else new_session(USER_AGENT)
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self._token_lock = threading.Lock()
        self._token_transport = google.auth.transport.requests.Request(self.session)

    @classmethod
    def from_file(cls, path: Path, api_url: str = GOOGLE_API_URL, **kw: Any
                  ) -> GoogleWalletClient:
        """Load a service-account key file; raises :class:`GoogleCredentialsError`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GoogleCredentialsError(f"service-account file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise GoogleCredentialsError(
                f"service-account file {path} cannot be read: {exc}") from None
        try:
            info = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GoogleCredentialsError(
                f"service-account file {path} is not valid JSON (line {exc.lineno}, "
                f"column {exc.colno}: {exc.msg})") from None
        try:
            return cls(info, api_url, **kw)
        except GoogleCredentialsError as exc:
            raise GoogleCredentialsError(f"{path}: {exc.message}") from None

    # -- the API -----------------------------------------------------------------------

    def get(self, resource: str, resource_id: str) -> dict[str, Any] | None:
        """The stored class or object, or None when Google does not know the id."""
        try:
            return self._call("GET", self._item_path(resource, resource_id),
                              issuer_id=_issuer_of(resource_id))
        except GoogleApiError as exc:
            if exc.status == 404:
                return None
            raise

    def insert(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create; raises GoogleApiError with status 409 when the id exists."""
        return self._call("POST", self._collection_path(resource), body,
                          issuer_id=_issuer_of(body.get("id") if isinstance(body, dict) else None))

    def patch(self, resource: str, resource_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Update the fields in ``body``; arrays given replace the stored ones whole."""
        return self._call("PATCH", self._item_path(resource, resource_id), body,
                          issuer_id=_issuer_of(resource_id))

    def add_message(self, resource: str, resource_id: str, message: dict[str, Any]) -> dict[str, Any]:
        """Add a message (``TEXT`` or ``TEXT_AND_NOTIFY``); returns the updated resource."""
        answer = self._call("POST", self._item_path(resource, resource_id) + "/addMessage",
                            {"message": message}, issuer_id=_issuer_of(resource_id))
        updated: dict[str, Any] = answer.get("resource", answer)
        return updated

    def ensure(self, resource: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The resource with ``body["id"]``, inserted from ``body`` if Google lacks it.

        Returns ``(resource, created)``. An existing resource is returned as Google has
        it (not patched). A 409 (someone inserted it meanwhile) reads it back.
        """
        resource_id = body.get("id") if isinstance(body, dict) else None
        if not resource_id:
            raise ValueError(f"{resource} body needs an id")
        found = self.get(resource, resource_id)
        if found is not None:
            return found, False
        try:
            return self.insert(resource, body), True
        except GoogleApiError as exc:
            if exc.status != 409:
                raise
        found = self.get(resource, resource_id)
        if found is None:
            raise GoogleApiError(409, "ALREADY_EXISTS",
                                 f"{resource} {resource_id} exists but cannot be read back")
        return found, False

    def check_issuer(self, issuer_id: str) -> None:
        """Prove the credentials work and the service account may act for ``issuer_id``.

        Lists at most one loyalty class of the issuer: that needs a valid key, a token,
        and the service account added as a user of the issuer account.
        """
        issuer_id = str(issuer_id).strip()
        if not _ISSUER_ID.match(issuer_id):
            raise GoogleApiError(None, "invalid_issuer_id",
                                 f"issuer id {issuer_id!r} must be the numeric issuer id shown"
                                 " in the Google Pay & Wallet console")
        self._call("GET", f"{_API_PATH}/loyaltyClass",
                   params={"issuerId": issuer_id, "maxResults": "1"}, issuer_id=issuer_id)

    # -- plumbing ----------------------------------------------------------------------

    @staticmethod
    def _collection_path(resource: str) -> str:
        if not _RESOURCE_NAME.match(resource or ""):
            raise ValueError(f"not a walletobjects collection name: {resource!r}")
        return f"{_API_PATH}/{resource}"

    def _item_path(self, resource: str, resource_id: str) -> str:
        if not resource_id:
            raise ValueError("resource id is empty")
        return f"{self._collection_path(resource)}/{quote(str(resource_id), safe='')}"

    def _authorization(self, *, force_refresh: bool = False) -> str:
        with self._token_lock:
            creds = self._credentials
            if force_refresh or not creds.valid:
                self._refresh(creds)
            return f"Bearer {creds.token}"

    def _refresh(self, creds: service_account.Credentials) -> None:
        def transport(url: str, method: str = "GET", body: Any = None,
                      headers: Any = None, timeout: float | None = None, **kwargs: Any) -> Any:
            return self._token_transport(url, method=method, body=body, headers=headers,
                                         timeout=timeout or self.timeout, **kwargs)
        try:
            creds.refresh(transport)
        except google.auth.exceptions.RefreshError as exc:
            detail = exc.args[0] if exc.args else "refused"
            raise GoogleApiError(
                None, "token_refused",
                f"{self.token_uri} refused an access token for {self.service_account_email}:"
                f" {detail} (is the key revoked or the service account deleted?)") from None
        except google.auth.exceptions.TransportError as exc:
            raise _NetworkError(f"token request to {self.token_uri} failed: "
                                f"{type(exc.args[0] if exc.args else exc).__name__}") from None
        log.debug("google: new access token for %s", self.service_account_email)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
              params: dict[str, Any] | None = None, issuer_id: str | None = None) -> dict[str, Any]:
        url = self.api_url + path
        operation = instruments.google_operation(method, path)
        refreshed = False
        attempt = 0
        while True:
            delay: float | None = None
            try:
                try:
                    headers = {"Authorization": self._authorization(),
                               "Accept": "application/json"}
                except GoogleApiError:  # the token endpoint refused the key
                    instruments.google_unanswered(operation, "token_refused")
                    raise
                started = time.perf_counter()
                response = self.session.request(method, url, json=body, params=params,
                                                headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout, _NetworkError) as exc:
                instruments.google_unanswered(operation, "network")
                if attempt >= self.max_retries:
                    message = (exc.args[0] if isinstance(exc, _NetworkError)
                               else f"{type(exc).__name__} talking to {self.api_url}")
                    raise GoogleApiError(
                        None, "network", f"{method} {path}: {message} "
                        f"(gave up after {attempt + 1} attempts)") from None
                log.warning("google: %s %s: %s, retrying", method, path, type(exc).__name__)
            else:
                status = response.status_code
                instruments.google_answered(operation, status, time.perf_counter() - started)
                if status < 300:
                    return _json(response)
                error = _error_from(response, method, path, self.service_account_email,
                                    issuer_id)
                if status == 401 and not refreshed:
                    refreshed = True
                    with self._token_lock:  # the token was revoked or expired early
                        self._credentials.token = None
                    continue
                if not _retryable(status, response) or attempt >= self.max_retries:
                    if attempt and _retryable(status, response):
                        error.message += f" (gave up after {attempt + 1} attempts)"
                    raise error
                delay = retry_after(response.headers)
                if delay is not None and delay > MAX_RETRY_AFTER:
                    error.message += f" (Google asks to retry after {delay:.0f} s)"
                    raise error
                log.warning("google: %s %s answered %s, retrying", method, path, status)
            backoff = self.backoff * (2 ** attempt) * random.uniform(0.75, 1.25)
            time.sleep(max(backoff, delay or 0.0))
            attempt += 1


def _issuer_of(resource_id: object) -> str | None:
    """The issuer part of ``<issuerId>.<suffix>`` (split at the first dot)."""
    head = str(resource_id or "").split(".", 1)[0]
    return head if _ISSUER_ID.match(head) else None


class _NetworkError(Exception):
    """The token endpoint could not be reached (retried like API connection errors)."""


def _retryable(status: int, response: requests.Response) -> bool:
    if status == 429 and "quotaExceeded" in _error_reasons(response):
        return False  # a used-up quota (e.g. a pass's notifications) does not come back soon
    if transient(status):
        return True
    if status == 403:
        return bool(_error_reasons(response) & _RETRYABLE_403_REASONS)
    return False


def _json(response: requests.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        data = response.json()
    except ValueError:
        raise GoogleApiError(response.status_code, "bad_response",
                             "Google answered with something that is not JSON") from None
    return data if isinstance(data, dict) else {"value": data}


def _error_body(response: requests.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else {}


def _error_reasons(response: requests.Response) -> set[str]:
    errors = _error_body(response).get("errors")
    if not isinstance(errors, list):
        return set()
    return {str(e["reason"]) for e in errors if isinstance(e, dict) and e.get("reason")}


_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "NOT_FOUND", 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED",
                 500: "INTERNAL", 502: "BAD_GATEWAY", 503: "UNAVAILABLE",
                 504: "DEADLINE_EXCEEDED"}


def _error_from(response: requests.Response, method: str, path: str, email_: str,
                issuer_id: str | None) -> GoogleApiError:
    status = response.status_code
    error = _error_body(response)
    reason = str(error.get("status") or _STATUS_NAMES.get(status) or f"HTTP_{status}")
    message = str(error.get("message") or response.reason or "no message").strip()
    text = f"{method} {path}: {message}"
    if status == 401:
        text += " (the access token was refused; check the service-account key)"
    elif status == 403 and not (_error_reasons(response) & _QUOTA_403_REASONS):
        issuer = f" {issuer_id}" if issuer_id else " that owns these ids"
        text += (f" -- add the service account {email_} as a user of the issuer account"
                 f"{issuer} in the Google Pay & Wallet console (Users), and check the issuer"
                 " id")
    return GoogleApiError(status, reason, text, frozenset(_error_reasons(response)))

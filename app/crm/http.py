"""The HTTP JSON connector: a tenant's own CRM, reached over a small REST contract.

Why a mapping rather than code per CRM: every CRM nests its JSON differently,
but the operations Passerelle needs are the same four (get by id, search by
email, create, update). ``CrmConnection.mapping`` says where each of our
fields lives in the CRM's JSON as a dotted path (``contact.email``,
``phones.0.number``); reading follows the paths, writing builds the nested
JSON from the same paths. Unmapped fields are neither read nor written.
The contract and the mapping syntax are documented in docs/crm.md.

Security choices: the credential is read from the environment on every
request (never stored, rotation needs no restart); redirects are not
followed, so a custom auth header can never be replayed to another host;
external ids are percent-encoded into the path; error messages carry HTTP
statuses and ids, never response bodies or emails.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import requests

from app.crm.connector import (
    STANDARD_FIELDS,
    CrmNotFound,
    CrmRecord,
    CrmRejected,
    CrmUnavailable,
)
from app.customers.customers import (
    CustomerDataError,
    clean_standard,
    normalize_email,
    parse_consent,
)
from app.infra.http import new_session, retry_after

log = logging.getLogger(__name__)

DEFAULT_RESOURCE = "customers"
DEFAULT_ID_PATH = "id"
RESOURCE_KEY = "@resource"  # reserved mapping key: the collection's path under base_url
CONSENT_PARTS = ("granted", "text", "recorded_at", "source")
_SEGMENT = re.compile(r"^[^.\s]+$")
_KIND = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ATTRIBUTE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_RESOURCE = re.compile(r"^[A-Za-z0-9_~-]+(/[A-Za-z0-9_~-]+)*$")
_RETRYABLE = {401, 403, 408, 425, 429}  # 401/403: credentials an operator can fix


# -- mapping ------------------------------------------------------------------------------

def _path(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, str) or not value:
        raise ValueError(f"mapping {key!r}: the path must be a non-empty string")
    segments = tuple(value.split("."))
    if not all(_SEGMENT.match(s) for s in segments):
        raise ValueError(f"mapping {key!r}: {value!r} is not a dotted path (e.g. contact.email)")
    return segments


def _check_key(key: str) -> None:
    if key == "external_id" or key in STANDARD_FIELDS:
        return
    if key.startswith("attributes.") and _ATTRIBUTE.match(key[len("attributes."):]):
        return
    if key.startswith("consents."):
        kind, _, part = key[len("consents."):].partition(".")
        if _KIND.match(kind) and (not part or part in CONSENT_PARTS):
            return
    raise ValueError(
        f"mapping: {key!r} is not a customer field (use external_id, "
        f"{', '.join(STANDARD_FIELDS)}, attributes.<name>, consents.<kind>[.text|.recorded_at"
        f"|.source], or {RESOURCE_KEY})")


@dataclass(frozen=True)
class Mapping:
    """Our field -> path of segments in the CRM's JSON, plus the collection's path."""

    paths: dict[str, tuple[str, ...]]
    resource: str = DEFAULT_RESOURCE

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Mapping:
        """Validate a stored mapping; ValueError names the offending key."""
        if not isinstance(raw, dict):
            raise ValueError("mapping: must be a JSON object")
        resource = raw.get(RESOURCE_KEY, DEFAULT_RESOURCE)
        if not isinstance(resource, str) or not _RESOURCE.match(resource):
            raise ValueError(f"mapping {RESOURCE_KEY!r}: {resource!r} is not a path like "
                             f"'customers' or 'v2/contacts'")
        paths: dict[str, tuple[str, ...]] = {}
        for key, value in raw.items():
            if key == RESOURCE_KEY:
                continue
            _check_key(key)
            if key.startswith("consents.") and key.endswith(".granted"):
                key = key.removesuffix(".granted")
            if key in paths:
                raise ValueError(f"mapping: {key!r} is mapped twice")
            paths[key] = _path(value, key)
        paths.setdefault("external_id", (DEFAULT_ID_PATH,))
        _check_no_overlap(paths)
        return cls(paths, resource)

    def mapped_fields(self) -> list[str]:
        """Field names a record can carry (consent sub-parts other than granted excluded)."""
        return sorted(k for k in self.paths
                      if not (k.startswith("consents.") and k.count(".") > 1))

    def read(self, document: dict[str, Any], fallback_id: str | None = None) -> CrmRecord:
        """Map a CRM record to ours; values a customer record cannot take are skipped."""
        raw_id = _get(document, self.paths["external_id"])
        external_id = str(raw_id) if raw_id not in (None, "") else fallback_id
        if not external_id:
            raise CrmUnavailable("the CRM record has no id at "
                                 f"{'.'.join(self.paths['external_id'])!r}; check the mapping")
        record = CrmRecord(external_id=external_id)
        present: set[str] = set()
        for key, path in self.paths.items():
            value = _get(document, path)
            if value is _MISSING or key == "external_id":
                continue
            if _read_field(record, key, value):
                present.add(key)
        record.present = frozenset(present)
        return record

    def write(self, payload: dict[str, Any], *, include_id: bool,
              skip_nulls: bool = False) -> dict[str, Any]:
        """Build the CRM's JSON from a ``customer_payload`` (only mapped fields).
        ``skip_nulls`` for a create: an empty field is left out rather than sent as null."""
        document: dict[str, Any] = {}
        for key, value in _flatten(payload, include_id):
            path = self.paths.get(key)
            if path is not None and not (skip_nulls and value is None):
                _set(document, path, value)
        return document


def _check_no_overlap(paths: dict[str, tuple[str, ...]]) -> None:
    """Two fields on one path, or one inside another, would overwrite each other."""
    items = sorted(paths.items(), key=lambda item: item[1])
    for (key_a, a), (key_b, b) in zip(items, items[1:]):
        if b[: len(a)] == a:
            raise ValueError(f"mapping: {key_a!r} ({'.'.join(a)}) and {key_b!r} "
                             f"({'.'.join(b)}) overlap")


def _read_field(record: CrmRecord, key: str, value: Any) -> bool:
    """Set one mapped value on the record; False if it is not usable."""
    if key.startswith("attributes."):
        record.attributes[key[len("attributes."):]] = value
        return True
    if key.startswith("consents."):
        if key.count(".") > 1 or value is None:
            return False  # text/time/source are ours to send, not to read back
        try:
            granted = value if isinstance(value, bool) else parse_consent(key, str(value))
        except CustomerDataError:
            log.warning("CRM record %s: %s is not yes/no, ignored", record.external_id, key)
            return False
        record.consents[key[len("consents."):]] = granted
        return True
    if value is None:
        setattr(record, key, None)
        return True
    try:
        setattr(record, key, _clean(key, value))
    except CustomerDataError:
        log.warning("CRM record %s: %s has a value a customer cannot take, ignored",
                    record.external_id, key)
        return False
    return True


def _clean(name: str, value: Any) -> Any:
    if isinstance(value, (dict, list, bool)):
        raise CustomerDataError(f"{name}: not a scalar")
    text = str(value)
    if name == "birthday" and len(text) > 10 and text[10] in "T ":
        text = text[:10]  # a datetime where a date was meant
    return clean_standard(name, text)


def _flatten(payload: dict[str, Any], include_id: bool) -> list[tuple[str, Any]]:
    """A payload as (mapping key, value) pairs."""
    pairs: list[tuple[str, Any]] = []
    if include_id and "external_id" in payload:
        pairs.append(("external_id", payload["external_id"]))
    pairs += [(name, payload[name]) for name in STANDARD_FIELDS if name in payload]
    pairs += [(f"attributes.{name}", value)
              for name, value in (payload.get("attributes") or {}).items()]
    for kind, consent in (payload.get("consents") or {}).items():
        pairs.append((f"consents.{kind}", consent.get("granted")))
        pairs += [(f"consents.{kind}.{part}", consent.get(part)) for part in CONSENT_PARTS[1:]]
    return pairs


class _Missing:
    pass


_MISSING: Any = _Missing()


def _get(document: Any, path: tuple[str, ...]) -> Any:
    node = document
    for segment in path:
        if isinstance(node, dict) and segment in node:
            node = node[segment]
        elif isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
            node = node[int(segment)]
        else:
            return _MISSING
    return node


def _set(document: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set a value, creating objects, and lists for numeric segments (padded with null)."""
    node: Any = document
    for index, segment in enumerate(path):
        last = index == len(path) - 1
        child: Any = value if last else ([] if path[index + 1].isdigit() else {})
        if isinstance(node, list):
            position = int(segment)
            node.extend([None] * (position + 1 - len(node)))
            if last or not isinstance(node[position], (dict, list)):
                node[position] = child
            node = node[position]
        else:
            if last or not isinstance(node.get(segment), (dict, list)):
                node[segment] = child
            node = node[segment]


# -- the connector ------------------------------------------------------------------------

class HttpConnector:
    """One tenant's CRM over HTTP; one ``requests.Session`` (connection pool) each."""

    kind = "http"

    def __init__(self, *, tenant_id: int, base_url: str, mapping: Mapping,
                 auth_header: str | None = None, auth_value_env: str | None = None,
                 timeout_seconds: float = 5, max_staleness_seconds: int = 86400) -> None:
        self.tenant_id = tenant_id
        self.base_url = base_url.rstrip("/")
        self.mapping = mapping
        self.auth_header = auth_header
        self.auth_value_env = auth_value_env
        self.timeout = timeout_seconds
        self.max_staleness = dt.timedelta(seconds=max_staleness_seconds)
        self.http = new_session("Passerelle-CRM/1", {"Accept": "application/json"})

    def close(self) -> None:
        self.http.close()

    # reads

    def fetch(self, external_id: str) -> CrmRecord | None:
        what = f"GET customer {external_id}"
        response = self._request("GET", self._item_url(external_id), what)
        if response.status_code in (404, 410):
            return None
        self._raise_for_read(response, what)
        document = self._json(response, what)
        if not isinstance(document, dict):
            raise self._unavailable(f"{what}: the answer is not a JSON object")
        return self.mapping.read(document, fallback_id=external_id)

    def find_by_email(self, email: str) -> CrmRecord | None:
        what = "search by email"
        response = self._request("GET", self._collection_url(), what, params={"email": email})
        if response.status_code in (404, 410):
            return None
        self._raise_for_read(response, what)
        document = self._json(response, what)
        candidates = document if isinstance(document, list) else [document]
        records = [self.mapping.read(item) for item in candidates if isinstance(item, dict)]
        if "email" in self.mapping.paths:
            # A CRM that ignored the filter must not hand us somebody else.
            try:
                wanted = normalize_email(email)
            except CustomerDataError:
                return None
            records = [r for r in records if (r.email or "").lower() == wanted]
        if len(records) > 1:
            log.warning("CRM of tenant %s: %d records share one email; using %s",
                        self.tenant_id, len(records), records[0].external_id)
        return records[0] if records else None

    # writes

    def write(self, operation: str, payload: dict[str, Any], *,
              idempotency_key: str | None = None) -> str | None:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        external_id = str(payload.get("external_id") or "")
        if operation == "create":
            what = f"POST customer {external_id}"
            body = self.mapping.write(payload, include_id=True, skip_nulls=True)
            response = self._request("POST", self._collection_url(), what, json=body,
                                     headers=headers)
            self._raise_for_write(response, what, missing=CrmUnavailable)
            return self._created_id(response)
        if operation == "update":
            what = f"PATCH customer {external_id}"
            body = self.mapping.write(payload, include_id=False)
            if not body:
                return None  # nothing of this change is mapped to the CRM
            response = self._request("PATCH", self._item_url(external_id), what, json=body,
                                     headers=headers)
            self._raise_for_write(response, what, missing=CrmNotFound)
            return None
        raise ValueError(f"unknown CRM operation {operation!r}")

    # plumbing

    def _collection_url(self) -> str:
        return f"{self.base_url}/{self.mapping.resource}"

    def _item_url(self, external_id: str) -> str:
        return f"{self._collection_url()}/{quote(external_id, safe='')}"

    def _auth(self) -> dict[str, str]:
        if not self.auth_header or not self.auth_value_env:
            return {}
        value = os.environ.get(self.auth_value_env)
        if value is None:
            raise self._unavailable(f"environment variable {self.auth_value_env} "
                                    f"(the CRM credential) is not set")
        return {self.auth_header: value}

    def _request(self, method: str, url: str, what: str, *,
                 headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        headers = {**(headers or {}), **self._auth()}
        try:
            response = self.http.request(method, url, headers=headers, timeout=self.timeout,
                                         allow_redirects=False, **kwargs)
        except requests.Timeout:
            raise self._unavailable(f"{what}: no answer within {self.timeout}s") from None
        except requests.ConnectionError:
            raise self._unavailable(f"{what}: connection failed") from None
        except requests.RequestException as exc:
            raise self._unavailable(f"{what}: {type(exc).__name__}") from None
        log.debug("CRM of tenant %s: %s -> HTTP %s", self.tenant_id, what, response.status_code)
        return response

    def _unavailable(self, message: str, retry_after: float | None = None) -> CrmUnavailable:
        return CrmUnavailable(f"CRM of tenant {self.tenant_id}: {message}", retry_after)

    def _status_error(self, response: requests.Response, what: str) -> CrmUnavailable:
        status = response.status_code
        hint = {401: " (credential refused)", 403: " (credential refused)"}.get(status, "")
        if 300 <= status < 400:
            hint = " (redirect not followed: set the final URL as base URL)"
        return self._unavailable(f"{what}: HTTP {status}{hint}", retry_after(response.headers))

    def _raise_for_read(self, response: requests.Response, what: str) -> None:
        if response.status_code != 200:
            raise self._status_error(response, what)

    def _raise_for_write(self, response: requests.Response, what: str,
                         missing: type[Exception]) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        if status == 404:
            if missing is CrmNotFound:
                raise CrmNotFound(f"CRM of tenant {self.tenant_id}: {what}: HTTP 404")
            raise self._unavailable(f"{what}: HTTP 404 (check the base URL and {RESOURCE_KEY})")
        if 400 <= status < 500 and status not in _RETRYABLE:
            raise CrmRejected(f"CRM of tenant {self.tenant_id}: {what}: HTTP {status}")
        raise self._status_error(response, what)

    def _json(self, response: requests.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self._unavailable(f"{what}: the answer is not JSON") from None

    def _created_id(self, response: requests.Response) -> str | None:
        """The id the CRM gave a created record: from the JSON body, else Location."""
        if response.content:
            try:
                document = response.json()
            except ValueError:
                document = None
            if isinstance(document, dict):
                value = _get(document, self.mapping.paths["external_id"])
                if value not in (_MISSING, None, ""):
                    return str(value)
        location = response.headers.get("Location")
        if location:
            last = urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1]
            return unquote(last) or None
        return None

"""APNs pushes for pass updates: a persistent, multiplexed HTTP/2 client per certificate.

A pass-update push is ``POST /3/device/<pushToken>`` with ``apns-topic:
<passTypeIdentifier>`` and the body ``{}``, over TLS authenticated with the Pass
Type ID certificate and key that sign the passes (docs: shared/reference/apple.md §4).

Apple asks senders to keep connections open and to put many concurrent streams on
each: reconnecting per push looks like a denial-of-service attack. So each
:class:`ApnsClient` owns one HTTP/2 connection pool (httpcore, the transport of
httpx, with ``h2`` for the framing) on a private event loop in a daemon thread.
:meth:`ApnsClient.push` is synchronous for its callers (job workers, commands) but
sends every token of a call concurrently over the same connection, and the
connection stays open between calls. :class:`ApnsPool` keeps one client per pass
type identifier.

Push tokens and keys never reach the logs; at most a token's first 8 characters do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import httpcore
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.certs import certificate_uid

if TYPE_CHECKING:
    from app.certs import SigningIdentity

log = logging.getLogger(__name__)
_T = TypeVar("_T")

APNS_PRODUCTION_URL = "https://api.push.apple.com"

#: Wallet tokens are hex; anything else must not be spliced into the request path.
_TOKEN = re.compile(r"^[0-9A-Fa-f]{1,200}$")
_BODY = b"{}"  # Apple: "an empty JSON dictionary for the payload"
_BODY_LENGTH = str(len(_BODY)).encode()
_BAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
_CREDENTIAL_REASONS = frozenset({"BadTopic", "MissingTopic", "TopicDisallowed"})
_REASON_LIMIT = 200


@dataclass(frozen=True)
class PushResult:
    push_token: str
    status: int | None  # HTTP status; None when the connection/TLS failed
    reason: str | None  # APNs "reason", or a short error text when status is None
    apns_id: str | None

    @property
    def outcome(self) -> str:
        """What the caller should do: sent | unregistered | bad_token | retry |
        credentials | failed."""
        status, reason = self.status, self.reason
        if status is None or status == 429 or status >= 500:
            return "retry"
        if status == 200:
            return "sent"
        if status == 410:
            return "unregistered"
        if status == 400 and reason in _BAD_TOKEN_REASONS:
            return "bad_token"
        if status == 403 or (status == 400 and reason in _CREDENTIAL_REASONS):
            return "credentials"
        return "failed"

    def __repr__(self) -> str:  # the token is a device identifier: show its start only
        return (f"PushResult(push_token={_short(self.push_token)!r}, status={self.status}, "
                f"reason={self.reason!r}, apns_id={self.apns_id!r})")


class ApnsError(Exception):
    """A setup problem (unreadable certificate or CA file, bad URL), as one clear line."""


class ApnsTokenKey:
    """Token-based APNs authentication: a .p8 key of the team that owns the pass type.

    Apple wants the signed token (ES256, header ``kid``, claims ``iss`` = team and
    ``iat``) refreshed at most every 20 minutes and at least every hour; one is
    kept for 50 minutes and shared by every request.
    """

    REFRESH_SECONDS = 50 * 60

    def __init__(self, key_id: str, team_id: str, private_key: ec.EllipticCurvePrivateKey,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise ApnsError(f"APNs key {key_id}: a .p8 key must be an elliptic-curve (P-256) key")
        self.key_id, self.team_id, self._key, self._clock = key_id, team_id, private_key, clock
        self._token: tuple[float, str] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, key_id: str, team_id: str) -> ApnsTokenKey:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ApnsError(f"{path}: cannot load the APNs .p8 key ({_describe(exc)})") from None
        return cls(key_id, team_id, key)  # type: ignore[arg-type]

    @property
    def fingerprint(self) -> bytes:
        public = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(self.key_id.encode() + b"\0" + public).digest()

    def bearer(self) -> str:
        now = self._clock()
        with self._lock:
            if self._token is None or now - self._token[0] >= self.REFRESH_SECONDS:
                token = jwt.encode({"iss": self.team_id, "iat": int(now)}, self._key,
                                   algorithm="ES256", headers={"kid": self.key_id})
                self._token = (now, token)
            return self._token[1]


class ApnsClient:
    """Persistent, multiplexed HTTP/2 client for ONE pass-type certificate (or .p8 key)."""

    def __init__(self, base_url: str, certificate: x509.Certificate | None = None,
                 private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None, *,
                 token_key: ApnsTokenKey | None = None,
                 ca_file: Path | None = None, timeout: float = 10.0,
                 max_concurrency: int = 200) -> None:
        """Authenticate with the pass certificate (TLS client auth, Apple's documented
        way) or, given ``token_key``, with a .p8 token of the same team."""
        if token_key is None and (certificate is None or private_key is None):
            raise ApnsError("APNs needs the pass certificate and key, or a .p8 token key")
        if max_concurrency < 1:
            raise ApnsError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.base_url = _check_url(base_url)
        parts = urlsplit(self.base_url)
        self._host = (parts.hostname or "").encode("idna")
        self._port = parts.port or 443
        self._authority = parts.netloc.encode("idna")
        timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        self._extensions: dict[str, object] = {"timeout": timeouts}
        self._token_key = token_key
        if token_key is not None:
            self.fingerprint = token_key.fingerprint
            ssl_context = _ssl_context(None, None, ca_file)
        else:
            assert certificate is not None and private_key is not None
            self.fingerprint = certificate.fingerprint(hashes.SHA256())
            ssl_context = _ssl_context(certificate, private_key, ca_file)
        self._timeout = timeout
        self._max_concurrency = max_concurrency

        self._pid = os.getpid()
        self._lock = threading.Condition()
        self._closed = False
        self._in_flight = 0  # push() calls running, so close() can let them finish
        self._healthy = False  # the last request got an HTTP answer: the connection works

        self._loop = asyncio.new_event_loop()
        uid = (certificate_uid(certificate) if certificate is not None else None) \
            or self.fingerprint.hex()[:12]
        # Daemon: a process that forgets close() still exits.
        self._thread = threading.Thread(target=self._run_loop, name=f"apns:{uid}", daemon=True)
        self._thread.start()
        try:
            self._http, self._semaphore = self._call(self._open(ssl_context)).result()
        except BaseException:
            self._stop_loop()
            raise

    # -- public ----------------------------------------------------------------------------

    def push(self, topic: str, tokens: Sequence[str]) -> list[PushResult]:
        """One push per token, concurrently over the open connection; results in token order.

        Per-token failures (HTTP errors, timeouts, a refused TLS handshake) come back as
        PushResults; nothing here raises for them.
        """
        tokens = list(tokens)
        if not tokens:
            return []
        with self._lock:
            if self._closed:
                # A pool may replace this client (new certificate) while a caller still
                # holds it: report "retry" rather than fail the caller's whole job.
                log.warning("APNs client for %s used after close; %d push(es) to retry",
                            topic, len(tokens))
                return [PushResult(t, None, "APNs client closed", None) for t in tokens]
            if os.getpid() != self._pid or not self._thread.is_alive():
                # A forked child has the client but not its thread: waiting would hang.
                raise ApnsError("APNs client used in a forked process or after its thread "
                                "died; get clients from ApnsPool.client() where you push")
            self._in_flight += 1
        try:
            results = self._call(self._push_all(topic, tokens)).result()
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()
        counts = Counter(r.outcome for r in results)
        level = (logging.DEBUG if counts.keys() <= {"sent"}
                 else logging.INFO if counts.keys() <= {"sent", "unregistered", "bad_token"}
                 else logging.WARNING)
        log.log(level, "APNs %s: %d push(es): %s", topic, len(results),
                ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return results

    def close(self) -> None:
        """Let running push() calls finish, close the connections, stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=self._timeout + 5)
        try:
            self._call(self._http.aclose()).result(timeout=self._timeout + 5)
        except Exception as exc:  # noqa: BLE001 - closing must not fail the caller
            log.warning("APNs client close: %s", _describe(exc))
        finally:
            self._stop_loop()

    def __enter__(self) -> ApnsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the event loop thread -------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> Future[_T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _stop_loop(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._loop.shutdown_asyncgens()

        if self._thread.is_alive():
            try:
                self._call(cancel_rest()).result(timeout=5)
            except Exception:  # noqa: BLE001 - best effort before stopping
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _open(self, ssl_context: ssl.SSLContext
                    ) -> tuple[httpcore.AsyncConnectionPool, asyncio.Semaphore]:
        # Created on the loop that uses them. httpx's transport layer, httpcore, is used
        # directly: httpx's client layer (URL parsing, cookies, redirects, hooks) cost
        # ~35% of each push and APNs needs none of it. http1=False: APNs speaks only
        # HTTP/2, and ALPN then offers just "h2". One origin = one multiplexed
        # connection; keepalive_expiry=None keeps it open between calls (APNs closes
        # idle ones itself, and a request on a closed one is retried once below).
        pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context, http1=False, http2=True,
                                            keepalive_expiry=None)
        return pool, asyncio.Semaphore(self._max_concurrency)

    async def _push_all(self, topic: str, tokens: list[str]) -> list[PushResult]:
        probe = next((i for i, t in enumerate(tokens) if _TOKEN.match(t)), None)
        if self._healthy or probe is None:
            return list(await asyncio.gather(*(self._push_one(topic, t) for t in tokens)))
        # No working connection yet: one request opens it. If that fails (TLS refused,
        # host down), every token shares its fate: opening one connection per token
        # would look like a denial-of-service attack to APNs.
        first = await self._push_one(topic, tokens[probe])
        if first.status is None:
            return [first if i == probe
                    else PushResult(t, None, first.reason, None) if _TOKEN.match(t)
                    else _not_hex(t) for i, t in enumerate(tokens)]
        rest = iter(await asyncio.gather(*(self._push_one(topic, t)
                                           for i, t in enumerate(tokens) if i != probe)))
        return [first if i == probe else next(rest) for i in range(len(tokens))]

    async def _push_one(self, topic: str, token: str) -> PushResult:
        if not _TOKEN.match(token):
            return _not_hex(token)
        url = httpcore.URL(scheme=b"https", host=self._host, port=self._port,
                           target=b"/3/device/" + token.encode())
        headers = [(b"host", self._authority), (b"apns-topic", topic.encode()),
                   (b"content-length", _BODY_LENGTH)]
        if self._token_key is not None:
            headers.append((b"authorization", b"bearer " + self._token_key.bearer().encode()))
        async with self._semaphore:
            for attempt in (1, 2):
                was_healthy = self._healthy
                try:
                    response = await self._http.request("POST", url, headers=headers,
                                                        content=_BODY,
                                                        extensions=self._extensions)
                except httpcore.TimeoutException as exc:
                    return self._transport_failure(token, exc, not was_healthy)
                except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
                    # A connection that worked may have been closed by APNs while idle
                    # (GOAWAY): one more try opens a new one. A duplicate pass-update
                    # push is harmless: the device just asks what changed.
                    if attempt == 1 and was_healthy:
                        continue
                    return self._transport_failure(token, exc, not was_healthy)
                except Exception as exc:  # noqa: BLE001 - per-token failures never raise
                    log.warning("APNs token %s…: unexpected %s", _short(token), _describe(exc))
                    return self._transport_failure(token, exc, not was_healthy)
                self._healthy = True
                return _result(token, response)
        raise AssertionError("unreachable")

    def _transport_failure(self, token: str, exc: Exception, fresh: bool) -> PushResult:
        self._healthy = False
        if isinstance(exc, httpcore.TimeoutException):  # its inner error says nothing useful
            reason = f"{type(exc).__name__}: no answer within {self._timeout:g} s"
        else:
            reason = _failure_reason(exc, fresh)
        log.debug("APNs token %s…: %s", _short(token), reason)
        return PushResult(token, None, reason, None)


class ApnsPool:
    """One ApnsClient per pass type identifier, reused across calls (thread-safe)."""

    def __init__(self, base_url: str, ca_file: Path | None = None,
                 timeout: float = 10.0) -> None:
        self.base_url = _check_url(base_url)
        self.ca_file = ca_file
        self.timeout = timeout
        self._clients: dict[str, ApnsClient] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def client(self, pass_type_identifier: str, identity: SigningIdentity,
               token_key: ApnsTokenKey | None = None) -> ApnsClient:
        """The open client for this pass type; a new one when its certificate (or
        token key) changed."""
        fingerprint = (token_key.fingerprint if token_key is not None
                       else identity.certificate.fingerprint(hashes.SHA256()))
        if os.getpid() != self._pid:
            # Forked (e.g. worker processes): the parent's clients have no thread here and
            # their sockets are the parent's. Start afresh, leaving those untouched.
            self._clients, self._lock, self._pid = {}, threading.Lock(), os.getpid()
        with self._lock:
            current = self._clients.get(pass_type_identifier)
            if current is not None and current.fingerprint == fingerprint:
                return current
            # Opened under the lock: two threads must not both connect for one pass type.
            if token_key is not None:
                client = ApnsClient(self.base_url, token_key=token_key, ca_file=self.ca_file,
                                    timeout=self.timeout)
            else:
                client = ApnsClient(self.base_url, identity.certificate, identity.private_key,
                                    ca_file=self.ca_file, timeout=self.timeout)
            self._clients[pass_type_identifier] = client
        if current is not None:
            log.info("APNs %s: certificate changed, new connection", pass_type_identifier)
            current.close()  # waits for its running pushes
        return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


# -- helpers ------------------------------------------------------------------------------

def _not_hex(token: str) -> PushResult:
    # What APNs would answer; decided here so a token never shapes the request path.
    log.debug("APNs token %s… is not hex, not sent", _short(token))
    return PushResult(token, 400, "BadDeviceToken", None)


def _result(token: str, response: httpcore.Response) -> PushResult:
    headers = dict(response.headers)  # names arrive lower-case over HTTP/2
    apns_id = headers.get(b"apns-id", b"").decode("ascii", "replace") or None
    if response.status == 200:
        return PushResult(token, 200, None, apns_id)
    reason: str | None = None
    try:
        body = json.loads(response.content or b"null")
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        reason = body["reason"]
    elif response.content:
        reason = response.content[:_REASON_LIMIT].decode("utf-8", "replace")
    log.debug("APNs token %s…: %d %s", _short(token), response.status, reason)
    return PushResult(token, response.status, reason, apns_id)


def _ssl_context(certificate: x509.Certificate | None,
                 private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None,
                 ca_file: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ context presenting the pass certificate (if any), trusting the system
    roots (+ ca_file)."""
    context = ssl.create_default_context()  # system trust, hostname checks, TLS >= 1.2
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ApnsError(f"{ca_file}: cannot load as a CA file ({_describe(exc)})") from None
    if certificate is None or private_key is None:
        return context  # token authentication: no client certificate
    try:
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        # ssl only loads a client key from a file. The file holds the key encrypted with a
        # one-time password, in a private directory removed right after loading, so a
        # crash in between leaves nothing usable on disk.
        password = secrets.token_urlsafe(32).encode()
        key_pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password))
    except (AttributeError, TypeError, ValueError) as exc:
        raise ApnsError(f"cannot use the pass certificate or key ({_describe(exc)})") from None
    directory = tempfile.mkdtemp(prefix="passerelle-apns-")  # mode 0700
    try:
        cert_path = _write_private(directory, "certificate.pem", cert_pem)
        key_path = _write_private(directory, "key.pem", key_pem)
        context.load_cert_chain(cert_path, key_path, password=password)
    except ssl.SSLError as exc:
        raise ApnsError(f"the pass certificate and key cannot be used for TLS "
                        f"({_describe(exc)}); do they belong together?") from None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return context


def _write_private(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _check_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme != "https" or not parts.hostname or parts.path.strip("/") \
            or parts.query or parts.fragment:
        raise ApnsError(f"APNs URL {base_url!r} must be https://host[:port] "
                        f"(production: {APNS_PRODUCTION_URL})")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ApnsError(f"APNs URL {base_url!r} has a malformed port") from None
    return f"https://{parts.netloc}"


def _describe(exc: BaseException) -> str:
    """One short line: the exception type and the innermost error that says what happened
    (httpcore wraps anyio's, which wraps the ssl or socket error)."""
    inner: BaseException | None = exc
    detail = ""
    seen: set[int] = set()
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if str(inner) and inner is not exc:
            detail = f"{type(inner).__name__}: {inner}"
        inner = inner.__cause__ or inner.__context__
    text = f"{type(exc).__name__}: {exc}" if str(exc) and not detail else \
        f"{type(exc).__name__} ({detail or repr(exc)})"
    return text.splitlines()[0][:_REASON_LIMIT]


def _failure_reason(exc: BaseException, fresh: bool) -> str:
    text = _describe(exc)
    if "alert" in text.lower():
        return f"TLS refused by APNs, check the Pass Type ID certificate: {text}"[:_REASON_LIMIT]
    if fresh and isinstance(exc, httpcore.ReadError | httpcore.WriteError
                            | httpcore.RemoteProtocolError):
        # TLS 1.3 ends the handshake before the server has judged our certificate: a
        # refused one shows up as the new connection being reset on first use.
        return (f"TLS connection dropped right after the handshake (is the Pass Type ID "
                f"certificate refused?): {text}")[:_REASON_LIMIT]
    return text


def _short(token: str) -> str:
    return token[:8]

"""APNs pushes for pass updates: a persistent, multiplexed HTTP/2 client per certificate.

A pass-update push is ``POST /3/device/<pushToken>`` with ``apns-topic:
<passTypeIdentifier>`` and the body ``{}``, over TLS authenticated with the Pass
Type ID certificate and key that sign the passes (docs: shared/reference/apple.md §4).

Apple asks senders to keep connections open and to put many concurrent streams on
each: reconnecting per push looks like a denial-of-service attack. So each
:class:`ApnsClient` keeps its TLS connection(s) open on a private event loop in a
daemon thread, and the ``h2`` library (the HTTP/2 implementation httpx uses) does the
framing: one asyncio protocol per connection hands h2's events to waiting pushes. No
general-purpose HTTP client sits in between: httpcore's per-request locking and pool
bookkeeping held one process near 1,100 pushes/s, several times below what the same
connection carries this way. :meth:`ApnsClient.push` is synchronous for its callers
(job workers, commands) but sends every token of a call concurrently, up to the
server's announced stream limit per connection (a second connection opens only while
the first is full), and the connections stay open between calls. Connecting goes
through a :class:`CircuitBreaker`: while handshakes fail (a refused certificate, APNs
unreachable) at most one attempt is made per delay, 5 s doubling to 10 min, and
operators are told (:meth:`ApnsClient.problem`). :class:`ApnsPool` keeps one client per
pass type identifier.

Push tokens and keys never reach the logs; at most a token's first 8 characters do.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
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

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hpack import NeverIndexedHeaderTuple

from app.infra import instruments
from app.infra.http import transient
from app.wallet.certs import certificate_uid

if TYPE_CHECKING:
    from app.wallet.certs import SigningIdentity

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
        if transient(status):
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
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ApnsError(f"APNs key {key_id}: a .p8 key must be an elliptic-curve (P-256) key")
        return cls(key_id, team_id, key)

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


class ConnectError(Exception):
    """No connection to APNs: TCP refused or timed out, TLS refused, or no HTTP/2 answer."""

    def __init__(self, reason: str, kind: str = "connect_failed") -> None:
        super().__init__(reason)
        self.kind = kind  # connect_failed | connect_timeout | tls_refused (a metrics label)


class ConnectionLost(Exception):
    """The connection ended (GOAWAY, reset, TLS alert) while a push was in flight."""


class CircuitOpen(Exception):
    """Pushes for this certificate are paused: connecting failed a moment ago."""


class CircuitBreaker:
    """One per certificate: after a failed connection attempt (refused client certificate,
    APNs unreachable), the next attempt waits ``first`` seconds, doubling per failure up
    to ``ceiling``. Every push in between fails at once without touching the network, so
    APNs sees at most one handshake per delay, never a storm of them; the first
    connection that works closes the breaker again."""

    FIRST = 5.0
    CEILING = 600.0

    def __init__(self, first: float = FIRST, ceiling: float = CEILING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first, self.ceiling, self._clock = first, ceiling, clock
        self.failures = 0
        self.attempts = 0  # connection attempts made (tests and status)
        self.last_error: str | None = None
        self.failing_since: dt.datetime | None = None
        self._retry_at = 0.0

    def allows(self) -> bool:
        return self.failures == 0 or self._clock() >= self._retry_at

    def retry_in(self) -> float:
        return max(self._retry_at - self._clock(), 0.0) if self.failures else 0.0

    def failed(self, reason: str) -> None:
        self.failures += 1
        delay = min(self.first * 2 ** (self.failures - 1), self.ceiling)
        self._retry_at = self._clock() + delay
        self.last_error = reason
        if self.failing_since is None:
            self.failing_since = dt.datetime.now(dt.UTC)
        log.error("APNs connection failed (%d in a row), next attempt in %.0f s: %s",
                  self.failures, delay, reason)

    def succeeded(self) -> None:
        if self.failures:
            log.warning("APNs connection works again after %d failed attempt(s)",
                        self.failures)
        self.failures, self.last_error, self.failing_since = 0, None, None

    def problem(self) -> ApnsProblem | None:
        """What operators should see while connecting fails; None when it works."""
        if not self.failures or self.failing_since is None:
            return None
        retry_at = (dt.datetime.now(dt.UTC)
                    + dt.timedelta(seconds=self.retry_in()))
        return ApnsProblem(self.failing_since, self.last_error or "", retry_at, self.failures)

    def _open_error(self) -> CircuitOpen:
        return CircuitOpen(f"APNs paused after {self.failures} failed connection(s), next "
                           f"attempt in {self.retry_in():.0f} s: {self.last_error}"
                           [:_REASON_LIMIT])


@dataclass(frozen=True)
class ApnsProblem:
    failing_since: dt.datetime  # aware UTC, like the database columns
    reason: str
    next_attempt_at: dt.datetime
    failures: int


class _Stream:
    __slots__ = ("future", "status", "apns_id", "body", "timer")

    def __init__(self, future: asyncio.Future[tuple[int, str | None, bytes]]) -> None:
        self.future = future
        self.status = 0
        self.apns_id: str | None = None
        self.body = bytearray()
        self.timer: asyncio.TimerHandle | None = None


class _Connection(asyncio.Protocol):
    """One TLS connection to APNs carrying many concurrent streams. The `h2` library
    does the HTTP/2 framing, flow control and header compression; this class only
    matches its events to waiting pushes."""

    def __init__(self, client: ApnsClient) -> None:
        self.client = client
        # Our request headers are fixed, lower-case bytes: h2's per-header validation and
        # normalisation of them (and of APNs' three response headers) is pure overhead.
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.in_flight = 0
        self.usable = True  # False after GOAWAY or loss: no new streams
        self.answered = False  # a response came back: this connection worked
        loop = asyncio.get_running_loop()
        self.settled: asyncio.Future[None] = loop.create_future()  # server's SETTINGS seen
        self.closed: asyncio.Future[None] = loop.create_future()  # connection_lost ran
        self._loop = loop
        self._flush_soon = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._abort(ConnectionLost(f"HTTP/2 protocol error: {exc}"))
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers:
                        if name == b":status":
                            stream.status = int(value)
                        elif name == b"apns-id":
                            stream.apns_id = value.decode("ascii", "replace")
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and len(stream.body) < 4096:
                    stream.body.extend(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length,
                                                  event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self._finish(stream, result=(stream.status, stream.apns_id,
                                                 bytes(stream.body)))
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self._finish(stream, error=ConnectionLost(
                        f"stream reset by APNs (error code {event.error_code})"))
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if not self.settled.done():
                    self.settled.set_result(None)
                self.client._wake_all()
            elif isinstance(event, h2.events.WindowUpdated):
                self.client._wake_all()
            elif isinstance(event, h2.events.ConnectionTerminated):  # GOAWAY
                self.usable = False
                last = event.last_stream_id or 0
                for stream_id in [s for s in self.streams if s > last]:
                    self._finish(self.streams.pop(stream_id),
                                 error=ConnectionLost("GOAWAY from APNs"))
                self.client._wake_all()
        self._flush()
        if not self.usable and not self.streams and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        error = ConnectionLost(_describe(exc) if exc else "connection closed by APNs")
        if exc is not None:
            error.__cause__ = exc
        if not self.settled.done():
            self.settled.set_exception(error)
            self.settled.exception()  # retrieved: the opener reads it or has given up
        for stream in list(self.streams.values()):
            self._finish(stream, error=error)
        self.streams.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self.client._lost(self)

    # -- used by ApnsClient ---------------------------------------------------------------

    def has_room(self) -> bool:
        limit = min(self.h2.remote_settings.max_concurrent_streams, self.client._max_streams)
        return (self.usable and self.in_flight < limit
                and self.h2.outbound_flow_control_window >= len(_BODY))

    def send(self, headers: list[tuple[bytes, bytes]], timeout: float
             ) -> asyncio.Future[tuple[int, str | None, bytes]]:
        try:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, headers)
            self.h2.send_data(stream_id, _BODY, end_stream=True)
        except h2.exceptions.NoAvailableStreamIDError:
            self.usable = False  # 2^31 streams used: a fresh connection takes over
            raise ConnectionLost("no stream ids left on this connection") from None
        stream = _Stream(self._loop.create_future())
        stream.timer = self._loop.call_later(timeout, self._expire, stream_id)
        self.streams[stream_id] = stream
        if not self._flush_soon:  # one write for all streams started in this loop turn
            self._flush_soon = True
            self._loop.call_soon(self._flush)
        return stream.future

    def release(self) -> None:
        self.in_flight -= 1
        self.client._wake_one()

    def close(self) -> None:
        self.usable = False
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.h2.close_connection()
                self.transport.write(self.h2.data_to_send())
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()

    # -- internals ------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_soon = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _expire(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.timer = None
        self._finish(stream, error=TimeoutError())
        try:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            self._flush()
        except h2.exceptions.ProtocolError:
            pass

    def _finish(self, stream: _Stream, result: tuple[int, str | None, bytes] | None = None,
                error: BaseException | None = None) -> None:
        if stream.timer is not None:
            stream.timer.cancel()
        if stream.future.done():
            return
        if error is not None:
            stream.future.set_exception(error)
        elif result is None:  # no caller does this: every stream ends with one of the two
            stream.future.set_exception(ConnectionLost("the stream ended without an answer"))
        else:
            self.answered = True
            stream.future.set_result(result)

    def _abort(self, error: Exception) -> None:
        self.usable = False
        for stream in list(self.streams.values()):
            self._finish(stream, error=error)
        self.streams.clear()
        if self.transport is not None:
            self.transport.close()


class ApnsClient:
    """Persistent, multiplexed HTTP/2 client for ONE pass-type certificate (or .p8 key)."""

    def __init__(self, base_url: str, certificate: x509.Certificate | None = None,
                 private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None, *,
                 token_key: ApnsTokenKey | None = None,
                 ca_file: Path | None = None, timeout: float = 10.0,
                 max_concurrency: int = 100, max_connections: int = 4,
                 breaker: CircuitBreaker | None = None) -> None:
        """Authenticate with the pass certificate (TLS client auth, Apple's documented
        way) or, given ``token_key``, with a .p8 token of the same team.

        ``max_concurrency`` caps streams per connection (the server's own limit, which
        APNs announces in its SETTINGS, applies too); a further connection, up to
        ``max_connections``, opens only while every open one is full. 100 streams per
        connection, like httpcore: h2 counts a connection's open streams one by one for
        every new stream, so a CPU-bound sender does better with several connections of
        100 than with one of 1,000, and against the real APNs, where the round trip sets
        the pace, 4 x 100 streams in flight carry several thousand pushes/s."""
        if token_key is None and (certificate is None or private_key is None):
            raise ApnsError("APNs needs the pass certificate and key, or a .p8 token key")
        if max_concurrency < 1 or max_connections < 1:
            raise ApnsError(f"max_concurrency and max_connections must be at least 1, got "
                            f"{max_concurrency} and {max_connections}")
        self.base_url = _check_url(base_url)
        parts = urlsplit(self.base_url)
        self._host = parts.hostname or ""
        self._port = parts.port or 443
        self._authority = parts.netloc.encode("idna")
        self._token_key = token_key
        if token_key is not None:
            self.fingerprint = token_key.fingerprint
            self._ssl = _ssl_context(None, None, ca_file)
        else:
            assert certificate is not None and private_key is not None
            self.fingerprint = certificate.fingerprint(hashes.SHA256())
            self._ssl = _ssl_context(certificate, private_key, ca_file)
        self._ssl.set_alpn_protocols(["h2"])  # APNs speaks only HTTP/2
        self._timeout = timeout
        self._max_streams = max_concurrency
        self._max_connections = max_connections
        self.breaker = breaker or CircuitBreaker()

        self._pid = os.getpid()
        self._lock = threading.Condition()
        self._closed = False
        self._in_flight = 0  # push() calls running, so close() can let them finish
        self._connections: list[_Connection] = []
        self._opening: asyncio.Future[_Connection] | None = None
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

        self._loop = asyncio.new_event_loop()
        uid = (certificate_uid(certificate) if certificate is not None else None) \
            or self.fingerprint.hex()[:12]
        # Daemon: a process that forgets close() still exits.
        self._thread = threading.Thread(target=self._run_loop, name=f"apns:{uid}", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------

    def push(self, topic: str, tokens: Sequence[str]) -> list[PushResult]:
        """One push per token, concurrently over the open connection(s); results in token
        order.

        Per-token failures (HTTP errors, timeouts, a refused TLS handshake, a paused
        circuit breaker) come back as PushResults; nothing here raises for them.
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
                instruments.apns_unanswered("client_closed", len(tokens))
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

    def problem(self) -> ApnsProblem | None:
        """Set while connecting fails (see :class:`CircuitBreaker`)."""
        return self.breaker.problem()

    def close(self) -> None:
        """Let running push() calls finish, close the connections, stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=self._timeout + 5)
        try:
            self._call(self._close_all()).result(timeout=self._timeout + 5)
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

    async def _close_all(self) -> None:
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        if connections:  # let the transports send GOAWAY and finish their TLS shutdown
            await asyncio.wait([c.closed for c in connections], timeout=2)
        for connection in connections:
            if not connection.closed.done() and connection.transport is not None:
                connection.transport.abort()

    async def _push_all(self, topic: str, tokens: list[str]) -> list[PushResult]:
        base = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", self._authority)]
        extra = [(b"apns-topic", topic.encode()), (b"content-length", _BODY_LENGTH)]
        if self._token_key is not None:
            extra.append((b"authorization", b"bearer " + self._token_key.bearer().encode()))
        return list(await asyncio.gather(*(self._push_one(base, extra, t) for t in tokens)))

    async def _push_one(self, base: list[tuple[bytes, bytes]],
                        extra: list[tuple[bytes, bytes]], token: str) -> PushResult:
        if not _TOKEN.match(token):
            return _not_hex(token)
        # Never indexed: each path is used once, so adding it to the HPACK table would
        # only cost time and evict the headers that repeat (topic, authority).
        headers = [*base, NeverIndexedHeaderTuple(b":path", b"/3/device/" + token.encode()),
                   *extra]
        for attempt in (1, 2):
            try:
                connection = await self._slot()
            except (ConnectError, CircuitOpen) as exc:
                instruments.apns_unanswered(exc.kind if isinstance(exc, ConnectError)
                                        else "circuit_open")
                return PushResult(token, None, str(exc)[:_REASON_LIMIT], None)
            worked = connection.answered
            started = time.perf_counter()
            try:
                status, apns_id, body = await connection.send(headers, self._timeout)
            except TimeoutError:
                instruments.apns_unanswered("timeout")
                return self._failure(token, f"ReadTimeout: no answer within "
                                            f"{self._timeout:g} s")
            except ConnectionLost as exc:
                # A connection that worked may have been closed by APNs (GOAWAY when idle
                # or being restarted): one more try on a new one. A duplicate pass-update
                # push is harmless: the device just asks what changed.
                if attempt == 1 and worked:
                    continue
                reason = _failure_reason(exc, fresh=not worked)
                instruments.apns_unanswered("tls_refused" if reason.startswith("TLS")
                                        else "connection_lost")
                return self._failure(token, reason)
            finally:
                connection.release()
            result = _result(token, status, apns_id, body)
            instruments.apns_answered(status, result.reason, time.perf_counter() - started)
            return result
        raise AssertionError("unreachable")

    def _failure(self, token: str, reason: str) -> PushResult:
        log.debug("APNs token %s…: %s", _short(token), reason)
        return PushResult(token, None, reason[:_REASON_LIMIT], None)

    async def _slot(self) -> _Connection:
        """A connection with a free stream (counted as taken). Opens one if none is open
        (or all are full, up to max_connections), through the circuit breaker: every
        push waiting for that connection shares its fate, so a refused certificate costs
        one handshake, not one per push."""
        while True:
            for connection in self._connections:
                if connection.has_room():
                    connection.in_flight += 1
                    return connection
            usable = sum(c.usable for c in self._connections)
            if self._opening is None and usable < self._max_connections:
                if self.breaker.allows():
                    self._opening = asyncio.ensure_future(self._open())
                    self._opening.add_done_callback(self._opened)
                elif not usable:
                    raise self.breaker._open_error()
            if self._opening is not None and not usable:
                await asyncio.shield(self._opening)  # its failure is this push's failure
                continue
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter

    async def _open(self) -> _Connection:
        self.breaker.attempts += 1
        connected = False
        try:
            _, connection = await asyncio.wait_for(self._loop.create_connection(
                lambda: _Connection(self), self._host, self._port, ssl=self._ssl,
                server_hostname=self._host), self._timeout)
            assert isinstance(connection, _Connection)
            connected = True
            try:
                # The server's SETTINGS: it accepted our certificate (with TLS 1.3 a
                # refusal arrives only after the client's side of the handshake ended).
                await asyncio.wait_for(asyncio.shield(connection.settled), self._timeout)
            except BaseException:
                connection.close()
                raise
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported through the breaker
            if isinstance(exc, asyncio.TimeoutError):
                reason, kind = f"ConnectTimeout: no answer within {self._timeout:g} s", \
                    "connect_timeout"
            else:
                reason, kind = _failure_reason(exc, fresh=connected), "tls_refused"
                if "TLS" not in reason:
                    reason, kind = f"ConnectError ({reason})", "connect_failed"
            instruments.apns_connection(kind)
            self.breaker.failed(reason)
            raise ConnectError(reason[:_REASON_LIMIT], kind) from None
        instruments.apns_connection("opened")
        self.breaker.succeeded()
        self._connections.append(connection)
        return connection

    def _opened(self, future: asyncio.Future[_Connection]) -> None:
        self._opening = None
        if not future.cancelled():
            future.exception()  # retrieved here; the pushes waiting on it read it too
        self._wake_all()

    def _lost(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
        self._wake_all()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


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


def _result(token: str, status: int, apns_id: str | None, content: bytes) -> PushResult:
    if status == 200:
        return PushResult(token, 200, None, apns_id)
    reason: str | None = None
    try:
        body = json.loads(content or b"null")
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        reason = body["reason"]
    elif content:
        reason = content[:_REASON_LIMIT].decode("utf-8", "replace")
    log.debug("APNs token %s…: %d %s", _short(token), status, reason)
    return PushResult(token, status, reason, apns_id)


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
    (ours wrap the ssl or socket error)."""
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
    if fresh and isinstance(exc, ConnectionLost | ConnectionError | EOFError):
        # TLS 1.3 ends the handshake before the server has judged our certificate: a
        # refused one shows up as the new connection being dropped before it answers.
        return (f"TLS connection dropped right after the handshake (is the Pass Type ID "
                f"certificate refused?): {text}")[:_REASON_LIMIT]
    return text[:_REASON_LIMIT]


def _short(token: str) -> str:
    return token[:8]

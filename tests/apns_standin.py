"""An APNs stand-in: a real HTTP/2 server over TLS on 127.0.0.1, for tests and benchmarks.

Framing is the `h2` library's; TLS is the standard `ssl` module, so the server sees
the client certificate and can check the topic against its UID the way APNs does.
It runs an asyncio loop in a background thread; each connection is one
`asyncio.Protocol` multiplexing any number of streams.

    with ApnsStandin(client_ca_files=[root_ca, wwdr]) as server:
        client = ApnsClient(server.url, cert, key, ca_file=server.ca_file)
        server.script[token] = [(410, "Unregistered")]   # then 200
        ...
        server.received  # every push: token, topic, body, client UID, connection id

Checks per request, in order: POST (else 405 MethodNotAllowed), path
``/3/device/<token>`` (else 404 BadPath) with a hex token (else 400 BadDeviceToken),
``apns-topic`` present (else 400 MissingTopic) and equal to the client certificate's
UID (else 400 DeviceTokenNotForTopic), a body that is a JSON object (else 400
PayloadEmpty / BadPayload). Then the token's script, then 200 with an ``apns-id``.

`python tests/apns_standin.py --client-ca root.pem --client-ca wwdr.pem` serves
until interrupted (used by benchmarks/push_fanout.py in a process of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import re
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if __package__ in (None, ""):  # run as a script: make `app` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.wallet.certs import certificate_uid

_PATH = re.compile(r"^/3/device/([^/?#]*)$")
_HEX = re.compile(r"^[0-9A-Fa-f]{1,200}$")
#: What APNs advertises to certificate-authenticated providers.
MAX_CONCURRENT_STREAMS = 1000

#: A scripted answer: (status, reason) or (status, reason, delay in seconds).
Answer = tuple[int, str | None] | tuple[int, str | None, float]


@dataclass(frozen=True)
class Received:
    token: str
    topic: str | None
    body: bytes
    client_uid: str | None  # UID of the client certificate (None: no certificate)
    connection_id: int
    status: int  # what the stand-in answered
    reason: str | None


@dataclass
class ApnsStandin:
    """HTTP/2 + TLS APNs stand-in. Use as a context manager."""

    client_ca_files: Sequence[Path]
    #: "required" (like APNs) or "optional" (accept clients without a certificate, e.g.
    #: h2load in the benchmark; the topic check is then skipped).
    client_cert: str = "required"
    port: int = 0
    record: bool = True
    script: dict[str, list[Answer]] = field(default_factory=dict)
    #: Token authentication: key id -> (team id, public key, topics that team owns).
    #: A request with ``authorization: bearer <JWT>`` is checked against these.
    token_keys: dict[str, tuple[str, object, set[str]]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    #: While True, every TLS handshake is refused as APNs refuses a revoked or foreign
    #: certificate: client certificates are checked against a CA that issued none of them.
    refuse_client_certificates: bool = False
    #: TLS handshakes begun (ClientHellos seen) and connections that completed one: the
    #: difference is handshakes refused, e.g. a client certificate from another CA.
    handshakes_started: int = 0
    connections_opened: int = 0
    #: Most streams one connection had waiting for an answer at once (see delayed answers).
    max_in_flight: int = 0
    #: Errors the event loop reported other than refused handshakes (should stay empty).
    errors: list[str] = field(default_factory=list)
    ca_file: Path = field(init=False)  # trust this to reach the stand-in

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._protocols: set[_Connection] = set()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> ApnsStandin:
        self._dir = Path(tempfile.mkdtemp(prefix="apns-standin-"))
        context = self._ssl_context(self._dir)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_exception)
        self._thread = threading.Thread(target=self._loop.run_forever, name="apns-standin",
                                        daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(context), self._loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for protocol in list(self._protocols):
                protocol.close()
            await self._server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
            # Let transports finish closing before the loop goes away.
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            self._loop = self._thread = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ApnsStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests look at -------------------------------------------------------------

    @property
    def handshakes_refused(self) -> int:
        return self.handshakes_started - self.connections_opened

    def close_connections(self) -> None:
        """Send GOAWAY on every open connection and close it, as APNs does to idle ones."""
        assert self._loop is not None

        async def close_all() -> None:
            for protocol in list(self._protocols):
                protocol.close()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=10)

    def connection_ids(self) -> set[int]:
        with self._lock:
            return {r.connection_id for r in self.received}

    def open_connections(self) -> int:
        return len(self._protocols)

    # -- internals ----------------------------------------------------------------------

    def _ssl_context(self, directory: Path) -> ssl.SSLContext:
        ca_pem, cert_pem, key_pem = _server_certificates()
        self.ca_file = directory / "standin-ca.pem"
        self.ca_file.write_bytes(ca_pem)
        (directory / "server.pem").write_bytes(cert_pem)
        (directory / "server-key.pem").write_bytes(key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(directory / "server.pem", directory / "server-key.pem")
        context.verify_mode = (ssl.CERT_REQUIRED if self.client_cert == "required"
                               else ssl.CERT_OPTIONAL)
        for ca in self.client_ca_files:
            context.load_verify_locations(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        context.sni_callback = self._hello
        # The same server, trusting only a CA that issued no client certificate.
        refusing = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        refusing.minimum_version = ssl.TLSVersion.TLSv1_2
        refusing.load_cert_chain(directory / "server.pem", directory / "server-key.pem")
        refusing.verify_mode = ssl.CERT_REQUIRED
        refusing.load_verify_locations(cadata=_server_certificates()[0].decode())
        refusing.set_alpn_protocols(["h2"])
        self._refusing = refusing
        return context

    async def _listen(self, context: ssl.SSLContext) -> asyncio.base_events.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Connection(self), "127.0.0.1", self.port,
                                        ssl=context, backlog=128)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError):
            return  # a refused handshake (reported in asyncio debug mode): counted above
        message = f"{type(exc).__name__}: {exc}" if exc else str(context.get("message"))
        self.errors.append(message)

    def _hello(self, sslobj: ssl.SSLObject, server_name: str | None,
               context: ssl.SSLContext) -> None:
        # OpenSSL calls this for every ClientHello, with or without SNI.
        self.handshakes_started += 1
        if self.refuse_client_certificates:
            sslobj.context = self._refusing

    def _answer(self, token: str) -> Answer:
        with self._lock:
            queue = self.script.get(token)
            if queue:
                return queue.pop(0)
        return (200, None)

    def _record(self, item: Received) -> None:
        if self.record:
            with self._lock:
                self.received.append(item)


class _Connection(asyncio.Protocol):
    """One TLS connection: h2 state machine, many streams."""

    def __init__(self, server: ApnsStandin) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.client_uid: str | None = None
        self.id = 0
        self.waiting = 0  # streams with a delayed answer still to send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server.connections_opened += 1
        self.id = server.connections_opened
        server._protocols.add(self)
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        if der:
            self.client_uid = certificate_uid(x509.load_der_x509_certificate(der))
        self.h2.initiate_connection()
        self.h2.update_settings({
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS})
        transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._protocols.discard(self)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.h2.close_connection()
            self.transport.write(self.h2.data_to_send())
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.h2.data_to_send())  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = (dict(event.headers), bytearray())  # type: ignore[arg-type]
                if event.stream_ended:
                    self._respond(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream[1].extend(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length,
                                                  event.stream_id)
                if event.stream_ended:
                    self._respond(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                if event.stream_id in self.streams:
                    self._respond(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
        if self.transport is not None:
            self.transport.write(self.h2.data_to_send())

    def _respond(self, stream_id: int) -> None:
        headers, body = self.streams.pop(stream_id)
        token, topic = "", headers.get("apns-topic")
        status, reason, delay = self._check(headers, bytes(body))
        match = _PATH.match(headers.get(":path", ""))
        if match:
            token = match.group(1)
        if status == 200:
            answer = self.server._answer(token)
            status, reason = answer[0], answer[1]
            delay = answer[2] if len(answer) > 2 else 0.0  # type: ignore[misc]
        self.server._record(Received(token, topic, bytes(body), self.client_uid, self.id,
                                     status, reason))
        if delay:
            self.waiting += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.waiting)
            loop = asyncio.get_running_loop()
            loop.call_later(delay, self._send_later, stream_id, status, reason)
        else:
            self._send(stream_id, status, reason, flush=False)

    def _check(self, headers: dict[str, str], body: bytes) -> tuple[int, str | None, float]:
        if headers.get(":method") != "POST":
            return 405, "MethodNotAllowed", 0.0
        match = _PATH.match(headers.get(":path", ""))
        if not match:
            return 404, "BadPath", 0.0
        if not _HEX.match(match.group(1)):
            return 400, "BadDeviceToken", 0.0
        topic = headers.get("apns-topic")
        if not topic:
            return 400, "MissingTopic", 0.0
        authorization = headers.get("authorization")
        if authorization is not None:
            problem = self._check_token(authorization, topic)
            if problem:
                return 403 if problem != "TopicDisallowed" else 400, problem, 0.0
        elif self.client_uid is None and self.server.token_keys:
            return 403, "MissingProviderToken", 0.0
        elif self.client_uid is not None and topic != self.client_uid:
            return 400, "DeviceTokenNotForTopic", 0.0
        if not body:
            return 400, "PayloadEmpty", 0.0
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, "BadPayload", 0.0
        if not isinstance(payload, dict):
            return 400, "BadPayload", 0.0
        return 200, None, 0.0

    def _check_token(self, authorization: str, topic: str) -> str | None:
        """APNs' provider-token rules: ES256, known kid, iss = its team, fresh iat."""
        import jwt

        if not authorization.startswith("bearer "):
            return "MissingProviderToken"
        token = authorization[len("bearer "):]
        try:
            header = jwt.get_unverified_header(token)
            team, public_key, topics = self.server.token_keys[header.get("kid", "")]
            claims = jwt.decode(token, public_key, algorithms=["ES256"],  # type: ignore[arg-type]
                                options={"require": ["iss", "iat"], "verify_iat": False})
        except (KeyError, jwt.PyJWTError):
            return "InvalidProviderToken"
        if claims["iss"] != team:
            return "InvalidProviderToken"
        if time.time() - claims["iat"] > 3600:
            return "ExpiredProviderToken"
        if topic not in topics:
            return "TopicDisallowed"
        return None

    def _send_later(self, stream_id: int, status: int, reason: str | None) -> None:
        self.waiting -= 1
        self._send(stream_id, status, reason)

    def _send(self, stream_id: int, status: int, reason: str | None,
              flush: bool = True) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = [(":status", str(status)), ("apns-id", str(uuid.uuid4()).upper())]
        data = b""
        if status != 200 and reason is not None:
            error: dict[str, object] = {"reason": reason}
            if status == 410:
                error["timestamp"] = int(time.time() * 1000)
            data = json.dumps(error).encode()
            headers += [("content-type", "application/json"),
                        ("content-length", str(len(data)))]
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not data)
            if data:
                self.h2.send_data(stream_id, data, end_stream=True)
        except h2.exceptions.StreamClosedError:
            return  # the client reset the stream (e.g. it timed out)
        if flush:
            self.transport.write(self.h2.data_to_send())


def _server_certificates() -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a 127.0.0.1/localhost server certificate it issued (EC P-256)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "APNs stand-in test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=False, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True,
              crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), cert.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client-ca", action="append", type=Path, required=True,
                        help="CA file trusted for client certificates (repeatable)")
    parser.add_argument("--client-cert", choices=["required", "optional"], default="required")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ca-out", type=Path,
                        help="copy the stand-in's own CA certificate here, for clients")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with ApnsStandin(args.client_ca, client_cert=args.client_cert, port=args.port,
                     record=False) as server:
        if args.ca_out:
            shutil.copyfile(server.ca_file, args.ca_out)
        print(f"listening {server.url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

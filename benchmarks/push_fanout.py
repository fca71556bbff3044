"""Pass-update pushes per second: ApnsClient.push fanning out to 10,000 devices.

    .venv/bin/python benchmarks/push_fanout.py --devices 10000 --repeat 3

Both sides talk to the same local APNs stand-in (tests/apns_standin.py: HTTP/2 over
TLS, Python `h2`), run in a process of its own so it has a core to itself:

- **ApnsClient**: one `push()` call with N tokens from this one process, over one
  persistent, multiplexed connection authenticated with a development Pass Type ID
  certificate — the path the push worker runs.
- **stand-in ceiling**: the most the stand-in answers, measured with a bare client in
  the same run: `h2load` (C, from nghttp2; `apt-get install nghttp2-client`), one
  connection, 100 concurrent streams — the stream limit ApnsClient's connection has.
  h2load cannot present a client certificate, so the stand-in runs with the client
  certificate optional (a connection that presents one, like ApnsClient's, is still
  verified and topic-checked; the per-request work is the same either way). Without
  h2load, a bare Python `h2` loop on a raw TLS socket is used instead (and said so).

The ratio says how close the client gets to what the server side can take; against
real APNs the network round trip, not this, usually sets the pace.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.apns import ApnsClient  # noqa: E402
from app.certs import load_identity, make_dev_certs  # noqa: E402

TOPIC = "pass.dev.benchmark.push"
STREAMS = 100  # concurrent streams per connection: httpcore's cap, h2load's -m


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bare", choices=["auto", "h2load", "python"], default="auto",
                        help="bare client for the stand-in's ceiling (auto: h2load if found)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="push-fanout-") as tmp:
        work = Path(tmp)
        paths = make_dev_certs(work / "certs", TOPIC, "BENCHTEAM1")
        identity = load_identity(work / "certs", paths.certificate_file, paths.key_file)
        server, url, ca_file = _start_standin(paths.root_ca, paths.wwdr, work)
        try:
            tokens = [os.urandom(32).hex() for _ in range(args.devices)]
            bare = _pick_bare(args.bare)
            client_rates: list[float] = []
            bare_rates: list[float] = []
            with ApnsClient(url, identity.certificate, identity.private_key,
                            ca_file=ca_file) as client:
                _check(client.push(TOPIC, tokens[:200]), 200)  # open and warm the connection
                for _ in range(args.repeat):  # interleaved, so both see the same machine
                    bare_rates.append(_bare_rate(bare, url, ca_file, tokens, work, identity))
                    started = time.perf_counter()
                    results = client.push(TOPIC, tokens)
                    client_rates.append(len(tokens) / (time.perf_counter() - started))
                    _check(results, len(tokens))
        finally:
            server.terminate()
            server.wait(timeout=10)

    client_rate, bare_rate = statistics.median(client_rates), statistics.median(bare_rates)
    label = {"h2load": f"h2load -c 1 -m {STREAMS}",
             "python": f"bare Python h2 loop, {STREAMS} streams; client-bound, so a floor "
                       f"of the real ceiling: apt-get install nghttp2-client for h2load"}[bare]
    print(f"cores: {os.cpu_count()}; Python {platform.python_version()}; "
          f"{args.devices} devices per run; median of {args.repeat}")
    print(f"stand-in ceiling ({label})")
    print(f"  {bare_rate:8.0f} pushes/s   runs: {', '.join(f'{r:.0f}' for r in bare_rates)}")
    print("ApnsClient.push (one process, one connection, one call per run)")
    print(f"  {client_rate:8.0f} pushes/s   runs: {', '.join(f'{r:.0f}' for r in client_rates)}")
    print(f"ApnsClient / ceiling: {client_rate / bare_rate:.0%}; "
          f"{args.devices} devices in {args.devices / client_rate:.1f} s")
    return 0


def _start_standin(root_ca: Path, wwdr: Path, work: Path) -> tuple[subprocess.Popen, str, Path]:
    ca_file = work / "standin-ca.pem"
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "apns_standin.py"), "--client-ca", str(root_ca),
         "--client-ca", str(wwdr), "--client-cert", "optional", "--ca-out", str(ca_file)],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("listening "):
        server.kill()
        raise SystemExit(f"stand-in did not start: {line!r}")
    return server, line.split()[1], ca_file


def _check(results: list, expected: int) -> None:  # type: ignore[type-arg]
    sent = sum(r.outcome == "sent" for r in results)
    if sent != expected:
        raise SystemExit(f"only {sent} of {expected} pushes were accepted: "
                         f"{results[0] if results else None}")


def _pick_bare(choice: str) -> str:
    if choice == "auto":
        return "h2load" if shutil.which("h2load") else "python"
    if choice == "h2load" and not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client (or --bare python)")
    return choice


def _bare_rate(kind: str, url: str, ca_file: Path, tokens: list[str], work: Path,
               identity) -> float:  # type: ignore[no-untyped-def]
    if kind == "h2load":
        return _h2load_rate(url, tokens, work)
    return _python_h2_rate(url, ca_file, tokens, identity)


def _h2load_rate(url: str, tokens: list[str], work: Path) -> float:
    uris, body = work / "uris.txt", work / "body.json"
    uris.write_text("".join(f"{url}/3/device/{t}\n" for t in tokens))
    body.write_bytes(b"{}")
    out = subprocess.run(
        ["h2load", "-n", str(len(tokens)), "-c", "1", "-m", str(STREAMS), "-t", "1",
         "-d", str(body), "-H", f"apns-topic: {TOPIC}", "-i", str(uris)],
        capture_output=True, text=True, check=True).stdout
    done = re.search(r"status codes: (\d+) 2xx", out)
    if not done or int(done.group(1)) != len(tokens):
        raise SystemExit(f"h2load: not every request got a 2xx:\n{out}")
    match = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    assert match, out
    return float(match.group(3))


def _python_h2_rate(url: str, ca_file: Path, tokens: list[str],
                    identity) -> float:  # type: ignore[no-untyped-def]
    """Bare h2 on a blocking TLS socket: keep STREAMS requests open, no pooling layer."""
    import h2.config
    import h2.connection
    import h2.events
    from cryptography.hazmat.primitives import serialization

    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 443
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as tmp:  # ssl wants files for the client identity
        cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert.write_bytes(identity.certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.chmod(key, 0o600)
        context.load_cert_chain(cert, key)
    sock = context.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    started = time.perf_counter()
    pending, done, next_token = 0, 0, 0
    authority = f"{host}:{port}"
    while done < len(tokens):
        while pending < STREAMS and next_token < len(tokens):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [(":method", "POST"), (":scheme", "https"),
                                       (":authority", authority),
                                       (":path", f"/3/device/{tokens[next_token]}"),
                                       ("apns-topic", TOPIC), ("content-length", "2")])
            conn.send_data(stream, b"{}", end_stream=True)
            pending, next_token = pending + 1, next_token + 1
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        if not data:
            raise SystemExit("stand-in closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.StreamEnded):
                pending, done = pending - 1, done + 1
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    elapsed = time.perf_counter() - started
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    return len(tokens) / elapsed


if __name__ == "__main__":
    raise SystemExit(main())

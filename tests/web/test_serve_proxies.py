"""``PASSERELLE_TRUSTED_PROXIES`` through the real production server: ``passerelle serve``
run as its own process, spoken to over HTTP like nginx would. Behind one trusted proxy,
each client (its ``X-Forwarded-For``) has its own rate-limit bucket; without the setting,
forged ``X-Forwarded-For`` headers change nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from app.web.limits import DEVICE_LOG_LIMIT

LOG_LIMIT = int(DEVICE_LOG_LIMIT.split()[0])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _serve(settings, tmp_path: Path, trusted_proxies: int) -> Iterator[str]:  # type: ignore[no-untyped-def]
    port = _free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PASSERELLE_")}
    env.update({
        "PASSERELLE_DATABASE_URL": settings.database_url,
        "PASSERELLE_INSTANCE_PATH": str(settings.instance_path),
        "PASSERELLE_CERTS_PATH": str(settings.certs_path),
        "PASSERELLE_STRICT_CERTS": "false",
        "PASSERELLE_TRUSTED_PROXIES": str(trusted_proxies),
    })
    command = Path(sys.executable).with_name("passerelle")
    args = ([str(command)] if command.exists()
            else [sys.executable, "-c", "from app.cli import main; main()"])
    output = (tmp_path / f"serve-{trusted_proxies}.log").open("w")
    # One server process: without Redis each process counts its own rate limits.
    server = subprocess.Popen([*args, "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"],
                              env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # until it answers (or has died)
            assert server.poll() is None, (tmp_path / f"serve-{trusted_proxies}.log").read_text()
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail("passerelle serve did not answer")
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        output.close()


def _log(url: str, client: str | None) -> requests.Response:
    headers = {"X-Forwarded-For": client} if client else {}
    return requests.post(f"{url}/passkit/v1/log", json={"logs": ["x"]}, headers=headers,
                         timeout=10)


def _remaining(response: requests.Response) -> int:
    assert response.status_code == 200, response.status_code
    return int(response.headers["X-RateLimit-Remaining"])


def test_behind_one_trusted_proxy_each_client_has_its_own_bucket(app, settings,  # type: ignore[no-untyped-def]
                                                                 tmp_path) -> None:
    with _serve(settings, tmp_path, trusted_proxies=1) as url:
        # nginx appends the address it saw; the last hop is the client.
        a, b = "198.51.100.7, 203.0.113.1", "203.0.113.2"
        assert [_remaining(_log(url, a)), _remaining(_log(url, b)),
                _remaining(_log(url, a))] == [LOG_LIMIT - 1, LOG_LIMIT - 1, LOG_LIMIT - 2]
        statuses = [_log(url, a).status_code for _ in range(LOG_LIMIT - 2 + 1)]
        assert statuses[-2:] == [200, 429]  # client A used up its minute ...
        assert _remaining(_log(url, b)) == LOG_LIMIT - 2  # ... B did not
        assert _remaining(_log(url, "203.0.113.3")) == LOG_LIMIT - 1
        assert _remaining(_log(url, None)) == LOG_LIMIT - 1  # the proxy's own address


def test_without_trusted_proxies_forged_headers_are_ignored(app, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with _serve(settings, tmp_path, trusted_proxies=0) as url:
        forged = [_remaining(_log(url, f"203.0.113.{n}")) for n in range(1, 4)]
        assert forged + [_remaining(_log(url, None))] == [
            LOG_LIMIT - 1, LOG_LIMIT - 2, LOG_LIMIT - 3, LOG_LIMIT - 4]

"""Headless Chromium (Debian's package) against a real server on localhost."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from werkzeug.serving import make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


@contextmanager
def live_server(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    # Werkzeug's threaded server, because its shutdown() is safe to call from another thread:
    # closing waitress's socket under its select() loop raised EBADF in that thread now and then.
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=120)


def dump_dom(url: str, profile: Path) -> str:
    result = chromium(url, profile, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def screenshot(url: str, profile: Path, name: str, size: tuple[int, int]) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    result = chromium(url, profile, f"--screenshot={path}", f"--window-size={size[0]},{size[1]}")
    assert result.returncode == 0 and path.exists(), result.stderr[-2000:]
    return path

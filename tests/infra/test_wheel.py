"""A built wheel works away from the checkout: ``pip wheel`` the project, install the
wheel (not editable) into a new virtualenv, run ``passerelle up`` from an empty folder,
and fetch the demo page and a signed .pkpass over HTTP.

Migrations and pass templates live at the repository root; only a wheel that carries
them (setup.py copies them into the package) can migrate and seed the demo here. The
instance folder must appear under the working directory, as README says.

The new virtualenv gets the wheel alone (``--no-deps``); its dependencies come from the
test virtualenv through a .pth line, which adds that site-packages folder without running
its .pth files, so the checkout's editable install does not leak in (asserted below).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import requests

from app.infra.config import REPO_ROOT
from tests.pkpass_check import verify_pkpass
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

#: Checkout content that is not the project's source (and would slow the copy down).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                                    "instance", "test-artifacts", "__pycache__", "*.pyc",
                                    ".pytest_cache", ".ruff_cache", ".mypy_cache", "out")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _build_wheel(tmp_path: Path) -> Path:
    # Built from a copy: setuptools' build/ folder in the checkout would keep files that
    # no longer exist in the source, and the wheel would carry them.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist,
         source)
    (wheel,) = dist.glob("passerelle-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         wheel)
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test-deps.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    return venv


def test_wheel_installed_elsewhere_serves_the_demo(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    venv = _venv_with(wheel, tmp_path)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PASSERELLE_") and key != "PYTHONPATH"}
    env["PASSERELLE_PUBLIC_URL"] = url

    # The code that runs is the wheel's, with its own copy of the root-level folders.
    where = _run(venv / "bin" / "python", "-c",
                 "import app, app.infra.config as c; print(app.__file__); "
                 "print(c.shipped('migrations')); print(c.shipped('pass_templates'))",
                 cwd=workdir, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    assert (Path(where[1]) / "env.py").is_file()
    assert (Path(where[2]) / "loyalty" / "pass.json").is_file()

    log = (tmp_path / "up.log").open("w")
    server = subprocess.Popen([str(venv / "bin" / "passerelle"), "up", "--host", "127.0.0.1",
                               "--port", str(port)],
                              cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)

    def answers() -> requests.Response | None:
        assert server.poll() is None, (tmp_path / "up.log").read_text()
        try:
            return requests.get(f"{url}/demo/", timeout=5)
        except requests.ConnectionError:
            return None

    try:
        page = wait_until(answers, seconds=90)
        assert page.status_code == 200, page.text
        link = re.search(r'href="(/demo/cards/[^"]+\.pkpass)"', page.text)
        assert link, page.text
        card = requests.get(url + link.group(1), timeout=30)
        assert card.status_code == 200
        assert card.headers["Content-Type"].startswith("application/vnd.apple.pkpass")
        instance = workdir / "instance"
        pass_json = verify_pkpass(card.content, instance / "certs" / "dev" / "root-ca.pem",
                                  tmp_path / "check")
        assert pass_json["webServiceURL"].startswith(url)
        assert (instance / "passerelle.sqlite3").is_file()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()

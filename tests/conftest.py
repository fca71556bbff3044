"""Shared fixtures: a real migrated database (SQLite, or PostgreSQL when
PASSERELLE_TEST_DATABASE_URL is set), development certificates, the Flask app.

Tests commit for real (commands and workers open their own connections), so
every table is emptied after each test instead of rolling back a transaction.

The suite runs in parallel (pytest-xdist, ``-n`` in pyproject.toml). Each worker is
its own process with its own database: a SQLite file under its own temporary folder,
or on PostgreSQL a database ``<given database>_<worker id>`` created next to the
given one on first use. Stand-ins and servers listen on ports the system picks.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

#: "gw0", "gw1"... in a pytest-xdist worker; empty in a serial run (``-n 0``, ``-p no:xdist``).
WORKER_ID = os.environ.get("PYTEST_XDIST_WORKER", "")
_OWN_METRICS = f"prometheus-{WORKER_ID}-"
if (WORKER_ID and os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        and not Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).name.startswith(_OWN_METRICS)):
    # Processes given one folder add up each other's metrics: a folder per worker, set
    # before prometheus_client is imported (it reads the variable once, at import).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=_OWN_METRICS)

from app import create_app
from app.infra import migrate
from app.infra.config import Settings, normalize_database_url
from app.infra.models import Base
from app.services import Services

TEST_DB_ENV = "PASSERELLE_TEST_DATABASE_URL"


def configured_database_url() -> str | None:
    """The server database this process tests against, or None for SQLite.

    In an xdist worker that is ``<database>_<worker id>`` beside the database named in
    PASSERELLE_TEST_DATABASE_URL (created here when missing, kept for the next run), so
    that workers never empty each other's tables. A serial run uses the URL as given.
    """
    given = os.environ.get(TEST_DB_ENV)
    if not given:
        return None
    url = make_url(normalize_database_url(given))
    if not WORKER_ID or url.get_backend_name() != "postgresql":
        return url.render_as_string(hide_password=False)
    own = url.set(database=f"{url.database}_{WORKER_ID}")
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                 {"name": own.database})
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{own.database}"'))
    finally:
        admin.dispose()
    return own.render_as_string(hide_password=False)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: no error under -p no:xdist
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (pyproject.toml) means one worker per core, but ``pytest -m cluster``
    runs serially: its one test starts a dozen processes that want the whole machine."""
    if (config.getoption("markexpr") or "").strip() == "cluster":
        return 0
    return None  # xdist counts the cores


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = configured_database_url()
    if url:
        engine = create_engine(url)
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("DROP SCHEMA public CASCADE"))
                conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.sqlite3'}"
    migrate.upgrade(url)
    yield url


@pytest.fixture(scope="session")
def shared_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Certificates and derived images are slow to make: one set per test session."""
    return {"certs": tmp_path_factory.mktemp("certs"),
            "image_cache": tmp_path_factory.mktemp("image-cache")}


@pytest.fixture()
def settings(tmp_path: Path, database_url: str, shared_dirs: dict[str, Path]) -> Settings:
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "image-cache").symlink_to(shared_dirs["image_cache"], target_is_directory=True)
    return Settings.from_env(
        environ={}, instance_path=instance, database_url=database_url,
        certs_path=shared_dirs["certs"], demo=True, strict_certs=False,
        public_url="https://wallet.example.test",
        # Receivers and stand-ins listen on 127.0.0.1; test_netguard.py turns this off.
        webhook_allow_private_networks=True,
    )


@pytest.fixture()
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from app.web.limits import limiter

    flask_app = create_app(settings)
    flask_app.config["TESTING"] = True
    limiter.reset()  # rate-limit counters are per process; each test starts from zero
    yield flask_app
    _empty_tables(flask_app.extensions["passerelle"])
    flask_app.extensions["passerelle"].db.dispose()


@pytest.fixture()
def services(app) -> Services:  # type: ignore[no-untyped-def]
    svc: Services = app.extensions["passerelle"]
    return svc


@pytest.fixture()
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture()
def runner(app):  # type: ignore[no-untyped-def]
    return app.test_cli_runner()


@pytest.fixture()
def demo(services: Services):  # type: ignore[no-untyped-def]
    from app.tenants import demo as demo_data

    with services.db.transaction() as session:
        seeded = demo_data.seed(session, services)
        ids = {"tenant_id": seeded.tenant.id,
               "program_ids": {p.slug: p.id for p in seeded.programs}}
    return ids


def _empty_tables(services: Services) -> None:
    engine = services.db.engine
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # A session a test forgot to close holds locks: fail loudly, never hang CI.
            conn.execute(text("SET LOCAL lock_timeout = '20s'"))
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                conn.execute(text(f"DELETE FROM {table}"))


@pytest.fixture()
def keep_signal_handlers():  # type: ignore[no-untyped-def]
    """A Huey consumer started in a test installs signal handlers: put ours back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    """Debian's Chromium driven by Playwright (no browser download), one per test module
    in each xdist worker: a worker never drives another's browser."""
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM

    assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()

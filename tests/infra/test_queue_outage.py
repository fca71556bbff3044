"""Redis away (restarting, failing over): the public pages keep answering.

Rate-limit counters live in Redis when PASSERELLE_REDIS_URL is set. Found by the
cluster test (tests/cluster/): while Redis restarted, every rate-limited page
answered 500. Now the limits fall back to per-process counters in memory until
Redis is back, so pages answer and floods are still refused.
"""

from __future__ import annotations

import dataclasses
import socket

from app import create_app


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_rate_limited_pages_answer_while_redis_is_down(settings, demo) -> None:  # type: ignore[no-untyped-def]
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{_closed_port()}/0")
    app = create_app(down)
    try:
        client = app.test_client()
        page = client.get("/join/demo/rewards")
        assert page.status_code == 200
        assert "csrf_token" in page.get_data(as_text=True)
        # The limits still hold, counted in this process's memory meanwhile.
        answers = [client.post("/passkit/v1/log", json={"logs": ["x"]}).status_code
                   for _ in range(61)]
        assert answers[:60] == [200] * 60
        assert answers[60] == 429
    finally:
        app.extensions["passerelle"].db.dispose()


def test_database_away_is_503_with_retry_after_never_500(settings) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL restarting: requests that need it are told to come back (503 with
    Retry-After), people get the friendly page, and nothing is a 500."""
    away = dataclasses.replace(
        settings, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/x")
    app = create_app(away)
    try:
        client = app.test_client()
        device = client.get("/passkit/v1/devices/abc123/registrations/pass.example.test")
        assert device.status_code == 503
        assert device.headers["Retry-After"].isdigit()
        assert device.mimetype == "application/problem+json"
        person = client.get("/join/demo/rewards", headers={"Accept": "text/html"})
        assert person.status_code == 503
        assert person.headers["Retry-After"].isdigit()
        assert person.mimetype == "text/html"
    finally:
        app.extensions["passerelle"].db.dispose()


def test_commands_say_the_database_is_unreachable_in_one_line(settings) -> None:  # type: ignore[no-untyped-def]
    """`passerelle serve` or `worker` started while PostgreSQL restarts: one error line
    and exit 1 (the supervisor starts it again), not a traceback."""
    from app.cli import main

    away = dataclasses.replace(
        settings, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/x")
    app = create_app(away)
    try:
        result = app.test_cli_runner().invoke(main, ["cards", "timeline", "abc"])
        assert result.exit_code == 1
        assert "the database cannot be reached" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    finally:
        app.extensions["passerelle"].db.dispose()

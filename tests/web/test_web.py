"""HTTP: health, the demo page and its downloads, error pages."""

from __future__ import annotations

import re

import pytest
from flask import request

from app import create_app
from tests.pkpass_check import verify_pkpass


def test_healthz(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok"}


def test_healthz_reports_unreachable_database(settings) -> None:  # type: ignore[no-untyped-def]
    settings.database_url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    app = create_app(settings)
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["detail"] == "database unreachable"


def test_demo_page_lists_customers_and_serves_verified_cards(client, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    page = client.get("/demo/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Jiří Novák" in html and "Zoë O&#39;Connor" in html
    links = re.findall(r'href="(/demo/cards/[^"]+\.pkpass)"', html)
    assert len(links) == 10
    assert all("@" not in link and "C-10" not in link for link in links)  # no personal data
    response = client.get(links[0])
    assert response.status_code == 200
    assert response.mimetype == "application/vnd.apple.pkpass"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert response.headers["Last-Modified"]
    verify_pkpass(response.data, services.settings.certs_path / "dev" / "root-ca.pem", tmp_path)


def test_unknown_card_is_a_friendly_404(client, demo) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/demo/cards/nope.pkpass", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert "No such card." in response.get_data(as_text=True)


def test_demo_pages_are_off_outside_demo_mode(settings, demo) -> None:  # type: ignore[no-untyped-def]
    settings.demo = False
    app = create_app(settings)
    assert app.test_client().get("/demo/").status_code == 404
    app.extensions["passerelle"].db.dispose()


def test_demo_not_seeded_explains_what_to_run(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/demo/")
    assert response.status_code == 404
    assert "passerelle demo" in response.get_data(as_text=True)


def test_site_icon_is_served(client) -> None:  # type: ignore[no-untyped-def]
    from io import BytesIO

    from PIL import Image

    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert Image.open(BytesIO(response.data)).size == (32, 32)


def test_wrong_method_says_which_methods_are_allowed(client) -> None:  # type: ignore[no-untyped-def]
    machine = client.delete("/healthz")
    assert machine.status_code == 405 and machine.mimetype == "application/problem+json"
    assert "GET" in machine.headers["Allow"]
    person = client.put("/demo/", headers={"Accept": "text/html"})
    assert person.status_code == 405 and person.mimetype == "text/html"
    assert "GET" in person.headers["Allow"]


@pytest.mark.parametrize("proxies, seen", [(0, "127.0.0.1 http"), (1, "198.51.100.7 https")])
def test_forwarded_headers_count_only_behind_trusted_proxies(settings, proxies, seen) -> None:  # type: ignore[no-untyped-def]
    """Rate limits key on the client address: behind a proxy it comes from the proxy's
    headers, and without one those headers are anybody's and ignored."""
    settings.trusted_proxies = proxies
    app = create_app(settings)
    app.add_url_rule("/_whoami", "whoami", lambda: f"{request.remote_addr} {request.scheme}")
    answer = app.test_client().get("/_whoami", headers={
        "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"})
    assert answer.get_data(as_text=True) == seen

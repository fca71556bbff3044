"""``Retry-After`` means "come back later": it belongs on 429 and 503 answers only, never on
a 200 page or a 303 redirect of a rate-limited route (RFC 9110 §10.2.3)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from app.admin import users as admin_users
from app.distribution import links
from app.infra.models import Program, Tenant, utcnow
from app.web import hooks
from tests.admin.test_admin import PASSWORD, login
from tests.api_helpers import auth, make_key
from tests.distribution.test_landing import IPHONE_SAFARI, issue
from tests.webhooks.test_webhooks_in import _hook

REFUSALS = (429, 503)


def _placeholder_path(rule: Any) -> str:
    def value(match: re.Match[str]) -> str:
        converter = match.group(1) or ""
        return "1" if converter.startswith("int") else "x"
    return re.sub(r"<(?:(\w+)(?:\([^)]*\))?:)?\w+>", value, rule.rule)


def _assert_retry_after_only_when_refused(response: Any, what: str) -> None:
    if response.status_code in REFUSALS:
        assert int(response.headers["Retry-After"]) >= 0, what
    else:
        assert "Retry-After" not in response.headers, (what, response.status_code)


def test_every_route_walked_keeps_retry_after_for_refusals(app, client, services, demo) -> None:  # type: ignore[no-untyped-def]
    app.testing = False  # a route that fails on placeholder values answers, it does not raise
    limited: set[str] = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            response = client.open(_placeholder_path(rule), method=method)
            _assert_retry_after_only_when_refused(response, f"{method} {rule.rule}")
            if "X-RateLimit-Limit" in response.headers:
                limited.add(rule.endpoint)
    # The walk reached every family of rate-limited routes.
    assert {"links.open_link", "links.open_signed", "links.join", "passkit.log",
            "hooks.receive"} <= limited
    assert any(endpoint.startswith("api.") for endpoint in limited)


def _signed_path(services, demo) -> str:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        url = links.signed_url("https://wallet.example.test", session.get(Tenant, demo["tenant_id"]),
                               session.get(Program, demo["program_ids"]["rewards"]), "C-1001",
                               "download", int(utcnow().timestamp()) + 3600)
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_successes_and_redirects_of_limited_routes_have_no_retry_after(  # type: ignore[no-untyped-def]
        client, services, demo) -> None:
    iphone = {"User-Agent": IPHONE_SAFARI}
    secret = _hook(services)
    key = make_key(services, demo["tenant_id"], "read")
    with services.db.transaction() as session:
        admin_users.create_user(session, demo["tenant_id"], "admin@a.example", PASSWORD, "admin")
    answers = {
        "token link": client.get(f"/l/{issue(services, demo)}", headers=iphone),
        "signed link": client.get(_signed_path(services, demo), headers=iphone),
        "join form": client.get("/join/demo/rewards", headers=iphone),
        "device log": client.post("/passkit/v1/log", json={"logs": ["x"]}),
        "hook": client.post("/hooks/demo/loyalty", headers={"X-Secret-Key": secret},
                            json={"id": "r-1", "type": "tier.changed",
                                  "customer": {"id": "C-1002"}, "tier": "Gold"}),
        "api": client.get("/api/v1/programs", headers=auth(key)),
        "sign-in": login(client, "admin@a.example"),
    }
    statuses = {what: response.status_code for what, response in answers.items()}
    assert statuses == {"token link": 200, "signed link": 303, "join form": 200,
                        "device log": 200, "hook": 200, "api": 200, "sign-in": 302}
    for what, response in answers.items():
        assert "X-RateLimit-Limit" in response.headers, what  # the route is rate-limited
        _assert_retry_after_only_when_refused(response, what)


def test_a_refusal_keeps_its_retry_after(client, services, demo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(hooks, "HOOK_LIMIT", "1 per minute")
    first = client.post("/hooks/demo/nobody", json={})
    refused = client.post("/hooks/demo/nobody", json={})
    assert (first.status_code, refused.status_code) == (404, 429)
    assert "Retry-After" not in first.headers
    assert 0 < int(refused.headers["Retry-After"]) <= 60

"""A form page posted twice is one submission (issue 11, item 7): back-and-send-again, a
double tap, and two posts at the same instant (two database sessions in two threads, and
two requests against a real server) give one enrollment, one customer and the person's own
card, for a new email and for a known one (held enrollments stay indistinguishable); a
details or consent form sent twice is applied once."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from sqlalchemy import event, func, select, text

from app.distribution import enrollment, links
from app.infra.models import (
    Consent,
    Customer,
    FormSubmission,
    FunnelEvent,
    Program,
    utcnow,
)
from tests.browser import live_server
from tests.distribution.test_platforms import IPHONE_SAFARI

JOIN = "/join/demo/rewards"
HIDDEN = ("csrf_token", "lang", "texts", "campaign", "submission")
NEW, KNOWN = "noor.haddad@example.org", "camille.martin@example.com"


def _hidden(page: str) -> dict[str, str]:
    return {name: found.group(1) for name in HIDDEN
            if (found := re.search(rf'name="{name}" value="([^"]*)"', page))}


def _join_page(client) -> dict[str, str]:  # type: ignore[no-untyped-def]
    response = client.get(JOIN, headers={"User-Agent": IPHONE_SAFARI})
    assert response.status_code == 200
    form = _hidden(response.get_data(as_text=True))
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", form["submission"])
    return form


def _filled(form: dict[str, str], email: str, **fields: str) -> dict[str, str]:
    return {**form, "email": email, "first_name": "Noor", "last_name": "Haddad",
            "consent_terms": "yes", **fields}


def _post(client, data: dict[str, str], path: str = JOIN):  # type: ignore[no-untyped-def]
    return client.post(path, data=data, headers={"User-Agent": IPHONE_SAFARI})


def _customer_of(services, location: str) -> int:  # type: ignore[no-untyped-def]
    token = re.fullmatch(r"/l/([A-Za-z0-9_-]{32})\?done=welcome", location).group(1)
    with services.db.session() as session:
        customer_id = links.resolve_token(session, token).customer_id
    assert customer_id is not None
    return customer_id


def _count(services, model, *where) -> int:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def _held(services) -> int:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        return sum(1 for a in session.scalars(select(Customer.attributes))
                   if enrollment.HELD_ATTRIBUTE in (a or {}))


def _events(services, kind: str) -> int:  # type: ignore[no-untyped-def]
    return _count(services, FunnelEvent, FunnelEvent.kind == kind)


def _assert_one_enrollment(services, email: str, customers_before: int) -> None:  # type: ignore[no-untyped-def]
    known = email == KNOWN
    assert _count(services, Customer) == customers_before + 1
    assert _held(services) == (1 if known else 0)
    assert _events(services, "enrolled") == (0 if known else 1)
    assert _events(services, "link_requested") == (1 if known else 0)


# -- the same page posted twice -----------------------------------------------------------

@pytest.mark.parametrize("email", [NEW, KNOWN])
def test_an_enrollment_page_posted_twice_is_one_enrollment(client, services, demo, email) -> None:  # type: ignore[no-untyped-def]
    before = _count(services, Customer)
    form = _filled(_join_page(client), email)
    first, second = _post(client, form), _post(client, form)
    assert first.status_code == second.status_code == 303
    assert sorted(first.headers.keys()) == sorted(second.headers.keys())
    assert first.headers["Location"] != second.headers["Location"]  # a fresh link each time
    assert _customer_of(services, first.headers["Location"]) == \
        _customer_of(services, second.headers["Location"])
    landing = client.get(second.headers["Location"], headers={"User-Agent": IPHONE_SAFARI})
    assert "Welcome! Your card is ready." in landing.get_data(as_text=True)
    _assert_one_enrollment(services, email, before)
    with services.db.session() as session:
        customer = session.get(Customer, _customer_of(services, first.headers["Location"]))
        assert customer.first_name == "Noor"
        assert customer.email == (None if email == KNOWN else NEW)
        assert len(customer.cards) == 1


def test_repeats_of_new_and_known_emails_look_alike(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    answers = []
    for email in (NEW, KNOWN):
        form = _filled(_join_page(client), email)
        answers += [_post(client, form), _post(client, form)]
    assert {a.status_code for a in answers} == {303}
    assert len({tuple(sorted(a.headers.keys())) for a in answers}) == 1
    assert all(re.fullmatch(r"/l/[A-Za-z0-9_-]{32}\?done=welcome", a.headers["Location"])
               for a in answers)


def test_a_repeat_gets_the_first_card_even_after_the_form_settings_changed(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    """Wording and fields changed between the two posts: the 409 ("the form changed") and
    new required fields are for first posts; a repeat is not enrolled a second time."""
    form = _filled(_join_page(client), NEW)
    first = _post(client, form)
    with services.db.transaction(demo["tenant_id"]) as session:
        session.get(Program, demo["program_ids"]["rewards"]).forms = {
            "fields": {"phone": "required"},
            "consents": [{"kind": "terms", "required": True, "text": {"en": "New terms."}}]}
    again = _post(client, form)
    assert again.status_code == 303, again.get_data(as_text=True)[:300]
    assert _customer_of(services, first.headers["Location"]) == \
        _customer_of(services, again.headers["Location"])
    assert _events(services, "enrolled") == 1 and _held(services) == 0
    # A first post of that old page is shown again with the new wording, as before.
    stale = _post(client, _filled(form, "other@example.org", submission="x" * 22))
    assert stale.status_code == 409


def test_a_new_page_is_a_new_enrollment(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    """A shop's tablet enrolling one person after another: each page is its own."""
    before = _count(services, Customer)
    one = _post(client, _filled(_join_page(client), "one@example.org"))
    two = _post(client, _filled(_join_page(client), "two@example.org"))
    assert _customer_of(services, one.headers["Location"]) != \
        _customer_of(services, two.headers["Location"])
    assert _count(services, Customer) == before + 2 and _events(services, "enrolled") == 2


def test_a_refused_post_does_not_use_up_its_page(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    form = _join_page(client)
    refused = _post(client, _filled(form, "not-an-email"))
    assert refused.status_code == 422
    assert _count(services, FormSubmission) == 0
    # The corrected page carries a new id; the old one, sent again corrected, still works.
    assert _hidden(refused.get_data(as_text=True))["submission"] != form["submission"]
    assert _post(client, _filled(form, NEW)).status_code == 303
    assert _events(services, "enrolled") == 1


def test_a_post_without_a_submission_id_is_handled_as_before(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    form = _filled(_join_page(client), NEW)
    del form["submission"]
    assert _post(client, form).status_code == 303
    assert _events(services, "enrolled") == 1 and _count(services, FormSubmission) == 0


def test_only_a_hash_of_the_id_is_kept_and_old_ones_are_forgotten(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    form = _filled(_join_page(client), NEW)
    assert _post(client, form).status_code == 303
    with services.db.session() as session:
        row = session.scalar(select(FormSubmission))
        assert row.key_hash != form["submission"] and len(row.key_hash) == 64
        assert (row.purpose, row.program_id) == ("enroll", demo["program_ids"]["rewards"])
    assert enrollment.forget_submissions(services) == 0
    assert services.jobs.forget_form_submissions.call_local() == 0  # the worker's hourly run
    later = utcnow() + enrollment.SUBMISSION_KEPT + dt.timedelta(minutes=1)
    assert enrollment.forget_submissions(services, now=later) == 1
    assert _count(services, FormSubmission) == 0


# -- two posts at the same instant --------------------------------------------------------

def _race(services, tenant_id: int, work: Callable[[Any], Any]) -> tuple[Any, Any]:  # type: ignore[no-untyped-def]
    """``work(session)`` in two sessions at once: the first does it all but has not
    committed when the second reaches its first write (where it must wait: PostgreSQL's
    row and index locks, SQLite's single writer); then the first commits."""
    worker: list[threading.Thread] = []
    writing = threading.Event()
    outcome: dict[str, Any] = {}

    def on_execute(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        if worker and threading.current_thread() is worker[0] and \
                statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            writing.set()

    def second() -> None:
        session = services.db.tenant_session(tenant_id)
        try:
            outcome["second"] = work(session)
            session.commit()
        except Exception as exc:  # noqa: BLE001 - reported to the test's thread
            session.rollback()
            outcome["error"] = exc
        finally:
            session.close()

    engine = services.db.engine
    event.listen(engine, "before_cursor_execute", on_execute)
    first = services.db.tenant_session(tenant_id)
    try:
        outcome["first"] = work(first)
        worker.append(threading.Thread(target=second))
        worker[0].start()
        assert writing.wait(30), "the second post never reached a write"
        _until_waiting(engine)
        assert worker[0].is_alive(), "the second post did not wait for the first"
        first.commit()
        worker[0].join(timeout=60)
        assert not worker[0].is_alive()
    finally:
        first.close()
        event.remove(engine, "before_cursor_execute", on_execute)
    assert "error" not in outcome, outcome.get("error")
    return outcome["first"], outcome["second"]


def _until_waiting(engine) -> None:  # type: ignore[no-untyped-def]
    """Until the second session is blocked on a lock: seen in pg_locks on PostgreSQL;
    SQLite cannot show a writer waiting for the lock, so it is given a moment."""
    if engine.dialect.name != "postgresql":
        time.sleep(0.3)
        return
    with engine.connect() as conn:
        for _ in range(300):
            if conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar():
                return
            time.sleep(0.1)
    raise AssertionError("the second session never waited for a lock")


@pytest.mark.parametrize("email", [NEW, KNOWN])
def test_two_enrollment_posts_at_the_same_instant_are_one(services, demo, email) -> None:  # type: ignore[no-untyped-def]
    before = _count(services, Customer)
    data = _filled({"submission": secrets.token_urlsafe(16)}, email)

    def work(session):  # type: ignore[no-untyped-def]
        program = session.get(Program, demo["program_ids"]["rewards"])
        texts = enrollment.consent_texts(enrollment.form_config(program), "en", program)
        return enrollment.enroll(session, services, program, data, "en", texts).customer.id

    first, second = _race(services, demo["tenant_id"], work)
    assert first == second  # the second post gets the first one's customer and card
    _assert_one_enrollment(services, email, before)


@pytest.mark.parametrize("email", [NEW, KNOWN])
def test_two_requests_at_the_same_instant_through_a_real_server(app, services, demo, email) -> None:  # type: ignore[no-untyped-def]
    before = _count(services, Customer)
    with live_server(app) as base:
        page = requests.get(base + JOIN, headers={"User-Agent": IPHONE_SAFARI}, timeout=30)
        # The session cookie is Secure (the public URL is https): carry it by hand.
        cookie = page.headers["Set-Cookie"].split(";", 1)[0]
        data = _filled(_hidden(page.text), email)
        start = threading.Barrier(2)
        answers: list[requests.Response] = []

        def post() -> None:
            start.wait(timeout=30)
            answers.append(requests.post(
                base + JOIN, data=data, allow_redirects=False, timeout=60,
                headers={"User-Agent": IPHONE_SAFARI, "Cookie": cookie}))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
    assert [a.status_code for a in answers] == [303, 303]
    assert _customer_of(services, answers[0].headers["Location"]) == \
        _customer_of(services, answers[1].headers["Location"])
    _assert_one_enrollment(services, email, before)


# -- details and consent forms ------------------------------------------------------------

def _details_link(client, services, demo, purpose: str):  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        program = session.get(Program, demo["program_ids"]["rewards"])
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        token = links.issue_token(session, program, customer, purpose)
    page = client.get(f"/l/{token}").get_data(as_text=True)
    return f"/l/{token}", _hidden(page)


def _camille_consents(services, kind: str = "marketing_email") -> int:  # type: ignore[no-untyped-def]
    with services.db.session() as session:
        camille = session.scalar(select(Customer.id).where(Customer.external_id == "C-1001"))
    return _count(services, Consent, Consent.customer_id == camille, Consent.kind == kind)


def test_a_details_page_posted_twice_is_applied_once(client, services, demo) -> None:  # type: ignore[no-untyped-def]
    action, form = _details_link(client, services, demo, "enrich")
    consents = _camille_consents(services)
    data = {**form, "first_name": "Camille", "last_name": "Martin-Roy", "consent_terms": "yes"}
    answers = [client.post(action, data=data) for _ in range(2)]
    assert [a.status_code for a in answers] == [303, 303]
    assert answers[0].headers["Location"] == answers[1].headers["Location"]
    assert _events(services, "enriched") == 1
    assert _camille_consents(services) == consents + 1  # marketing_email withdrawn once
    # The same page sent again with another value is a new edit, and is applied.
    changed = client.post(action, data={**data, "last_name": "Roy"})
    assert changed.status_code == 303
    with services.db.session() as session:
        assert session.scalar(select(Customer.last_name).where(
            Customer.external_id == "C-1001")) == "Roy"
    assert _events(services, "enriched") == 2


def test_two_consent_posts_at_the_same_instant_are_one(services, demo) -> None:  # type: ignore[no-untyped-def]
    consents = _camille_consents(services)
    data = {"submission": secrets.token_urlsafe(16), "consent_terms": "yes"}

    def work(session):  # type: ignore[no-untyped-def]
        program = session.get(Program, demo["program_ids"]["rewards"])
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        texts = enrollment.consent_texts(enrollment.form_config(program), "en", program)
        return enrollment.enrich(session, services, customer, data, "en", texts,
                                 program=program, purpose="consent")

    first, second = _race(services, demo["tenant_id"], work)
    assert "consents.marketing_email" in first and second == set()
    assert _camille_consents(services) == consents + 1
    assert _camille_consents(services, "terms") == 1

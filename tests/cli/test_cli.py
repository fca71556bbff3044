"""The passerelle commands, run through Click's runner against the real database."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from sqlalchemy import func, select

from app.cli import main
from app.infra.models import Card, Consent, Customer, Program, Tenant
from tests import factories
from tests.pkpass_check import verify_pkpass


def invoke(runner, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(main, list(args), catch_exceptions=False)


def test_demo_is_idempotent(runner, services) -> None:  # type: ignore[no-untyped-def]
    first = invoke(runner, "demo")
    assert first.exit_code == 0, first.output
    with services.db.session() as session:
        counts = [session.scalar(select(func.count()).select_from(m))
                  for m in (Tenant, Program, Customer, Card, Consent)]
    second = invoke(runner, "demo")
    assert second.exit_code == 0
    with services.db.session() as session:
        again = [session.scalar(select(func.count()).select_from(m))
                 for m in (Tenant, Program, Customer, Card, Consent)]
    assert counts == again == [1, 2, 5, 10, 5]


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_import_upserts_reports_bad_rows_and_keeps_good_ones(runner, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    csv_file = _write(tmp_path / "customers.csv", (
        "external_id;email;first_name;points;tier;consent_marketing_email;birthday\n"
        "C-1001;camille.martin@example.com;Camille;2000;Platinum;no;\n"   # update
        "N-1;New.Person@Example.com;Émile;10;;yes;1990-02-03\n"           # create
        "N-2;not-an-email;X;1;;;\n"                                       # bad email
        "N-3;n3@example.com;Y;1;;maybe;\n"                                # bad consent
        ";n4@example.com;Z;1;;;\n"                                        # no id
        "N-5;jiri.novak@example.com;W;1;;;\n"                             # email taken
        "N-6;n6@example.com;V;1;;;1990-13-01\n"                           # bad date
        "N-7;n7@example.com;Q;1\n"                                        # short row
    ))
    result = invoke(runner, "customers", "import", str(csv_file), "--tenant", "demo")
    assert result.exit_code == 2, result.output
    assert "1 created, 1 updated, 0 unchanged, 6 rejected" in result.output
    for line, words in [(4, "email"), (5, "consent_marketing_email"), (6, "external_id"),
                        (7, "already used"), (8, "birthday"), (9, "cells")]:
        assert f"line {line}: " in result.output and words in result.output
    with services.db.tenant_session(demo["tenant_id"]) as session:
        camille = session.scalar(select(Customer).where(Customer.external_id == "C-1001"))
        assert camille.attributes["points"] == "2000" and camille.attributes["tier"] == "Platinum"
        assert camille.last_name == "Martin"  # absent column left alone
        assert camille.current_consents()["marketing_email"].granted is False
        new = session.scalar(select(Customer).where(Customer.external_id == "N-1"))
        assert new.email == "new.person@example.com" and new.first_name == "Émile"
        assert new.birthday.isoformat() == "1990-02-03"
        assert "tier" not in new.attributes  # blank cell
        assert new.current_consents()["marketing_email"].source == "import"
        assert session.scalar(select(func.count()).select_from(Customer)) == 6

    # The same file again: nothing changes, the same rows are rejected.
    again = invoke(runner, "customers", "import", str(csv_file), "--tenant", "demo")
    assert "0 created, 0 updated, 2 unchanged, 6 rejected" in again.output


def test_import_refuses_wrong_encoding_and_columns(runner, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    latin = _write(tmp_path / "latin.csv", "external_id,first_name\nA,Zoë\n", "latin-1")
    result = invoke(runner, "customers", "import", str(latin), "--tenant", "demo")
    assert result.exit_code == 1 and "line 2 is not valid UTF-8" in result.output
    no_id = _write(tmp_path / "noid.csv", "id,email\n1,a@b.co\n")
    result = invoke(runner, "customers", "import", str(no_id), "--tenant", "demo")
    assert result.exit_code == 1 and "no external_id column" in result.output
    twice = _write(tmp_path / "twice.csv", "external_id,email,Email\n1,a@b.co,c@d.co\n")
    result = invoke(runner, "customers", "import", str(twice), "--tenant", "demo")
    assert result.exit_code == 1 and "named twice: email" in result.output
    empty = _write(tmp_path / "empty.csv", "")
    assert "is empty" in invoke(runner, "customers", "import", str(empty), "--tenant", "demo").output
    unknown = invoke(runner, "customers", "import", str(no_id), "--tenant", "nope")
    assert unknown.exit_code == 1 and "no tenant 'nope'" in unknown.output


def test_import_utf16_excel_export(runner, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    utf16 = _write(tmp_path / "u16.csv", "external_id\tfirst_name\nU-1\tŽofie\n", "utf-16")
    result = invoke(runner, "customers", "import", str(utf16), "--tenant", "demo")
    assert result.exit_code == 0, result.output
    with services.db.tenant_session(demo["tenant_id"]) as session:
        assert session.scalar(select(Customer.first_name).where(
            Customer.external_id == "U-1")) == "Žofie"


def test_cards_build_writes_verified_passes_in_parallel(runner, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    result = invoke(runner, "cards", "build", "--program", "rewards", "--out", str(out),
                    "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "5 cards written" in result.output and "5 with new content" in result.output
    files = sorted(out.glob("*.pkpass"))
    assert len(files) == 5
    with services.db.tenant_session(demo["tenant_id"]) as session:
        serials = set(session.scalars(select(Card.serial_number).where(
            Card.program_id == demo["program_ids"]["rewards"])))
    assert {f.stem for f in files} == serials
    ca = services.settings.certs_path / "dev" / "root-ca.pem"
    for i, f in enumerate(files):
        verify_pkpass(f.read_bytes(), ca, tmp_path / f"v{i}")
    # A second build has nothing new to version.
    again = invoke(runner, "cards", "build", "--program", "rewards", "--out", str(out))
    assert "0 with new content" in again.output


def test_cards_build_issue_missing_and_bad_program(runner, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        session.add(Customer(external_id="lonely", attributes={"points": 3}))
    result = invoke(runner, "cards", "build", "--program", "club", "--out", str(tmp_path / "o"),
                    "--issue-missing", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "issued 1 new cards" in result.output and "6 cards written" in result.output
    missing = invoke(runner, "cards", "build", "--program", "nope", "--out", str(tmp_path))
    assert missing.exit_code == 1 and "no program 'nope'" in missing.output


def test_cards_build_reports_cards_with_bad_data(runner, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction(demo["tenant_id"]) as session:
        customer = session.scalar(select(Customer).where(Customer.external_id == "C-1002"))
        customer.attributes["points"] = "many"
    result = invoke(runner, "cards", "build", "--program", "rewards", "--out",
                    str(tmp_path / "o"), "--workers", "1")
    assert result.exit_code == 2
    assert "4 cards written" in result.output
    assert "field 'points': attribute 'points' = 'many' is not a valid int" in result.output


def test_certs_check_passes_on_dev_certificates_and_fails_on_mismatch(runner, services, demo) -> None:  # type: ignore[no-untyped-def]
    ok = invoke(runner, "certs", "check")
    assert ok.exit_code == 0, ok.output
    assert "certificates OK" in ok.output
    with services.db.transaction() as session:
        program = session.scalar(select(Program).where(Program.slug == "club"))
        program.pass_type_identifier = "pass.other.type"
    bad = invoke(runner, "certs", "check")
    assert bad.exit_code == 1
    assert "program 'club': no certificate registered for 'pass.other.type'" in bad.output


def test_healthz_and_commands_refuse_unmigrated_database(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app import create_app
    from app.infra.config import Settings

    app = create_app(Settings.from_env(environ={}, instance_path=tmp_path / "i"))
    result = app.test_cli_runner().invoke(main, ["demo"])
    assert result.exit_code == 1 and "passerelle db upgrade" in result.output
    app.extensions["passerelle"].db.dispose()


def test_setting_up_a_brand_from_the_shell(runner, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.wallet import certs as certs_module

    paths = certs_module.make_dev_certs(services.settings.certs_path, "pass.com.brand.card",
                                        "BRANDTEAM1")
    assert invoke(runner, "tenants", "create", "brand", "--name", "Brand").exit_code == 0
    dup = invoke(runner, "tenants", "create", "brand", "--name", "Brand")
    assert dup.exit_code == 1 and "already exists" in dup.output
    assert "not a valid slug" in invoke(runner, "tenants", "create", "Bad Slug", "--name", "x").output
    early = invoke(runner, "programs", "create", "card", "--tenant", "brand", "--name", "Card",
                   "--template", "loyalty", "--pass-type-identifier", "pass.com.brand.card")
    assert early.exit_code == 1 and "certs register" in early.output
    wrong = invoke(runner, "certs", "register", "--tenant", "brand", "--certificate",
                   paths.certificate_file, "--key", paths.key_file,
                   "--pass-type-identifier", "pass.com.other")
    assert wrong.exit_code == 1 and "not 'pass.com.other'" in wrong.output
    ok = invoke(runner, "certs", "register", "--tenant", "brand", "--certificate",
                paths.certificate_file, "--key", paths.key_file)
    assert ok.exit_code == 0 and "pass.com.brand.card (team BRANDTEAM1)" in ok.output
    bad_template = invoke(runner, "programs", "create", "card", "--tenant", "brand", "--name", "C",
                          "--template", "nope", "--pass-type-identifier", "pass.com.brand.card")
    assert bad_template.exit_code == 1 and "no pass template named 'nope'" in bad_template.output
    created = invoke(runner, "programs", "create", "card", "--tenant", "brand", "--name", "Card",
                     "--template", "membership", "--pass-type-identifier", "pass.com.brand.card")
    assert created.exit_code == 0, created.output
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("external_id,first_name,last_name\nB-1,Ann,Lee\n")
    assert invoke(runner, "customers", "import", str(csv_file), "--tenant", "brand").exit_code == 0
    out = tmp_path / "out"
    built = invoke(runner, "cards", "build", "--program", "card", "--tenant", "brand",
                   "--out", str(out), "--issue-missing", "--workers", "1")
    assert built.exit_code == 0, built.output
    [card_file] = out.glob("*.pkpass")
    pass_json = verify_pkpass(card_file.read_bytes(), paths.root_ca, tmp_path / "v")
    assert pass_json["passTypeIdentifier"] == "pass.com.brand.card"
    assert pass_json["teamIdentifier"] == "BRANDTEAM1"
    assert invoke(runner, "certs", "check").exit_code == 0


def test_cards_build_with_a_corrupt_template_image_names_the_file(runner, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from app.wallet.images import ImageCache
    from app.wallet.template import TemplateLibrary

    templates = tmp_path / "templates"
    shutil.copytree(services.settings.templates_path / "loyalty", templates / "loyalty")
    (templates / "loyalty" / "images" / "strip.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    services.templates = TemplateLibrary(templates, ImageCache())
    result = invoke(runner, "cards", "build", "--program", "rewards", "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert "strip.png" in result.output and "Traceback" not in result.output


def test_flask_cli_has_the_same_commands(app) -> None:  # type: ignore[no-untyped-def]
    result = app.test_cli_runner().invoke(args=["demo"])
    assert result.exit_code == 0, result.output
    assert set(main.commands) <= set(app.cli.commands)


def test_import_runs_the_update_pipeline(runner, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.cards import cards as cards_module
    from app.infra.models import PushJob

    with services.db.transaction(demo["tenant_id"]) as session:
        card = session.scalar(select(Card).join(Customer).where(
            Customer.external_id == "C-1001", Card.program_id == demo["program_ids"]["rewards"]))
        cards_module.build_pkpass(session, card, services)  # as served at install
        factories.device(session, card, "dev1", pass_type="pass.dev.passerelle.demo")
        card_id, version = card.id, card.version
    csv_file = _write(tmp_path / "points.csv", "external_id,points\nC-1001,4321\nC-1002,many\n")
    result = invoke(runner, "customers", "import", str(csv_file), "--tenant", "demo")
    # C-1002's new value cannot render: reported, but the data is kept.
    assert result.exit_code == 2 and "0 created, 2 updated" in result.output
    assert "'many' is not a valid int" in result.output
    with services.db.session() as session:
        card = session.get(Card, card_id)
        assert card.version == version + 1 and card.update_tag > 0
        [job] = session.scalars(select(PushJob)).all()
        assert (job.card_id, job.update_tag) == (card_id, card.update_tag)
        assert session.scalar(select(Customer.attributes).where(
            Customer.external_id == "C-1002"))["points"] == "many"


# -- first use of every command --------------------------------------------------------------

MAPPING = {"external_id": "id", "email": "contact.email", "attributes.points": "loyalty.points"}


def test_crm_configure_first_use_without_optional_options(runner, services, demo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """docs/crm.md marks --max-staleness-hours and --timeout-seconds optional: the first
    configure without them crashed (the defaults were not there before INSERT) and saved
    nothing."""
    import json

    from app.infra.models import CrmConnection

    mapping = _write(tmp_path / "mapping.json", json.dumps(MAPPING))
    result = runner.invoke(main, ["crm", "configure", "--tenant", "demo", "--kind", "http",
                                  "--base-url", "https://crm.example.com/api",
                                  "--auth-header", "Authorization", "--auth-env", "CRM_TOKEN",
                                  "--mapping-file", str(mapping)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    assert "copies served up to 24 h" in result.output
    with services.db.session() as session:
        row = session.scalar(select(CrmConnection))
        assert row is not None and row.kind == "http"
        assert (row.max_staleness_seconds, row.timeout_seconds) == (86400, 5)
        assert row.base_url == "https://crm.example.com/api"


@pytest.mark.parametrize("hours", ["inf", "nan", "1e12", "-1"])
def test_crm_staleness_is_bounded_by_its_column(runner, demo, hours) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(main, ["crm", "configure", "--tenant", "demo", "--kind", "builtin",
                                  "--max-staleness-hours", hours])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output


@pytest.mark.parametrize("command", [["webhooks", "redeliver"], ["webhooks", "enable"],
                                     ["webhooks", "disable"]])
@pytest.mark.parametrize("value", [str(2**31), str(2**63), "1" + "0" * 30, "0", "-1"])
def test_row_ids_on_the_command_line_are_bounded(runner, demo, command, value) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(main, [*command, "--", value])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output


#: Commands that run until stopped (servers, the worker, Flask's shell).
LONG_RUNNING = {"serve", "up", "worker", "run", "shell"}
#: Beyond the required options, what the docs give as the least a command needs to work.
DOCUMENTED = {
    ("crm", "configure"): ["--base-url", "https://crm.example.com/api", "--auth-header",
                           "Authorization", "--auth-env", "CRM_TOKEN", "--mapping-file", "{mapping}"],
    ("links", "issue"): ["--customer", "C-1001"],
    ("links", "revoke"): ["--program", "rewards"],
}
#: Minimal invocations that rightly end in a one-line error here (the named thing is absent).
REFUSED = {("admins", "disable"): "the tenant's last admin", ("apikeys", "revoke"): "no such key",
           ("cards", "timeline"): "no such card", ("certs", "register"): "no such file",
           ("google", "check"): "Google is not configured", ("webhooks", "redeliver"): "no delivery"}


def _commands(group: click.Group, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _minimal_arguments(path: tuple[str, ...], command: click.Command, tmp_path: Path) -> list[str]:
    """The documented minimal invocation: required options and arguments only."""
    csv_file = _write(tmp_path / "customers.csv", "external_id;first_name\nMIN-1;Min\n")
    values = {"tenant_slug": "demo", "program_slug": "rewards", "email": "min@a.example",
              "scope": "read", "key": "pk_unknown", "out_dir": str(tmp_path / "out"),
              "serial": "NoSuchSerial", "certificate": "missing.pem", "file": str(csv_file),
              "issuer_id": "3388000000012345678", "service_account": "missing.json",
              "slug": "min-thing", "purpose": "download", "out_path": str(tmp_path / "x.csv"),
              "external_id": "C-1001", "expires_in_days": "7", "name": "Minimal",
              "template": "loyalty", "pass_type_identifier": "pass.dev.passerelle.demo",
              "url": "https://hooks.example.invalid/x", "events": "card.installed",
              "subscription_id": "1", "delivery_id": "1"}
    arguments: list[str] = []
    for param in command.params:
        if not param.required:
            continue
        assert param.name in values, f"{' '.join(path)}: give a value for {param.name}"
        value = values[param.name]  # type: ignore[index]
        if isinstance(param, click.Option):
            arguments += [param.opts[0], value]
        else:
            arguments.append(value)
    mapping = _write(tmp_path / "mapping.json", '{"external_id": "id"}')
    return arguments + [a.format(mapping=mapping) for a in DOCUMENTED.get(path, [])]


def test_every_command_runs_its_minimal_invocation(runner, demo, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Options left out take their defaults without a crash: each command does its work
    (or, where REFUSED says so, names in one line what is absent), never a traceback."""
    monkeypatch.setenv("PASSERELLE_ADMIN_PASSWORD", "a long enough password")
    crashed = []
    ran = 0
    for path, command in _commands(main):
        if path[0] in LONG_RUNNING or not command.callback.__module__.startswith("app."):
            continue  # servers; Flask's and its extensions' own commands (routes, limiter)
        result = runner.invoke(main, [*path, *_minimal_arguments(path, command, tmp_path)])
        ran += 1
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            crashed.append(f"{' '.join(path)}: {result.exception!r}")
        elif (result.exit_code != 0) != (path in REFUSED):
            crashed.append(f"{' '.join(path)}: exit {result.exit_code}: {result.output[-200:]}")
    assert ran >= 35
    assert not crashed, "\n".join(crashed)

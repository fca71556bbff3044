"""Bulk .pkpass throughput: Passerelle's full path against a bare sign-and-zip baseline.

    .venv/bin/python benchmarks/pkpass_bulk.py [--cards 2000] [--repeat 3] [--db-cards 5000]

Measured in the same run, on the same certificates and files:

- baseline: the template's precomputed files plus one precomputed pass.json;
  per card, SHA-1 manifest, cryptography's PKCS#7 detached signature, and a
  zipfile archive (PNGs stored, text deflated). No template, no database.
- full path: per card, Jinja render + locale formatting + pass.json validation
  + manifest + signature + zip, through app.wallet.builder.PassBuilder, with
  the template's derived images cached.
- end to end: `cards build` logic (app.updates.bulk.build_program) over a SQLite
  database of --db-cards customers, on all cores, with peak memory.

Each figure is cards per second; per-core figures run in one process, the
all-core figures run one loop per core at once. The median of --repeat runs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from app.wallet import certs
from app.wallet.builder import CardInput, PassBuilder
from app.wallet.images import ImageCache
from app.wallet.template import TemplateLibrary

PASS_TYPE, TEAM = "pass.bench.passerelle", "BENCHTEAM1"
NAMES = ["Camille Martin", "Jiří Novák", "Lena Müller", "Zoë O'Connor", "Sam Taylor"]


def card_inputs(n: int, template) -> list[CardInput]:  # type: ignore[no-untyped-def]
    cards = []
    for i in range(n):
        first, last = NAMES[i % len(NAMES)].split(" ", 1)
        builtins = {"member_id": f"M{i:08d}", "external_id": f"M{i:08d}", "first_name": first,
                    "last_name": last, "full_name": f"{first} {last}", "locale": "fr-FR",
                    "program_name": "Aurore Rewards", "organization_name": "Maison Aurore"}
        values = template.resolve(builtins, {"points": i * 7, "tier": "Gold",
                                             "points_to_next_tier": 1000 - i % 1000})
        cards.append(CardInput(
            serial_number=f"serial-{i:012d}", authentication_token="t" * 43,
            pass_type_identifier=PASS_TYPE, team_identifier=TEAM,
            organization_name="Maison Aurore", member_id=f"M{i:08d}", locale="fr-FR",
            values=values, web_service_url="https://wallet.example.com/passkit"))
    return cards


class Fixture:
    """Everything both paths share, loaded once per process."""

    def __init__(self, certs_path: Path) -> None:
        paths = certs.make_dev_certs(certs_path, PASS_TYPE, TEAM)
        self.identity = certs.load_identity(certs_path, paths.certificate_file, paths.key_file)
        self.template = TemplateLibrary(ROOT / "pass_templates", ImageCache()).get("loyalty")
        self.builder = PassBuilder(self.template, self.identity.sign)


def baseline_build(files: dict[str, bytes], cert, key, wwdr) -> bytes:  # type: ignore[no-untyped-def]
    manifest = json.dumps({n: hashlib.sha1(d).hexdigest() for n, d in files.items()}).encode()
    signature = (pkcs7.PKCS7SignatureBuilder().set_data(manifest)
                 .add_signer(cert, key, hashes.SHA256()).add_certificate(wwdr)
                 .sign(serialization.Encoding.DER,
                       [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in [*files.items(), ("manifest.json", manifest), ("signature", signature)]:
            method = zipfile.ZIP_STORED if name.endswith(".png") or name == "signature" \
                else zipfile.ZIP_DEFLATED
            zf.writestr(name, data, compress_type=method)
    return buf.getvalue()


def run_loop(args: tuple[str, str, int]) -> tuple[int, float]:
    """One process's loop: build `count` cards by `kind`; return (count, seconds)."""
    kind, certs_dir, count = args
    fx = Fixture(Path(certs_dir))
    inputs = card_inputs(count, fx.template)
    if kind == "baseline":
        files = dict(fx.template.static_files)
        files["pass.json"] = fx.builder.pass_json(inputs[0])
        ident = fx.identity
        start = time.perf_counter()
        for _ in range(count):
            baseline_build(files, ident.certificate, ident.private_key, ident.wwdr)
        return count, time.perf_counter() - start
    start = time.perf_counter()
    for card in inputs:
        fx.builder.build(card)
    return count, time.perf_counter() - start


def throughput(kind: str, certs_dir: str, count: int, processes: int, repeat: int) -> float:
    rates = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        for _ in range(repeat):
            results = pool.map(run_loop, [(kind, certs_dir, count)] * processes)
            # All loops ran at once: total cards over the slowest loop's time.
            rates.append(sum(n for n, _ in results) / max(t for _, t in results))
    return statistics.median(rates)


def seed_database(instance: Path, customers: int) -> None:
    """A demo tenant plus `customers` customers with cards, in a SQLite database."""
    from app.infra import migrate
    from app.infra.config import Settings
    from app.infra.models import Customer, Program
    from app.services import Services
    from app.tenants import demo
    from app.updates import bulk

    settings = Settings.from_env(environ={}, instance_path=instance, strict_certs=False)
    migrate.upgrade(settings.database_url)
    services = Services(settings)
    with services.db.transaction() as session:
        seeded = demo.seed(session, services)
        tenant_id = seeded.tenant.id
        program_id = next(p.id for p in seeded.programs if p.slug == "rewards")
    for start in range(0, customers, 5000):
        with services.db.transaction(tenant_id) as session:
            session.add_all(Customer(external_id=f"B{i:07d}", first_name="Bench",
                                     last_name=NAMES[i % 5], locale="de-DE",
                                     attributes={"points": i, "tier": "Silver"})
                            for i in range(start, min(start + 5000, customers)))
    with services.db.tenant_session(tenant_id) as session:
        bulk.issue_missing_cards(session, session.get(Program, program_id))
    services.db.dispose()


def build_only(instance: Path, workers: int) -> None:
    """Run in its own process so its peak memory is the build's alone; prints JSON."""
    from sqlalchemy import select

    from app.infra.config import Settings
    from app.infra.models import Program
    from app.services import Services
    from app.updates import bulk

    settings = Settings.from_env(environ={}, instance_path=instance, strict_certs=False)
    services = Services(settings)
    with services.db.session() as session:
        program = session.scalar(select(Program).where(Program.slug == "rewards"))
        tenant_id = program.tenant_id
    with services.db.tenant_session(tenant_id) as session:
        program = session.scalar(select(Program).where(Program.slug == "rewards"))
        start = time.perf_counter()
        report = bulk.build_program(session, services, program, instance / "out", workers)
        elapsed = time.perf_counter() - start
    assert not report.errors, report.errors[:3]
    print(json.dumps({
        "cards": report.written, "seconds": elapsed,
        "main_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def end_to_end(db_cards: int, workers: int) -> dict[str, float]:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        seed_database(Path(tmp), db_cards)
        out = subprocess.run([sys.executable, __file__, "--build-only", tmp,
                              "--workers", str(workers)],
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cards", type=int, default=2000, help="cards per process per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--db-cards", type=int, nargs="*", default=[5000, 20000],
                        help="database sizes for the end-to-end runs (none to skip)")
    parser.add_argument("--build-only", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.build_only:
        build_only(Path(args.build_only), args.workers or cores)
        return
    with tempfile.TemporaryDirectory() as certs_dir:
        Fixture(Path(certs_dir))  # make certificates once, before the timed runs
        rows = {}
        for kind in ("baseline", "full"):
            rows[kind] = (throughput(kind, certs_dir, args.cards, 1, args.repeat),
                          throughput(kind, certs_dir, args.cards, cores, args.repeat))
    base1, baseN = rows["baseline"]
    full1, fullN = rows["full"]
    print(f"cores: {cores}; cards per process per run: {args.cards}; median of {args.repeat}")
    print(f"{'path':<34}{'1 process':>12}{f'{cores} processes':>14}{'scaling':>9}")
    print(f"{'bare baseline (sign + zipfile)':<34}{base1:>10.0f}/s{baseN:>12.0f}/s"
          f"{baseN / base1:>8.2f}x")
    print(f"{'full path (render+images+sign+zip)':<34}{full1:>10.0f}/s{fullN:>12.0f}/s"
          f"{fullN / full1:>8.2f}x")
    print(f"full / baseline: {full1 / base1:.0%} on one core, {fullN / baseN:.0%} on {cores} cores")
    for size in args.db_cards:
        run = end_to_end(size, cores)
        print(f"end to end, SQLite, {run['cards']:>6.0f} cards, {cores} workers: "
              f"{run['cards'] / run['seconds']:>5.0f} cards/s (incl. worker start-up); "
              f"peak RSS main {run['main_rss_mib']:.0f} MiB, worker {run['worker_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()

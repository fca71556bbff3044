"""Make a development certificate chain without the `passerelle` CLI.

    python certs.example/make_dev_certs.py --certs-path instance/certs \\
        --pass-type-identifier pass.dev.passerelle.demo --team-identifier DEVTEAM123

Same result as `passerelle certs dev`: a throwaway root CA, a WWDR stand-in and a
pass certificate + key. Passes signed with it verify with OpenSSL against
dev/root-ca.pem but will not install on an iPhone (see certs.example/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run from a checkout without installing: make `app` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.wallet.certs import CertificateError, make_dev_certs  # noqa: E402


def _default_certs_path() -> Path:
    if os.environ.get("PASSERELLE_CERTS_PATH"):
        return Path(os.environ["PASSERELLE_CERTS_PATH"])
    instance = os.environ.get("PASSERELLE_INSTANCE_PATH")
    root = Path(instance) if instance else Path(__file__).resolve().parent.parent / "instance"
    return root / "certs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs-path", type=Path, default=_default_certs_path(),
                        help="certificate folder (default: $PASSERELLE_CERTS_PATH or "
                             "instance/certs)")
    parser.add_argument("--pass-type-identifier", default="pass.dev.passerelle.demo")
    parser.add_argument("--team-identifier", default="DEVTEAM123")
    parser.add_argument("--organization", default="Passerelle Development")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing development pass certificate")
    args = parser.parse_args(argv)
    try:
        paths = make_dev_certs(args.certs_path, args.pass_type_identifier,
                               args.team_identifier, organization=args.organization,
                               overwrite=args.overwrite)
    except (CertificateError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"development root CA: {paths.root_ca}")
    print(f"WWDR stand-in:       {paths.wwdr}")
    print(f"pass certificate:    {paths.certificate}")
    print(f"private key:         {paths.key}")
    print(f"store in the database: certificate_file={paths.certificate_file} "
          f"key_file={paths.key_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

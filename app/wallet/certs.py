"""Apple Pass Type ID certificates: load, check, sign, and make a development chain.

A .pkpass signature is a DER PKCS#7 *detached* signature of manifest.json, made with
the pass certificate's key (SHA-256, with the S/MIME signing-time attribute), carrying
the leaf certificate and the WWDR intermediate that issued it. See
certs.example/README.md for where the files come from and how they are laid out.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

if TYPE_CHECKING:
    from app.infra.models import AppleIdentity

#: Private keys PKCS#7 signing accepts (Apple issues RSA 2048 pass certificates).
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

WWDR_DIR = "wwdr"
WWDR_SUFFIXES = (".pem", ".cer", ".crt")
P12_SUFFIXES = (".p12", ".pfx")
APPLE_CA_URL = "https://www.apple.com/certificateauthority/"
#: Extended key usage Apple puts on Pass Type ID certificates.
PASS_TYPE_ID_EKU = ObjectIdentifier("1.2.840.113635.100.4.14")

_SHA256 = hashes.SHA256()
_SIGN_OPTIONS = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CertificateError(Exception):
    """A certificate, key or chain problem, as one line naming the file."""


# -- the signing identity ---------------------------------------------------------------

@dataclass(frozen=True)
class SigningIdentity:
    certificate: x509.Certificate
    private_key: SigningKey = field(repr=False)
    wwdr: x509.Certificate  # the intermediate that issued `certificate`
    pass_type_identifier: str  # from the certificate's UID
    team_identifier: str  # from the certificate's OU

    def sign(self, manifest: bytes) -> bytes:
        """DER detached PKCS#7 of `manifest`: SHA-256, signingTime, certs = leaf + WWDR.

        Binary keeps the bytes as they are: without it newlines are canonicalised to
        CRLF before hashing and a pretty-printed manifest would no longer verify.
        The builder is rebuilt per call, in this order, on purpose: `set_data()` and
        `add_signer()` return a builder *without* the certificates added before them
        (seen in cryptography 50), so a pre-built builder silently drops the WWDR.
        The builder steps are cheap next to the RSA operation.
        """
        return (pkcs7.PKCS7SignatureBuilder()
                .set_data(manifest)
                .add_signer(self.certificate, self.private_key, _SHA256)
                .add_certificate(self.wwdr)
                .sign(serialization.Encoding.DER, _SIGN_OPTIONS))

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


def load_identity(certs_path: Path, certificate_file: str, key_file: str | None = None,
                  password: bytes | None = None) -> SigningIdentity:
    """Load a pass certificate, its key and the WWDR intermediate that issued it.

    `certificate_file` is a PEM/DER certificate (with `key_file`, a PEM private key,
    or the key in the same PEM file) or a .p12/.pfx. Relative paths are under
    `certs_path`. Raises CertificateError with one line naming the file.
    """
    certs_path = Path(certs_path)
    material = _load_material(certs_path, certificate_file, key_file, password)
    if not _key_matches(material.key, material.certificate):
        raise CertificateError(_mismatch_message(material))
    wwdr = find_wwdr(material.certificate, certs_path, material.extra_certificates,
                     material.certificate_path)
    uid = certificate_uid(material.certificate)
    if uid is None:
        raise CertificateError(f"{material.certificate_path}: certificate has no UID "
                               f"(not a Pass Type ID certificate)")
    return SigningIdentity(
        certificate=material.certificate,
        private_key=material.key,
        wwdr=wwdr,
        pass_type_identifier=uid,
        team_identifier=certificate_team(material.certificate) or "",
    )


def certificate_uid(cert: x509.Certificate) -> str | None:
    """The pass type identifier Apple puts in the subject UID (falls back to the CN)."""
    uid = _name_value(cert.subject, NameOID.USER_ID)
    if uid:
        return uid
    cn = _name_value(cert.subject, NameOID.COMMON_NAME) or ""
    prefix = "Pass Type ID: "
    return cn[len(prefix):] if cn.startswith(prefix) else None


def certificate_team(cert: x509.Certificate) -> str | None:
    """The team identifier Apple puts in the subject OU."""
    return _name_value(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)


def find_wwdr(leaf: x509.Certificate, certs_path: Path,
              extra: list[x509.Certificate] | tuple[x509.Certificate, ...] = (),
              leaf_path: Path | None = None) -> x509.Certificate:
    """The intermediate from `certs_path/wwdr/` (or `extra`) that really issued `leaf`.

    A match needs the subject to equal the leaf's issuer *and* its key to verify the
    leaf's signature: G1, G3 and G4 differ only by OU, and a wrong one is the classic
    "trust chain could not be verified" failure in Wallet.
    """
    directory = Path(certs_path) / WWDR_DIR
    candidates, skipped = _wwdr_candidates(directory)
    matches = [c for c in [*candidates, *extra] if _issued(leaf, c)]
    if matches:
        # Several copies (e.g. a renewed G4 with the same key): prefer one valid now,
        # then the one that lasts longest.
        now = datetime.now(UTC)
        best: x509.Certificate = max(
            matches, key=lambda c: (c.not_valid_before_utc <= now < c.not_valid_after_utc,
                                    c.not_valid_after_utc))
        return best
    where = directory if directory.is_dir() else f"{directory} (directory missing)"
    note = f"; unreadable: {', '.join(skipped)}" if skipped else ""
    who = f"{leaf_path}: " if leaf_path else ""
    raise CertificateError(
        f"{who}no WWDR intermediate issued this certificate: looked for issuer "
        f"'{leaf.issuer.rfc4514_string()}' in {where} ({len(candidates)} certificate(s) "
        f"found{note}); put Apple's AppleWWDRCAG4.cer from {APPLE_CA_URL} there")


# -- checks -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CertProblem:
    level: str  # "error" | "warning"
    message: str  # one clear line


def check_identity(certs_path: Path, certificate_file: str, key_file: str | None,
                   password: bytes | None, expected_pass_type_identifier: str,
                   expected_team_identifier: str | None = None,
                   warn_days: int = 30, now: datetime | None = None) -> list[CertProblem]:
    """Everything that would make Wallet reject our passes. Empty list = all good.

    Never raises for bad input: each failure becomes a CertProblem.
    """
    now = _aware(now or datetime.now(UTC))
    certs_path = Path(certs_path)
    problems: list[CertProblem] = []

    def error(message: str) -> None:
        problems.append(CertProblem("error", message))

    try:
        material = _load_material(certs_path, certificate_file, key_file, password)
    except CertificateError as exc:
        return [CertProblem("error", str(exc))]
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
        return [CertProblem("error", f"{certs_path / certificate_file}: cannot load "
                                     f"({type(exc).__name__})")]

    cert, where = material.certificate, material.certificate_path
    if not _key_matches(material.key, cert):
        error(_mismatch_message(material))

    uid = certificate_uid(cert)
    if uid is None:
        error(f"{where}: certificate has no UID (not a Pass Type ID certificate)")
    elif uid != expected_pass_type_identifier:
        error(f"{where}: certificate is for pass type {uid!r}, expected "
              f"{expected_pass_type_identifier!r} (passTypeIdentifier must equal the UID)")

    team = certificate_team(cert)
    if expected_team_identifier is not None and team != expected_team_identifier:
        error(f"{where}: certificate belongs to team {team!r}, expected "
              f"{expected_team_identifier!r} (teamIdentifier must equal the OU)")

    problems.extend(_validity(cert, "certificate", where, now, warn_days,
                              "renew it in the Apple Developer portal"))

    try:
        wwdr = find_wwdr(cert, certs_path, material.extra_certificates, where)
    except CertificateError as exc:
        error(str(exc))
    else:
        subject = _name_value(wwdr.subject, NameOID.COMMON_NAME) or wwdr.subject.rfc4514_string()
        problems.extend(_validity(wwdr, f"WWDR intermediate '{subject}'", certs_path / WWDR_DIR,
                                  now, warn_days, f"get a current one from {APPLE_CA_URL}"))
    return problems


def _validity(cert: x509.Certificate, what: str, where: Path, now: datetime, warn_days: int,
              remedy: str) -> list[CertProblem]:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return [CertProblem("error", f"{where}: {what} is not valid before {start:%Y-%m-%d}")]
    if now >= end:
        ago = (now - end).days
        return [CertProblem("error", f"{where}: {what} expired on {end:%Y-%m-%d}, "
                                     f"{ago} days ago; {remedy}")]
    left = end - now
    if left <= timedelta(days=warn_days):
        days = math.ceil(left.total_seconds() / 86400)
        return [CertProblem("warning", f"{where}: {what} expires on {end:%Y-%m-%d}, "
                                       f"in {days} days; {remedy}")]
    return []


# -- development chain ------------------------------------------------------------------

@dataclass(frozen=True)
class DevCertPaths:
    root_ca: Path
    wwdr: Path
    certificate: Path
    key: Path
    certificate_file: str  # relative to certs_path, for the database
    key_file: str  # relative to certs_path, for the database


DEV_ROOT_CN = "Passerelle Development Root CA (not Apple)"
DEV_WWDR_CN = "Passerelle Development WWDR (stand-in for Apple WWDR G4)"


def make_dev_certs(certs_path: Path, pass_type_identifier: str, team_identifier: str,
                   organization: str = "Passerelle Development",
                   overwrite: bool = False) -> DevCertPaths:
    """A local root → WWDR stand-in → pass certificate chain, so no Apple account is needed.

    Idempotent: an existing leaf is kept unless `overwrite`. The root key is never
    written; the stand-in intermediate's key is (dev/dev-wwdr-key.pem, 0600) so that
    several development pass types share one intermediate instead of each new one
    replacing wwdr/dev-wwdr.pem and breaking the others' chains.
    """
    for label, value in (("pass type identifier", pass_type_identifier),
                         ("team identifier", team_identifier)):
        if not _SAFE_NAME.match(value) or ".." in value:
            raise CertificateError(f"{label} {value!r} is not a plain identifier")
    root = Path(certs_path).resolve()
    paths = DevCertPaths(
        root_ca=root / "dev" / "root-ca.pem",
        wwdr=root / WWDR_DIR / "dev-wwdr.pem",
        certificate=root / pass_type_identifier / "certificate.pem",
        key=root / pass_type_identifier / "key.pem",
        certificate_file=f"{pass_type_identifier}/certificate.pem",
        key_file=f"{pass_type_identifier}/key.pem",
    )
    if paths.certificate.exists() and paths.key.exists() and not overwrite:
        return paths

    now = datetime.now(UTC)
    leaf_end = now + timedelta(days=365)
    wwdr_key_path = root / "dev" / "dev-wwdr-key.pem"
    chain = _existing_dev_chain(paths, wwdr_key_path, leaf_end)
    if chain is None:
        root_key = _new_rsa_key()
        root_cert = make_ca_certificate(
            _name(CN=DEV_ROOT_CN, O=organization, C="US"), root_key,
            not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=365 * 20))
        wwdr_key: SigningKey = _new_rsa_key()
        wwdr_cert = make_ca_certificate(
            _name(CN=DEV_WWDR_CN, OU="G4", O=organization, C="US"), wwdr_key,
            issuer=root_cert, issuer_key=root_key,
            not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=365 * 10))
        _write(paths.root_ca, _pem(root_cert))
        _write(wwdr_key_path, _key_pem(wwdr_key), private=True)
        _write(paths.wwdr, _pem(wwdr_cert))
    else:
        wwdr_cert, wwdr_key = chain

    leaf_key = _new_rsa_key()
    leaf = make_pass_certificate(wwdr_cert, wwdr_key, leaf_key.public_key(),
                                 pass_type_identifier, team_identifier, organization,
                                 not_before=now - timedelta(minutes=5), not_after=leaf_end)
    # Key first: a certificate without its key would look like a finished leaf.
    _write(paths.key, _key_pem(leaf_key), private=True)
    _write(paths.certificate, _pem(leaf))
    return paths


def make_ca_certificate(subject: x509.Name, key: SigningKey, *, not_before: datetime,
                        not_after: datetime, issuer: x509.Certificate | None = None,
                        issuer_key: SigningKey | None = None) -> x509.Certificate:
    """A CA certificate: self-signed root, or an intermediate when issuer/issuer_key given."""
    signer_key = issuer_key or key
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None
                                                    else 0), critical=True)
               .add_extension(_key_usage(cert_sign=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   signer_key.public_key()), critical=False))
    return builder.sign(signer_key, hashes.SHA256())


def make_pass_certificate(issuer: x509.Certificate, issuer_key: SigningKey,
                          public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
                          pass_type_identifier: str, team_identifier: str | None,
                          organization: str = "Passerelle Development", *,
                          not_before: datetime, not_after: datetime) -> x509.Certificate:
    """A leaf shaped like Apple's: UID=<id>, CN="Pass Type ID: <id>", OU=<team>, O, C=US."""
    subject = _name(UID=pass_type_identifier, CN=f"Pass Type ID: {pass_type_identifier}",
                    OU=team_identifier, O=organization, C="US")
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(cert_sign=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                                     PASS_TYPE_ID_EKU]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _existing_dev_chain(paths: DevCertPaths, wwdr_key_path: Path,
                        leaf_end: datetime) -> tuple[x509.Certificate, SigningKey] | None:
    """The stand-in intermediate and its key, if present, consistent and long-lived enough."""
    try:
        root_cert = x509.load_pem_x509_certificate(paths.root_ca.read_bytes())
        wwdr_cert = x509.load_pem_x509_certificate(paths.wwdr.read_bytes())
        wwdr_key = serialization.load_pem_private_key(wwdr_key_path.read_bytes(), None)
        wwdr_cert.verify_directly_issued_by(root_cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return None
    if not isinstance(wwdr_key, SigningKey) or not _key_matches(wwdr_key, wwdr_cert):
        return None
    if wwdr_cert.not_valid_after_utc < leaf_end + timedelta(days=1):
        return None
    return wwdr_cert, wwdr_key


# -- loading ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Material:
    certificate: x509.Certificate
    key: SigningKey
    extra_certificates: tuple[x509.Certificate, ...]
    certificate_path: Path
    key_path: Path


def _load_material(certs_path: Path, certificate_file: str, key_file: str | None,
                   password: bytes | None) -> _Material:
    cert_path = certs_path / certificate_file  # an absolute certificate_file wins
    if cert_path.suffix.lower() in P12_SUFFIXES:
        return _load_p12(cert_path, password)

    cert_data = _read(cert_path)
    certificates = _parse_certificates(cert_data, cert_path)
    if key_file:
        key_path = certs_path / key_file
        key = _parse_private_key(_read(key_path), key_path, password)
    elif b"PRIVATE KEY-----" in cert_data:  # certificate and key concatenated in one PEM
        key_path = cert_path
        key = _parse_private_key(cert_data, key_path, password)
    else:
        raise CertificateError(f"{cert_path}: no key file given (a PEM certificate needs "
                               f"its private key file, or use a .p12)")
    # In a PEM bundle the leaf is the certificate that goes with the key.
    leaf = next((c for c in certificates if _key_matches(key, c)), certificates[0])
    extra = tuple(c for c in certificates if c is not leaf)
    return _Material(leaf, key, extra, cert_path, key_path)


def _load_p12(path: Path, password: bytes | None) -> _Material:
    data = _read(path)
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except (ValueError, TypeError) as exc:
        if not data or data[0] != 0x30:  # not even a DER SEQUENCE
            raise CertificateError(f"{path}: not a PKCS#12 (.p12) file") from exc
        if password is None:
            raise CertificateError(f"{path}: cannot open the .p12 without a password "
                                   f"(or the file is damaged)") from exc
        raise CertificateError(f"{path}: wrong password for the .p12 "
                               f"(or the file is damaged)") from exc
    if key is None:
        raise CertificateError(f"{path}: the .p12 holds no private key (export the "
                               f"certificate together with its key from Keychain)")
    if not isinstance(key, SigningKey):
        raise CertificateError(f"{path}: unsupported private key type {type(key).__name__} "
                               f"(need RSA or EC)")
    certificates = ([cert] if cert is not None else []) + list(extra)
    if not certificates:
        raise CertificateError(f"{path}: the .p12 holds no certificate")
    leaf = next((c for c in certificates if _key_matches(key, c)), certificates[0])
    return _Material(leaf, key, tuple(c for c in certificates if c is not leaf), path, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CertificateError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse_certificates(data: bytes, path: Path) -> list[x509.Certificate]:
    """All certificates in a PEM file, or the one in a DER file (Apple's .cer)."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise CertificateError(f"{path}: not a PEM or DER X.509 certificate") from None


def _parse_private_key(data: bytes, path: Path, password: bytes | None) -> SigningKey:
    pem = b"-----BEGIN" in data
    load = serialization.load_pem_private_key if pem else serialization.load_der_private_key
    try:
        try:
            key = load(data, password)
        except TypeError:
            if password is None:
                raise CertificateError(f"{path}: private key is encrypted but no password "
                                       f"was given") from None
            key = load(data, None)  # a password that is not needed is harmless
    except ValueError:
        if password is not None and pem and b"ENCRYPTED" in data:
            raise CertificateError(f"{path}: wrong password for the private key") from None
        raise CertificateError(f"{path}: not a PEM private key") from None
    except TypeError:
        raise CertificateError(f"{path}: cannot read the private key") from None
    if not isinstance(key, SigningKey):
        raise CertificateError(f"{path}: unsupported private key type {type(key).__name__} "
                               f"(need RSA or EC)")
    return key


def _wwdr_candidates(directory: Path) -> tuple[list[x509.Certificate], list[str]]:
    certificates: list[x509.Certificate] = []
    skipped: list[str] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError:  # missing or unreadable: the caller says where it looked
        return certificates, skipped
    for path in entries:
        if path.suffix.lower() not in WWDR_SUFFIXES or not path.is_file():
            continue
        try:
            certificates.extend(_parse_certificates(_read(path), path))
        except CertificateError:
            skipped.append(path.name)
    return certificates, skipped


def _issued(leaf: x509.Certificate, candidate: x509.Certificate) -> bool:
    if candidate.subject != leaf.issuer:
        return False
    try:
        leaf.verify_directly_issued_by(candidate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _key_matches(key: SigningKey, cert: x509.Certificate) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def _mismatch_message(material: _Material) -> str:
    if material.key_path == material.certificate_path:
        return f"{material.certificate_path}: the private key does not match the certificate"
    return (f"{material.certificate_path}: certificate does not match the private key "
            f"{material.key_path}")


# -- small helpers ----------------------------------------------------------------------

def _name_value(name: x509.Name, oid: ObjectIdentifier) -> str | None:
    attributes = name.get_attributes_for_oid(oid)
    if not attributes:
        return None
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode()


_NAME_OIDS = {"UID": NameOID.USER_ID, "CN": NameOID.COMMON_NAME,
              "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "O": NameOID.ORGANIZATION_NAME,
              "C": NameOID.COUNTRY_NAME}


def _name(**parts: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(_NAME_OIDS[k], v) for k, v in parts.items() if v])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


def _new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Atomic write; private files are created 0600 so the key is never world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def identity_password(identity: AppleIdentity) -> bytes | None:
    """The key or .p12 password, read from the environment variable the identity names."""
    if not identity.password_env:
        return None
    value = os.environ.get(identity.password_env)
    if value is None:
        raise CertificateError(
            f"{identity.pass_type_identifier}: environment variable {identity.password_env} "
            f"(the certificate password) is not set"
        )
    return value.encode()


def file_stamp(root: Path, relative: str) -> float:
    """A certificate file's modification time: cache keys change when the file is replaced."""
    try:
        return (Path(root) / relative).stat().st_mtime
    except OSError:
        return 0.0

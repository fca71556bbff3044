"""app.wallet.certs against the real `openssl` binary: signatures, chains, p12, checks, dev certs.

No database, no Flask, no mocks. RSA key generation is the slow part, so keys are
made once per module and every test builds the certificates it needs from them.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import NameOID

from app.wallet import certs
from app.wallet.certs import CertificateError, CertProblem, SigningIdentity

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")

PASS_TYPE = "pass.dev.passerelle.test"
TEAM = "TEAM123456"
NOW = datetime.now(UTC).replace(microsecond=0)
MANIFEST = json.dumps({"pass.json": "0" * 40, "icon.png": "1" * 40,
                       "en.lproj/pass.strings": "2" * 40}, indent=2).encode() + b"\n"


# -- shared keys and tiny cert-making helpers ------------------------------------------

@dataclass(frozen=True)
class Keys:
    root: rsa.RSAPrivateKey
    wwdr: rsa.RSAPrivateKey
    leaf: rsa.RSAPrivateKey
    other: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    def new() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    return Keys(new(), new(), new(), new())


@dataclass(frozen=True)
class Chain:
    root: x509.Certificate
    wwdr: x509.Certificate
    leaf: x509.Certificate


def name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attrs)


WWDR_NAME = name("Test WWDR Certification Authority", "G4")


def make_chain(keys: Keys, *, root_key: rsa.RSAPrivateKey | None = None,
               wwdr_key: rsa.RSAPrivateKey | None = None, wwdr_name: x509.Name = WWDR_NAME,
               uid: str = PASS_TYPE, team: str | None = TEAM,
               leaf_start: datetime | None = None, leaf_end: datetime | None = None,
               wwdr_end: datetime | None = None) -> Chain:
    root_key = root_key or keys.root
    wwdr_key = wwdr_key or keys.wwdr
    root = certs.make_ca_certificate(name("Test Root CA"), root_key,
                                     not_before=NOW - timedelta(days=3650),
                                     not_after=NOW + timedelta(days=3650))
    wwdr = certs.make_ca_certificate(wwdr_name, wwdr_key, issuer=root, issuer_key=root_key,
                                     not_before=NOW - timedelta(days=3000),
                                     not_after=wwdr_end or NOW + timedelta(days=3000))
    leaf = certs.make_pass_certificate(wwdr, wwdr_key, keys.leaf.public_key(), uid, team,
                                       "Test Org",
                                       not_before=leaf_start or NOW - timedelta(days=1),
                                       not_after=leaf_end or NOW + timedelta(days=300))
    return Chain(root, wwdr, leaf)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: rsa.RSAPrivateKey, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def install(certs_path: Path, chain: Chain, key: rsa.RSAPrivateKey,
            password: bytes | None = None) -> tuple[str, str]:
    """Write leaf + key under certs_path/<id>/ and the WWDR (DER, like Apple's) into wwdr/."""
    (certs_path / PASS_TYPE).mkdir(parents=True, exist_ok=True)
    (certs_path / "wwdr").mkdir(exist_ok=True)
    (certs_path / PASS_TYPE / "certificate.pem").write_bytes(pem(chain.leaf))
    (certs_path / PASS_TYPE / "key.pem").write_bytes(key_pem(key, password))
    (certs_path / "wwdr" / "AppleWWDRCAG4.cer").write_bytes(
        chain.wwdr.public_bytes(serialization.Encoding.DER))
    return f"{PASS_TYPE}/certificate.pem", f"{PASS_TYPE}/key.pem"


def check(certs_path: Path, cert_file: str, key_file: str | None,
          password: bytes | None = None, **kwargs: object) -> list[CertProblem]:
    kwargs.setdefault("expected_team_identifier", TEAM)
    return certs.check_identity(certs_path, cert_file, key_file, password, PASS_TYPE,
                                now=NOW, **kwargs)  # type: ignore[arg-type]


def only(problems: list[CertProblem], level: str, *fragments: str) -> CertProblem:
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.level == level, problem
    for fragment in fragments:
        assert fragment in problem.message, problem
    assert "\n" not in problem.message
    return problem


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True,
                          timeout=30, check=False)


# -- development chain + openssl verification ----------------------------------------

@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> certs.DevCertPaths:
    return certs.make_dev_certs(tmp_path_factory.mktemp("certs"), PASS_TYPE, TEAM)


@pytest.fixture(scope="module")
def dev_identity(dev: certs.DevCertPaths) -> SigningIdentity:
    return certs.load_identity(dev.root_ca.parent.parent, dev.certificate_file, dev.key_file)


@needs_openssl
def test_dev_signature_verifies_with_openssl(dev: certs.DevCertPaths,
                                             dev_identity: SigningIdentity,
                                             tmp_path: Path) -> None:
    assert b"\n" in MANIFEST  # Binary must keep LF: CRLF canonicalisation breaks this
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(MANIFEST)
    signature = tmp_path / "signature"
    signature.write_bytes(dev_identity.sign(MANIFEST))

    for tool in ("smime", "cms"):
        result = openssl(tool, "-verify", "-binary", "-inform", "DER", "-in", signature,
                         "-content", manifest, "-CAfile", dev.root_ca, "-purpose", "any",
                         "-out", tmp_path / f"{tool}.out")
        assert result.returncode == 0, (tool, result.stderr)
        assert (tmp_path / f"{tool}.out").read_bytes() == MANIFEST

    dump = openssl("cms", "-cmsout", "-print", "-inform", "DER", "-in", signature)
    assert dump.returncode == 0, dump.stderr
    assert "signingTime" in dump.stdout
    assert "sha256" in dump.stdout
    assert "eContent: <ABSENT>" in dump.stdout
    assert f"Pass Type ID: {PASS_TYPE}" in dump.stdout
    assert certs.DEV_WWDR_CN in dump.stdout

    bundled = pkcs7.load_der_pkcs7_certificates(signature.read_bytes())
    assert {c.fingerprint(hashes.SHA256()) for c in bundled} == {
        dev_identity.certificate.fingerprint(hashes.SHA256()),
        dev_identity.wwdr.fingerprint(hashes.SHA256())}


@needs_openssl
def test_tampered_manifest_fails_openssl(dev: certs.DevCertPaths,
                                         dev_identity: SigningIdentity,
                                         tmp_path: Path) -> None:
    signature = tmp_path / "signature"
    signature.write_bytes(dev_identity.sign(MANIFEST))
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(MANIFEST.replace(b"0000", b"0001", 1))
    for tool in ("smime", "cms"):
        result = openssl(tool, "-verify", "-binary", "-inform", "DER", "-in", signature,
                         "-content", manifest, "-CAfile", dev.root_ca, "-purpose", "any",
                         "-out", tmp_path / "out")
        assert result.returncode != 0, tool


@needs_openssl
def test_openssl_chain_verifies(dev: certs.DevCertPaths) -> None:
    result = openssl("verify", "-CAfile", dev.root_ca, "-untrusted", dev.wwdr, dev.certificate)
    assert result.returncode == 0, result.stderr


def test_dev_identity_fields(dev: certs.DevCertPaths, dev_identity: SigningIdentity) -> None:
    assert dev_identity.pass_type_identifier == PASS_TYPE
    assert dev_identity.team_identifier == TEAM
    assert dev_identity.not_after.tzinfo is not None
    assert timedelta(days=364) < dev_identity.not_after - NOW < timedelta(days=366)
    leaf = dev_identity.certificate
    subject = {a.oid: a.value for a in leaf.subject}
    assert subject[NameOID.USER_ID] == PASS_TYPE
    assert subject[NameOID.COMMON_NAME] == f"Pass Type ID: {PASS_TYPE}"
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == TEAM
    assert subject[NameOID.ORGANIZATION_NAME] == "Passerelle Development"
    assert subject[NameOID.COUNTRY_NAME] == "US"
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    wwdr = dev_identity.wwdr
    assert wwdr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert wwdr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == certs.DEV_WWDR_CN
    assert wwdr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "G4"
    root = x509.load_pem_x509_certificate(dev.root_ca.read_bytes())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(dev_identity.private_key, rsa.RSAPrivateKey)
    assert dev_identity.private_key.key_size == 2048
    assert "PRIVATE" not in repr(dev_identity)


def test_dev_certs_pass_their_own_check(dev: certs.DevCertPaths) -> None:
    assert certs.check_identity(dev.root_ca.parent.parent, dev.certificate_file,
                                dev.key_file, None, PASS_TYPE, TEAM) == []


def test_make_dev_certs_idempotent_and_private(dev: certs.DevCertPaths) -> None:
    certs_path = dev.root_ca.parent.parent
    assert dev.certificate_file == f"{PASS_TYPE}/certificate.pem"
    assert dev.key_file == f"{PASS_TYPE}/key.pem"
    for path in (dev.root_ca, dev.wwdr, dev.certificate, dev.key):
        assert path.is_absolute() and path.is_file()
    assert dev.wwdr == certs_path / "wwdr" / "dev-wwdr.pem"
    assert dev.root_ca == certs_path / "dev" / "root-ca.pem"
    assert stat.S_IMODE(dev.key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in dev.root_ca.read_bytes()
    # The root key is never written anywhere.
    root_key_pub = x509.load_pem_x509_certificate(dev.root_ca.read_bytes()).public_key()
    for path in certs_path.rglob("*.pem"):
        data = path.read_bytes()
        if b"PRIVATE KEY" in data:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            key = serialization.load_pem_private_key(data, None)
            assert key.public_key() != root_key_pub, path

    before = {p: p.read_bytes() for p in (dev.root_ca, dev.wwdr, dev.certificate, dev.key)}
    again = certs.make_dev_certs(certs_path, PASS_TYPE, TEAM)
    assert again == dev
    assert {p: p.read_bytes() for p in before} == before


def test_make_dev_certs_overwrite_and_second_pass_type(tmp_path: Path) -> None:
    first = certs.make_dev_certs(tmp_path, PASS_TYPE, TEAM)
    old_leaf, old_wwdr = first.certificate.read_bytes(), first.wwdr.read_bytes()

    replaced = certs.make_dev_certs(tmp_path, PASS_TYPE, TEAM, overwrite=True)
    assert replaced.certificate.read_bytes() != old_leaf
    assert replaced.wwdr.read_bytes() == old_wwdr  # the stand-in chain is reused
    assert stat.S_IMODE(replaced.key.stat().st_mode) == 0o600

    # A second development pass type shares the intermediate: the first still checks out.
    other = certs.make_dev_certs(tmp_path, "pass.dev.passerelle.other", "OTHERTEAM1")
    assert other.wwdr.read_bytes() == old_wwdr
    assert certs.check_identity(tmp_path, first.certificate_file, first.key_file, None,
                                PASS_TYPE, TEAM) == []
    assert certs.check_identity(tmp_path, other.certificate_file, other.key_file, None,
                                "pass.dev.passerelle.other", "OTHERTEAM1") == []


def test_make_dev_certs_rejects_path_like_identifiers(tmp_path: Path) -> None:
    with pytest.raises(CertificateError):
        certs.make_dev_certs(tmp_path, "../escape", TEAM)


# -- WWDR selection ---------------------------------------------------------------------

def test_wwdr_selection_picks_the_issuer(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    # A decoy with the very same subject but another key, and an unrelated chain.
    decoy = make_chain(keys, root_key=keys.other, wwdr_key=keys.other)
    unrelated = make_chain(keys, root_key=keys.other, wwdr_key=keys.other,
                           wwdr_name=name("Unrelated Intermediate", "G3"))
    wwdr_dir = tmp_path / "wwdr"
    (wwdr_dir / "0-decoy.pem").write_bytes(pem(decoy.wwdr))
    (wwdr_dir / "1-unrelated.crt").write_bytes(pem(unrelated.wwdr) + pem(unrelated.root))
    (wwdr_dir / "notes.txt").write_text("not a certificate, and not a certificate suffix")

    identity = certs.load_identity(tmp_path, cert_file, key_file)
    assert identity.wwdr == chain.wwdr
    assert identity.wwdr != decoy.wwdr and decoy.wwdr.subject == chain.wwdr.subject


@needs_openssl
def test_selected_wwdr_signature_verifies(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    decoy = make_chain(keys, root_key=keys.other, wwdr_key=keys.other)
    (tmp_path / "wwdr" / "0-decoy.pem").write_bytes(pem(decoy.wwdr))
    identity = certs.load_identity(tmp_path, cert_file, key_file)
    (tmp_path / "root.pem").write_bytes(pem(chain.root))
    (tmp_path / "manifest.json").write_bytes(MANIFEST)
    (tmp_path / "signature").write_bytes(identity.sign(MANIFEST))
    result = openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "signature",
                     "-content", tmp_path / "manifest.json", "-CAfile", tmp_path / "root.pem",
                     "-purpose", "any", "-out", tmp_path / "out")
    assert result.returncode == 0, result.stderr


def test_wwdr_missing_fails_clearly(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    (tmp_path / "wwdr" / "AppleWWDRCAG4.cer").unlink()
    decoy = make_chain(keys, root_key=keys.other, wwdr_key=keys.other)
    (tmp_path / "wwdr" / "decoy.pem").write_bytes(pem(decoy.wwdr))
    (tmp_path / "wwdr" / "broken.cer").write_bytes(b"garbage")

    with pytest.raises(CertificateError) as caught:
        certs.load_identity(tmp_path, cert_file, key_file)
    message = str(caught.value)
    assert "Test WWDR Certification Authority" in message  # the issuer looked for
    assert str(tmp_path / "wwdr") in message  # and where
    assert "broken.cer" in message
    assert "\n" not in message

    only(check(tmp_path, cert_file, key_file), "error", "no WWDR intermediate",
         str(tmp_path / "wwdr"))


def test_wwdr_directory_missing(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    shutil.rmtree(tmp_path / "wwdr")
    with pytest.raises(CertificateError, match="directory missing"):
        certs.load_identity(tmp_path, cert_file, key_file)


# -- p12 and passwords ------------------------------------------------------------------

def write_p12(path: Path, keys: Keys, chain: Chain, password: bytes,
              cas: list[x509.Certificate] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"Pass Type ID", keys.leaf, chain.leaf, cas,
        serialization.BestAvailableEncryption(password)))


def test_p12_with_password_loads_and_signs(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    install(tmp_path, chain, keys.leaf)
    write_p12(tmp_path / PASS_TYPE / "certificate.p12", keys, chain, b"s3cret")
    identity = certs.load_identity(tmp_path, f"{PASS_TYPE}/certificate.p12", None, b"s3cret")
    assert identity.certificate == chain.leaf
    assert identity.wwdr == chain.wwdr
    assert identity.pass_type_identifier == PASS_TYPE
    assert identity.team_identifier == TEAM
    assert pkcs7.load_der_pkcs7_certificates(identity.sign(MANIFEST))
    assert check(tmp_path, f"{PASS_TYPE}/certificate.p12", None, b"s3cret") == []


def test_p12_absolute_path_and_bundled_wwdr(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    p12 = tmp_path / "elsewhere" / "identity.pfx"
    write_p12(p12, keys, chain, b"pw", cas=[chain.wwdr])
    # No wwdr/ directory at all: the intermediate exported with the .p12 is used.
    identity = certs.load_identity(tmp_path / "certs", str(p12), None, b"pw")
    assert identity.wwdr == chain.wwdr


def test_p12_wrong_or_missing_password(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    install(tmp_path, chain, keys.leaf)
    write_p12(tmp_path / "id.p12", keys, chain, b"right")
    with pytest.raises(CertificateError, match="wrong password") as caught:
        certs.load_identity(tmp_path, "id.p12", None, b"wrong")
    assert "id.p12" in str(caught.value) and "right" not in str(caught.value)
    with pytest.raises(CertificateError, match="without a password"):
        certs.load_identity(tmp_path, "id.p12", None, None)
    only(check(tmp_path, "id.p12", None, b"wrong"), "error", "wrong password", "id.p12")
    (tmp_path / "junk.p12").write_bytes(b"this is not a p12")
    with pytest.raises(CertificateError, match="not a PKCS#12"):
        certs.load_identity(tmp_path, "junk.p12", None, b"x")


def test_encrypted_pem_key(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    cert_file, key_file = install(tmp_path, chain, keys.leaf, password=b"k3y")
    assert certs.load_identity(tmp_path, cert_file, key_file, b"k3y").certificate == chain.leaf
    with pytest.raises(CertificateError, match="wrong password") as caught:
        certs.load_identity(tmp_path, cert_file, key_file, b"nope")
    assert "key.pem" in str(caught.value)
    with pytest.raises(CertificateError, match="no password"):
        certs.load_identity(tmp_path, cert_file, key_file, None)


def test_combined_pem_without_key_file(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys)
    install(tmp_path, chain, keys.leaf)
    (tmp_path / "bundle.pem").write_bytes(pem(chain.leaf) + key_pem(keys.leaf))
    assert certs.load_identity(tmp_path, "bundle.pem").certificate == chain.leaf
    (tmp_path / "bare.pem").write_bytes(pem(chain.leaf))
    with pytest.raises(CertificateError, match="no key file"):
        certs.load_identity(tmp_path, "bare.pem")


# -- check_identity -------------------------------------------------------------------

def test_check_all_good(keys: Keys, tmp_path: Path) -> None:
    cert_file, key_file = install(tmp_path, make_chain(keys), keys.leaf)
    assert check(tmp_path, cert_file, key_file) == []
    assert check(tmp_path, cert_file, key_file, expected_team_identifier=None) == []


def test_check_key_mismatch(keys: Keys, tmp_path: Path) -> None:
    cert_file, key_file = install(tmp_path, make_chain(keys), keys.other)
    only(check(tmp_path, cert_file, key_file), "error", "does not match", "certificate.pem",
         "key.pem")
    with pytest.raises(CertificateError, match="does not match"):
        certs.load_identity(tmp_path, cert_file, key_file)


def test_check_missing_files(keys: Keys, tmp_path: Path) -> None:
    cert_file, key_file = install(tmp_path, make_chain(keys), keys.leaf)
    only(check(tmp_path, "nope/certificate.pem", key_file), "error", "file not found",
         "nope/certificate.pem")
    (tmp_path / key_file).unlink()
    only(check(tmp_path, cert_file, key_file), "error", "file not found", "key.pem")
    with pytest.raises(CertificateError, match="file not found"):
        certs.load_identity(tmp_path, cert_file, key_file)
    only(check(tmp_path, PASS_TYPE, None), "error", "directory")


def test_check_garbage_files(keys: Keys, tmp_path: Path) -> None:
    cert_file, key_file = install(tmp_path, make_chain(keys), keys.leaf)
    good_cert = (tmp_path / cert_file).read_bytes()
    (tmp_path / key_file).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    only(check(tmp_path, cert_file, key_file), "error", "not a PEM private key", "key.pem")
    (tmp_path / cert_file).write_bytes(b"\x00\x01garbage")
    only(check(tmp_path, cert_file, key_file), "error", "not a PEM or DER X.509 certificate",
         "certificate.pem")
    with pytest.raises(CertificateError, match="certificate.pem"):
        certs.load_identity(tmp_path, cert_file, key_file)
    assert good_cert  # the DER form of the same certificate is accepted too:
    (tmp_path / cert_file).write_bytes(x509.load_pem_x509_certificate(good_cert)
                                       .public_bytes(serialization.Encoding.DER))
    (tmp_path / key_file).write_bytes(key_pem(keys.leaf))
    assert check(tmp_path, cert_file, key_file) == []


def test_check_expired(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys, leaf_start=NOW - timedelta(days=400),
                       leaf_end=NOW - timedelta(days=35))
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    end = chain.leaf.not_valid_after_utc
    only(check(tmp_path, cert_file, key_file), "error", f"expired on {end:%Y-%m-%d}",
         "35 days ago")


def test_check_expiring_soon_is_a_warning(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys, leaf_end=NOW + timedelta(days=10))
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    end = chain.leaf.not_valid_after_utc
    only(check(tmp_path, cert_file, key_file), "warning",
         f"expires on {end:%Y-%m-%d}, in 10 days")
    assert check(tmp_path, cert_file, key_file, warn_days=5) == []
    # Still loadable and usable: the warning is advance notice, not a refusal.
    certs.load_identity(tmp_path, cert_file, key_file)


def test_check_not_yet_valid(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys, leaf_start=NOW + timedelta(days=2))
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    only(check(tmp_path, cert_file, key_file), "error", "not valid before")


def test_check_wrong_uid_and_team(keys: Keys, tmp_path: Path) -> None:
    chain = make_chain(keys, uid="pass.com.example.other", team="OTHERTEAM9")
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    problems = check(tmp_path, cert_file, key_file)
    assert [p.level for p in problems] == ["error", "error"], problems
    uid, team = problems
    assert "'pass.com.example.other'" in uid.message and f"'{PASS_TYPE}'" in uid.message
    assert "UID" in uid.message
    assert "'OTHERTEAM9'" in team.message and f"'{TEAM}'" in team.message
    assert "OU" in team.message
    # Team mismatch alone, and no team expectation at all.
    only(check(tmp_path, cert_file, key_file, expected_team_identifier=None), "error", "UID")


def test_check_expired_wwdr(keys: Keys, tmp_path: Path) -> None:
    # Like G1 after 7 Feb 2023: the leaf is fine but its issuer has expired.
    chain = make_chain(keys, wwdr_end=NOW - timedelta(days=1))
    cert_file, key_file = install(tmp_path, chain, keys.leaf)
    only(check(tmp_path, cert_file, key_file), "error", "WWDR intermediate",
         "Test WWDR Certification Authority", "expired on")


def test_certificate_uid(keys: Keys) -> None:
    leaf_key = keys.other
    cert = certs.make_pass_certificate(
        certs.make_ca_certificate(name("r"), leaf_key, not_before=NOW,
                                  not_after=NOW + timedelta(days=1)),
        leaf_key, leaf_key.public_key(), "pass.x.y", None,
        not_before=NOW, not_after=NOW + timedelta(days=1))
    assert certs.certificate_uid(cert) == "pass.x.y"
    assert certs.certificate_team(cert) is None

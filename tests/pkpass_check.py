"""Independent checks of a .pkpass: tools other than the code that built it.

- ``unzip -t`` (Info-ZIP) and Python's zipfile both read the archive;
- manifest.json's SHA-1 values are recomputed from the archived bytes;
- ``openssl smime -verify`` checks the detached signature against a CA file;
- image pixel sizes are compared with Apple's table, written out here again
  rather than imported from app.wallet.images;
- pass.json keys and types are checked against Apple's documented set.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

from PIL import Image

# Apple's image sizes in points (Wallet Developer Guide, "Pass Design and Creation").
APPLE_POINTS = {
    "icon": (29, 29),
    "thumbnail": (90, 90),
    "background": (180, 220),
    "footer": (286, 15),
}
STRIP_POINTS = {"eventTicket": (375, 98), "coupon": (375, 144)}
STRIP_DEFAULT = (375, 123)
LOGO_MAX = (160, 50)

APPLE_TOP_LEVEL_TYPES = {
    "formatVersion": int, "passTypeIdentifier": str, "serialNumber": str, "teamIdentifier": str,
    "organizationName": str, "description": str, "webServiceURL": str,
    "authenticationToken": str, "backgroundColor": str, "foregroundColor": str,
    "labelColor": str, "logoText": str, "barcodes": list, "voided": bool,
    "expirationDate": str, "storeCard": dict, "generic": dict, "coupon": dict,
    "eventTicket": dict, "boardingPass": dict, "locations": list, "userInfo": dict,
    "sharingProhibited": bool, "relevantDate": str, "suppressStripShine": bool,
}


def verify_pkpass(data: bytes, ca_file: Path, work_dir: Path) -> dict[str, Any]:
    """Run every independent check; return the parsed pass.json."""
    work_dir.mkdir(parents=True, exist_ok=True)
    archive = work_dir / "card.pkpass"
    archive.write_bytes(data)

    listing = subprocess.run(["unzip", "-t", str(archive)], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "No errors detected" in listing.stdout

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        files = {name: zf.read(name) for name in zf.namelist()}
        infos = {info.filename: info for info in zf.infolist()}
    assert not any(n.endswith("/") or n.startswith(("__MACOSX", ".")) for n in files)
    for name in ("pass.json", "manifest.json", "signature", "icon.png"):
        assert name in files, f"{name} missing from the archive"
    for name, info in infos.items():
        if name.endswith(".png"):
            assert info.compress_type == zipfile.ZIP_STORED, f"{name} should be stored"

    manifest = json.loads(files["manifest.json"])
    assert set(manifest) == set(files) - {"manifest.json", "signature"}
    for name, digest in manifest.items():
        assert hashlib.sha1(files[name]).hexdigest() == digest, f"manifest hash of {name}"

    (work_dir / "manifest.json").write_bytes(files["manifest.json"])
    (work_dir / "signature").write_bytes(files["signature"])
    verify = subprocess.run(
        ["openssl", "smime", "-verify", "-binary", "-inform", "DER",
         "-in", str(work_dir / "signature"), "-content", str(work_dir / "manifest.json"),
         "-CAfile", str(ca_file), "-purpose", "any", "-out", "/dev/null"],
        capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr

    pass_json = json.loads(files["pass.json"].decode("utf-8"))
    check_pass_json(pass_json)
    check_images(files, pass_json)
    for name, content in files.items():
        if name.endswith(".strings"):
            assert content.startswith(b"\xff\xfe"), f"{name} is not UTF-16LE with BOM"
            content.decode("utf-16")
    return pass_json


def check_pass_json(data: dict[str, Any]) -> None:
    for key in ("formatVersion", "passTypeIdentifier", "serialNumber", "teamIdentifier",
                "organizationName", "description"):
        assert key in data, f"pass.json lacks {key}"
    assert data["formatVersion"] == 1
    for key, value in data.items():
        expected = APPLE_TOP_LEVEL_TYPES.get(key)
        assert expected is not None, f"unexpected top-level key {key}"
        assert isinstance(value, expected) and not (expected is int and isinstance(value, bool)), key
    styles = [k for k in ("storeCard", "generic", "coupon", "eventTicket", "boardingPass")
              if k in data]
    assert len(styles) == 1
    keys: list[str] = []
    for fields in data[styles[0]].values():
        for field in fields:
            assert isinstance(field["key"], str) and "value" in field
            assert isinstance(field["value"], (str, int, float))
            keys.append(field["key"])
            if "changeMessage" in field:
                assert isinstance(field["changeMessage"], str)
    assert len(keys) == len(set(keys)), "field keys must be unique"
    if "authenticationToken" in data:
        assert len(data["authenticationToken"]) >= 16
        assert data["webServiceURL"].startswith(("https://", "http://"))
    for barcode in data.get("barcodes", []):
        assert barcode["format"] in ("PKBarcodeFormatQR", "PKBarcodeFormatPDF417",
                                     "PKBarcodeFormatAztec", "PKBarcodeFormatCode128")
        assert barcode["messageEncoding"] in ("iso-8859-1", "utf-8")
        assert isinstance(barcode["message"], str)


def check_images(files: dict[str, bytes], pass_json: dict[str, Any]) -> None:
    style = next(k for k in ("storeCard", "generic", "coupon", "eventTicket", "boardingPass")
                 if k in pass_json)
    for name, content in files.items():
        match = re.fullmatch(r"(?:[\w-]+\.lproj/)?(\w+?)(?:@(\d)x)?\.png", name)
        if not match:
            continue
        role, scale = match.group(1), int(match.group(2) or 1)
        size = Image.open(io.BytesIO(content)).size
        if role == "logo":
            assert size[0] <= LOGO_MAX[0] * scale and size[1] <= LOGO_MAX[1] * scale, (name, size)
            assert size[1] == LOGO_MAX[1] * scale or size[0] == LOGO_MAX[0] * scale, (name, size)
            continue
        points = STRIP_POINTS.get(style, STRIP_DEFAULT) if role == "strip" else APPLE_POINTS[role]
        assert size == (points[0] * scale, points[1] * scale), (name, size)

"""The .pkpass archive: manifest, detached signature and ZIP, built fast.

A template's static files (images, localized strings) are identical for every
card, so their SHA-1 for the manifest, their CRC-32 and their ZIP entries are
computed once here. Per card only pass.json, manifest.json and the signature
are new. PNGs are already compressed: they are stored, and only text is
deflated (deflating images costs several times the signature itself).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

# 1980-01-01 00:00 in DOS format: a fixed timestamp keeps archives reproducible.
_DOS_TIME, _DOS_DATE = 0, (0 << 9) | (1 << 5) | 1
_DEFLATE_SUFFIXES = (".json", ".strings")
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")

Signer = Callable[[bytes], bytes]


@dataclass(frozen=True)
class _Entry:
    name: bytes
    method: int
    crc: int
    compressed_size: int
    size: int
    data: bytes  # already compressed if method == 8

    @classmethod
    def make(cls, name: str, content: bytes) -> _Entry:
        deflate = name.endswith(_DEFLATE_SUFFIXES) and len(content) > 64
        if deflate:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
            data = compressor.compress(content) + compressor.flush()
        else:
            data = content
        return cls(name.encode("utf-8"), 8 if deflate else 0, zlib.crc32(content),
                   len(data), len(content), data)

    def local_record(self) -> bytes:
        header = _LOCAL.pack(0x04034B50, 20, 0x0800, self.method, _DOS_TIME, _DOS_DATE,
                             self.crc, self.compressed_size, self.size, len(self.name), 0)
        return header + self.name + self.data

    def central_record(self, offset: int) -> bytes:
        return _CENTRAL.pack(0x02014B50, 20, 20, 0x0800, self.method, _DOS_TIME, _DOS_DATE,
                             self.crc, self.compressed_size, self.size, len(self.name),
                             0, 0, 0, 0, 0, offset) + self.name


class PassPackager:
    """Builds signed .pkpass archives for one template's set of static files."""

    def __init__(self, static_files: dict[str, bytes]) -> None:
        reserved = {"pass.json", "manifest.json", "signature"} & set(static_files)
        if reserved:
            raise ValueError(f"static files must not include {sorted(reserved)}")
        self._static_hashes = {name: hashlib.sha1(data).hexdigest()
                               for name, data in sorted(static_files.items())}
        self._static_entries = [_Entry.make(name, data) for name, data in sorted(static_files.items())]
        self._static_records = [entry.local_record() for entry in self._static_entries]

    def manifest(self, pass_json: bytes) -> bytes:
        hashes = {"pass.json": hashlib.sha1(pass_json).hexdigest(), **self._static_hashes}
        return json.dumps(hashes, sort_keys=True, indent=1).encode()

    def build(self, pass_json: bytes, sign: Signer) -> bytes:
        """Return the .pkpass bytes: the exact pass.json bytes given, hashed and signed."""
        return self.assemble(pass_json, sign(self.manifest(pass_json)))

    def assemble(self, pass_json: bytes, signature: bytes) -> bytes:
        """The archive from a pass.json and a signature made earlier over its manifest
        (see app/cards.py's signed versions): no signing here."""
        manifest = self.manifest(pass_json)
        dynamic = [_Entry.make("pass.json", pass_json), _Entry.make("manifest.json", manifest),
                   _Entry.make("signature", signature)]
        parts: list[bytes] = []
        central: list[bytes] = []
        offset = 0
        for entry, record in [(e, e.local_record()) for e in dynamic] + list(
                zip(self._static_entries, self._static_records)):
            central.append(entry.central_record(offset))
            parts.append(record)
            offset += len(record)
        directory = b"".join(central)
        count = len(central)
        end = _END.pack(0x06054B50, 0, 0, count, count, len(directory), offset, 0)
        return b"".join(parts) + directory + end

"""Derive Apple Wallet pass images (@1x/@2x/@3x PNG) from one source image per role.

Template authors drop one large image per role (``icon.png``, ``strip.jpg``...) into a
template folder; this module turns it into the exact pixel sizes Apple documents
(reference/apple.md §1.5) so every pass ships crisp, correctly sized artwork.
It runs when a template is loaded, never per pass, and results are cached by content
hash (:class:`ImageCache`), so a restart or a second worker does not redo the work.

Sizing rules:

* Fixed-size roles (everything except ``logo``) are scaled to *cover* the slot with
  the aspect ratio kept, then centre-cropped, which is what Wallet itself does
  ("images fill their allotted space ... then cropped").
* ``logo`` is fitted *inside* 160x50 pt keeping its aspect ratio and is never cropped,
  because cropping a wordmark cuts letters off.

"Too small" rule: a source is refused when producing the @1x image would need upscaling,
i.e. when the @3x image would need more than 3x upscaling. For fixed-size roles that
means the source must be at least the @1x size in *both* dimensions (cover-scaling
is driven by the smaller side ratio, so one short side is enough to blur everything);
for ``logo`` it must reach the 160x50 pt box in its limiting dimension (width >= 160
or height >= 50 px). Anything smaller would look visibly soft on every iPhone.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import tempfile
import threading
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

try:  # LittleCMS is optional in Pillow builds; without it we fall back to naive conversion.
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on how Pillow was built
    ImageCms = None  # type: ignore[assignment]  # a module or None; callers test for None

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("icon", "logo", "strip", "thumbnail", "background", "footer")
SCALES = (1, 2, 3)
# Same set as app.wallet.schema.STYLES; kept local so image derivation has no import-time
# dependency on the pass.json schema module.
STYLES: tuple[str, ...] = ("boardingPass", "coupon", "eventTicket", "generic", "storeCard")

# Bump whenever the output bytes for a given input would change (resampling, cropping,
# colour handling, PNG options): old cache entries then simply stop matching.
ALGORITHM_VERSION = 1

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000
# Decoders we trust with uploaded files. Deliberately excludes EPS/PS (Pillow shells out to
# Ghostscript for those) and exotic formats nobody exports pass artwork in.
# iPhone multi-picture JPEGs (MPO) are opened by the JPEG decoder.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 1x point sizes of the fixed-size roles; strip depends on the style.
_FIXED_POINTS: dict[str, tuple[int, int]] = {
    "icon": (29, 29),
    "thumbnail": (90, 90),
    "background": (180, 220),
    "footer": (286, 15),
}
_STRIP_POINTS: dict[str, tuple[int, int]] = {
    "eventTicket": (375, 98),
    "coupon": (375, 144),
}
_STRIP_DEFAULT_POINTS = (375, 123)  # storeCard, generic and "all other cases"
_LOGO_POINTS = (160, 50)


class ImageError(ValueError):
    """An image cannot be used for a pass; the message names the file and the problem."""


def _check_role_style(role: str, style: str, name: str | None = None) -> None:
    prefix = f"{name}: " if name else ""
    if role not in ROLES:
        raise ImageError(
            f"{prefix}unknown image role {role!r} (expected one of {', '.join(ROLES)})"
        )
    if style not in STYLES:
        raise ImageError(
            f"{prefix}unknown pass style {style!r} (expected one of {', '.join(STYLES)})"
        )


def _round(value: float) -> int:
    # Half-up rather than Python's banker's rounding, so sizes are predictable; never 0 px.
    return max(1, math.floor(value + 0.5))


def _points(role: str, style: str) -> tuple[int, int]:
    if role == "strip":
        return _STRIP_POINTS.get(style, _STRIP_DEFAULT_POINTS)
    if role == "logo":
        return _LOGO_POINTS
    return _FIXED_POINTS[role]


def target_size(
    role: str, style: str, scale: int = 1, source_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Exact pixel size of ``role`` for ``style`` at ``scale``.

    For ``logo`` the result depends on ``source_size``: the source is fitted inside
    160x50 pt keeping its aspect ratio, so the height is exactly 50*scale unless the
    source is wider than 16:5, in which case the width is exactly 160*scale. Without
    ``source_size`` the logo's bounding box (160*scale, 50*scale) is returned.
    """
    _check_role_style(role, style)
    if scale not in SCALES:
        raise ImageError(f"unsupported scale {scale!r} (expected one of {SCALES})")
    box_w, box_h = (p * scale for p in _points(role, style))
    if role != "logo" or source_size is None:
        return box_w, box_h
    src_w, src_h = source_size
    if src_w <= 0 or src_h <= 0:
        raise ImageError(f"invalid source size {source_size!r}")
    if src_w * _LOGO_POINTS[1] > src_h * _LOGO_POINTS[0]:  # wider than 16:5, integer-exact
        return box_w, min(box_h, _round(src_h * box_w / src_w))
    return min(box_w, _round(src_w * box_h / src_h)), box_h


def _file_names(role: str) -> list[str]:
    return [f"{role}.png" if s == 1 else f"{role}@{s}x.png" for s in SCALES]


def _open(source: bytes, name: str) -> Image.Image:
    """Decode ``source`` fully, turning every way it can be bad into one ImageError."""
    if len(source) == 0:
        raise ImageError(f"{name}: file is empty (0 bytes)")
    if len(source) > MAX_FILE_BYTES:
        raise ImageError(
            f"{name}: file is {len(source) / 1048576:.1f} MB; the limit is "
            f"{MAX_FILE_BYTES // 1048576} MB"
        )
    try:
        # Pillow may raise DecompressionBombWarning as an exception (when warnings are
        # errors) or DecompressionBombError from the header alone; both land below.
        im = Image.open(io.BytesIO(source), formats=ALLOWED_FORMATS)
        w, h = im.size
        # Checked on the header, before decoding, so a tiny file claiming a huge canvas
        # never allocates it.
        if w * h > MAX_PIXELS:
            raise ImageError(
                f"{name}: image is {w}x{h} ({w * h / 1e6:.0f} megapixels); the limit is "
                f"{MAX_PIXELS / 1e6:.0f} megapixels"
            )
        im.load()
        # Phone photos store rotation in EXIF; we strip metadata, so bake it in first.
        return ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not a readable image (supported formats: {', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{name}: image dimensions are too large (possible decompression bomb): {exc}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        # Truncated data, bad CRCs, broken chunks... Pillow reports these in many ways.
        raise ImageError(f"{name}: image is corrupt or truncated ({exc})") from None


def _to_srgb(im: Image.Image) -> Image.Image:
    """Return an RGB or RGBA image in sRGB, without metadata.

    Wallet ignores nothing we could rely on after stripping metadata, so colour-managed
    sources (CMYK print logos, Display P3 screenshots) are converted through their ICC
    profile; palette and grey images keep their transparency.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: a plain convert("L") clips everything above 255 to white.
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        mode = "L"
    elif mode == "F":
        im = im.convert("L")
        mode = "L"

    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("LA", "La", "RGBa"):
        im = im.convert("RGBA")
    elif mode in ("1", "L"):
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode not in ("RGB", "RGBA", "CMYK"):  # YCbCr, LAB, HSV, ...
        im = im.convert("RGB")

    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    color = im.convert("RGB") if im.mode == "RGBA" else im
    icc = im.info.get("icc_profile")
    converted: Image.Image | None = None
    if icc and ImageCms is not None:
        try:
            src_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(
                color, src_profile, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            converted = None  # unusable profile: fall back to Pillow's plain conversion
    if converted is None:
        converted = color.convert("RGB")
    if alpha is not None and alpha.getextrema() != (255, 255):
        converted.putalpha(alpha)
    # A fully opaque alpha channel only costs bytes, so it is dropped (converted is RGB).
    out = converted.copy()
    out.info = {}
    return out


def _min_source_size(role: str, style: str) -> str:
    w, h = target_size(role, style, 1)
    w3, h3 = target_size(role, style, 3)
    if role == "logo":
        return f"at least {w} px wide or {h} px high ({w3}x{h3} box recommended)"
    return f"at least {w}x{h} px ({w3}x{h3} recommended)"


def _png(im: Image.Image) -> bytes:
    im.info = {}  # resize() copies info; an empty dict keeps ICC/text/EXIF out of the file
    candidates = []
    # optimize=True (zlib level 9) is usually smallest, but on smooth gradients level 6 can
    # win by a few bytes; both are lossless and deterministic, so keep the smaller.
    for options in ({"optimize": True}, {"compress_level": 6}):
        buf = io.BytesIO()
        im.save(buf, format="PNG", **options)
        candidates.append(buf.getvalue())
    return min(candidates, key=len)


def derive_role_images(
    source: bytes, role: str, style: str, *, name: str = "<image>"
) -> dict[str, bytes]:
    """Return ``{"<role>.png": ..., "<role>@2x.png": ..., "<role>@3x.png": ...}``.

    Raises :class:`ImageError` (naming ``name``) for an unknown role or style, a file that
    is not an image or is corrupt/truncated, more than 20 MB or 40 megapixels, or a source
    too small for the role (see the module docstring for the rule).
    """
    _check_role_style(role, style, name)
    im = _to_srgb(_open(source, name))
    src_w, src_h = im.size

    w1, h1 = target_size(role, style, 1, im.size)
    if role == "logo":
        too_small = w1 > src_w or h1 > src_h
    else:
        too_small = src_w < w1 or src_h < h1
    if too_small:
        raise ImageError(
            f"{name}: image is {src_w}x{src_h} px, too small for a {role} on a {style} pass; "
            f"use {_min_source_size(role, style)}"
        )

    out: dict[str, bytes] = {}
    for scale, file_name in zip(SCALES, _file_names(role), strict=True):
        size = target_size(role, style, scale, im.size)
        if role == "logo":
            resized = im.resize(size, Image.Resampling.LANCZOS)
        else:
            # Crop box is computed in source coordinates, so each scale is resampled once,
            # straight from the source (never from a smaller derivative).
            resized = ImageOps.fit(im, size, method=Image.Resampling.LANCZOS)
        out[file_name] = _png(resized)
    return out


class ImageCache:
    """Content-addressed cache of :func:`derive_role_images` results.

    Lookup order: in-memory dict, then ``cache_dir/<key>/<file>``, then compute. The key
    covers the source bytes' SHA-256, role, style and :data:`ALGORITHM_VERSION`, so an
    edited source or a new algorithm never serves stale images. Files are written to a
    temporary name and ``os.replace``-d into place, so processes sharing ``cache_dir``
    only ever see complete files; two processes missing at once both compute the same
    bytes and the last rename wins harmlessly. The memory cache is unbounded: it holds a
    few images per template.
    """

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0  # subset of hits served from cache_dir
        self._memory: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(source: bytes, role: str, style: str) -> str:
        digest = hashlib.sha256(source).hexdigest()
        return f"{digest}-{role}-{style}-v{ALGORITHM_VERSION}"

    def role_images(self, source_path: Path, role: str, style: str) -> dict[str, bytes]:
        source_path = Path(source_path)
        name = str(source_path)
        _check_role_style(role, style, name)
        source = _read_source(source_path)
        key = self.key(source, role, style)

        with self._lock:
            cached = self._memory.get(key)
            if cached is not None:
                self.hits += 1
                return dict(cached)

        files = self._read_disk(key, role)
        if files is not None:
            with self._lock:
                self.hits += 1
                self.disk_hits += 1
                self._memory[key] = files
            return dict(files)

        with self._lock:
            self.misses += 1
        # Module-level lookup (not a bound reference) so tests can prove it is not called.
        files = derive_role_images(source, role, style, name=name)
        with self._lock:
            self._memory[key] = files
        self._write_disk(key, files)
        return dict(files)

    def _read_disk(self, key: str, role: str) -> dict[str, bytes] | None:
        if self.cache_dir is None:
            return None
        entry = self.cache_dir / key
        files: dict[str, bytes] = {}
        try:
            for file_name in _file_names(role):
                data = (entry / file_name).read_bytes()
                if not data.startswith(PNG_SIGNATURE):
                    return None  # damaged by something outside our atomic writes: recompute
                files[file_name] = data
        except OSError:
            return None  # missing or incomplete entry (another process may be writing it)
        return files

    def _write_disk(self, key: str, files: dict[str, bytes]) -> None:
        if self.cache_dir is None:
            return
        entry = self.cache_dir / key
        try:
            entry.mkdir(parents=True, exist_ok=True)
            for file_name, data in files.items():
                _atomic_write(entry / file_name, data)
        except OSError as exc:
            # The images are already computed; a read-only or full disk must not stop a
            # template from loading, it only costs a recompute next time.
            log.warning("could not write image cache entry %s: %s", entry, exc)


def _read_source(path: Path) -> bytes:
    try:
        # stat first so a huge file is refused without reading it into memory
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(
                f"{path}: file is {size / 1048576:.1f} MB; the limit is "
                f"{MAX_FILE_BYTES // 1048576} MB"
            )
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # a crash must not leave a renamed-but-empty file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

"""Pass image derivation (app/passes/images.py): sizes, formats, errors and caching."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageCms, ImageDraw

from app.wallet import images
from app.wallet.images import (
    ROLES,
    SCALES,
    ImageCache,
    ImageError,
    derive_role_images,
    target_size,
)

PNG_SIG = b"\x89PNG\r\n\x1a\n"
STYLES = ("boardingPass", "coupon", "eventTicket", "generic", "storeCard")

# Apple's 1x point sizes (reference/apple.md §1.5), written out independently of the module.
FIXED_POINTS = {
    "icon": (29, 29),
    "thumbnail": (90, 90),
    "background": (180, 220),
    "footer": (286, 15),
}
STRIP_POINTS = {
    "eventTicket": (375, 98),
    "coupon": (375, 144),
    "storeCard": (375, 123),
    "generic": (375, 123),
    "boardingPass": (375, 123),
}


def _artwork(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A deterministic picture with gradients and edges (compresses like real artwork)."""
    w, h = size
    im = Image.linear_gradient("L").resize((w, h))
    rgb = Image.merge("RGB", (im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), im.rotate(90)))
    draw = ImageDraw.Draw(rgb)
    draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(240, 180, 40))
    draw.rectangle((w // 10, h // 10, w // 5, h // 2), fill=(20, 60, 200))
    return rgb.convert(mode) if mode != "RGB" else rgb


def _encode(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    assert data[:8] == PNG_SIG, "output is not a PNG file"
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    im.load()
    return im


def _names(role: str) -> list[str]:
    return [f"{role}.png", f"{role}@2x.png", f"{role}@3x.png"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return PNG_SIG + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def source_png() -> bytes:
    return _encode(_artwork((1200, 900)))


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("role", [r for r in ROLES if r != "logo"])
def test_fixed_roles_exact_pixel_sizes(source_png: bytes, role: str, style: str) -> None:
    points = STRIP_POINTS[style] if role == "strip" else FIXED_POINTS[role]
    out = derive_role_images(source_png, role, style, name="art.png")
    assert list(out) == _names(role)
    for scale, file_name in zip(SCALES, _names(role)):
        expected = (points[0] * scale, points[1] * scale)
        assert target_size(role, style, scale) == expected
        im = _open(out[file_name])
        assert im.size == expected, (role, style, scale)
        assert im.mode == "RGB"
        assert not im.info, "metadata must be stripped"


def test_cover_then_centre_crop() -> None:
    # Left third red, middle green, right third blue: a square crop keeps only the green.
    src = Image.new("RGB", (900, 300), (255, 0, 0))
    src.paste((0, 255, 0), (300, 0, 600, 300))
    src.paste((0, 0, 255), (600, 0, 900, 300))
    out = derive_role_images(_encode(src), "icon", "generic")
    for data in out.values():
        im = _open(data)
        for xy in [(0, 0), (im.width - 1, im.height - 1), (im.width // 2, im.height // 2)]:
            r, g, b = im.getpixel(xy)
            assert g > 200 and r < 40 and b < 40, (xy, (r, g, b))


@pytest.mark.parametrize(
    ("source", "expected_1x", "expected_3x"),
    [
        ((1600, 500), (160, 50), (480, 150)),  # exactly 16:5 fills the box
        ((2000, 500), (160, 40), (480, 120)),  # wider than 16:5: width pinned
        ((600, 600), (50, 50), (150, 150)),  # square: height pinned
        ((1000, 250), (160, 40), (480, 120)),
        ((900, 300), (150, 50), (450, 150)),
        ((100, 400), (13, 50), (38, 150)),  # tall, half-up rounding (12.5 -> 13)
    ],
)
def test_logo_fits_inside_box_keeping_aspect(
    source: tuple[int, int], expected_1x: tuple[int, int], expected_3x: tuple[int, int]
) -> None:
    assert target_size("logo", "storeCard", 1, source) == expected_1x
    assert target_size("logo", "storeCard", 3, source) == expected_3x
    out = derive_role_images(_encode(_artwork(source)), "logo", "storeCard")
    assert list(out) == _names("logo")
    for scale, file_name in zip(SCALES, _names("logo")):
        w, h = _open(out[file_name]).size
        assert (w, h) == target_size("logo", "storeCard", scale, source)
        assert w <= 160 * scale and h <= 50 * scale
        wider_than_16_5 = source[0] * 5 > source[1] * 16
        assert (w == 160 * scale) if wider_than_16_5 else (h == 50 * scale)
        assert abs(w / h - source[0] / source[1]) <= source[0] / source[1] * 0.05 + 1 / h


def test_logo_without_source_size_is_the_bounding_box() -> None:
    sizes = [target_size("logo", "generic", s) for s in SCALES]
    assert sizes == [(160, 50), (320, 100), (480, 150)]


def test_target_size_rejects_unknown_values() -> None:
    with pytest.raises(ImageError, match="role"):
        target_size("banner", "generic")
    with pytest.raises(ImageError, match="style"):
        target_size("icon", "poster")
    with pytest.raises(ImageError, match="scale"):
        target_size("icon", "generic", 4)


# --- colour modes and PNG output ------------------------------------------------------------


def test_rgba_source_keeps_alpha() -> None:
    src = Image.new("RGBA", (600, 300), (0, 0, 0, 0))
    ImageDraw.Draw(src).ellipse((200, 50, 400, 250), fill=(255, 255, 255, 255))
    out = derive_role_images(_encode(src), "logo", "storeCard", name="logo.png")
    for data in out.values():
        im = _open(data)
        assert im.mode == "RGBA"
        assert im.getpixel((0, 0))[3] == 0  # corner stays transparent
        assert im.getpixel((im.width // 2, im.height // 2)) == (255, 255, 255, 255)


def test_opaque_rgba_source_is_saved_as_rgb() -> None:
    out = derive_role_images(_encode(_artwork((300, 300), "RGBA")), "icon", "generic")
    assert all(_open(d).mode == "RGB" for d in out.values())


def test_palette_sources_with_and_without_transparency() -> None:
    pal = _artwork((400, 400)).quantize(16)
    out = derive_role_images(_encode(pal), "thumbnail", "generic", name="p.png")
    assert {_open(d).mode for d in out.values()} == {"RGB"}

    gif = Image.new("P", (400, 400), 0)
    gif.putpalette([0, 0, 0, 255, 128, 0] + [0] * 762)
    ImageDraw.Draw(gif).rectangle((100, 100, 300, 300), fill=1)
    out = derive_role_images(_encode(gif, "GIF", transparency=0), "icon", "generic", name="a.gif")
    for data in out.values():
        im = _open(data)
        assert im.mode == "RGBA"
        assert im.getpixel((0, 0))[3] == 0
        assert im.getpixel((im.width // 2, im.height // 2)) == (255, 128, 0, 255)


def test_cmyk_jpeg_source() -> None:
    src = Image.new("CMYK", (400, 400), (255, 0, 0, 0))  # pure cyan ink
    out = derive_role_images(_encode(src, "JPEG", quality=95), "icon", "coupon", name="c.jpg")
    for data in out.values():
        im = _open(data)
        assert im.mode == "RGB"
        r, g, b = im.getpixel((im.width // 2, im.height // 2))
        assert r < 30 and g > 225 and b > 225


def test_sixteen_bit_grey_is_not_clipped_to_white() -> None:
    src = Image.new("I;16", (100, 100), 32768)
    out = derive_role_images(_encode(src), "icon", "generic")
    r, g, b = _open(out["icon.png"]).getpixel((10, 10))
    assert 120 <= r <= 136 and r == g == b


def test_metadata_is_stripped() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret author note")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010E] = "description"
    src = _encode(_artwork((300, 300)), pnginfo=info, icc_profile=icc, exif=exif.tobytes())
    assert b"iCCP" in src and b"tEXt" in src
    for data in derive_role_images(src, "icon", "generic").values():
        for chunk in (b"iCCP", b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"pHYs"):
            assert chunk not in data
        assert not _open(data).info


def test_exif_orientation_is_applied() -> None:
    # Stored landscape (red left, blue right) but tagged "rotate 90 CW" -> displayed portrait.
    src = Image.new("RGB", (600, 300), (255, 0, 0))
    src.paste((0, 0, 255), (300, 0, 600, 300))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = derive_role_images(_encode(src, "JPEG", exif=exif.tobytes()), "icon", "generic")
    im = _open(out["icon@3x.png"])
    top, bottom = im.getpixel((43, 5)), im.getpixel((43, 81))
    assert top[0] > 200 and top[2] < 60  # red now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_outputs_are_optimized_png() -> None:
    out = derive_role_images(_encode(_artwork((1500, 600))), "strip", "storeCard")
    for data in out.values():
        naive = _encode(_open(data))  # default zlib level, no optimize
        assert len(data) <= len(naive)


def test_output_is_deterministic(source_png: bytes) -> None:
    assert derive_role_images(source_png, "strip", "generic") == derive_role_images(
        source_png, "strip", "generic"
    )


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"hello, this is a text file\n" * 10, "not a readable image"),
        (b"", "empty"),
        (_png_header_only(8000, 6000), "megapixels"),  # 48 MP: over our 40 MP limit
        (_png_header_only(10000, 10000), "too large|megapixels"),  # Pillow bomb warning
        (_png_header_only(20000, 20000), "too large|megapixels"),  # Pillow bomb error
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a readable image"),
    ],
    ids=["text", "zero-bytes", "48MP", "100MP", "400MP", "eps"],
)
def test_bad_input_raises_image_error_naming_file(data: bytes, problem: str) -> None:
    with pytest.raises(ImageError, match=problem) as exc:
        derive_role_images(data, "icon", "generic", name="brand/icon.png")
    assert "brand/icon.png" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_bomb_header_refused_even_when_pillow_warnings_are_ignored() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageError, match="bomb.png"):
            derive_role_images(_png_header_only(10000, 10000), "icon", "generic", name="bomb.png")


def test_truncated_png(source_png: bytes) -> None:
    with pytest.raises(ImageError, match=r"cut\.png.*(corrupt|truncated)"):
        derive_role_images(source_png[: len(source_png) // 2], "icon", "generic", name="cut.png")


def test_file_over_20_mb() -> None:
    data = PNG_SIG + b"\0" * (20 * 1024 * 1024)
    with pytest.raises(ImageError, match=r"big\.png.*20 MB"):
        derive_role_images(data, "icon", "generic", name="big.png")


def test_unknown_role_and_style(source_png: bytes) -> None:
    with pytest.raises(ImageError, match=r"x\.png.*unknown image role 'banner'"):
        derive_role_images(source_png, "banner", "generic", name="x.png")
    with pytest.raises(ImageError, match=r"x\.png.*unknown pass style"):
        derive_role_images(source_png, "icon", "poster", name="x.png")


@pytest.mark.parametrize(
    ("role", "style", "size", "ok"),
    [
        ("icon", "generic", (29, 29), True),
        ("icon", "generic", (28, 28), False),
        ("icon", "generic", (500, 28), False),  # one short side already needs upscaling
        ("strip", "storeCard", (375, 123), True),
        ("strip", "storeCard", (1125, 120), False),
        ("strip", "eventTicket", (1125, 120), True),  # event strips are only 98 pt tall
        ("footer", "boardingPass", (286, 15), True),
        ("background", "eventTicket", (179, 400), False),
        ("logo", "storeCard", (160, 10), True),  # reaches the box width
        ("logo", "storeCard", (40, 50), True),  # reaches the box height
        ("logo", "storeCard", (150, 40), False),
    ],
)
def test_too_small_rule(role: str, style: str, size: tuple[int, int], ok: bool) -> None:
    data = _encode(_artwork(size))
    if ok:
        out = derive_role_images(data, role, style)
        assert len(out) == 3
    else:
        with pytest.raises(ImageError, match=r"small\.png.*too small") as exc:
            derive_role_images(data, role, style, name="small.png")
        assert f"{size[0]}x{size[1]}" in str(exc.value)


# --- cache ----------------------------------------------------------------------------------


@pytest.fixture()
def icon_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "icon.bmp"
    path.parent.mkdir()
    # BMP: no checksums, so flipping one byte still gives a valid (different) image.
    path.write_bytes(_encode(_artwork((200, 200)), "BMP"))
    return path


def test_memory_cache_hit(icon_file: Path) -> None:
    cache = ImageCache()
    first = cache.role_images(icon_file, "icon", "storeCard")
    assert (cache.hits, cache.misses) == (0, 1)
    second = cache.role_images(icon_file, "icon", "storeCard")
    assert (cache.hits, cache.misses) == (1, 1)
    assert first == second
    assert first == derive_role_images(icon_file.read_bytes(), "icon", "storeCard")
    second["icon.png"] = b"mutated by caller"
    assert cache.role_images(icon_file, "icon", "storeCard") == first


def test_disk_cache_shared_by_new_instance(
    icon_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    first = ImageCache(cache_dir).role_images(icon_file, "icon", "generic")
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].iterdir()) == sorted(_names("icon"))

    def boom(*_a: object, **_k: object) -> dict[str, bytes]:
        raise AssertionError("recomputed despite a disk cache entry")

    monkeypatch.setattr(images, "derive_role_images", boom)
    fresh = ImageCache(cache_dir)
    assert fresh.role_images(icon_file, "icon", "generic") == first
    assert (fresh.hits, fresh.disk_hits, fresh.misses) == (1, 1, 0)
    assert fresh.role_images(icon_file, "icon", "generic") == first  # now from memory
    assert (fresh.hits, fresh.disk_hits, fresh.misses) == (2, 1, 0)


def test_one_changed_byte_is_a_miss(icon_file: Path, tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    before = cache.role_images(icon_file, "icon", "generic")
    data = bytearray(icon_file.read_bytes())
    data[-10] ^= 0xFF  # one pixel byte
    icon_file.write_bytes(bytes(data))
    after = cache.role_images(icon_file, "icon", "generic")
    assert (cache.hits, cache.misses) == (0, 2)
    assert after != before
    # Other role or style for the same bytes is a separate entry too.
    cache.role_images(icon_file, "icon", "eventTicket")
    assert cache.misses == 3


def test_algorithm_version_is_part_of_the_key(
    icon_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ImageCache(tmp_path / "cache").role_images(icon_file, "icon", "generic")
    monkeypatch.setattr(images, "ALGORITHM_VERSION", images.ALGORITHM_VERSION + 1)
    cache = ImageCache(tmp_path / "cache")
    cache.role_images(icon_file, "icon", "generic")
    assert cache.misses == 1


def test_damaged_disk_entry_is_recomputed(icon_file: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    good = ImageCache(cache_dir).role_images(icon_file, "icon", "generic")
    (entry,) = cache_dir.iterdir()
    (entry / "icon@2x.png").write_bytes(b"garbage")
    (entry / "icon@3x.png").unlink()
    cache = ImageCache(cache_dir)
    assert cache.role_images(icon_file, "icon", "generic") == good
    assert cache.misses == 1
    assert (entry / "icon@2x.png").read_bytes() == good["icon@2x.png"]  # repaired


def test_concurrent_writers_share_cache_dir(icon_file: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    results: list[dict[str, bytes]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker() -> None:
        cache = ImageCache(cache_dir)  # separate instances, like separate processes
        barrier.wait()
        try:
            results.append(cache.role_images(icon_file, "icon", "storeCard"))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 6 and all(r == results[0] for r in results)
    (entry,) = cache_dir.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == sorted(_names("icon"))  # no temp files left
    assert ImageCache(cache_dir).role_images(icon_file, "icon", "storeCard") == results[0]


def test_cache_errors_name_the_path(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(ImageError, match="missing.png"):
        cache.role_images(tmp_path / "missing.png", "icon", "generic")
    huge = tmp_path / "huge.png"
    with huge.open("wb") as fh:
        fh.truncate(21 * 1024 * 1024)  # sparse: refused by size before being read
    with pytest.raises(ImageError, match=r"huge\.png.*20 MB"):
        cache.role_images(huge, "icon", "generic")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=r"notes\.png.*not a readable image"):
        cache.role_images(text, "icon", "generic")
    assert cache.misses == 1  # only notes.png got as far as decoding; nothing was cached
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# --- shipped template artwork ---------------------------------------------------------------

TEMPLATES = Path(__file__).resolve().parents[2] / "pass_templates"


@pytest.mark.parametrize(
    ("template", "style", "roles"),
    [
        ("loyalty", "storeCard", ("icon", "logo", "strip")),
        ("membership", "generic", ("icon", "logo", "thumbnail")),
    ],
)
def test_shipped_artwork_derives_cleanly(template: str, style: str, roles: tuple[str, ...]) -> None:
    cache = ImageCache()
    for role in roles:
        path = TEMPLATES / template / "images" / f"{role}.png"
        assert path.stat().st_size < 200 * 1024
        with Image.open(path) as src:
            w3, h3 = target_size(role, style, 3, src.size)
            assert src.width >= w3 and src.height >= h3, "source must not need upscaling at @3x"
        out = cache.role_images(path, role, style)
        assert _open(out[f"{role}@3x.png"]).size == (w3, h3)

"""A PNG picture of a card's front, for marketers checking a program and its data.

Honest, not pixel-perfect: it draws what the rendered pass.json says (colours,
logo text, header/primary/secondary/auxiliary fields with their localized
labels and values, the barcode) over the template's own derived images (logo,
strip or thumbnail), in Wallet's general layout. It is made from the same
``PassBuilder.pass_dict`` the signed pass uses, so a preview never shows data
the card would not.

Pure: takes a template and plain card data, touches no database.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import qrcode
from PIL import Image, ImageDraw, ImageFont

from app.wallet.builder import CardInput, PassBuilder
from app.wallet.template import PassTemplate

WIDTH = 640  # Wallet's 320 points at @2x
PADDING = 24
_RGB = re.compile(r"^\s*rgb\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)\s*$")
_FIELD_ROWS = ("secondaryFields", "auxiliaryFields")


def _colour(value: Any, default: tuple[int, int, int]) -> tuple[int, int, int]:
    match = _RGB.match(value) if isinstance(value, str) else None
    if not match:
        return default
    r, g, b = (min(int(x), 255) for x in match.groups())
    return r, g, b


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _localizer(template: PassTemplate, locale: str | None) -> Callable[[Any], str]:
    """Labels and values that are .strings keys get the customer's language, as on a phone."""
    tables = template.strings
    chosen: dict[str, str] = {}
    if locale:
        tag = locale.replace("_", "-")
        chosen = tables.get(tag) or tables.get(tag.split("-")[0]) or {}
    fallback = tables.get("en") or (next(iter(tables.values())) if tables else {})

    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return chosen.get(value) or fallback.get(value) or value
        return str(value)

    return text


def _image(template: PassTemplate, role: str) -> Image.Image | None:
    for name in (f"{role}@2x.png", f"{role}.png"):
        data = template.static_files.get(name)
        if data:
            return Image.open(io.BytesIO(data)).convert("RGBA")
    return None


def _fit(image: Image.Image, max_w: int, max_h: int) -> Image.Image:
    scale = min(max_w / image.width, max_h / image.height, 1.0 if image.width <= max_w else 10.0)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _draw_field(draw: ImageDraw.ImageDraw, x: int, y: int, label: str, value: str,
                colours: dict[str, tuple[int, int, int]], value_size: int,
                anchor_right: bool = False, max_width: int = WIDTH) -> None:
    label_font, value_font = _font(18), _font(value_size)
    label, value = label.upper()[:40], value[:60]
    while value and draw.textlength(value, font=value_font) > max_width:
        value = value[:-2] + "…"
    if anchor_right:
        draw.text((x, y), label, font=label_font, fill=colours["label"], anchor="ra")
        draw.text((x, y + 22), value, font=value_font, fill=colours["fg"], anchor="ra")
    else:
        draw.text((x, y), label, font=label_font, fill=colours["label"])
        draw.text((x, y + 22), value, font=value_font, fill=colours["fg"])


def render_front(template: PassTemplate, card: CardInput) -> bytes:
    """The card front as PNG bytes."""
    builder = PassBuilder(template, _no_signer)
    data = builder.pass_dict(card)
    style = template.style
    body: dict[str, Any] = data.get(style) or {}
    text = _localizer(template, card.locale)
    colours = {
        "bg": _colour(data.get("backgroundColor"), (60, 60, 60)),
        "fg": _colour(data.get("foregroundColor"), (255, 255, 255)),
        "label": _colour(data.get("labelColor"), (220, 220, 220)),
    }
    strip = _image(template, "strip") if style in ("storeCard", "coupon", "eventTicket") else None
    thumbnail = _image(template, "thumbnail") if style in ("generic", "eventTicket") else None
    height = 900 if strip is not None else 820
    canvas = Image.new("RGBA", (WIDTH, height), colours["bg"] + (255,))
    draw = ImageDraw.Draw(canvas)

    # Top row: logo, logo text, header fields on the right.
    x = PADDING
    logo = _image(template, "logo")
    if logo is not None:
        logo = _fit(logo, 300, 90)
        canvas.alpha_composite(logo, (x, PADDING))
        x += logo.width + 12
    logo_text = text(data.get("logoText"))
    if logo_text:
        draw.text((x, PADDING + 30), logo_text[:30], font=_font(28), fill=colours["fg"])
    right = WIDTH - PADDING
    for field in reversed(body.get("headerFields", [])[:2]):
        value = text(field.get("value"))
        _draw_field(draw, right, PADDING + 10, text(field.get("label")), value, colours, 28,
                    anchor_right=True, max_width=200)
        right -= 210
    y = PADDING + 110

    # Primary fields: over the strip image when there is one.
    primary = body.get("primaryFields", [])[:1]
    if strip is not None:
        strip = strip.resize((WIDTH, int(strip.height * WIDTH / strip.width)),
                             Image.Resampling.LANCZOS)
        canvas.alpha_composite(strip, (0, y))
        for field in primary:
            _draw_field(draw, PADDING, y + 40, text(field.get("label")),
                        text(field.get("value")), colours, 64, max_width=WIDTH - 2 * PADDING)
        y += strip.height + 24
    else:
        if thumbnail is not None:
            thumbnail = _fit(thumbnail, 180, 220)
            canvas.alpha_composite(thumbnail, (WIDTH - PADDING - thumbnail.width, y))
        for field in primary:
            _draw_field(draw, PADDING, y, text(field.get("label")), text(field.get("value")),
                        colours, 48, max_width=WIDTH - 2 * PADDING - 200)
        y += 130 if thumbnail is None else 240

    # Secondary and auxiliary rows, up to four fields each.
    for row in _FIELD_ROWS:
        fields = body.get(row, [])[:4]
        if not fields:
            continue
        column = (WIDTH - 2 * PADDING) // len(fields)
        for index, field in enumerate(fields):
            _draw_field(draw, PADDING + index * column, y, text(field.get("label")),
                        text(field.get("value")), colours, 30, max_width=column - 10)
        y += 90

    # Barcode on a white panel, with its alternative text.
    barcodes = data.get("barcodes") or []
    if barcodes:
        code = barcodes[0]
        qr = qrcode.QRCode(border=1, box_size=6)
        qr.add_data(str(code.get("message", "")))
        qr.make(fit=True)
        image = qr.make_image(fill_color="black", back_color="white").get_image().convert("RGBA")
        image = _fit(image, 220, 220)
        panel_h = image.height + (50 if code.get("altText") else 24)
        top = max(y, height - panel_h - PADDING)
        left = (WIDTH - image.width) // 2 - 12
        draw.rounded_rectangle((left, top, left + image.width + 24, top + panel_h), 12,
                               fill=(255, 255, 255, 255))
        canvas.alpha_composite(image, (left + 12, top + 12))
        if code.get("altText"):
            draw.text((WIDTH // 2, top + image.height + 16), str(code["altText"])[:40],
                      font=_font(20), fill=(0, 0, 0), anchor="ma")
    if data.get("voided"):
        draw.text((WIDTH // 2, height // 2), "VOID", font=_font(120), fill=(255, 60, 60, 200),
                  anchor="mm")

    out = io.BytesIO()
    canvas.convert("RGB").save(out, format="PNG", optimize=True)
    return out.getvalue()


def _no_signer(_data: bytes) -> bytes:  # pragma: no cover - previews are never signed
    raise RuntimeError("previews are not signed")

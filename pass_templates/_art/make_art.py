"""Draw the source artwork of the shipped pass templates (Pillow only, deterministic).

    python pass_templates/_art/make_art.py

writes pass_templates/{loyalty,membership}/images/*.png. Everything is drawn from
shapes; the only text uses Pillow's bundled default font (ImageFont.load_default,
Pillow >= 10.1), so no system fonts are needed. Shapes are drawn at SS x the final
size and downsampled with LANCZOS for clean anti-aliased edges. The outputs are
large "source" images; app/passes/images.py derives the @1x/@2x/@3x files from them.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
SS = 4  # supersampling factor

RGB = tuple[int, int, int]

# Maison Aurore (loyalty, storeCard)
PLUM: RGB = (58, 28, 64)
PLUM_DEEP: RGB = (36, 15, 42)
COPPER: RGB = (196, 118, 72)
GOLD: RGB = (244, 196, 140)
CREAM: RGB = (255, 248, 240)

# Nordhaven Club (membership, generic)
NAVY: RGB = (18, 52, 86)
NAVY_DEEP: RGB = (10, 32, 56)
NAVY_LIGHT: RGB = (34, 82, 124)
ICE: RGB = (150, 200, 230)
WHITE: RGB = (255, 255, 255)


def font(px: float) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(1, round(px)))  # type: ignore[return-value]


def lerp(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def down(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    return im.resize(size, Image.Resampling.LANCZOS)


def tracked_text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    fnt: ImageFont.FreeTypeFont,
    fill: tuple[int, ...],
    tracking: float = 0.0,
    stroke: int = 0,
) -> float:
    """Draw text with extra letter spacing at ``xy`` (top-left of the line); return its width."""
    x, y = xy
    for i, ch in enumerate(text):
        draw.text((x, y), ch, font=fnt, fill=fill, stroke_width=stroke, stroke_fill=fill)
        x += fnt.getlength(ch) + (tracking if i < len(text) - 1 else 0)
    return x - xy[0]


def tracked_width(text: str, fnt: ImageFont.FreeTypeFont, tracking: float) -> float:
    return sum(fnt.getlength(c) for c in text) + tracking * (len(text) - 1)


def ink_box(text: str, fnt: ImageFont.FreeTypeFont) -> tuple[int, int, int, int]:
    return fnt.getbbox(text)


# --- Maison Aurore ---------------------------------------------------------------------------


def draw_sunrise(
    draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, color: tuple[int, ...], *,
    rays: int = 7, horizon: bool = True,
) -> None:
    """A half sun resting on a horizon with a fan of tapered rays (the Aurore mark)."""
    draw.pieslice((cx - r, cy - r, cx + r, cy + r), 180, 360, fill=color)
    ray_in, ray_out = r * 1.32, r * 1.95
    for i in range(rays):
        a = math.radians(180 + 180 * (i + 0.5) / rays)
        half = math.radians(5.2)
        p1 = (cx + ray_in * math.cos(a - half * 1.2), cy + ray_in * math.sin(a - half * 1.2))
        p2 = (cx + ray_out * math.cos(a), cy + ray_out * math.sin(a))
        p3 = (cx + ray_in * math.cos(a + half * 1.2), cy + ray_in * math.sin(a + half * 1.2))
        draw.polygon([p1, p2, p3], fill=color)
    if horizon:
        t = r * 0.16
        draw.rounded_rectangle(
            (cx - r * 2.0, cy + r * 0.22, cx + r * 2.0, cy + r * 0.22 + t), radius=t / 2, fill=color
        )


def aurore_icon(size: int = 348) -> Image.Image:
    s = size * SS
    im = radial_gradient((s, s), (s * 0.5, s * 0.95), s * 0.95, (96, 44, 84), PLUM_DEEP)
    draw = ImageDraw.Draw(im)
    draw_sunrise(draw, s * 0.5, s * 0.6, s * 0.2, GOLD)
    return down(im, (size, size))


def aurore_mark(s: float) -> Image.Image:
    """Roundel for the logo: gold ring around the sunrise, on transparency."""
    im = Image.new("RGBA", (round(s), round(s)), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    w = s * 0.055
    draw.ellipse((w / 2, w / 2, s - w / 2, s - w / 2), outline=GOLD + (255,), width=round(w))
    draw_sunrise(draw, s * 0.5, s * 0.6, s * 0.17, GOLD + (255,))
    return im


def aurore_logo(height: int = 300) -> Image.Image:
    h = height * SS
    pad = h * 0.04
    mark = aurore_mark(h - 2 * pad)
    big, small = font(h * 0.46), font(h * 0.17)
    track = h * 0.055
    top_w = tracked_width("MAISON", small, track)
    bottom_w = big.getlength("Aurore")
    text_x = pad + mark.width + h * 0.12
    w = math.ceil(text_x + max(top_w, bottom_w) + pad)
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    im.alpha_composite(mark, (round(pad), round(pad)))
    draw = ImageDraw.Draw(im)
    # Vertically centre the two-line block on the mark, using ink (not line) boxes.
    sb, bb = ink_box("MAISON", small), ink_box("Aurore", big)
    gap = h * 0.075
    block = (sb[3] - sb[1]) + gap + (bb[3] - bb[1])
    y0 = (h - block) / 2
    tracked_text(draw, (text_x + h * 0.012, y0 - sb[1]), "MAISON", small, GOLD + (255,), track)
    draw.text(
        (text_x, y0 + (sb[3] - sb[1]) + gap - bb[1]), "Aurore", font=big, fill=CREAM + (255,),
        stroke_width=round(h * 0.004), stroke_fill=CREAM + (255,),
    )
    return down(im, (math.ceil(w / SS), height))


def radial_mask(size: tuple[int, int], centre: tuple[float, float], radius: float) -> Image.Image:
    """L mask: 0 at ``centre`` rising linearly to 255 at ``radius`` and beyond.

    (Pillow's Image.radial_gradient reaches 255 only in its corners, which leaves a seam
    wherever its square ends, so the distance field is computed here at 1/8 resolution
    and upsampled; it is smooth, so nothing is lost.)
    """
    w, h = size
    k = 8
    sw, sh = max(2, math.ceil(w / k)), max(2, math.ceil(h / k))
    cx, cy, r = centre[0] / k, centre[1] / k, radius / k
    data = bytes(
        min(255, round(255 * math.hypot(x + 0.5 - cx, y + 0.5 - cy) / r))
        for y in range(sh) for x in range(sw)
    )
    return Image.frombytes("L", (sw, sh), data).resize(size, Image.Resampling.BICUBIC)


def radial_gradient(
    size: tuple[int, int], centre: tuple[float, float], radius: float, inner: RGB, outer: RGB
) -> Image.Image:
    """RGB image fading from ``inner`` at ``centre`` to ``outer`` at ``radius`` (smoothstep)."""
    lut = [round(255 * (t * t * (3 - 2 * t))) for t in (i / 255 for i in range(256))]
    mask = radial_mask(size, centre, radius).point(lut)
    return Image.composite(Image.new("RGB", size, outer), Image.new("RGB", size, inner), mask)


def aurore_strip(size: tuple[int, int] = (1125, 369)) -> Image.Image:
    w, h = size
    # Base: diagonal plum -> copper, dark where the white points balance sits (left).
    base = Image.new("RGB", size)
    px = base.load()
    stops = [(0.0, PLUM_DEEP), (0.38, PLUM), (0.72, (128, 58, 78)), (1.0, COPPER)]
    for x in range(w):
        for y in range(h):
            t = min(1.0, max(0.0, (x / w) * 0.85 + (y / h) * 0.15))
            for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
                if t <= t1:
                    px[x, y] = lerp(c0, c1, (t - t0) / (t1 - t0))
                    break
    im = base.convert("RGBA")

    # Dawn glow rising from below the bottom-right edge.
    sun = (w * 0.8, h * 1.08)
    glow = ImageChops.invert(radial_mask(size, sun, h * 1.5))
    glow = glow.point(lambda v: round(150 * (v / 255) ** 2.2))
    im = Image.composite(Image.new("RGBA", size, GOLD + (255,)), im, glow)

    # Faint sun rays fanning from the same point.
    S = SS
    rays = Image.new("L", (w * S, h * S), 0)
    d = ImageDraw.Draw(rays)
    cx, cy = sun[0] * S, sun[1] * S
    far = w * S * 1.5
    for i in range(22):
        a0 = math.radians(180 + i * 180 / 22)
        a1 = a0 + math.radians(180 / 22 / 2)
        d.polygon(
            [(cx, cy), (cx + far * math.cos(a0), cy + far * math.sin(a0)),
             (cx + far * math.cos(a1), cy + far * math.sin(a1))],
            fill=255,
        )
    rays = down(rays, size)
    # Rays fade out towards the left so the text area stays calm.
    ramp = Image.linear_gradient("L").rotate(90).resize(size)  # 0 left .. 255 right
    ray_alpha = ImageChops.multiply(rays, ramp.point(lambda v: round(18 * (v / 255) ** 1.5)))
    im = Image.composite(Image.new("RGBA", size, CREAM + (255,)), im, ray_alpha)

    # Subtle pattern: a diagonal lattice of tiny diamonds (like a pastry-box print).
    pat = Image.new("L", (w * S, h * S), 0)
    d = ImageDraw.Draw(pat)
    step, r = 30 * S, 2.2 * S
    for j, y in enumerate(range(0, h * S + step, step)):
        off = step / 2 if j % 2 else 0
        for x in range(0, w * S + step, step):
            X = x + off
            d.polygon([(X, y - r), (X + r, y), (X, y + r), (X - r, y)], fill=255)
    pat = down(pat, size).point(lambda v: round(v * 0.10))
    im = Image.composite(Image.new("RGBA", size, GOLD + (255,)), im, pat)

    # A soft vignette along the top keeps the header fields readable.
    vig = Image.linear_gradient("L").resize(size)  # 0 top .. 255 bottom
    vig = ImageChops.invert(vig).point(lambda v: round(70 * (v / 255) ** 3))
    im = Image.composite(Image.new("RGBA", size, PLUM_DEEP + (255,)), im, vig)
    return im.convert("RGB")


# --- Nordhaven Club --------------------------------------------------------------------------


def draw_peaks(
    draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, color: tuple[int, ...],
    snow: tuple[int, ...] | None = None,
) -> None:
    """Two overlapping peaks (big right, small left) sitting on ``base``, width ``w``."""
    big = [(cx - w * 0.30, base), (cx + w * 0.14, base - w * 0.62), (cx + w * 0.50, base)]
    small = [(cx - w * 0.50, base), (cx - w * 0.20, base - w * 0.40), (cx + w * 0.08, base)]
    draw.polygon(small, fill=color)
    draw.polygon(big, fill=color)
    if snow is not None:
        # Snow caps: the top of each peak in a second colour, with a zig-zag lower edge.
        for (lx, ly), (tx, ty), (rx, ry), depth in ((big[0], big[1], big[2], 0.30),
                                                    (small[0], small[1], small[2], 0.32)):
            k = depth
            left = (tx + (lx - tx) * k, ty + (ly - ty) * k)
            right = (tx + (rx - tx) * k, ty + (ry - ty) * k)
            dip = (ly - ty) * k * 0.35
            mid1 = (left[0] + (right[0] - left[0]) * 0.33, left[1] - dip * 0.3)
            mid2 = (left[0] + (right[0] - left[0]) * 0.5, left[1] + dip * 0.2)
            mid3 = (left[0] + (right[0] - left[0]) * 0.7, right[1] - dip * 0.4)
            draw.polygon([(tx, ty), right, mid3, mid2, mid1, left], fill=snow)


def draw_star(
    draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, color: tuple[int, ...]
) -> None:
    """Four-pointed north star."""
    k = r * 0.22
    draw.polygon(
        [(cx, cy - r), (cx + k, cy - k), (cx + r, cy), (cx + k, cy + k),
         (cx, cy + r), (cx - k, cy + k), (cx - r, cy), (cx - k, cy - k)],
        fill=color,
    )


def nordhaven_icon(size: int = 348) -> Image.Image:
    s = size * SS
    im = radial_gradient((s, s), (s * 0.5, s * 0.3), s * 0.9, NAVY_LIGHT, NAVY_DEEP)
    draw = ImageDraw.Draw(im)
    draw_peaks(draw, s * 0.5, s * 0.76, s * 0.7, WHITE, snow=ICE)
    draw_star(draw, s * 0.30, s * 0.27, s * 0.085, ICE)
    return down(im, (size, size))


def nordhaven_mark(size: int = 300) -> Image.Image:
    """Logo mark (the pass shows logoText "Nordhaven Club" beside it): peaks in a ring."""
    s = size * SS
    im = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    ring = s * 0.06
    draw.ellipse((ring / 2, ring / 2, s - ring / 2, s - ring / 2), outline=WHITE + (255,),
                 width=round(ring))
    # Clip the peaks to the inner disc so their bases meet the ring cleanly.
    inner = Image.new("L", (s, s), 0)
    edge = ring * 1.9
    ImageDraw.Draw(inner).ellipse((edge, edge, s - edge, s - edge), fill=255)
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    ld = ImageDraw.Draw(layer)
    draw_peaks(ld, s * 0.5, s * 0.74, s * 0.74, WHITE + (255,), snow=ICE + (255,))
    ld.rectangle((0, s * 0.74, s, s), fill=WHITE + (255,))
    draw_star(ld, s * 0.33, s * 0.3, s * 0.075, ICE + (255,))
    layer.putalpha(ImageChops.multiply(layer.getchannel("A"), inner))
    im.alpha_composite(layer)
    return down(im, (size, size))


def nordhaven_badge(size: int = 540) -> Image.Image:
    """Member badge for the thumbnail: ringed roundel, peaks, star and a MEMBER ribbon."""
    s = size * SS
    im = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    m = s * 0.03
    # Soft shadow so the badge lifts off the navy card.
    shadow = Image.new("L", (s, s), 0)
    ImageDraw.Draw(shadow).ellipse((m * 1.6, m * 2.6, s - m * 1.6, s - m * 0.6), fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(s * 0.02))
    im.paste((4, 16, 30, 255), (0, 0), shadow)

    disc = radial_gradient((s, s), (s * 0.5, s * 0.32), s * 0.62, NAVY_LIGHT, NAVY_DEEP)
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).ellipse((m * 2, m * 2, s - m * 2, s - m * 2), fill=255)
    im.paste(disc, (0, 0), mask)
    draw = ImageDraw.Draw(im)
    draw.ellipse((m * 2, m * 2, s - m * 2, s - m * 2), outline=ICE + (255,), width=round(s * 0.035))
    draw.ellipse((m * 4.3, m * 4.3, s - m * 4.3, s - m * 4.3), outline=WHITE + (200,),
                 width=round(s * 0.008))

    draw_peaks(draw, s * 0.5, s * 0.63, s * 0.5, WHITE + (255,), snow=ICE + (255,))
    draw_star(draw, s * 0.5, s * 0.2, s * 0.05, ICE + (255,))
    for dx in (-0.12, 0.12):
        draw_star(draw, s * (0.5 + dx), s * 0.235, s * 0.022, WHITE + (230,))

    # Ribbon across the lower third.
    rh = s * 0.15
    top = s * 0.655
    x0, x1 = s * 0.12, s * 0.88
    notch = rh * 0.35
    for side in (-1, 1):  # folded tails behind the band
        xa = x0 if side < 0 else x1
        xt = xa + side * s * 0.07
        draw.polygon(
            [(xa, top + rh * 0.25), (xt, top + rh * 0.25), (xt - side * notch, top + rh * 0.75),
             (xt, top + rh * 1.25), (xa, top + rh * 1.25)],
            fill=(96, 150, 186, 255),
        )
    draw.rectangle((x0, top, x1, top + rh), fill=ICE + (255,))
    fnt = font(rh * 0.58)
    track = rh * 0.12
    tw = tracked_width("MEMBER", fnt, track)
    box = ink_box("M", fnt)
    ty = top + (rh - (box[3] - box[1])) / 2 - box[1]
    tracked_text(draw, ((s - tw) / 2, ty), "MEMBER", fnt, NAVY_DEEP + (255,), track,
                 stroke=round(s * 0.002))
    return down(im, (size, size))


def save(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.info = {}
    im.save(path, format="PNG", optimize=True)
    print(f"{path.relative_to(ROOT)}  {im.width}x{im.height}  {path.stat().st_size // 1024} KB")


def main() -> None:
    loyalty = ROOT / "loyalty" / "images"
    save(aurore_icon(), loyalty / "icon.png")
    save(aurore_logo(), loyalty / "logo.png")
    save(aurore_strip(), loyalty / "strip.png")
    membership = ROOT / "membership" / "images"
    save(nordhaven_icon(), membership / "icon.png")
    save(nordhaven_mark(), membership / "logo.png")
    save(nordhaven_badge(), membership / "thumbnail.png")


if __name__ == "__main__":
    main()

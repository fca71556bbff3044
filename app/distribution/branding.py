"""A program's look on its web pages, taken from its card template.

The pages a customer opens from a link should look like the card they are
about to add: the template's background colour, its text colour and its logo.
Colours come, in order, from the program's ``options["colors"]`` override,
the template's ``[google] background``, then the ``backgroundColor`` /
``foregroundColor`` / ``labelColor`` of its pass.json. Text colours are checked
against WCAG 2 contrast (4.5:1) and replaced by white or near-black when a
brand's pair is too faint to read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.wallet.template import TemplateError

if TYPE_CHECKING:
    from app.infra.models import Program
    from app.services import Services

RGB = tuple[int, int, int]
DEFAULT_BACKGROUND: RGB = (58, 28, 64)
WHITE: RGB = (255, 255, 255)
INK: RGB = (29, 27, 34)
MIN_TEXT_CONTRAST = 4.5
MIN_FOCUS_CONTRAST = 3.0

_HEX = re.compile(r"^#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_RGB = re.compile(r"^rgb\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)$")
_PASS_COLOR = re.compile(r'"(backgroundColor|foregroundColor|labelColor)"\s*:\s*"([^"]+)"')


@dataclass(frozen=True)
class Branding:
    brand: str          # the tenant's name
    program: str        # the program's name
    logo_url: str | None
    background: str     # "#rrggbb"
    foreground: str     # readable on background
    accent: str         # focus rings and highlights, visible on background


def parse_color(value: object) -> RGB | None:
    """``#abc``, ``#aabbcc`` or ``rgb(r, g, b)``; None for anything else."""
    text = str(value or "").strip()
    if match := _HEX.match(text):
        digits = match.group(1)
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
    if match := _RGB.match(text):
        red, green, blue = (int(part) for part in match.groups())
        if all(0 <= c <= 255 for c in (red, green, blue)):
            return red, green, blue
    return None


def hex_color(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def luminance(rgb: RGB) -> float:
    """WCAG 2 relative luminance."""
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: RGB, b: RGB) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def readable_on(background: RGB, wanted: RGB | None, minimum: float) -> RGB:
    """``wanted`` if it reads well on ``background``, else white or ink, whichever reads best."""
    if wanted is not None and contrast(background, wanted) >= minimum:
        return wanted
    return max((WHITE, INK), key=lambda c: contrast(background, c))


def template_colors(services: Services, program: Program) -> dict[str, RGB]:
    """The colours the program's card uses (see the module docstring for the order)."""
    found: dict[str, RGB] = {}
    try:
        template = services.templates.get(program.template)
    except TemplateError:
        return found
    pass_json = template.path / "pass.json"
    if pass_json.is_file():
        names = {"backgroundColor": "background", "foregroundColor": "foreground",
                 "labelColor": "accent"}
        for key, value in _PASS_COLOR.findall(pass_json.read_text(encoding="utf-8")):
            if (rgb := parse_color(value)) is not None:
                found[names[key]] = rgb
    if (rgb := parse_color(template.google.get("background"))) is not None:
        found["background"] = rgb
    overrides = (program.options or {}).get("colors") or {}
    if isinstance(overrides, dict):
        for name in ("background", "foreground", "accent"):
            if (rgb := parse_color(overrides.get(name))) is not None:
                found[name] = rgb
    return found


def logo_url(services: Services, program: Program) -> str | None:
    """The template's logo through the public image route (app/web/google.py), if it has one."""
    try:
        folder = services.templates.get(program.template).path / "images"
    except TemplateError:
        return None
    for role in ("logo", "icon"):
        if (folder / f"{role}.png").is_file():
            return f"/google/images/{program.template}/{role}.png"
    return None


def branding(services: Services, program: Program) -> Branding:
    colors = template_colors(services, program)
    background = colors.get("background", DEFAULT_BACKGROUND)
    foreground = readable_on(background, colors.get("foreground"), MIN_TEXT_CONTRAST)
    accent = readable_on(background, colors.get("accent"), MIN_FOCUS_CONTRAST)
    return Branding(brand=program.tenant.name, program=program.name,
                    logo_url=logo_url(services, program), background=hex_color(background),
                    foreground=hex_color(foreground), accent=hex_color(accent))

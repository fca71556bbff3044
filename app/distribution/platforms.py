"""Which wallet a visitor's device takes, from its User-Agent.

Three answers, because the landing page has three layouts:

- ``apple``: iPhone, iPod touch, iPad (every browser there is WebKit and opens a
  .pkpass into Wallet);
- ``google``: Android phones and tablets (Google Wallet);
- ``desktop``: everything else; the page shows both buttons plus a QR code of
  the same link, to continue on the phone.

iPadOS 13+ asks for desktop sites by default and then sends a Mac User-Agent,
so the server cannot tell an iPad from a Mac. The caller may pass
``touch_hint`` (``navigator.maxTouchPoints > 1``, known only in the browser);
without it a "Macintosh" UA stays ``desktop`` and the page's small inline
script promotes the Apple button on touch Macs (which are iPads).

What the page *says* needs one more distinction than which buttons it shows:
``desktop`` also covers devices we cannot name (an empty UA, a Windows Phone,
a TV), and only a real computer may be asked "On a computer?". :func:`device`
names the device; :func:`offer` decides, for a device and the wallets a
program has set up, which buttons, QR code and notice the landing shows, so
that no page offers a button the device cannot use or a wallet the program
does not have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Platform = Literal["apple", "google", "desktop"]
PLATFORMS: tuple[Platform, ...] = ("apple", "google", "desktop")
Device = Literal["iphone", "ipad", "android", "computer", "unknown"]

_APPLE_MOBILE = re.compile(r"\b(iPhone|iPod|iPad)\b")
_ANDROID = re.compile(r"\bAndroid\b", re.IGNORECASE)
# Windows Phone UAs also say "Android" and "iPhone" for compatibility; no wallet there.
_WINDOWS_PHONE = re.compile(r"Windows Phone|IEMobile", re.IGNORECASE)
_MACINTOSH = re.compile(r"\bMacintosh\b")
_IPAD = re.compile(r"\biPad\b")
# Desktop operating systems (checked after phones: Android UAs say "Linux" too).
_COMPUTER = re.compile(r"\b(Windows NT|Macintosh|X11|CrOS)\b")


def detect(user_agent: str | None, *, touch_hint: bool | None = None) -> Platform:
    """The platform to show buttons for; ``desktop`` when unsure (it offers both)."""
    ua = user_agent or ""
    if _WINDOWS_PHONE.search(ua):
        return "desktop"
    if _APPLE_MOBILE.search(ua):
        return "apple"
    if _ANDROID.search(ua):
        return "google"
    if touch_hint and _MACINTOSH.search(ua):
        return "apple"  # iPadOS in desktop mode
    return "desktop"


def may_be_ipad(user_agent: str | None) -> bool:
    """A Mac UA: could be iPadOS in desktop mode (the page checks touch in the browser)."""
    return bool(_MACINTOSH.search(user_agent or ""))


def device(user_agent: str | None, *, touch_hint: bool | None = None) -> Device:
    """What the visitor holds, as far as the User-Agent tells: for the page's wording."""
    ua = user_agent or ""
    if _WINDOWS_PHONE.search(ua):
        return "unknown"  # a phone, but no wallet we serve
    if _APPLE_MOBILE.search(ua):
        return "ipad" if _IPAD.search(ua) else "iphone"
    if _ANDROID.search(ua):
        return "android"
    if touch_hint and _MACINTOSH.search(ua):
        return "ipad"
    if _COMPUTER.search(ua):
        return "computer"
    return "unknown"


@dataclass(frozen=True)
class Offer:
    """What a landing shows: buttons, QR code and notice, for one device and program.

    ``layout`` is the page's layout (``apple``/``google`` for a phone or tablet,
    ``desktop`` for both buttons and a QR code). ``missing`` names the wallet the
    device takes when the program does not offer it (``apple``, ``google``), or
    ``all`` when the program offers no wallet yet: the page says so instead of
    showing a button the device cannot use. ``qr_heading`` is ``computer`` ("On a
    computer?") only for a device known to be a computer, else ``other`` ("On
    another phone?").
    """

    layout: Platform
    apple: bool
    google: bool
    qr: bool
    qr_heading: Literal["computer", "other"]
    missing: Literal["apple", "google", "all"] | None
    more: bool  # the "every option" link (phones and tablets)


def offer(device_: Device, *, apple: bool, google: bool, show_all: bool = False) -> Offer:
    """The landing for ``device_`` when the program offers ``apple`` / ``google`` wallets."""
    heading: Literal["computer", "other"] = "computer" if device_ == "computer" else "other"
    if device_ in ("iphone", "ipad"):
        own: Platform = "apple"
    elif device_ == "android":
        own = "google"
    else:
        own = "desktop"
    if not (apple or google):  # nothing to add anywhere: no button, no code to scan
        return Offer(own, False, False, False, heading, "all", False)
    if show_all or own == "desktop":
        return Offer("desktop", apple, google, True, heading, None, False)
    available = apple if own == "apple" else google
    return Offer(own, own == "apple" and apple, own == "google" and google, False, heading,
                 None if available else own, True)

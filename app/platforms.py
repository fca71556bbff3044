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
"""

from __future__ import annotations

import re
from typing import Literal

Platform = Literal["apple", "google", "desktop"]
PLATFORMS: tuple[Platform, ...] = ("apple", "google", "desktop")

_APPLE_MOBILE = re.compile(r"\b(iPhone|iPod|iPad)\b")
_ANDROID = re.compile(r"\bAndroid\b", re.IGNORECASE)
# Windows Phone UAs also say "Android" and "iPhone" for compatibility; no wallet there.
_WINDOWS_PHONE = re.compile(r"Windows Phone|IEMobile", re.IGNORECASE)
_MACINTOSH = re.compile(r"\bMacintosh\b")


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

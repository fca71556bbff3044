"""Platform detection with User-Agent strings real browsers send."""

from __future__ import annotations

import pytest

from app.distribution.platforms import Offer, detect, device, may_be_ipad, offer

IPHONE_SAFARI = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
                 "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1")
IPHONE_CHROME = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
                 "(KHTML, like Gecko) CriOS/126.0.6478.54 Mobile/15E148 Safari/604.1")
IPHONE_FIREFOX = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
                  "(KHTML, like Gecko) FxiOS/127.0 Mobile/15E148 Safari/605.1.15")
IPOD = ("Mozilla/5.0 (iPod touch; CPU iPhone OS 15_7 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/15.6 Mobile/15E148 Safari/604.1")
IPAD_OLD = ("Mozilla/5.0 (iPad; CPU OS 12_5_7 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/12.1.2 Mobile/15E148 Safari/604.1")
# iPadOS 13+ in its default "desktop website" mode: byte for byte a Mac's Safari.
IPADOS = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.5 Safari/605.1.15")
ANDROID_CHROME = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
                  "(KHTML, like Gecko) Chrome/126.0.6478.71 Mobile Safari/537.36")
ANDROID_REDUCED = ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 "
                   "(KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36")
SAMSUNG = ("Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S921B) AppleWebKit/537.36 "
           "(KHTML, like Gecko) SamsungBrowser/25.0 Chrome/121.0.0.0 Mobile Safari/537.36")
FIREFOX_ANDROID = "Mozilla/5.0 (Android 14; Mobile; rv:127.0) Gecko/127.0 Firefox/127.0"
# The pre-Chrome stock ("AOSP") browser, still seen on old and unbranded devices.
ANDROID_STOCK = ("Mozilla/5.0 (Linux; U; Android 4.0.3; ko-kr; LG-L160L Build/IML74K) "
                 "AppleWebkit/534.30 (KHTML, like Gecko) Version/4.0 Mobile Safari/534.30")
ANDROID_TABLET = ("Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 "
                  "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36")
DESKTOP_CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                  "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36")
DESKTOP_FIREFOX = ("Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0")
MAC_SAFARI = IPADOS  # the same string: only touch tells them apart
MAC_CHROME = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
              "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36")
WINDOWS_PHONE = ("Mozilla/5.0 (Windows Phone 10.0; Android 6.0.1; Microsoft; Lumia 950) "
                 "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/52.0.2743.116 Mobile "
                 "Safari/537.36 Edge/15.15063")


@pytest.mark.parametrize("ua, expected", [
    (IPHONE_SAFARI, "apple"), (IPHONE_CHROME, "apple"), (IPHONE_FIREFOX, "apple"),
    (IPOD, "apple"), (IPAD_OLD, "apple"),
    (ANDROID_CHROME, "google"), (ANDROID_REDUCED, "google"), (SAMSUNG, "google"),
    (FIREFOX_ANDROID, "google"), (ANDROID_TABLET, "google"), (ANDROID_STOCK, "google"),
    (DESKTOP_CHROME, "desktop"), (DESKTOP_FIREFOX, "desktop"), (MAC_SAFARI, "desktop"),
    (MAC_CHROME, "desktop"), (WINDOWS_PHONE, "desktop"), ("", "desktop"), (None, "desktop"),
    ("curl/8.5.0", "desktop"),
])
def test_detect(ua: str | None, expected: str) -> None:
    assert detect(ua) == expected


def test_ipados_is_apple_only_with_touch() -> None:
    assert detect(IPADOS, touch_hint=True) == "apple"
    assert detect(IPADOS, touch_hint=False) == "desktop"
    # A touch screen on Windows or Linux is not an iPad.
    assert detect(DESKTOP_CHROME, touch_hint=True) == "desktop"
    assert detect(DESKTOP_FIREFOX, touch_hint=True) == "desktop"


def test_mac_user_agents_may_be_ipads() -> None:
    assert may_be_ipad(IPADOS) and may_be_ipad(MAC_CHROME)
    assert not may_be_ipad(DESKTOP_CHROME) and not may_be_ipad(IPHONE_SAFARI)
    assert not may_be_ipad(None)


@pytest.mark.parametrize("ua, expected", [
    (IPHONE_SAFARI, "iphone"), (IPHONE_CHROME, "iphone"), (IPOD, "iphone"), (IPAD_OLD, "ipad"),
    (ANDROID_CHROME, "android"), (SAMSUNG, "android"), (FIREFOX_ANDROID, "android"),
    (ANDROID_TABLET, "android"), (ANDROID_STOCK, "android"),
    (DESKTOP_CHROME, "computer"), (DESKTOP_FIREFOX, "computer"), (MAC_SAFARI, "computer"),
    (MAC_CHROME, "computer"),
    # Not known to be computers: they are never asked "On a computer?".
    (WINDOWS_PHONE, "unknown"), ("", "unknown"), (None, "unknown"), ("curl/8.5.0", "unknown"),
])
def test_device(ua: str | None, expected: str) -> None:
    assert device(ua) == expected


def test_a_touch_mac_is_an_ipad() -> None:
    assert device(IPADOS, touch_hint=True) == "ipad"
    assert device(DESKTOP_CHROME, touch_hint=True) == "computer"


BOTH = {"apple": True, "google": True}


@pytest.mark.parametrize("device_, wallets, expected", [
    ("iphone", BOTH, Offer("apple", True, False, False, "other", None, True)),
    ("iphone", {"apple": False, "google": True},
     Offer("apple", False, False, False, "other", "apple", True)),
    ("android", BOTH, Offer("google", False, True, False, "other", None, True)),
    # The reported case: no Google Wallet in the program. No Apple file, no "computer".
    ("android", {"apple": True, "google": False},
     Offer("google", False, False, False, "other", "google", True)),
    ("computer", {"apple": True, "google": False},
     Offer("desktop", True, False, True, "computer", None, False)),
    ("unknown", BOTH, Offer("desktop", True, True, True, "other", None, False)),
    ("ipad", {"apple": False, "google": False},
     Offer("apple", False, False, False, "other", "all", False)),
    ("computer", {"apple": False, "google": False},
     Offer("desktop", False, False, False, "computer", "all", False)),
])
def test_offer(device_: str, wallets: dict[str, bool], expected: Offer) -> None:
    assert offer(device_, **wallets) == expected  # type: ignore[arg-type]


def test_every_option_on_a_phone_is_for_another_phone() -> None:
    shown = offer("android", apple=True, google=False, show_all=True)
    assert (shown.layout, shown.apple, shown.google, shown.qr, shown.qr_heading) == \
        ("desktop", True, False, True, "other")

"""Polling for what another thread or process does (a stand-in receiving, a worker
finishing): the one wait the end-to-end tests share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def wait_until(predicate: Callable[[], _T], seconds: float = 20.0) -> _T:
    """The predicate's first truthy value, polled every 50 ms; fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")

"""Waiting in tests: poll a condition until a deadline, never sleep a fixed time and hope."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, message: str, interval: float = 0.05) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something truthy, and return that.

    At the deadline the test fails with ``message`` (say what did not happen). The predicate is called
    once more at the deadline, so a slow last poll is not counted as a failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        expired = time.monotonic() >= deadline
        result = predicate()
        if result:
            return result
        if expired:
            pytest.fail(f"{message} (waited {timeout:g} s)")
        time.sleep(interval)

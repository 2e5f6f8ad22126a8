"""Polite pulling: retrieve only inside an off-peak window, and at most N instances per second.

Production PACS teams allow bulk retrieval off-peak (e.g. 19:00-07:00 local time) and at a bounded
rate. ``Pacer.before_request(n)`` is called before every retrieve request (C-MOVE, C-GET, WADO-RS)
for the ``n`` instances it asks for: outside the window it blocks, saying when the pull resumes;
with ``max_rate`` it spaces requests so the instances asked for average at most ``max_rate`` per
second. Requests already running when the window closes finish; no new one starts.
``Pacer.interrupt()`` (Ctrl-C) wakes every waiting thread at once with ``PullInterrupted``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LOGGER = logging.getLogger("ingest.polite")

_WINDOW_PATTERN = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_DAY_S = 86400


class PullInterrupted(Exception):
    """A wait of the pacer was interrupted: the pull is stopping."""


@dataclass(frozen=True)
class Window:
    """A daily time-of-day window in local time; ``start > end`` wraps past midnight (19:00-07:00)."""

    start: dt.time
    end: dt.time

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError(f"window {self}: start equals end; leave --window out to pull at any time")

    @classmethod
    def parse(cls, text: str) -> Window:
        match = _WINDOW_PATTERN.match(text.strip())
        if match is None:
            raise ValueError(f"window {text!r}: write HH:MM-HH:MM in local time, e.g. 19:00-07:00")
        h1, m1, h2, m2 = map(int, match.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ValueError(f"window {text!r}: hours are 0..23 and minutes 0..59")
        return cls(dt.time(h1, m1), dt.time(h2, m2))

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def seconds_until_open(self, now: dt.datetime) -> float:
        """0 inside the window, else the seconds until it opens next."""
        t = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
        start = self.start.hour * 3600 + self.start.minute * 60
        end = self.end.hour * 3600 + self.end.minute * 60
        inside = start <= t < end if start < end else (t >= start or t < end)
        return 0.0 if inside else (start - t) % _DAY_S


class Pacer:
    """Window and rate limit shared by every retrieving thread of a pull (thread-safe).

    ``now`` gives the local wall-clock time (for the window), ``monotonic`` the rate's clock, and
    ``wait(seconds)`` sleeps, returning True when interrupted: parameters, so tests can drive them.
    """

    def __init__(
        self,
        window: Window | None = None,
        max_rate: float | None = None,
        *,
        now: Callable[[], dt.datetime] = dt.datetime.now,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if max_rate is not None and max_rate <= 0:
            raise ValueError(f"max_rate={max_rate!r}: instances per second, > 0 (or None for no limit)")
        self.window = window
        self.max_rate = max_rate
        self._now = now
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._next_start = 0.0
        self._interrupted = threading.Event()
        self._wait = wait or self._interrupted.wait
        self._paused_until: dt.datetime | None = None
        self.paused_s = 0.0

    @property
    def active(self) -> bool:
        return self.window is not None or self.max_rate is not None

    def interrupt(self) -> None:
        """Wake every waiting thread with PullInterrupted, now and for every later wait."""
        self._interrupted.set()

    def _sleep(self, seconds: float) -> None:
        if self._wait(max(seconds, 0.0)) or self._interrupted.is_set():
            raise PullInterrupted("the pull was interrupted")

    def wait_for_window(self) -> None:
        """Block while outside the window; log once per pause when the pull resumes."""
        if self.window is None:
            return
        while True:
            if self._interrupted.is_set():
                raise PullInterrupted("the pull was interrupted")
            now = self._now()
            wait = self.window.seconds_until_open(now)
            if wait <= 0:
                with self._lock:
                    if self._paused_until is not None:
                        LOGGER.info("inside the pull window %s again: resuming", self.window)
                        self._paused_until = None
                return
            with self._lock:
                resume = now + dt.timedelta(seconds=wait)
                if self._paused_until is None:
                    LOGGER.warning(
                        "outside the pull window %s: pausing until %s (local time)",
                        self.window,
                        resume.strftime("%Y-%m-%d %H:%M"),
                    )
                    self._paused_until = resume
            # Wake at least each minute: a clock change or a suspended machine must not oversleep.
            step = min(wait, 60.0)
            self._sleep(step)
            with self._lock:
                self.paused_s += step

    def before_request(self, instances: int = 1) -> None:
        """Wait until a request for ``instances`` instances may start."""
        self.wait_for_window()
        if self.max_rate is None:
            return
        with self._lock:
            now = self._monotonic()
            start = max(now, self._next_start)
            self._next_start = start + max(instances, 1) / self.max_rate
        self._sleep(start - now)


@dataclass(frozen=True)
class Slot:
    """One request's place in ``AdaptiveConcurrency``: when it started, in which epoch, beside how many."""

    epoch: int
    started: float
    in_flight: int


class AdaptiveConcurrency:
    """How many requests may run at once, halved when the PACS shows it is overloaded, grown back by
    one after ``grow_after`` calm requests in a row; every change is logged.

    Overload signs: what the caller reports (DIMSE A7xx statuses such as A702 "out of resources",
    HTTP 429 and 503), and rising latency. Latency is each request's seconds per instance divided by
    the requests in flight beside it (about the PACS's own time per instance, which more parallel
    requests alone should not change); once ``min_samples`` requests have set a baseline (the lowest
    moving average seen), a moving average ``slowdown`` times the baseline is a sign too. A request
    is calm when it met no sign and its latency is within twice the baseline. Requests that started
    before a back-off cannot cause another one, so a storm from one burst halves the limit once.
    """

    def __init__(
        self,
        maximum: int,
        *,
        grow_after: int = 20,
        slowdown: float = 4.0,
        min_samples: int = 10,
        what: str = "requests",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if maximum < 1 or grow_after < 1 or min_samples < 1 or slowdown <= 1:
            raise ValueError(
                f"maximum={maximum}, grow_after={grow_after}, min_samples={min_samples}: use >= 1; "
                f"slowdown={slowdown}: use > 1"
            )
        self.maximum = maximum
        self.limit = maximum
        self.grow_after = grow_after
        self.slowdown = slowdown
        self.min_samples = min_samples
        self.what = what
        self.changes: list[tuple[int, int, str]] = []  # (from, to, why), for reports and tests
        self._monotonic = monotonic
        self._active = 0
        self._epoch = 0
        self._calm = 0
        self._samples = 0
        self._average: float | None = None  # moving average of the latency, seconds per instance
        self._baseline: float | None = None
        self._condition = threading.Condition()

    def acquire(self) -> Slot:
        """Wait for a free slot; give it back with ``release``."""
        with self._condition:
            while self._active >= self.limit:
                self._condition.wait()
            self._active += 1
            return Slot(self._epoch, self._monotonic(), self._active)

    def release(self, slot: Slot, overloaded: str | None = None, instances: int = 0) -> None:
        """End the request of ``slot``: ``overloaded`` names the overload sign it met; ``instances``
        it brought (0: it brought none, its latency says nothing)."""
        seconds = self._monotonic() - slot.started
        with self._condition:
            # Beside how many it ran: the most of when it started and when it ended.
            latency = seconds / instances / max(slot.in_flight, self._active) if instances > 0 else None
            self._active -= 1
            # Requests from before the last back-off ran at the old limit: they say nothing of this one.
            current = slot.epoch == self._epoch
            slow = self._latency_sign(latency) if latency is not None and current else None
            sign = overloaded or slow
            if sign is not None:
                self._calm = 0
                if current and self.limit > 1:
                    self._change(max(1, self.limit // 2), sign)
                    self._epoch += 1
                    self._average, self._samples = self._baseline, 0  # judge the new limit afresh
            elif self.limit < self.maximum and self._is_calm(latency):
                self._calm += 1
                if self._calm >= self.grow_after:
                    self._calm = 0
                    self._change(self.limit + 1, f"{self.grow_after} calm requests in a row")
            self._condition.notify_all()

    def _latency_sign(self, latency: float) -> str | None:
        self._average = latency if self._average is None else 0.8 * self._average + 0.2 * latency
        self._samples += 1
        if self._samples < self.min_samples:
            return None
        if self._baseline is None or self._average < self._baseline:
            self._baseline = self._average
        if self._average > self.slowdown * self._baseline:
            return (
                f"latency {1000 * self._average:.0f} ms per instance, "
                f"{self._average / self._baseline:.1f}x the best {1000 * self._baseline:.0f} ms"
            )
        return None

    def _is_calm(self, latency: float | None) -> bool:
        return latency is None or self._baseline is None or latency <= 2 * self._baseline

    def _change(self, limit: int, why: str) -> None:
        log = LOGGER.warning if limit < self.limit else LOGGER.info
        log("concurrent %s %d -> %d: %s", self.what, self.limit, limit, why)
        self.changes.append((self.limit, limit, why))
        self.limit = limit

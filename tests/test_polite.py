"""Polite pulling: the off-peak window and the instance rate, alone and in C-GET and DICOMweb pulls."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pydicom
import pytest
from factories import make_instance
from pacs_peers import GetPacs

from ingest.dicom.scp import TRANSPORTS, spooled_uids
from ingest.dicom.scu import PacsConfig, RetrieveItem, retrieve
from ingest.polite import AdaptiveConcurrency, Pacer, PullInterrupted, Window

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def test_window_parses_and_wraps_past_midnight() -> None:
    night = Window.parse("19:00-07:00")
    assert str(night) == "19:00-07:00"
    day = dt.datetime(2026, 3, 2)
    assert night.seconds_until_open(day.replace(hour=23)) == 0
    assert night.seconds_until_open(day.replace(hour=6, minute=59)) == 0
    assert night.seconds_until_open(day.replace(hour=7)) == 12 * 3600
    assert night.seconds_until_open(day.replace(hour=18, minute=30)) == 1800
    office = Window.parse("9:00-17:30")
    assert office.seconds_until_open(day.replace(hour=12)) == 0
    assert office.seconds_until_open(day.replace(hour=18)) == 15 * 3600
    for bad in ("19-07", "25:00-07:00", "07:00-07:00"):
        with pytest.raises(ValueError):
            Window.parse(bad)


class FakeClock:
    """Local time that advances only when the pacer waits."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start
        self.waits: list[float] = []

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += dt.timedelta(seconds=seconds)
        return False


def test_outside_the_window_the_pacer_pauses_says_when_it_resumes_and_resumes(caplog) -> None:
    caplog.set_level(logging.INFO, logger="ingest.polite")
    clock = FakeClock(dt.datetime(2026, 3, 2, 18, 58, 30))
    pacer = Pacer(Window.parse("19:00-07:00"), now=lambda: clock.now, wait=clock.wait)
    pacer.before_request(5)
    assert clock.now == dt.datetime(2026, 3, 2, 19, 0) and sum(clock.waits) == 90
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "outside the pull window 19:00-07:00: pausing until 2026-03-02 19:00 (local time)"
    assert messages[1:] == ["inside the pull window 19:00-07:00 again: resuming"]
    clock.waits.clear()
    pacer.before_request(5)
    assert clock.waits == [], "inside the window nothing waits"


def test_interrupt_wakes_a_thread_waiting_for_the_window_at_once() -> None:
    closed = Window.parse("00:00-00:01")
    pacer = Pacer(closed, now=lambda: dt.datetime(2026, 3, 2, 12, 0))
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pacer.before_request()
        except PullInterrupted as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive(), "outside the window the request waits"
    started = time.monotonic()
    pacer.interrupt()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - started < 1 and len(errors) == 1


def test_max_rate_spaces_requests_by_the_instances_they_ask_for() -> None:
    clock = {"t": 100.0}
    slept: list[float] = []

    def wait(seconds: float) -> bool:
        slept.append(seconds)
        clock["t"] += seconds
        return False

    pacer = Pacer(max_rate=10, monotonic=lambda: clock["t"], wait=wait)
    pacer.before_request(5)  # first request: at once
    pacer.before_request(1)  # 5 instances at 10/s: half a second later
    pacer.before_request(1)
    assert slept == pytest.approx([0, 0.5, 0.1])
    with pytest.raises(ValueError, match="instances per second"):
        Pacer(max_rate=0)


@pytest.mark.slow
def test_c_get_requests_keep_to_the_rate(tmp_path) -> None:
    study, series = "1.2.826.0.1.3680043.10.996.1", "1.2.826.0.1.3680043.10.996.1.1"
    paths = [
        make_instance(tmp_path / f"{n}.dcm", study_uid=study, series_uid=series, sop_uid=f"{series}.{n}")
        for n in range(1, 7)
    ]
    datasets = [pydicom.dcmread(path) for path in paths]
    pacs = GetPacs(datasets)
    try:
        cfg = PacsConfig("127.0.0.1", pacs.port, "FLAKYPACS", retries=0)
        items = [RetrieveItem(study, series, (ds.SOPInstanceUID,), (ds.SOPClassUID,)) for ds in datasets]
        started = time.monotonic()
        summary = retrieve(
            cfg, items, method="get", spool_dir=tmp_path / "spool", workers=3, pacer=Pacer(max_rate=10)
        )
        elapsed = time.monotonic() - started
    finally:
        pacs.server.shutdown()
    assert summary.ok and summary.completed == 6 and pacs.requests == 6
    assert elapsed >= 0.5, "6 single-instance requests at 10 instances/s take at least 0.5 s"


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_retrieve_that_stays_pending_is_cancelled_and_retried(tmp_path, transport: str) -> None:
    study, series = "1.2.826.0.1.3680043.10.995.1", "1.2.826.0.1.3680043.10.995.1.1"
    paths = [
        make_instance(tmp_path / f"{n}.dcm", study_uid=study, series_uid=series, sop_uid=f"{series}.{n}")
        for n in range(1, 5)
    ]
    pacs = GetPacs([pydicom.dcmread(path) for path in paths])
    pacs.abort_after, pacs.stall = 2, 1  # the first request sends 2 instances, then stays pending
    try:
        cfg = PacsConfig("127.0.0.1", pacs.port, "FLAKYPACS", retries=1, backoff_s=0.05, retrieve_timeout=1.0)
        uids = tuple(f"{series}.{n}" for n in range(1, 5))
        started = time.monotonic()
        summary = retrieve(
            cfg,
            [RetrieveItem(study, series, uids, (CR_STORAGE,))],
            method="get",
            spool_dir=tmp_path / "spool",
            workers=1,
            progress=False,
            transport=transport,
        )
        elapsed = time.monotonic() - started
    finally:
        pacs.server.shutdown()
    assert pacs.cancelled == 1 and pacs.requests == 2
    assert summary.ok and summary.completed == 4 and spooled_uids(tmp_path / "spool") == set(uids)
    assert elapsed < 10, "cancelled after retrieve_timeout, not after the 120 s DIMSE timeout"


def test_adaptive_concurrency_halves_once_per_storm_and_grows_back(caplog) -> None:
    caplog.set_level(logging.INFO, logger="ingest.polite")
    limit = AdaptiveConcurrency(8, grow_after=3, what="C-MOVE requests")
    burst = [limit.acquire() for _ in range(8)]
    for slot in burst:  # eight A702s from one burst: one back-off
        limit.release(slot, overloaded="status 0xA702")
    assert limit.limit == 4
    running = [limit.acquire() for _ in range(4)]
    fifth_started = threading.Event()

    def fifth() -> None:
        slot = limit.acquire()  # waits: 4 already run
        fifth_started.set()
        limit.release(slot)

    thread = threading.Thread(target=fifth)
    thread.start()
    assert not fifth_started.wait(0.2), "only 4 may run at once after the back-off"
    for slot in running:
        limit.release(slot)
    thread.join(timeout=5)
    assert fifth_started.is_set()
    limit.release(limit.acquire())
    assert limit.limit == 6, "3 and then 3 more calm requests grew it by one each"
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "concurrent C-MOVE requests 8 -> 4: status 0xA702"
    assert messages[1] == "concurrent C-MOVE requests 4 -> 5: 3 calm requests in a row"


def test_adaptive_concurrency_backs_off_when_the_pacs_slows_down_not_when_it_is_shared(caplog) -> None:
    caplog.set_level(logging.INFO, logger="ingest.polite")
    clock = {"t": 0.0}
    limit = AdaptiveConcurrency(
        4, grow_after=5, min_samples=3, what="WADO-RS requests", monotonic=lambda: clock["t"]
    )

    def burst(seconds: float) -> None:
        """Four requests side by side, each bringing 2 instances in ``seconds``."""
        slots = [limit.acquire() for _ in range(limit.limit)]
        clock["t"] += seconds
        for slot in slots:
            limit.release(slot, instances=2)

    for _ in range(3):
        burst(0.04)  # baseline: 4 in flight, 20 ms an instance each: 5 ms of the PACS's time
    assert limit.limit == 4, "four requests sharing the PACS take longer each: not a slowdown"
    burst(1.0)  # 125 ms of the PACS's time an instance: 25x
    assert limit.limit == 2
    assert "concurrent WADO-RS requests 4 -> 2: latency" in caplog.records[-1].getMessage()
    for _ in range(5):
        burst(0.01 * limit.limit)  # the PACS's 5 ms an instance again, however many run: calm
    assert limit.limit == 4 and [change[:2] for change in limit.changes] == [(4, 2), (2, 3), (3, 4)]


@pytest.mark.slow
def test_an_a702_storm_backs_off_and_every_instance_arrives(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ingest.polite")
    study, series = "1.2.826.0.1.3680043.10.994.1", "1.2.826.0.1.3680043.10.994.1.1"
    paths = [
        make_instance(tmp_path / f"{n}.dcm", study_uid=study, series_uid=series, sop_uid=f"{series}.{n}")
        for n in range(1, 9)
    ]
    pacs = GetPacs([pydicom.dcmread(path) for path in paths])
    pacs.out_of_resources = 4
    try:
        cfg = PacsConfig("127.0.0.1", pacs.port, "FLAKYPACS", retries=3, backoff_s=0.05)
        items = [RetrieveItem(study, series, (f"{series}.{n}",), (CR_STORAGE,)) for n in range(1, 9)]
        summary = retrieve(cfg, items, method="get", spool_dir=tmp_path / "spool", workers=4, progress=False)
    finally:
        pacs.server.shutdown()
    assert summary.ok and summary.completed == 8 and len(spooled_uids(tmp_path / "spool")) == 8
    changes = [r.getMessage() for r in caplog.records if r.name == "ingest.polite"]
    assert changes and changes[0].startswith("concurrent C-GET requests 4 -> 2: status 0xA702")

"""DICOM query/retrieve client: C-ECHO, paged C-FIND, and parallel C-MOVE / C-GET into the spool.

* ``find_studies`` pages around a PACS result cap (Orthanc's ``LimitFindResults``): a window that
  comes back at the cap, or that the PACS ends with Cancel/Warning ("more matches exist"), is split
  in halves by date, and a single over-full day by time of day, until every window is under the cap.
* ``retrieve`` runs N worker threads; each holds one association and reuses it for many C-MOVE or
  C-GET requests, reconnecting after an abort. Each item is retried with exponential back-off; what
  was stored before a failure stays in the spool (the spool de-duplicates), and the summary names
  every item that still failed and why. ``processes=P`` runs P child processes of N associations
  each, taking requests from the parent as they free up: receiving is CPU-bound Python under the GIL
  (``ingest.dicom.requestor`` for the C-MOVE and C-GET associations and the C-STOREs a C-GET brings,
  ``ingest.dicom.acceptor`` for the C-MOVE C-STOREs), so one process uses at most one core for it however
  many associations it has. C-ECHO and C-FIND run on pynetdicom.
* ``transport="pynetdicom"`` (``--transport pynetdicom``) runs the C-MOVE and C-GET associations,
  and the C-STOREs a C-GET brings, on pynetdicom instead (for C-MOVE, the ``StorageSCP`` has its
  own ``transport``): the same spool, slower. It is what a site switches to when its PACS vendor's
  implementation does not interoperate with the fast upper layer.
* ``plan_retrieval`` asks the PACS which instances a study has and leaves out those already spooled,
  so a resumed pull transfers only what is missing. Studies not yet spooled at all are retrieved
  whole, many per request (a StudyInstanceUID list): per request Orthanc opens a C-STORE
  association to us, which costs more than moving a small study.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn, Protocol

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from tqdm import tqdm

from ingest.dicom.requestor import (
    REQUEST_SYNTAXES,
    AssociationRejected,
    RequestorAssociation,
    StoreHandler,
    Timeouts,
)
from ingest.dicom.scp import (
    ACCEPTED_TRANSFER_SYNTAXES,
    DEFAULT_TRANSPORT,
    TRANSPORT_HELP,
    TRANSPORTS,
    StorageSCP,
    StoreCounts,
    check_transport,
    present_in_spool,
    remove_stale_parts,
    setup_cli_logging,
    spool_path,
    spooled_uids,
    store_event,
    store_instance,
    tune_connection,
)
from ingest.dicom.upper_layer import ProtocolError
from ingest.polite import AdaptiveConcurrency, Pacer, PullInterrupted

LOGGER = logging.getLogger("ingest.dicom.scu")

# Storage SOP classes offered on C-GET associations when an item does not say what it holds.
RADIOGRAPHY_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
# An association carries at most 128 presentation contexts; one is the C-GET model itself.
_MAX_STORAGE_CONTEXTS = 127
# Study UIDs per C-MOVE/C-GET identifier: 1000 UIDs of up to 64 characters plus separators fit the
# 16-bit length of an explicit VR UI element.
_MAX_LISTED_STUDIES = 1000
_PENDING = (0xFF00, 0xFF01)
# Final statuses after which "more matches exist": Cancel (Orthanc's LimitFindResults) or a Warning.
_FIND_TRUNCATED = (0xFE00, 0xB000)
# Retrieve failures that another attempt cannot fix.
_PERMANENT_RETRIEVE_STATUSES = {
    0xA801: "move destination unknown: register {dest} (host/port of our Storage SCP) at the PACS",
    0xA900: "identifier does not match SOP class",
}
_MOVE_DESTINATION_UNKNOWN = 0xA801
# Day windows are split by time only once a single day exceeds the cap.
_EARLIEST_DATE = dt.date(1, 1, 1)
_LATEST_DATE = dt.date(9999, 12, 31)
_AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


class PacsError(RuntimeError):
    """A PACS operation failed; ``retryable`` says whether another attempt could succeed."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class AssociationError(PacsError):
    """No association could be established (refused, rejected, timed out)."""


def _check_ae_title(name: str, value: str) -> None:
    if not isinstance(value, str) or not _AE_TITLE_PATTERN.match(value) or not value.strip():
        raise ValueError(
            f"{name}={value!r} is not a valid AE title: use 1-16 printable ASCII characters, no backslash"
        )


@dataclass(frozen=True)
class PacsConfig:
    """Where the PACS is and how to talk to it. Timeouts are seconds; ``max_pdu=0`` means unlimited."""

    host: str
    port: int
    called_aet: str
    calling_aet: str = "PEDXRAY"
    move_destination: str | None = None
    acse_timeout: float = 30
    dimse_timeout: float = 120
    network_timeout: float = 60
    max_pdu: int = 65536
    retries: int = 3
    backoff_s: float = 1.0
    # Total seconds for one C-MOVE / C-GET (None: no limit); past it the request is cancelled and retried.
    retrieve_timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.host or not isinstance(self.host, str):
            raise ValueError("host is empty: give the PACS host name or IP address")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"port={self.port!r}: the PACS DICOM port must be an integer in 1..65535")
        _check_ae_title("called_aet", self.called_aet)
        _check_ae_title("calling_aet", self.calling_aet)
        if self.move_destination is not None:
            _check_ae_title("move_destination", self.move_destination)
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name}={value!r}: timeouts are seconds and must be > 0")
        if not isinstance(self.max_pdu, int) or (self.max_pdu != 0 and not 4096 <= self.max_pdu < 2**32):
            raise ValueError(f"max_pdu={self.max_pdu!r}: use 0 (unlimited) or a size in 4096..2**32-1 bytes")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries={self.retries!r}: use 0 (one attempt only) or more")
        if not isinstance(self.backoff_s, int | float) or self.backoff_s < 0:
            raise ValueError(f"backoff_s={self.backoff_s!r}: the first back-off delay must be >= 0 seconds")
        if self.retrieve_timeout is not None and (
            not isinstance(self.retrieve_timeout, int | float) or self.retrieve_timeout <= 0
        ):
            raise ValueError(
                f"retrieve_timeout={self.retrieve_timeout!r}: seconds per C-MOVE/C-GET, > 0 (None: no limit)"
            )

    @classmethod
    def parse(cls, address: str, called_aet: str | None = None, **options) -> PacsConfig:
        """Build a config from ``"HOST:PORT"`` or ``"AET@HOST:PORT"`` (``[::1]:104`` for IPv6)."""
        match = re.fullmatch(
            r"(?:(?P<aet>[^@]+)@)?(?P<host>\[[^\]]+\]|[^:@\[\]]+):(?P<port>\d+)", address.strip()
        )
        if match is None:
            raise ValueError(
                f"PACS address {address!r} is not HOST:PORT or AET@HOST:PORT (e.g. PACS@10.0.0.5:104)"
            )
        aet = called_aet or match["aet"]
        if aet is None:
            raise ValueError(f"no called AE title for {address!r}: pass called_aet= or write AET@HOST:PORT")
        return cls(host=match["host"].strip("[]"), port=int(match["port"]), called_aet=aet, **options)

    def describe(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"


class RetrieveObserver(Protocol):
    """Hooks for metrics (e.g. Prometheus counters); every method must be cheap and thread-safe."""

    def on_found(self, n: int) -> None: ...

    def on_stored(self, nbytes: int) -> None: ...

    def on_failed(self, reason: str) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Associations and retries


def _make_ae(cfg: PacsConfig) -> AE:
    ae = AE(ae_title=cfg.calling_aet)
    ae.acse_timeout = cfg.acse_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    ae.network_timeout = cfg.network_timeout
    ae.connection_timeout = cfg.network_timeout
    ae.maximum_pdu_size = cfg.max_pdu
    return ae


class _ParkingCheckpoint(threading.Event):
    """A drop-in for pynetdicom's ``Association._reactor_checkpoint`` that really parks the reactor.

    ``send_c_*()`` clears the checkpoint and then trusts a flag saying the reactor thread is paused.
    That flag can be stale: the reactor may have been woken by the previous request's ``set()`` and
    not yet run, and ``Event.wait()`` returns once notified even if the flag was cleared since. The
    reactor then takes the next DIMSE response off the queue and drops it ("Received unexpected
    C-FIND service message", pynetdicom issue #875): a C-FIND silently loses a match, a C-GET or
    C-MOVE its final status. Here ``wait()`` returns only while the flag is set, and ``clear()``
    returns once the reactor sits blocked in ``wait()``, so nothing can be taken while a request runs.

    This patches pynetdicom internals: the private ``Association._reactor_checkpoint`` and how
    ``Association._run_reactor`` and ``send_c_*()`` use it, as in pynetdicom 3.0.4, the version
    pyproject.toml pins for that reason. A version bump needs this re-checked against the new
    ``association.py`` (and dropped once pynetdicom fixes issue #875).
    """

    _PARK_TIMEOUT_S = 1.0  # the reactor parks within a loop turn (1 ms); a dead one must not hang us

    def __init__(self) -> None:
        super().__init__()
        self._parked = threading.Condition()
        self._blocked = False

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            return super().wait(timeout)
        with self._parked:
            while not self.is_set():
                self._blocked = True
                self._parked.notify_all()
                self._parked.wait()
            self._blocked = False
        return True

    def set(self) -> None:
        with self._parked:
            super().set()
            self._parked.notify_all()

    def clear(self) -> None:
        with self._parked:
            super().clear()
            self._parked.wait_for(lambda: self._blocked, timeout=self._PARK_TIMEOUT_S)


def _install_parking_checkpoint(event: Event) -> None:
    """EVT_CONN_OPEN handler: runs before the requestor's reactor loop starts, so the swap is safe.

    The patch site of pynetdicom's private ``_reactor_checkpoint`` (see ``_ParkingCheckpoint``): pinned
    pynetdicom==3.0.4; re-check on a version bump."""
    checkpoint = _ParkingCheckpoint()
    checkpoint.set()
    event.assoc._reactor_checkpoint = checkpoint


def _associate(cfg: PacsConfig, ae: AE, **kwargs) -> Association:
    handlers = [
        *kwargs.pop("evt_handlers", ()),
        (evt.EVT_CONN_OPEN, tune_connection),
        (evt.EVT_CONN_OPEN, _install_parking_checkpoint),
    ]
    assoc = ae.associate(
        cfg.host, cfg.port, ae_title=cfg.called_aet, max_pdu=cfg.max_pdu, evt_handlers=handlers, **kwargs
    )
    if assoc.is_established:
        return assoc
    response = assoc.acceptor.primitive if assoc.is_rejected else _unread_rejection(assoc)
    if response is not None:
        detail = f"{response.result_str}, source: {response.source_str}, reason: {response.reason_str}"
        _raise_rejected(cfg, detail, permanent=response.result == 0x01)
    raise AssociationError(
        f"no association with {cfg.describe()}: connection refused, timed out after "
        f"{cfg.network_timeout:g}/{cfg.acse_timeout:g} s or aborted by the peer"
    )


def _unread_rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RJ where pynetdicom reported an abort instead.

    pynetdicom 3.0.4 does so for about 1 in 100 quick rejections: its DUL thread closes the socket on
    the RJ before ACSE checks that the socket is connected, and ACSE then aborts without reading the
    RJ, which stays in the DUL's queue for the user. Reading that queue relies on pynetdicom internals
    (``Association.dul.to_user_queue``) as of the pinned 3.0.4: re-check on a version bump.
    """
    for primitive in list(assoc.dul.to_user_queue.queue):
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            return primitive
    return None


def _raise_rejected(cfg: PacsConfig, detail: str, permanent: bool) -> NoReturn:
    if permanent:  # a configuration problem: retrying will not help
        raise AssociationError(
            f"association rejected by {cfg.describe()} ({detail}); check that the PACS knows calling AE "
            f"{cfg.calling_aet!r} and that {cfg.called_aet!r} is its AE title",
            retryable=False,
        )
    raise AssociationError(f"association rejected by {cfg.describe()} ({detail})")


def _with_retries(cfg: PacsConfig, what: str, attempt: Callable[[int], object]):
    """Run ``attempt(attempt_number)``; on a retryable PacsError wait backoff_s * 2**n and try again.

    After the last attempt the error says what failed, how often, and the last reason; its
    ``__cause__`` is the last attempt's error.
    """
    number = 0
    while True:
        try:
            return attempt(number)
        except PacsError as exc:
            if not exc.retryable or number >= cfg.retries:
                tries = f"{number + 1} attempt{'s' if number else ''}"
                raise PacsError(f"{what} failed after {tries}: {exc}", retryable=False) from exc
            delay = cfg.backoff_s * 2**number
            LOGGER.warning(
                "%s failed (attempt %d of %d): %s; retrying in %.1f s",
                what,
                number + 1,
                cfg.retries + 1,
                exc,
                delay,
            )
            time.sleep(delay)
            number += 1


class _PynetdicomRetrieving:
    """A pynetdicom association that sends C-MOVE and C-GET requests as a ``RequestorAssociation``
    does (the pynetdicom transport): each ``send_c_*`` returns the final ``(status, identifier)``,
    or ``(Dataset(), None)`` with ``lost_reason`` set once the association is gone."""

    def __init__(self, assoc: Association, cfg: PacsConfig) -> None:
        self._assoc = assoc
        self._dimse_timeout = cfg.dimse_timeout
        self._retrieve_timeout = cfg.retrieve_timeout
        self.lost_reason: str | None = None
        self.cancelled = False

    @property
    def is_established(self) -> bool:
        return self._assoc.is_established

    def send_c_move(
        self, identifier: Dataset, move_aet: str, query_model: str, msg_id: int
    ) -> tuple[Dataset, Dataset | None]:
        responses = self._assoc.send_c_move(identifier, move_aet, query_model, msg_id=msg_id)
        return self._final(responses, query_model, msg_id)

    def send_c_get(
        self, identifier: Dataset, query_model: str, msg_id: int
    ) -> tuple[Dataset, Dataset | None]:
        responses = self._assoc.send_c_get(identifier, query_model, msg_id=msg_id)
        return self._final(responses, query_model, msg_id)

    def _cancel(self, query_model: str, msg_id: int) -> None:
        """Timer thread: C-CANCEL the request still running after retrieve_timeout."""
        context_id = next(
            cx.context_id for cx in self._assoc.accepted_contexts if cx.abstract_syntax == query_model
        )
        LOGGER.warning(
            "retrieve %d still running after retrieve_timeout=%g s: sending C-CANCEL",
            msg_id,
            self._retrieve_timeout,
        )
        self.cancelled = True
        self._assoc.send_c_cancel(msg_id, context_id)

    def _final(
        self, responses: Iterator[tuple[Dataset, Dataset | None]], query_model: str, msg_id: int
    ) -> tuple[Dataset, Dataset | None]:
        self.cancelled = False
        if self._retrieve_timeout is None:
            return self._final_status(responses)
        timer = threading.Timer(self._retrieve_timeout, self._cancel, (query_model, msg_id))
        timer.daemon = True
        timer.start()
        try:
            return self._final_status(responses)
        finally:
            timer.cancel()

    def _final_status(
        self, responses: Iterator[tuple[Dataset, Dataset | None]]
    ) -> tuple[Dataset, Dataset | None]:
        final: tuple[Dataset, Dataset | None] | None = None
        for status, identifier in responses:  # to the end: pynetdicom un-parks its reactor there
            if not status:
                self.lost_reason = (
                    "association aborted (by the PACS, or by us after no response within "
                    f"dimse_timeout={self._dimse_timeout:g} s)"
                )
                return Dataset(), None
            if status.Status not in _PENDING:
                final = (status, identifier)
        if final is None:
            self.lost_reason = "the PACS ended the retrieve without a final status"
            self.abort()
            return Dataset(), None
        return final

    def abort(self) -> None:
        self._assoc.abort()

    def release(self) -> None:
        self._assoc.release()


_AnyAssociation = Association | RequestorAssociation | _PynetdicomRetrieving


class _Connection:
    """One association reused for many requests, reopened on demand after an abort or a release.

    ``opener()`` makes a new established association (pynetdicom's for C-ECHO and C-FIND,
    ``ingest.dicom.requestor``'s for C-MOVE and C-GET, or with the pynetdicom transport pynetdicom's
    behind ``_PynetdicomRetrieving``) or raises AssociationError.
    """

    def __init__(self, cfg: PacsConfig, opener: Callable[[], _AnyAssociation]) -> None:
        self.cfg = cfg
        self._opener = opener
        self._assoc: _AnyAssociation | None = None
        self._message_ids = itertools.cycle(range(1, 65536))

    def get(self) -> _AnyAssociation:
        if self._assoc is None or not self._assoc.is_established:
            self._assoc = self._opener()
        return self._assoc

    def next_message_id(self) -> int:
        return next(self._message_ids)

    def drop(self) -> None:
        """Abort after an error that may have left the association out of step (e.g. a half-read reply)."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.abort()
        self._assoc = None

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _status_text(status: Dataset) -> str:
    comment = status.get("ErrorComment")
    return f"0x{status.Status:04X}" + (f" ({comment})" if comment else "")


def echo(cfg: PacsConfig) -> None:
    """C-ECHO the PACS; raise PacsError saying what failed if it does not answer with Success."""
    ae = _make_ae(cfg)
    ae.add_requested_context(Verification)

    def attempt(_number: int) -> None:
        with _Connection(cfg, functools.partial(_associate, cfg, ae)) as conn:
            status = conn.get().send_c_echo(msg_id=conn.next_message_id())
            if not status:
                conn.drop()
                raise PacsError(f"no C-ECHO response within dimse_timeout={cfg.dimse_timeout:g} s")
            if status.Status != 0x0000:
                raise PacsError(f"C-ECHO answered with status {_status_text(status)}")

    _with_retries(cfg, f"C-ECHO {cfg.calling_aet} -> {cfg.describe()}", attempt)
    LOGGER.info("C-ECHO %s -> %s ok", cfg.calling_aet, cfg.describe())


# ---------------------------------------------------------------------------------------------------
# C-FIND


STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "PatientID",
    "StudyDescription",
    "AccessionNumber",
)
SERIES_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber")
_INTEGER_KEYS = {
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "SeriesNumber",
    "InstanceNumber",
}


def _value(identifier: Dataset, keyword: str):
    """A plain Python value: str, tuple[str, ...] for multi-valued keys, int or None for counts."""
    value = identifier.get(keyword)
    if keyword == "ModalitiesInStudy":
        if value is None or value == "":
            return ()
        return tuple(str(v) for v in value) if isinstance(value, MultiValue) else (str(value),)
    if keyword in _INTEGER_KEYS:
        try:
            return int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _query(level: str, keys: Sequence[str], **filters) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword in keys:
        setattr(query, keyword, filters.get(keyword, ""))
    for keyword, value in filters.items():
        if keyword not in keys:
            setattr(query, keyword, value)
    return query


def _find_once(conn: _Connection, query: Dataset, keys: Sequence[str]) -> tuple[list[dict], bool]:
    """One C-FIND; returns (matches, truncated) where truncated means the PACS said more matches exist."""
    matches: list[dict] = []
    assoc = conn.get()
    for status, identifier in assoc.send_c_find(
        query, StudyRootQueryRetrieveInformationModelFind, msg_id=conn.next_message_id()
    ):
        if not status:
            conn.drop()
            raise PacsError(
                f"C-FIND got no response within dimse_timeout={conn.cfg.dimse_timeout:g} s "
                "or the association was aborted"
            )
        code = status.Status
        if code in _PENDING:
            if identifier is not None:
                matches.append({keyword: _value(identifier, keyword) for keyword in keys})
            continue
        if code == 0x0000:
            return matches, False
        if code in _FIND_TRUNCATED:
            return matches, True
        raise PacsError(f"C-FIND failed with status {_status_text(status)}")
    conn.drop()
    raise PacsError("C-FIND ended without a final status")


def _find(conn: _Connection, query: Dataset, keys: Sequence[str], what: str) -> tuple[list[dict], bool]:
    return _with_retries(conn.cfg, what, lambda _n: _find_once(conn, query, keys))


def _find_connection(cfg: PacsConfig) -> _Connection:
    ae = _make_ae(cfg)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return _Connection(cfg, functools.partial(_associate, cfg, ae))


def _as_date(value: dt.date | str | None, name: str) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    text = str(value).strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"{name}={value!r} is not a date: use YYYY-MM-DD, YYYYMMDD or a datetime.date")


def _dicom_date(value: dt.date | None) -> str:
    # strftime("%Y") does not zero-pad years before 1000 on glibc; DA needs 8 digits.
    return "" if value is None else f"{value.year:04d}{value.month:02d}{value.day:02d}"


@dataclass(frozen=True)
class StudyWindow:
    """A study-date window, narrowed to a time-of-day range (seconds) once it is a single day."""

    first: dt.date | None
    last: dt.date | None
    seconds: tuple[int, int] | None = None

    def date_filter(self) -> str:
        if self.first is None and self.last is None:
            return ""
        if self.first == self.last:
            return _dicom_date(self.first)
        return f"{_dicom_date(self.first)}-{_dicom_date(self.last)}"

    def time_filter(self) -> str:
        if self.seconds is None:
            return ""
        start, end = (f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}" for s in self.seconds)
        return f"{start}-{end}"

    def split(self) -> list[StudyWindow]:
        """Two halves in chronological order; [] when a single second cannot be split further."""
        first = self.first or _EARLIEST_DATE
        last = self.last or _LATEST_DATE
        if first < last:
            middle = first + (last - first) // 2
            return [StudyWindow(first, middle), StudyWindow(middle + dt.timedelta(days=1), last)]
        start, end = self.seconds or (0, 86399)
        if start == end:
            return []
        middle = (start + end) // 2
        return [StudyWindow(first, last, (start, middle)), StudyWindow(first, last, (middle + 1, end))]

    def describe(self) -> str:
        text = self.date_filter() or "any date"
        return f"{text} {self.time_filter()}".strip()


def find_studies(
    cfg: PacsConfig,
    *,
    date_range: tuple[dt.date | str | None, dt.date | str | None] | None = None,
    modalities: Sequence[str] | None = ("CR", "DX"),
    page_limit: int | None = None,
) -> Iterator[dict]:
    """Yield each matching study once, as a dict keyed by STUDY_KEYS.

    ``date_range`` is inclusive; either end may be None (open). ``modalities`` filters on
    ModalitiesInStudy (None or () = any). ``page_limit`` is the PACS's result cap if known: a window
    returning that many matches is split even when the PACS does not say that more exist.

    Some PACSs (Orthanc 1.10) cut a ModalitiesInStudy query at their cap with a plain Success, so
    with no ``page_limit`` the first query goes without that filter: when the PACS says it was cut,
    its length is the cap used from then on; when it was not, it already holds every study.
    """
    with _find_connection(cfg) as conn:

        def search(window: StudyWindow, modalities_filter: str) -> tuple[list[dict], bool]:
            query = _query(
                "STUDY",
                STUDY_KEYS,
                StudyDate=window.date_filter(),
                StudyTime=window.time_filter(),
                ModalitiesInStudy=modalities_filter,
            )
            what = f"C-FIND studies {window.describe()} on {cfg.describe()}"
            return _find(conn, query, STUDY_KEYS, what)

        yield from search_by_date_windows(
            search,
            date_range=date_range,
            modalities=modalities,
            page_limit=page_limit,
            probe_without_modalities=page_limit is None,
        )


def search_by_date_windows(
    search: Callable[[StudyWindow, str], tuple[list[dict], bool]],
    *,
    date_range: tuple[dt.date | str | None, dt.date | str | None] | None = None,
    modalities: Sequence[str] | None = ("CR", "DX"),
    page_limit: int | None = None,
    probe_without_modalities: bool = False,
) -> Iterator[dict]:
    """Study search around a result cap, whatever the protocol: ``search(window, modalities_filter)``
    runs one query (C-FIND, QIDO-RS) and returns (matches keyed by STUDY_KEYS, truncated).

    A window that comes back at the cap, or truncated ("more matches exist"), is split in halves by
    date, and a single over-full day by time of day, until every window is under the cap.
    ``probe_without_modalities`` sends the first query without the ModalitiesInStudy filter (see
    ``find_studies``); matches of other modalities are dropped here.
    """
    if page_limit is not None and page_limit < 1:
        raise ValueError(f"page_limit={page_limit!r}: use None (no known cap) or the PACS's cap, >= 1")
    if isinstance(modalities, str):
        raise ValueError(f"modalities={modalities!r}: pass a sequence such as ('CR', 'DX')")
    first, last = date_range if date_range is not None else (None, None)
    first, last = _as_date(first, "date_range[0]"), _as_date(last, "date_range[1]")
    if first and last and first > last:
        raise ValueError(f"date_range starts after it ends: {first} > {last}")
    wanted_modalities = tuple(modalities or ())
    cap = page_limit
    probe = probe_without_modalities
    seen: set[str] = set()
    windows = [StudyWindow(first, last)]
    while windows:
        window = windows.pop()
        matches, truncated = search(window, "" if probe else "\\".join(wanted_modalities))
        probe = False
        if truncated and matches:
            cap = len(matches) if cap is None else min(cap, len(matches))
        if truncated or (cap is not None and len(matches) >= cap):
            halves = window.split()
            if halves:
                if window.first is None and window.last is None:
                    LOGGER.warning(
                        "result cap hit without a date bound: studies without a StudyDate "
                        "cannot be reached by date windows and are skipped"
                    )
                if window.first is not None and window.first == window.last and window.seconds is None:
                    LOGGER.warning(
                        "over %d studies on %s: splitting by StudyTime (studies without "
                        "a StudyTime on that day are not matched)",
                        len(matches),
                        window.first,
                    )
                LOGGER.debug("%s: %d matches at the cap, splitting", window.describe(), len(matches))
                windows.extend(reversed(halves))
                continue
            if truncated:
                raise PacsError(
                    f"more studies than the PACS returns per query in the single second "
                    f"{window.describe()}: raise the PACS's result cap (Orthanc: LimitFindResults)",
                    retryable=False,
                )
            LOGGER.warning(
                "%d studies in the single second %s reach the result cap %d: some may be missing",
                len(matches),
                window.describe(),
                cap,
            )
        for study in matches:
            uid = study["StudyInstanceUID"]
            if not uid or uid in seen:
                continue
            if (
                wanted_modalities
                and study["ModalitiesInStudy"]
                and not (set(study["ModalitiesInStudy"]) & set(wanted_modalities))
            ):
                continue  # the PACS ignored the optional ModalitiesInStudy filter, or this was the probe
            seen.add(uid)
            yield study


def _check_uid(name: str, value: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) or len(value) > 64:
        raise ValueError(f"{name}={value!r} is not a DICOM UID (digits and dots, at most 64 characters)")


def _find_series(conn: _Connection, study_uid: str) -> list[dict]:
    query = _query("SERIES", SERIES_KEYS, StudyInstanceUID=study_uid)
    what = f"C-FIND series of study {study_uid} on {conn.cfg.describe()}"
    matches, truncated = _find(conn, query, SERIES_KEYS, what)
    if truncated:
        raise PacsError(f"study {study_uid} has more series than the PACS returns per query", retryable=False)
    return matches


def _find_instances(conn: _Connection, study_uid: str, series_uid: str) -> list[dict]:
    query = _query("IMAGE", INSTANCE_KEYS, StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
    what = f"C-FIND instances of series {series_uid} on {conn.cfg.describe()}"
    matches, truncated = _find(conn, query, INSTANCE_KEYS, what)
    if truncated:
        raise PacsError(
            f"series {series_uid} has more instances than the PACS returns per query: raise its cap "
            "(Orthanc: LimitFindInstances)",
            retryable=False,
        )
    return matches


def find_series(cfg: PacsConfig, study_uid: str) -> list[dict]:
    """The series of one study, as dicts keyed by SERIES_KEYS."""
    _check_uid("study_uid", study_uid)
    with _find_connection(cfg) as conn:
        return _find_series(conn, study_uid)


def find_instances(cfg: PacsConfig, study_uid: str, series_uid: str | None = None) -> list[dict]:
    """The instances of one series, or of every series of the study, as dicts keyed by INSTANCE_KEYS.

    The study root model requires the series UID at image level, so a study is queried per series.
    """
    _check_uid("study_uid", study_uid)
    if series_uid is not None:
        _check_uid("series_uid", series_uid)
    with _find_connection(cfg) as conn:
        series_uids = (
            [series_uid] if series_uid else [s["SeriesInstanceUID"] for s in _find_series(conn, study_uid)]
        )
        return [match for uid in series_uids for match in _find_instances(conn, study_uid, uid)]


# ---------------------------------------------------------------------------------------------------
# Retrieval


@dataclass(frozen=True)
class RetrieveItem:
    """What to retrieve: a study, a series, or listed instances of one series.

    * IMAGE level: ``series_uid`` and the ``sop_instance_uids`` to fetch.
    * SERIES level: ``series_uid`` alone.
    * STUDY level: no ``series_uid``. ``sop_instance_uids`` may list the instances the study holds
      (from C-FIND); the whole study is requested, and the spool is checked against that list to
      count, retry and resume exactly as for an IMAGE-level item. Such items are what ``retrieve``
      sends several of in one request (a StudyInstanceUID list).

    ``sop_class_uids`` lets a C-GET association offer exactly the storage classes the item holds.
    """

    study_uid: str
    series_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()
    sop_class_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_uid("study_uid", self.study_uid)
        if self.series_uid is not None:
            _check_uid("series_uid", self.series_uid)
        for uid in (*self.sop_instance_uids, *self.sop_class_uids):
            _check_uid("RetrieveItem uid", uid)

    @property
    def level(self) -> Literal["STUDY", "SERIES", "IMAGE"]:
        if self.series_uid is None:
            return "STUDY"
        return "IMAGE" if self.sop_instance_uids else "SERIES"

    def identifier(self) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = self.level
        query.StudyInstanceUID = self.study_uid
        if self.series_uid:
            query.SeriesInstanceUID = self.series_uid
        if self.level == "IMAGE":
            query.SOPInstanceUID = list(self.sop_instance_uids)
        return query

    def describe(self) -> str:
        if self.level == "IMAGE":
            return f"{len(self.sop_instance_uids)} instance(s) of series {self.series_uid}"
        if self.level == "SERIES":
            return f"series {self.series_uid}"
        expected = f" ({len(self.sop_instance_uids)} instance(s))" if self.sop_instance_uids else ""
        return f"study {self.study_uid}{expected}"


def _study_list_identifier(items: Sequence[RetrieveItem]) -> Dataset:
    """One STUDY-level identifier naming every study of ``items`` (a backslash-separated UID list)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = [item.study_uid for item in items]
    return query


def _lists_studies(item: RetrieveItem) -> bool:
    """Whether ``item`` may share a request with other studies: whole study, expected instances known."""
    return item.level == "STUDY" and bool(item.sop_instance_uids)


@dataclass(frozen=True)
class RetrieveFailure:
    item: RetrieveItem
    reason: str


@dataclass
class RetrieveSummary:
    """Instance counts for one ``retrieve`` run.

    ``requested`` = instances listed in items plus, for study/series items, the PACS's sub-operation
    total. ``failed`` counts instances known to be missing; ``failures`` lists every item that did not
    complete (an item whose association died may have no instance count).
    """

    requested: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    already_present: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: list[RetrieveFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.failed == 0

    def add(self, other: RetrieveSummary) -> None:
        """Count ``other`` (a later retrieve of the same pull) in."""
        for name in ("requested", "completed", "failed", "warning", "already_present", "bytes", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.extend(other.failures)

    @property
    def images_per_s(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"requested {self.requested}, completed {self.completed}, failed {self.failed}, "
            f"warning {self.warning}, already present {self.already_present}, "
            f"{self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s, "
            f"{self.megabytes_per_s:.1f} MB/s), {len(self.failures)} item(s) failed"
        )


@dataclass
class _ItemOutcome:
    item: RetrieveItem
    requested: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    error: str | None = None


def storage_contexts_for_get(sop_classes: Iterable[str]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs for a C-GET association, one context each.

    A PACS sends a C-GET sub-operation only on a context whose transfer syntax it can produce, and
    many cannot transcode a lossy or compressed instance: a context per stored syntax lets it send
    the instance as stored. With many classes, fewer syntaxes per class fit in 127 contexts; the
    syntaxes are in ACCEPTED_TRANSFER_SYNTAXES order, most common first.
    """
    classes = list(dict.fromkeys(sop_classes))
    if not classes:
        raise ValueError("no storage SOP classes to offer on the C-GET association")
    if len(classes) > _MAX_STORAGE_CONTEXTS:
        raise ValueError(
            f"{len(classes)} storage SOP classes exceed the {_MAX_STORAGE_CONTEXTS} contexts of one "
            "association: retrieve them in several runs grouped by SOP class"
        )
    per_class = min(len(ACCEPTED_TRANSFER_SYNTAXES), _MAX_STORAGE_CONTEXTS // len(classes))
    if per_class < len(ACCEPTED_TRANSFER_SYNTAXES):
        LOGGER.info(
            "C-GET offers %d transfer syntaxes for each of %d SOP classes; the PACS transcodes or "
            "fails instances stored in another syntax",
            per_class,
            len(classes),
        )
    return [(sop_class, syntax) for sop_class in classes for syntax in ACCEPTED_TRANSFER_SYNTAXES[:per_class]]


class _Retriever:
    """Shared state of one ``retrieve`` run; each worker thread calls ``work`` with its own association."""

    def __init__(self, cfg, method, destination, spool_dir, counts, opener, observer, bar, workers=1):
        self.cfg = cfg
        self.method = method
        self.destination = destination
        self.spool_dir = spool_dir
        self.counts = counts
        self.opener = opener
        self.observer = observer
        self.bar = bar
        self.outcomes: list[_ItemOutcome] = []
        self._lock = threading.Lock()
        self._unreachable: str | None = None
        self._lists_refused = False
        self.request_warnings = 0  # from UID-list requests: the PACS counts them per request, not study
        # Fewer requests at once while the PACS answers A7xx ("out of resources"); see ingest.polite.
        self.concurrency = AdaptiveConcurrency(workers, what=f"C-{method.upper()} requests")

    def work(self, next_batch: Callable[[], list[RetrieveItem] | None]) -> None:
        """Retrieve batches from ``next_batch()`` over one association until it returns None."""
        with _Connection(self.cfg, self.opener) as conn:
            while True:
                try:
                    batch = next_batch()
                except PullInterrupted:  # Ctrl-C while the pacer held this thread: start nothing more
                    return
                if batch is None:
                    return
                remaining = self._retrieve_study_list(conn, batch) if len(batch) > 1 else batch
                for item in remaining:
                    self._record(self._retrieve_with_retries(conn, item))

    def _record(self, outcome: _ItemOutcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)
            self.bar.update(1)
        if outcome.error is not None and self.observer is not None:
            self.observer.on_failed(outcome.error)

    def _missing(self, item: RetrieveItem) -> tuple[str, ...]:
        present = present_in_spool(self.spool_dir, item.sop_instance_uids)
        return tuple(uid for uid in item.sop_instance_uids if uid not in present)

    def _retrieve_study_list(self, conn: _Connection, batch: list[RetrieveItem]) -> list[RetrieveItem]:
        """One request for every study of ``batch``; returns the items still incomplete after it.

        Those are then retrieved one per request with the usual retries. A PACS that answers a UID
        list without sending anything does not understand lists: from then on this run sends one
        study per request.
        """
        if self._unreachable is not None or self._lists_refused:
            return batch
        what = f"C-{self.method.upper()} of {len(batch)} studies from {self.cfg.describe()}"
        status = None
        try:
            status, identifier = self._send(conn, _study_list_identifier(batch))
            with self._lock:
                self.request_warnings += int(status.get("NumberOfWarningSuboperations") or 0)
            self._check_final(status, identifier)
            error = None
        except AssociationError:
            return batch  # the per-item retries reconnect, or find the PACS unreachable
        except PacsError as exc:
            error = exc
        incomplete: list[RetrieveItem] = []
        arrived = 0
        for item in batch:
            missing = self._missing(item)
            arrived += len(item.sop_instance_uids) - len(missing)
            if missing:
                incomplete.append(dataclasses.replace(item, sop_instance_uids=missing))
            else:
                self._record(_ItemOutcome(item, len(item.sop_instance_uids), len(item.sop_instance_uids)))
        if not incomplete:
            return []
        if status is not None and status.Status == _MOVE_DESTINATION_UNKNOWN:
            for item in incomplete:  # sending the studies one by one cannot help
                failed = len(item.sop_instance_uids)
                self._record(_ItemOutcome(item, failed, failed=failed, error=f"{what} failed: {error}"))
            return []
        if status is not None and arrived == 0:
            with self._lock:
                if not self._lists_refused:
                    LOGGER.warning(
                        "%s answered a C-%s of %d studies in one request with %s and sent none of them: "
                        "it does not take StudyInstanceUID lists, so this run sends one study per request "
                        "(max_studies_per_request=1, --studies-per-request 1, skips the try)",
                        self.cfg.describe(),
                        self.method.upper(),
                        len(batch),
                        error or "success",
                    )
                self._lists_refused = True
        else:
            LOGGER.info("%s: %d incomplete (%s), retrying them one per request", what, len(incomplete), error)
        return incomplete

    def _retrieve_with_retries(self, conn: _Connection, item: RetrieveItem) -> _ItemOutcome:
        outcome = _ItemOutcome(item, requested=len(item.sop_instance_uids))
        if self._unreachable is not None:
            outcome.error = f"not attempted: {self._unreachable}"
            outcome.failed = outcome.requested
            return outcome
        pending = item
        what = f"C-{self.method.upper()} {item.describe()} from {self.cfg.describe()}"

        def attempt(_number: int) -> None:
            nonlocal pending
            if item.sop_instance_uids:
                # Retry only what is still missing: earlier attempts' instances are safe in the spool.
                missing = self._missing(pending)
                if not missing:
                    return
                pending = dataclasses.replace(item, sop_instance_uids=missing)
            self._retrieve_once(conn, pending, outcome)

        try:
            _with_retries(self.cfg, what, attempt)
        except PacsError as exc:
            outcome.error = str(exc)
            if isinstance(exc.__cause__, AssociationError):
                # Every back-off is spent: fail the remaining items at once instead of waiting for each.
                self._unreachable = f"no association with {self.cfg.describe()} ({exc.__cause__})"
        if item.sop_instance_uids:
            # The spool, not the PACS's counters, says what arrived.
            outcome.completed = outcome.requested - len(self._missing(item))
            outcome.failed = outcome.requested - outcome.completed
            if outcome.failed == 0:
                outcome.error = None
        return outcome

    def _send(self, conn: _Connection, identifier: Dataset) -> tuple[Dataset, Dataset | None]:
        """One C-MOVE or C-GET; returns the final (status, identifier), raises PacsError on an abort."""
        assoc = conn.get()
        slot = self.concurrency.acquire()
        overloaded = None
        status = Dataset()
        try:
            if self.method == "move":
                status, answer = assoc.send_c_move(
                    identifier,
                    self.destination,
                    StudyRootQueryRetrieveInformationModelMove,
                    msg_id=conn.next_message_id(),
                )
            else:
                status, answer = assoc.send_c_get(
                    identifier, StudyRootQueryRetrieveInformationModelGet, msg_id=conn.next_message_id()
                )
            if status and status.Status >> 8 == 0xA7:
                overloaded = f"status {_status_text(status)} from {self.cfg.describe()}"
        finally:
            completed = int(status.get("NumberOfCompletedSuboperations") or 0) if status else 0
            self.concurrency.release(slot, overloaded, completed)
        if not status:
            conn.drop()
            raise PacsError(f"association lost: {assoc.lost_reason}")
        if assoc.cancelled:
            # A stalled retrieve: what arrived is in the spool, and the retry asks for the rest.
            completed = int(status.get("NumberOfCompletedSuboperations") or 0)
            raise PacsError(
                f"no final answer within retrieve_timeout={self.cfg.retrieve_timeout:g} s: cancelled "
                f"(C-CANCEL) after {completed} sub-operation(s)"
            )
        return status, answer

    def _check_final(self, status: Dataset, identifier: Dataset | None) -> None:
        """Raise PacsError unless the final status says every sub-operation succeeded (or warned)."""
        completed = int(status.get("NumberOfCompletedSuboperations") or 0)
        failed = int(status.get("NumberOfFailedSuboperations") or 0)
        warning = int(status.get("NumberOfWarningSuboperations") or 0)
        code = status.Status
        if code in _PERMANENT_RETRIEVE_STATUSES:
            reason = _PERMANENT_RETRIEVE_STATUSES[code].format(dest=self.destination)
            raise PacsError(f"status {_status_text(status)}: {reason}", retryable=False)
        if failed or code not in (0x0000, 0xB000):
            failed_uids = identifier.get("FailedSOPInstanceUIDList") if identifier is not None else None
            listed = f"; failed instances: {failed_uids}" if failed_uids else ""
            raise PacsError(
                f"status {_status_text(status)}, {completed} sub-operation(s) completed, {failed} failed, "
                f"{warning} warning{listed}"
            )

    def _retrieve_once(self, conn: _Connection, item: RetrieveItem, outcome: _ItemOutcome) -> None:
        status, identifier = self._send(conn, item.identifier())
        completed = int(status.get("NumberOfCompletedSuboperations") or 0)
        failed = int(status.get("NumberOfFailedSuboperations") or 0)
        warning = int(status.get("NumberOfWarningSuboperations") or 0)
        if not item.sop_instance_uids:
            # Study/series items are re-sent whole, so the last attempt's counters are the outcome.
            outcome.requested, outcome.completed = completed + failed + warning, completed
            outcome.failed, outcome.warning = failed, warning
        else:
            outcome.warning += warning
        self._check_final(status, identifier)


def _requests(
    items: list[RetrieveItem], workers: int, max_studies_per_request: int
) -> list[list[RetrieveItem]]:
    """Group whole-study items into UID-list requests, at least ``workers`` of them where there are
    enough studies so every association gets work; every other item is a request of its own."""
    listable = [item for item in items if _lists_studies(item)]
    per_request = min(max_studies_per_request, -(-len(listable) // workers)) if listable else 1
    batches = [listable[start : start + per_request] for start in range(0, len(listable), per_request)]
    return batches + [[item] for item in items if not _lists_studies(item)]


def retrieve(
    cfg: PacsConfig,
    items: Iterable[RetrieveItem],
    *,
    method: Literal["move", "get"] = "move",
    scp: StorageSCP | None = None,
    spool_dir: str | Path | None = None,
    workers: int = 4,
    processes: int = 1,
    progress: bool = True,
    observer: RetrieveObserver | None = None,
    max_studies_per_request: int = 50,
    fsync: bool = True,
    transport: str = DEFAULT_TRANSPORT,
    pacer: Pacer | None = None,
    clean_spool: bool = True,
) -> RetrieveSummary:
    """Retrieve ``items`` by C-MOVE (into the running ``scp``) or C-GET (into ``spool_dir``).

    ``fsync=False`` (C-GET; for C-MOVE it is the ``scp``'s setting) trades crash safety for speed,
    see ``ingest.dicom.scp.write_spool_file``. ``transport`` runs the C-MOVE / C-GET associations
    (and a C-GET's C-STOREs) on this project's upper layer (``"fast"``) or on pynetdicom
    (``"pynetdicom"``, for a PACS that does not interoperate with the fast one); a C-MOVE's
    C-STOREs arrive however the ``scp`` was started.

    ``workers`` threads each hold one association and reuse it for many requests. Instances listed
    in an item that are already in the spool are skipped and counted as ``already_present``.

    ``processes > 1`` runs ``workers`` associations in each of that many child processes, which take
    requests from one shared queue: PDUs are decoded in Python, so one process tops out at one core
    whatever its number of associations. For C-MOVE each child listens on the ``scp``'s
    port too (the ``scp`` must be started with ``share_port=True``), and the kernel spreads the
    PACS's C-STORE associations over them. The spool is shared: a duplicate is still stored once,
    and a child that dies leaves its instances missing, to be fetched by the next run. Children come
    from a fork server (POSIX); where there is none they are spawned, and the calling script needs
    the usual ``if __name__ == "__main__":`` guard.

    Whole-study items with their instances listed (what ``plan_retrieval`` makes) go up to
    ``max_studies_per_request`` to one request as a StudyInstanceUID list: Orthanc, for one, opens a
    C-STORE association to us per C-MOVE, which costs more than a small study's transfer. Studies a
    list request leaves incomplete are retried one per request; a PACS that sends nothing for a
    list gets one study per request for the rest of the run (of that process). ``max_studies_per_request=1``
    never sends a list.

    ``pacer`` (``ingest.polite``) is asked before each request is handed to an association: outside
    its window no request starts, and requests are spaced to its instance rate. ``clean_spool=False``
    skips removing a killed process's temp files from a C-GET spool (a caller retrieving chunk after
    chunk does it once).
    """
    if method not in ("move", "get"):
        raise ValueError(f"method={method!r}: use 'move' (PACS pushes to our Storage SCP) or 'get'")
    check_transport(transport)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: use 1 or more parallel associations")
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes={processes!r}: use 1 (this process) or more retrieving processes")
    if (
        not isinstance(max_studies_per_request, int)
        or not 1 <= max_studies_per_request <= _MAX_LISTED_STUDIES
    ):
        raise ValueError(
            f"max_studies_per_request={max_studies_per_request!r}: use 1 (no UID lists) to "
            f"{_MAX_LISTED_STUDIES} (what fits one identifier element)"
        )
    items = list(items)
    if method == "move":
        if scp is None or not scp.running:
            raise ValueError("method='move' needs a started StorageSCP (scp=...) for the PACS to send to")
        if processes > 1 and not scp.share_port:
            raise ValueError(
                "processes > 1 with method='move' needs StorageSCP(share_port=True): every process "
                "listens on the port the PACS knows for our AE title"
            )
        destination = cfg.move_destination or scp.ae_title
        spool = scp.spool_dir
        counts = scp.counts
    else:
        if spool_dir is None and scp is None:
            raise ValueError("method='get' needs spool_dir= (where received instances are written)")
        destination = None
        spool = Path(spool_dir) if spool_dir is not None else scp.spool_dir
        spool.mkdir(parents=True, exist_ok=True)
        if clean_spool:
            remove_stale_parts(spool)  # StorageSCP.start() does it for C-MOVE
        counts = StoreCounts()
    sop_classes = _get_sop_classes(items) if method == "get" else ()

    summary = RetrieveSummary()
    started = time.monotonic()
    wanted: list[RetrieveItem] = []
    for item in items:
        if item.sop_instance_uids:
            # One stat per listed instance: a pull retrieving chunk after chunk never lists the spool.
            present = present_in_spool(spool, item.sop_instance_uids)
            missing = tuple(uid for uid in item.sop_instance_uids if uid not in present)
            summary.already_present += len(item.sop_instance_uids) - len(missing)
            summary.requested += len(item.sop_instance_uids) - len(missing)
            if not missing:
                continue
            item = dataclasses.replace(item, sop_instance_uids=missing)
        wanted.append(item)
    requests = _requests(wanted, workers * processes, max_studies_per_request)
    processes = min(processes, len(requests)) or 1
    n_workers = min(workers, len(requests)) if processes == 1 else workers

    bytes_before = counts.snapshot()["bytes"]
    if observer is not None:
        counts.subscribe(observer.on_stored)
    LOGGER.info(
        "retrieving %d item(s) in %d request(s) by C-%s from %s with %d %s association(s)%s%s",
        len(wanted),
        len(requests),
        method.upper(),
        cfg.describe(),
        n_workers * processes,
        transport,
        f" in {processes} processes" if processes > 1 else "",
        f" into {destination}" if destination else "",
    )
    try:
        with tqdm(total=len(wanted), unit="item", desc=f"C-{method.upper()}", disable=not progress) as bar:
            if processes == 1:
                opener = _retrieve_opener(cfg, method, sop_classes, spool, counts, fsync, transport)
                retriever = _Retriever(
                    cfg, method, destination, spool, counts, opener, observer, bar, max(n_workers, 1)
                )
                work: queue.Queue[list[RetrieveItem]] = queue.Queue()
                for batch in requests:
                    work.put(batch)
                _run_threads(retriever, n_workers, lambda: _paced(pacer, _next_or_none(work)))
                outcomes, request_warnings, child_bytes = retriever.outcomes, retriever.request_warnings, 0
            else:
                job = _ChildJob(
                    cfg=cfg,
                    method=method,
                    destination=destination,
                    spool=spool,
                    scp_settings=scp.settings() if method == "move" else None,
                    sop_classes=tuple(sop_classes),
                    workers=workers,
                    fsync=fsync,
                    transport=transport,
                )
                outcomes, request_warnings, child_bytes = _retrieve_in_processes(
                    job, requests, processes, observer, bar, pacer
                )
    finally:
        if observer is not None:
            counts.unsubscribe(observer.on_stored)

    for outcome in outcomes:
        summary.requested += outcome.requested
        summary.completed += outcome.completed
        summary.failed += outcome.failed
        summary.warning += outcome.warning
        if outcome.error is not None:
            summary.failures.append(RetrieveFailure(outcome.item, outcome.error))
    summary.warning += request_warnings
    summary.bytes = counts.snapshot()["bytes"] - bytes_before + child_bytes
    summary.seconds = time.monotonic() - started
    log = LOGGER.warning if summary.failures else LOGGER.info
    log("C-%s from %s: %s", method.upper(), cfg.describe(), summary)
    for failure in summary.failures:
        LOGGER.warning("failed: %s: %s", failure.item.describe(), failure.reason)
    return summary


def _get_sop_classes(items: Sequence[RetrieveItem]) -> tuple[str, ...]:
    """Storage classes a C-GET association offers: those the items hold, plus the radiography ones
    where an item does not say."""
    known_classes = [uid for item in items for uid in item.sop_class_uids]
    needs_defaults = any(not item.sop_class_uids for item in items)
    defaults = RADIOGRAPHY_SOP_CLASSES if needs_defaults or not known_classes else ()
    return tuple(dict.fromkeys([*known_classes, *defaults]))


def _retrieve_opener(
    cfg: PacsConfig,
    method: str,
    sop_classes: Sequence[str],
    spool: Path,
    counts: StoreCounts,
    fsync: bool = True,
    transport: str = DEFAULT_TRANSPORT,
) -> Callable[[], RequestorAssociation | _PynetdicomRetrieving]:
    """What opens a retrieving association (C-GET: one that also stores, into ``spool``)."""
    if method == "move":
        model = StudyRootQueryRetrieveInformationModelMove
        return functools.partial(_open_retrieving, cfg, model, (), None, transport)
    on_store = functools.partial(store_instance, spool, counts, fsync=fsync)
    get_model = StudyRootQueryRetrieveInformationModelGet
    return functools.partial(_open_retrieving, cfg, get_model, sop_classes, on_store, transport)


def _open_retrieving(
    cfg: PacsConfig,
    query_model: UID,
    storage_classes: Sequence[str],
    on_store: StoreHandler | None,
    transport: str = DEFAULT_TRANSPORT,
) -> RequestorAssociation | _PynetdicomRetrieving:
    """An association for C-MOVE or C-GET requests (with ``storage_classes``, one that takes the
    SCP role for them and stores what arrives through ``on_store``) on ``transport``."""
    if transport == "pynetdicom":
        return _open_pynetdicom_retrieving(cfg, query_model, storage_classes, on_store)
    contexts = [(query_model, REQUEST_SYNTAXES)]
    if storage_classes:
        contexts += [(sop_class, [syntax]) for sop_class, syntax in storage_contexts_for_get(storage_classes)]
    try:
        assoc = RequestorAssociation.open(
            cfg.host,
            cfg.port,
            calling_aet=cfg.calling_aet,
            called_aet=cfg.called_aet,
            contexts=contexts,
            max_pdu=cfg.max_pdu,
            timeouts=Timeouts(
                connect=cfg.network_timeout,
                acse=cfg.acse_timeout,
                dimse=cfg.dimse_timeout,
                retrieve=cfg.retrieve_timeout,
            ),
            scp_role_classes=storage_classes,
            on_store=on_store,
        )
    except AssociationRejected as exc:
        _raise_rejected(cfg, exc.describe(), exc.permanent)
    except (OSError, ProtocolError) as exc:
        raise AssociationError(f"no association with {cfg.describe()}: {exc}") from exc
    if not assoc.accepts(query_model):
        assoc.release()
        _raise_model_refused(cfg, query_model)
    return assoc


def _open_pynetdicom_retrieving(
    cfg: PacsConfig,
    query_model: UID,
    storage_classes: Sequence[str],
    on_store: StoreHandler | None,
) -> _PynetdicomRetrieving:
    """``_open_retrieving`` on pynetdicom: the same contexts and roles; its EVT_C_STORE handler
    stores through ``on_store``."""
    ae = _make_ae(cfg)
    ae.add_requested_context(query_model, list(REQUEST_SYNTAXES))
    options: dict = {}
    if storage_classes:
        for sop_class, syntax in storage_contexts_for_get(storage_classes):
            ae.add_requested_context(sop_class, syntax)
        classes = dict.fromkeys(storage_classes)
        options["ext_neg"] = [build_role(sop_class, scp_role=True) for sop_class in classes]
        options["evt_handlers"] = [(evt.EVT_C_STORE, store_event, [on_store])]
    assoc = _associate(cfg, ae, **options)
    if not any(context.abstract_syntax == query_model for context in assoc.accepted_contexts):
        assoc.release()
        _raise_model_refused(cfg, query_model)
    return _PynetdicomRetrieving(assoc, cfg)


def _raise_model_refused(cfg: PacsConfig, query_model: UID) -> NoReturn:
    raise AssociationError(
        f"{cfg.describe()} accepted the association but not the {query_model.name} context: "
        "it does not serve this retrieve model to our calling AE title",
        retryable=False,
    )


def _paced(pacer: Pacer | None, batch: list[RetrieveItem] | None) -> list[RetrieveItem] | None:
    """``batch``, once ``pacer`` lets a request for its instances start (a study or series item
    without a list counts as one)."""
    if pacer is not None and batch is not None:
        pacer.before_request(sum(len(item.sop_instance_uids) or 1 for item in batch))
    return batch


def _next_or_none(work: queue.Queue) -> list[RetrieveItem] | None:
    try:
        return work.get_nowait()
    except queue.Empty:
        return None


def _run_threads(retriever: _Retriever, n_workers: int, next_batch: Callable[[], list | None]) -> None:
    threads = [
        threading.Thread(target=retriever.work, args=(next_batch,), name=f"retrieve-{n}", daemon=True)
        for n in range(n_workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class _ParentLink:
    """A child process's end of its own pipe to the parent: events out, requests handed in.

    One pipe per child, no queue shared between children: a child killed mid-write can corrupt
    only its own pipe (the parent sees it end), never block its siblings on a shared lock.
    """

    def __init__(self, connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def _send(self, message: tuple) -> None:
        with self._lock:
            self._connection.send(message)

    def next_batch(self) -> list[RetrieveItem] | None:
        with self._lock:
            self._connection.send(("next",))
            return self._connection.recv()

    def wait_for_stop(self) -> None:
        self._connection.recv()

    # RetrieveObserver and progress-bar methods, forwarded to the parent.
    def on_found(self, n: int) -> None:
        pass

    def on_stored(self, nbytes: int) -> None:
        self._send(("stored", nbytes))

    def on_failed(self, reason: str) -> None:
        self._send(("failed", reason))

    def update(self, n: int = 1) -> None:
        self._send(("item", n))

    def done(self, outcomes: list[_ItemOutcome], request_warnings: int) -> None:
        self._send(("done", outcomes, request_warnings))


@dataclass(frozen=True)
class _ChildJob:
    """What every retrieving child process is given (picklable, for spawned children too)."""

    cfg: PacsConfig
    method: str
    destination: str | None
    spool: Path
    scp_settings: dict | None  # C-MOVE: a StorageSCP like the parent's, on its shared port
    sop_classes: tuple[str, ...]
    workers: int
    fsync: bool
    transport: str


def _retrieve_process(job: _ChildJob, connection) -> None:
    """Body of one retrieving child process: ``job.workers`` associations asking the parent for
    requests until it answers None. For C-MOVE it keeps its Storage SCP on the shared port until
    the parent says stop: a sibling's C-MOVE may still be storing through it."""
    link = _ParentLink(connection)
    scp = StorageSCP(**job.scp_settings).start() if job.method == "move" else None
    counts = scp.counts if scp is not None else StoreCounts()
    counts.subscribe(link.on_stored)
    try:
        opener = _retrieve_opener(
            job.cfg, job.method, job.sop_classes, job.spool, counts, job.fsync, job.transport
        )
        retriever = _Retriever(
            job.cfg, job.method, job.destination, job.spool, counts, opener, link, link, job.workers
        )
        _run_threads(retriever, job.workers, link.next_batch)
        link.done(retriever.outcomes, retriever.request_warnings)
        if scp is not None:
            link.wait_for_stop()
    finally:
        if scp is not None:
            scp.stop()


def _process_context() -> multiprocessing.context.BaseContext:
    """Where child processes come from: a fork server that has imported this module, where there is one.

    Not plain fork: this process has threads (an SCP, tqdm), and a lock one of them holds would stay
    locked in the child. Not spawn either, where avoidable: each spawned child imports pydicom and
    pynetdicom again (~0.7 s of CPU); the fork server imports them once and forks ready children.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _retrieve_in_processes(
    job: _ChildJob, requests: list[list[RetrieveItem]], processes: int, observer, bar, pacer=None
) -> tuple[list[_ItemOutcome], int, int]:
    """Run ``requests`` in ``processes`` child processes, handing each request to whichever asks
    first; returns (outcomes, request warnings, bytes the children stored). Items of a child that
    died are judged by the spool: what is there is complete, the rest failed."""
    context = _process_context()
    pending = list(reversed(requests))
    links: dict = {}
    for n in range(processes):
        parent_end, child_end = context.Pipe()
        child = context.Process(
            target=_retrieve_process,
            args=(job, child_end),
            name=f"retrieve-process-{n}",
            daemon=True,
        )
        child.start()
        child_end.close()
        links[parent_end] = child
    outcomes: list[_ItemOutcome] = []
    request_warnings = child_bytes = 0
    done: set = set()
    live = set(links)
    try:
        while live - done:
            for connection in multiprocessing.connection.wait(list(live), timeout=1.0):
                try:
                    kind, *payload = connection.recv()
                except (EOFError, OSError):  # the child ended (or was killed)
                    live.discard(connection)
                    continue
                if kind == "next":
                    batch = _paced(pacer, pending.pop() if pending else None)
                    try:
                        connection.send(batch)
                    except OSError:  # it died after asking: the batch goes to the next that asks
                        if batch is not None:
                            pending.append(batch)
                        live.discard(connection)
                elif kind == "stored":
                    child_bytes += payload[0]
                    if observer is not None:
                        observer.on_stored(payload[0])
                elif kind == "item":
                    bar.update(payload[0])
                elif kind == "failed":
                    if observer is not None:
                        observer.on_failed(payload[0])
                elif kind == "done":
                    outcomes.extend(payload[0])
                    request_warnings += payload[1]
                    done.add(connection)
    finally:
        for connection, child in links.items():
            try:
                connection.send("stop")
            except OSError:
                pass
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()
                child.join()
            connection.close()
    reported = {outcome.item for outcome in outcomes}
    lost = [item for batch in requests for item in batch if item not in reported]
    if lost:
        codes = ", ".join(f"{child.name} exit code {child.exitcode}" for child in links.values())
        for item in lost:
            outcome = _ItemOutcome(item, requested=len(item.sop_instance_uids))
            missing = tuple(uid for uid in item.sop_instance_uids if not spool_path(job.spool, uid).exists())
            outcome.completed = outcome.requested - len(missing)
            outcome.failed = len(missing)
            if missing or not item.sop_instance_uids:
                outcome.error = f"the retrieving process died before this item was done ({codes})"
                if observer is not None:
                    observer.on_failed(outcome.error)
            outcomes.append(outcome)
    return outcomes, request_warnings, child_bytes


def _sop_classes(instances: Iterable[dict]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i["SOPClassUID"] for i in instances if i["SOPClassUID"]))


def plan_retrieval(
    cfg: PacsConfig,
    spool_dir: str | Path,
    study_uids: Iterable[str],
    *,
    max_instances_per_item: int = 100,
    observer: RetrieveObserver | None = None,
    progress: bool = False,
    whole_studies: bool = True,
    promised: dict[str, list[dict]] | None = None,
    workers: int = 1,
    relational: bool = False,
    studies_per_query: int = 50,
    expected_instances: Mapping[str, int | None] | None = None,
    present: set[str] | None = None,
) -> list[RetrieveItem]:
    """What to retrieve for ``study_uids``, found by C-FIND, with spooled instances left out.

    A study with nothing in the spool becomes one STUDY-level item listing its instances, which
    ``retrieve`` sends several to a request; a partly spooled study becomes IMAGE-level items, one
    per series and ``max_instances_per_item`` missing instances. ``whole_studies=False`` plans every
    study that way. Running it again after a complete pull returns []; after a partial pull, items
    for exactly the missing instances. ``promised``, when given, receives every study's instances
    (spooled or not), keyed by study UID, for the pull's ledger.

    The searches run over ``workers`` associations. By default each study costs a SERIES-level
    C-FIND and one IMAGE-level C-FIND per series (the hierarchical model every PACS serves).
    ``relational=True`` asks instead for the instances of up to ``studies_per_query`` studies in one
    IMAGE-level C-FIND by StudyInstanceUID list (a relational query, PS3.4 C.4.1.3.2, which Orthanc
    and dcm4chee answer). A study that answer leaves empty, or short of its
    ``expected_instances`` (NumberOfStudyRelatedInstances from the study search), is searched
    hierarchically, so a PACS that answers relational queries wrongly costs time, not instances.
    ``present`` is the spool's UIDs when the caller has listed them already (``spooled_uids``).
    """
    if max_instances_per_item < 1:
        raise ValueError(f"max_instances_per_item={max_instances_per_item!r} must be >= 1")
    if workers < 1:
        raise ValueError(f"workers={workers!r} must be >= 1")
    if not 1 <= studies_per_query <= 1000:
        raise ValueError(f"studies_per_query={studies_per_query!r}: use 1..1000")
    present = spooled_uids(spool_dir) if present is None else present
    plan: list[RetrieveItem] = []
    study_uids = list(study_uids)
    for uid in study_uids:
        _check_uid("study_uid", uid)
    expected_instances = expected_instances or {}
    # Each C-FIND is a round trip of a few ms: over ``workers`` associations (one per thread,
    # reused) and, where the PACS allows, many studies per query, a million studies plan in minutes.
    local = threading.local()
    connections: list[_Connection] = []
    lock = threading.Lock()

    def hierarchical(conn: _Connection, study_uid: str) -> dict[str, list[dict]]:
        return {
            series["SeriesInstanceUID"]: _find_instances(conn, study_uid, series["SeriesInstanceUID"])
            for series in _find_series(conn, study_uid)
        }

    def search(batch: list[str]) -> list[tuple[str, dict[str, list[dict]]]]:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = _find_connection(cfg)
            with lock:
                connections.append(conn)
        found = _find_instances_of_studies(conn, batch) if relational else {}
        answers = []
        for study_uid in batch:
            by_series = found.get(study_uid, {})
            count = sum(len(instances) for instances in by_series.values())
            expected = expected_instances.get(study_uid)
            if count == 0 or (expected is not None and count != expected):
                by_series = hierarchical(conn, study_uid)
            answers.append((study_uid, by_series))
        return answers

    per_task = studies_per_query if relational else 50  # bounds the futures, not the queries
    batches = [study_uids[start : start + per_task] for start in range(0, len(study_uids), per_task)]
    try:
        with (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plan") as pool,
            tqdm(total=len(study_uids), unit="study", desc="plan", disable=not progress) as bar,
        ):
            for answers in pool.map(search, batches):
                bar.update(len(answers))
                for study_uid, by_series in answers:
                    instances = [instance for found in by_series.values() for instance in found]
                    if promised is not None:
                        promised[study_uid] = instances
                    if observer is not None:
                        observer.on_found(len(instances))
                    plan.extend(
                        plan_study(study_uid, instances, present, whole_studies, max_instances_per_item)
                    )
    finally:
        for conn in connections:
            conn.close()
    LOGGER.info(
        "plan: %d item(s), %d instance(s) to fetch for %d study(ies)",
        len(plan),
        sum(len(item.sop_instance_uids) for item in plan),
        len(study_uids),
    )
    return plan


def _find_instances_of_studies(conn: _Connection, study_uids: list[str]) -> dict[str, dict[str, list[dict]]]:
    """Study UID → series UID → instances, from relational IMAGE-level C-FINDs by study UID list.

    An answer the PACS says it cut short is asked again in halves; a single study's cut answer is
    left out (the caller then searches that study hierarchically).
    """
    query = _query(
        "IMAGE", INSTANCE_KEYS, StudyInstanceUID=list(study_uids) if len(study_uids) > 1 else study_uids[0]
    )
    what = f"C-FIND instances of {len(study_uids)} study(ies) on {conn.cfg.describe()}"
    matches, truncated = _find(conn, query, INSTANCE_KEYS, what)
    if truncated:
        if len(study_uids) == 1:
            return {}
        middle = len(study_uids) // 2
        return _find_instances_of_studies(conn, study_uids[:middle]) | _find_instances_of_studies(
            conn, study_uids[middle:]
        )
    wanted = set(study_uids)
    found: dict[str, dict[str, list[dict]]] = {}
    for match in matches:
        if match["StudyInstanceUID"] in wanted:  # a PACS that ignores the list must not add studies
            found.setdefault(match["StudyInstanceUID"], {}).setdefault(match["SeriesInstanceUID"], []).append(
                match
            )
    return found


def plan_study(
    study_uid: str,
    instances: Sequence[dict],
    present: set[str],
    whole_studies: bool = True,
    max_instances_per_item: int = 100,
) -> list[RetrieveItem]:
    """The retrieve items for one study's ``instances`` (dicts keyed by INSTANCE_KEYS, from C-FIND or
    QIDO-RS) that are not ``present``: the whole study when none is (and ``whole_studies``),
    otherwise one IMAGE-level item per series and ``max_instances_per_item`` missing instances."""
    if whole_studies and instances and not any(i["SOPInstanceUID"] in present for i in instances):
        uids = tuple(i["SOPInstanceUID"] for i in instances)
        return [RetrieveItem(study_uid, None, uids, _sop_classes(instances))]
    by_series: dict[str, list[dict]] = {}
    for instance in instances:
        if instance["SOPInstanceUID"] not in present:
            by_series.setdefault(instance["SeriesInstanceUID"], []).append(instance)
    items = []
    for series_uid, missing in by_series.items():
        for start in range(0, len(missing), max_instances_per_item):
            chunk = missing[start : start + max_instances_per_item]
            uids = tuple(i["SOPInstanceUID"] for i in chunk)
            items.append(RetrieveItem(study_uid, series_uid, uids, _sop_classes(chunk)))
    return items


# ---------------------------------------------------------------------------------------------------
# CLI


def _config_from_args(args: argparse.Namespace) -> PacsConfig:
    return PacsConfig.parse(
        args.pacs,
        calling_aet=args.aet,
        move_destination=args.move_dest,
        dimse_timeout=args.dimse_timeout,
        retries=args.retries,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest scu", description="Query and retrieve radiographs from a PACS into a spool."
    )
    parser.add_argument("--pacs", required=True, help="the PACS as AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
    parser.add_argument("--aet", default="PEDXRAY", help="our calling AE title (default PEDXRAY)")
    parser.add_argument("--move-dest", help="C-MOVE destination AE title (default: --aet)")
    parser.add_argument("--dimse-timeout", type=float, default=120, help="seconds per DIMSE reply")
    parser.add_argument("--retries", type=int, default=3, help="retries per request after the first try")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("echo", help="C-ECHO the PACS")
    for name in ("find", "pull"):
        sub = commands.add_parser(name, help="list matching studies" if name == "find" else "retrieve them")
        sub.add_argument("--from", dest="first", help="first study date, YYYY-MM-DD")
        sub.add_argument("--to", dest="last", help="last study date, YYYY-MM-DD")
        sub.add_argument("--modality", nargs="*", default=["CR", "DX"], help="ModalitiesInStudy filter")
        sub.add_argument("--page-limit", type=int, help="the PACS's C-FIND result cap, if known")
    pull = commands.choices["pull"]
    pull.add_argument("--spool", required=True, type=Path, help="spool directory")
    pull.add_argument("--method", choices=("move", "get"), default="move")
    pull.add_argument("--workers", type=int, default=4, help="parallel associations per process")
    pull.add_argument(
        "--processes", type=int, default=1, help="retrieving processes, each with --workers associations"
    )
    pull.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="answer C-STOREs before the instance is on disk (unsafe on an OS crash; see ingest pull -h)",
    )
    pull.add_argument(
        "--studies-per-request",
        type=int,
        default=50,
        help="whole studies per C-MOVE/C-GET as a StudyInstanceUID list (1: a PACS without list support)",
    )
    pull.add_argument("--transport", choices=TRANSPORTS, default=DEFAULT_TRANSPORT, help=TRANSPORT_HELP)
    pull.add_argument("--scp-host", default="0.0.0.0", help="address our Storage SCP binds for C-MOVE")
    pull.add_argument("--scp-port", type=int, default=11112, help="port the PACS knows for our AE title")
    args = parser.parse_args(argv)
    setup_cli_logging()
    try:
        cfg = _config_from_args(args)
        if args.command == "echo":
            echo(cfg)
            print(f"C-ECHO {cfg.describe()}: ok")
            return 0
        studies = find_studies(
            cfg, date_range=(args.first, args.last), modalities=args.modality, page_limit=args.page_limit
        )
        if args.command == "find":
            for study in studies:
                modalities = "/".join(study["ModalitiesInStudy"])
                print(study["StudyInstanceUID"], study["StudyDate"], modalities, study["StudyDescription"])
            return 0
        study_uids = [study["StudyInstanceUID"] for study in studies]
        items = plan_retrieval(cfg, args.spool, study_uids, progress=True)
        if args.method == "get":
            summary = retrieve(
                cfg,
                items,
                method="get",
                spool_dir=args.spool,
                workers=args.workers,
                processes=args.processes,
                max_studies_per_request=args.studies_per_request,
                fsync=args.fsync,
                transport=args.transport,
            )
        else:
            destination = cfg.move_destination or cfg.calling_aet
            scp = StorageSCP(
                args.spool,
                destination,
                args.scp_port,
                [cfg.called_aet],
                args.scp_host,
                share_port=args.processes > 1,
                fsync=args.fsync,
                transport=args.transport,
            )
            with scp:
                summary = retrieve(
                    cfg,
                    items,
                    method="move",
                    scp=scp,
                    workers=args.workers,
                    processes=args.processes,
                    max_studies_per_request=args.studies_per_request,
                    transport=args.transport,
                )
    except (PacsError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    print(summary)
    return 0 if summary.ok else 2


if __name__ == "__main__":
    raise SystemExit(main())

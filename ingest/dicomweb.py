"""DICOMweb client for the pull: QIDO-RS searches and WADO-RS retrieval into the spool.

* ``find_studies`` runs QIDO-RS ``/studies`` over the same date-window bisection as C-FIND
  (``ingest.dicom.scu.search_by_date_windows``): a window answered at the page limit, or with a
  ``Warning: 299`` saying more results exist, is split.
* ``plan_retrieval`` asks ``/studies/{uid}/instances`` for each study (over ``workers`` parallel
  connections) and leaves out what the spool holds, exactly as the DIMSE planner does: a study
  with nothing spooled is fetched whole (``GET /studies/{uid}``), the rest instance by instance.
* ``retrieve`` runs ``workers`` threads, each with its own keep-alive ``requests.Session``. It asks
  for ``multipart/related; type="application/dicom"`` with ``transfer-syntax=*`` (the instances as
  stored: nothing is transcoded, nothing lossy is made lossless or the reverse), checks every part
  as a C-STORE is checked (``ingest.dicom.scp.store_instance``) and writes it atomically into the
  same spool. What is still missing after a request is retried with back-off; 429 and 503 answers
  wait for ``Retry-After``.

Credentials (a bearer token, or basic user and password) come from the environment or a file and
live only in the ``Authorization`` header: no log line, error message, repr or saved config shows
them.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
from pydicom.tag import Tag
from pydicom.uid import UID
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from ingest.dicom.scp import (
    STATUS_SUCCESS,
    StoreCounts,
    present_in_spool,
    remove_stale_parts,
    spool_path,
    spooled_uids,
    store_instance,
)
from ingest.dicom.scu import (
    INSTANCE_KEYS,
    STUDY_KEYS,
    PacsError,
    RetrieveFailure,
    RetrieveItem,
    RetrieveObserver,
    RetrieveSummary,
    StudyWindow,
    plan_study,
    search_by_date_windows,
)
from ingest.dicom.upper_layer import ReceivedInstance
from ingest.polite import AdaptiveConcurrency, Pacer

LOGGER = logging.getLogger("ingest.dicomweb")

TOKEN_ENV = "PEDX_DICOMWEB_TOKEN"
USER_ENV = "PEDX_DICOMWEB_USER"
PASSWORD_ENV = "PEDX_DICOMWEB_PASSWORD"

ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_JSON = "application/dicom+json"
# Answers after which the same request may succeed later: throttling, overload, gateway trouble.
_RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}
# Answers that say the server is overloaded: the retrieval runs fewer requests at once for a while.
_OVERLOAD_HTTP = {429, 503}
_MAX_RETRY_AFTER_S = 300.0
_INTEGER_KEYS = {"NumberOfStudyRelatedInstances", "InstanceNumber"}
_MULTIVALUED_KEYS = {"ModalitiesInStudy"}
# Explicit VR elements with a 4-byte length (PS3.5 7.1.2).
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_TAGS = {keyword: f"{Tag(keyword):08X}" for keyword in {*STUDY_KEYS, *INSTANCE_KEYS}}


@dataclass(frozen=True)
class DicomwebConfig:
    """A DICOMweb service root (``https://host/dicom-web``) and how to talk to it.

    ``authorization`` is the whole ``Authorization`` header value; it never appears in ``repr`` or
    ``describe`` and ``ingest.pull`` leaves it out of the saved config.
    """

    url: str
    authorization: str | None = field(default=None, repr=False)
    timeout: float = 120
    retries: int = 3
    backoff_s: float = 1.0
    # Total seconds for one WADO-RS answer, body included (None: no limit); past it the request is retried.
    retrieve_timeout: float | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"DICOMweb URL {self.url!r}: give the service root, e.g. https://pacs.example.org/dicom-web"
            )
        if parts.username or parts.password:
            raise ValueError(
                "the DICOMweb URL carries credentials: remove them and set "
                f"${TOKEN_ENV}, or ${USER_ENV} and ${PASSWORD_ENV}, or use a token/password file"
            )
        if not isinstance(self.timeout, int | float) or self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout!r}: seconds per HTTP request, > 0")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries={self.retries!r}: use 0 (one attempt only) or more")
        if not isinstance(self.backoff_s, int | float) or self.backoff_s < 0:
            raise ValueError(f"backoff_s={self.backoff_s!r}: the first back-off delay must be >= 0 seconds")
        if self.retrieve_timeout is not None and self.retrieve_timeout <= 0:
            raise ValueError(f"retrieve_timeout={self.retrieve_timeout!r}: seconds per WADO-RS answer, > 0")

    @property
    def root(self) -> str:
        return self.url.rstrip("/")

    def describe(self) -> str:
        return self.root

    def to_dict(self) -> dict:
        """The settings without the credentials (for pull-config.json)."""
        d = dataclasses.asdict(self)
        d["authorization"] = self.authorization.split(" ", 1)[0] if self.authorization else None
        return d


def authorization_from(
    *,
    token_file: str | os.PathLike | None = None,
    basic_file: str | os.PathLike | None = None,
    environ: dict[str, str] | None = None,
) -> str | None:
    """The ``Authorization`` header value: a bearer token from ``token_file`` or ``$PEDX_DICOMWEB_TOKEN``,
    else basic auth from ``basic_file`` (one line ``user:password``) or ``$PEDX_DICOMWEB_USER`` and
    ``$PEDX_DICOMWEB_PASSWORD``; None when none is given."""
    environ = os.environ if environ is None else environ
    if token_file is not None and basic_file is not None:
        raise ValueError("give a bearer token file or a basic-auth file, not both")
    if token_file is not None:
        token = _read_secret(token_file, "token file")
        return f"Bearer {token}"
    if basic_file is not None:
        user, sep, password = _read_secret(basic_file, "basic-auth file").partition(":")
        if not sep or not user:
            raise ValueError(f"basic-auth file {basic_file}: write one line user:password")
    elif environ.get(TOKEN_ENV):
        return f"Bearer {environ[TOKEN_ENV].strip()}"
    elif environ.get(USER_ENV):
        user, password = environ[USER_ENV], environ.get(PASSWORD_ENV, "")
    else:
        return None
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _read_secret(path: str | os.PathLike, what: str) -> str:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if not text or "\n" in text:
        raise ValueError(f"{what} {path}: write the secret on one line")
    return text


def open_session(cfg: DicomwebConfig, pool_size: int = 1) -> requests.Session:
    """A keep-alive session carrying the credentials; ``pool_size`` connections at most."""
    session = requests.Session()
    session.trust_env = False  # no proxy or .netrc from the environment: the URL and our header only
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if cfg.authorization:
        session.headers["Authorization"] = cfg.authorization
    return session


def _get(
    session: requests.Session,
    cfg: DicomwebConfig,
    path: str,
    what: str,
    total_timeout: float | None = None,
    concurrency: AdaptiveConcurrency | None = None,
    consume: Callable[[requests.Response, Iterator[bytes]], None] | None = None,
    instances: int = 0,
    **kwargs,
) -> tuple[requests.Response, bytes]:
    """One GET with retries on connection errors and retryable answers: (the response, its body).
    Raises PacsError when it fails for good.

    ``consume(response, chunks)``, when given, takes a successful answer's body as it arrives
    (the returned body is then empty); a connection lost on the way is retried like any other.
    ``total_timeout`` bounds the whole answer, body included (``timeout`` bounds each read only):
    a server that trickles or stalls mid-body is cut off and asked again. Each attempt holds a
    slot of ``concurrency``, which 429 and 503 answers shrink, and a successful one reports how
    long its ``instances`` took."""
    number = 0
    while True:
        delay = cfg.backoff_s * 2**number
        slot = concurrency.acquire() if concurrency is not None else None
        overloaded = None
        brought = 0
        deadline = None if total_timeout is None else time.monotonic() + total_timeout
        read_timeout = cfg.timeout if total_timeout is None else min(cfg.timeout, total_timeout)
        try:
            response = session.get(cfg.root + path, timeout=read_timeout, stream=True, **kwargs)
            with response:
                if response.status_code in _OVERLOAD_HTTP:
                    overloaded = f"HTTP {response.status_code} from {cfg.describe()}"
                chunks = _body_chunks(response, deadline, total_timeout)
                if consume is not None and response.status_code < 400:
                    consume(response, chunks)
                    for _ in chunks:
                        pass  # the epilogue: read to the end, or urllib3 drops the keep-alive connection
                    body = b""
                else:
                    body = b"".join(chunks)
                brought = instances if response.status_code < 400 else 0
        except requests.RequestException as exc:
            # The exception text names the URL only (requests keeps headers out of it).
            error = PacsError(f"{what}: {type(exc).__name__}: {exc}")
        else:
            error = None
        finally:
            if slot is not None:
                concurrency.release(slot, overloaded, brought)
        if error is None:
            if response.status_code < 400:
                return response, body
            error = http_error(response, what)
            if response.status_code not in _RETRYABLE_HTTP:
                raise error
            delay = max(delay, _retry_after(response))
        if number >= cfg.retries:
            raise PacsError(f"{error} (after {number + 1} attempts)", retryable=False) from error
        LOGGER.warning("%s; retrying in %.1f s (attempt %d of %d)", error, delay, number + 1, cfg.retries + 1)
        time.sleep(delay)
        number += 1


def _body_chunks(response: requests.Response, deadline: float | None, total: float | None) -> Iterator[bytes]:
    """The body in pieces of up to 1 MiB (``response.content`` reads 10 kB at a time), ending with
    requests.Timeout once past ``deadline``."""
    for chunk in response.iter_content(chunk_size=1 << 20):
        yield chunk
        if deadline is not None and time.monotonic() > deadline:
            raise requests.Timeout(f"answer not complete within retrieve_timeout={total:g} s")


def http_error(response: requests.Response, what: str) -> PacsError:
    code = response.status_code
    hint = ""
    if code in (401, 403):
        hint = f": check the credentials (${TOKEN_ENV}, ${USER_ENV}/${PASSWORD_ENV} or the auth file)"
    return PacsError(f"{what}: HTTP {code} {response.reason}{hint}", retryable=code in _RETRYABLE_HTTP)


def _retry_after(response: requests.Response) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        return min(float(value), _MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------------
# QIDO-RS


def _from_json(obj: dict, keys: Sequence[str]) -> dict:
    """A DICOM JSON object as the dict ``ingest.dicom.scu`` makes of a C-FIND match."""
    out: dict = {}
    for keyword in keys:
        values = obj.get(_TAGS[keyword], {}).get("Value", [])
        if keyword in _MULTIVALUED_KEYS:
            out[keyword] = tuple(str(v) for v in values)
        elif keyword in _INTEGER_KEYS:
            try:
                out[keyword] = int(values[0]) if values else None
            except (TypeError, ValueError):
                out[keyword] = None
        else:
            out[keyword] = "\\".join(str(v) for v in values)
    return out


def _qido(session, cfg: DicomwebConfig, path: str, params: dict, what: str) -> tuple[list[dict], bool]:
    """One QIDO-RS search: (matches, whether the server says more exist)."""
    response, body = _get(session, cfg, path, what, params=params, headers={"Accept": ACCEPT_JSON})
    matches = json.loads(body) if body.strip() else []
    # PS3.18 8.3.4.4: a server that returns fewer results than match says so in a 299 warning.
    truncated = "299" in response.headers.get("Warning", "")
    return matches, truncated


def find_studies(
    cfg: DicomwebConfig,
    *,
    date_range: tuple[dt.date | str | None, dt.date | str | None] | None = None,
    modalities: Sequence[str] | None = ("CR", "DX"),
    page_limit: int | None = None,
    session: requests.Session | None = None,
) -> Iterator[dict]:
    """Yield each matching study once, as a dict keyed by STUDY_KEYS (as C-FIND's ``find_studies``).

    ``page_limit`` is sent as QIDO's ``limit``: a window answered with that many studies is split.
    """
    own = session is None
    session = session or open_session(cfg)
    includes = ",".join(_TAGS[k] for k in STUDY_KEYS)

    def search(window: StudyWindow, modalities_filter: str) -> tuple[list[dict], bool]:
        params = {"includefield": includes}
        if window.date_filter():
            params["StudyDate"] = window.date_filter()
        if window.time_filter():
            params["StudyTime"] = window.time_filter()
        if modalities_filter:
            params["ModalitiesInStudy"] = modalities_filter.replace("\\", ",")
        if page_limit is not None:
            params["limit"] = str(page_limit)
        what = f"QIDO-RS studies {window.describe()} on {cfg.describe()}"
        found, truncated = _qido(session, cfg, "/studies", params, what)
        return [_from_json(obj, STUDY_KEYS) for obj in found], truncated

    try:
        yield from search_by_date_windows(
            search, date_range=date_range, modalities=modalities, page_limit=page_limit
        )
    finally:
        if own:
            session.close()


def find_instances(cfg: DicomwebConfig, session: requests.Session, study_uid: str) -> list[dict]:
    """The instances of one study, as dicts keyed by INSTANCE_KEYS (one QIDO-RS request)."""
    includes = ",".join(_TAGS[k] for k in INSTANCE_KEYS)
    what = f"QIDO-RS instances of study {study_uid} on {cfg.describe()}"
    params = {"includefield": includes}
    found, truncated = _qido(session, cfg, f"/studies/{study_uid}/instances", params, what)
    if truncated:
        raise PacsError(f"{what}: the server cut the answer; raise its QIDO-RS result limit", retryable=False)
    return [_from_json(obj, INSTANCE_KEYS) for obj in found]


def plan_retrieval(
    cfg: DicomwebConfig,
    spool_dir: str | Path,
    study_uids: Iterable[str],
    *,
    workers: int = 4,
    promised: dict[str, list[dict]] | None = None,
    observer: RetrieveObserver | None = None,
    progress: bool = False,
    present: set[str] | None = None,
) -> list[RetrieveItem]:
    """What to retrieve for ``study_uids``, found by QIDO-RS, with spooled instances left out.

    A study with nothing in the spool becomes one STUDY-level item listing its instances; a partly
    spooled study one IMAGE-level item per series with its missing instances
    (``ingest.dicom.scu.plan_study``). ``promised``, when given, receives every study's instances
    (spooled or not) for the ledger; ``present`` is the spool's UIDs when the caller has them.
    """
    present = spooled_uids(spool_dir) if present is None else present
    study_uids = list(study_uids)
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()

    def instances_of(study_uid: str) -> tuple[str, list[dict]]:
        if not hasattr(local, "session"):
            local.session = open_session(cfg)
            with lock:
                sessions.append(local.session)
        return study_uid, find_instances(cfg, local.session, study_uid)

    plan: list[RetrieveItem] = []
    try:
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(total=len(study_uids), unit="study", desc="plan", disable=not progress) as bar,
        ):
            for study_uid, instances in pool.map(instances_of, study_uids):
                bar.update()
                if observer is not None:
                    observer.on_found(len(instances))
                if promised is not None:
                    promised[study_uid] = instances
                plan.extend(plan_study(study_uid, instances, present))
    finally:
        for session in sessions:
            session.close()
    LOGGER.info(
        "plan: %d item(s), %d instance(s) to fetch for %d study(ies)",
        len(plan),
        sum(len(item.sop_instance_uids) for item in plan),
        len(study_uids),
    )
    return plan


# ---------------------------------------------------------------------------------------------------
# WADO-RS


def multipart_parts(content_type: str, chunks: Iterable[bytes]) -> Iterator[tuple[dict[str, str], bytes]]:
    """The (headers, body) of each part of a ``multipart/related`` body (RFC 2046) that arrives as
    ``chunks``: each part is yielded as soon as it is complete, so it is stored while the next one
    is still on its way.

    A part's ``Content-Length``, where given, bounds its body, so a boundary-like byte run inside
    pixel data cannot cut it.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise ValueError(f"no boundary in Content-Type {content_type!r}")
    delimiter = b"--" + match.group(1).encode()
    pieces = iter(chunks)
    buffer = bytearray()

    def more() -> bool:
        chunk = next(pieces, None)
        if chunk is None:
            return False
        buffer.extend(chunk)
        return True

    def find(needle: bytes, start: int) -> int:
        """Where ``needle`` starts at or after ``start``, receiving more until it is there."""
        searched = start
        while (found := buffer.find(needle, searched)) < 0:
            searched = max(start, len(buffer) - len(needle) + 1)
            if not more():
                raise ValueError("a multipart body ends before its close delimiter")
        return found

    def need(size: int) -> None:
        while len(buffer) < size:
            if not more():
                raise ValueError("a multipart part is shorter than its Content-Length")

    position = find(delimiter, 0)
    while True:
        position += len(delimiter)
        need(position + 2)
        if buffer[position : position + 2] == b"--":
            return  # the close delimiter
        header_end = find(b"\r\n\r\n", position)
        headers = {}
        for line in buffer[position:header_end].decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        start = header_end + 4
        if "content-length" in headers:
            end = start + int(headers["content-length"])
            need(end)
            following = find(delimiter, end)
        else:
            following = find(delimiter, start)
            end = following - 2 if buffer[following - 2 : following] == b"\r\n" else following
        part = bytes(buffer[start:end])
        del buffer[:following]  # what is handed out leaves the buffer
        position = 0
        yield headers, part


def received_from_part10(data: bytes, peer: str) -> ReceivedInstance:
    """A Part 10 file as the receiving code takes a C-STORE: UIDs and transfer syntax from its file
    meta, the data set after it (checked against them by ``store_instance``).

    The file meta group (explicit VR little endian, PS3.10 7.1) is read here: pydicom's reader
    validated every value again and cost more than storing the instance."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM marker)")
    meta: dict[int, str] = {}
    offset = 132
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            break
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<L", data, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            start = offset + 8
        if vr == b"UI":
            meta[element] = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = start + length
    if offset > len(data):
        raise ValueError("file meta information is cut short")
    return ReceivedInstance(
        sop_class_uid=meta.get(0x0002, ""),
        sop_instance_uid=meta.get(0x0003, ""),
        transfer_syntax=UID(meta.get(0x0010, "")),
        dataset=data[offset:],
        source_aet="",
        peer=peer,
    )


class _Retriever:
    """One ``retrieve`` run: per-thread sessions, shared counts and outcomes."""

    def __init__(self, cfg, spool, counts, fsync, observer, bar, pacer, workers: int) -> None:
        self.cfg = cfg
        self.spool = spool
        self.counts = counts
        self.fsync = fsync
        self.observer = observer
        self.bar = bar
        self.pacer = pacer
        self.concurrency = AdaptiveConcurrency(workers, what="WADO-RS requests")
        self.failures: list[RetrieveFailure] = []
        self.requested = self.completed = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._fatal: str | None = None

    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = open_session(self.cfg)
            with self._lock:
                self._sessions.append(self._local.session)
        return self._local.session

    def close(self) -> None:
        for session in self._sessions:
            session.close()

    def missing(self, uids: Iterable[str]) -> list[str]:
        return [uid for uid in uids if not spool_path(self.spool, uid).exists()]

    def run(self, item: RetrieveItem) -> None:
        reason = self._retrieve(item)
        missing = self.missing(item.sop_instance_uids)
        with self._lock:
            self.requested += len(item.sop_instance_uids)
            self.completed += len(item.sop_instance_uids) - len(missing)
            if missing:
                narrowed = dataclasses.replace(item, sop_instance_uids=tuple(missing))
                self.failures.append(RetrieveFailure(narrowed, reason or "not sent by the server"))
            self.bar.update()
        if missing and self.observer is not None:
            self.observer.on_failed(reason or "not sent by the server")

    def _retrieve(self, item: RetrieveItem) -> str | None:
        """Fetch ``item``; the reason the last attempt failed, None when nothing failed."""
        if self._fatal is not None:
            return f"not attempted: {self._fatal}"
        reason = None
        if item.level == "STUDY":
            try:
                what = f"WADO-RS study {item.study_uid}"
                self._fetch(f"/studies/{item.study_uid}", what, len(item.sop_instance_uids))
            except PacsError as exc:
                reason = self._failed(exc)
                if self._fatal is not None:
                    return reason
            leftovers = self.missing(item.sop_instance_uids)
            if not leftovers:
                return None
            # The study came (or broke off) without some of its instances: ask for each of them.
            item = dataclasses.replace(item, series_uid=None, sop_instance_uids=tuple(leftovers))
        for uid in self.missing(item.sop_instance_uids):
            path = f"/studies/{item.study_uid}/instances/{uid}"
            if item.series_uid:
                path = f"/studies/{item.study_uid}/series/{item.series_uid}/instances/{uid}"
            try:
                self._fetch(path, f"WADO-RS instance {uid}", 1)
            except PacsError as exc:
                reason = self._failed(exc)
                if self._fatal is not None:
                    break
        return reason

    def _failed(self, exc: PacsError) -> str:
        if "HTTP 401" in str(exc) or "HTTP 403" in str(exc):
            self._fatal = str(exc)  # every further request would be refused the same way
        return str(exc)

    def _fetch(self, path: str, what: str, instances: int) -> None:
        if self.pacer is not None:
            self.pacer.before_request(instances)

        def store_parts(response: requests.Response, chunks: Iterator[bytes]) -> None:
            content_type = response.headers.get("Content-Type", "")
            if not content_type.startswith("multipart/related"):
                raise ValueError(f"answered {content_type or 'no Content-Type'}, not multipart/related")
            for headers, part in multipart_parts(content_type, chunks):
                self._store(headers, part, what)

        try:
            _get(
                self.session(),
                self.cfg,
                path,
                what,
                total_timeout=self.cfg.retrieve_timeout,
                concurrency=self.concurrency,
                consume=store_parts,
                instances=instances,
                # Pixel data hardly compresses: gzip (Orthanc's, for answers it buffers) cost ~100 ms a study.
                headers={"Accept": ACCEPT_DICOM, "Accept-Encoding": "identity"},
            )
        except ValueError as exc:
            raise PacsError(f"{what}: {exc}", retryable=False) from None

    def _store(self, headers: dict[str, str], body: bytes, what: str) -> None:
        try:
            instance = received_from_part10(body, self.cfg.describe())
        except Exception as exc:  # pydicom raises many types on malformed meta
            self.counts.add_failed()
            LOGGER.error("%s: a part is not a DICOM file: %s", what, exc)
            return
        status = store_instance(self.spool, self.counts, instance, fsync=self.fsync)
        if status != STATUS_SUCCESS:
            LOGGER.error("%s: instance %s refused (0x%04X)", what, instance.sop_instance_uid, status)


def retrieve(
    cfg: DicomwebConfig,
    items: Iterable[RetrieveItem],
    *,
    spool_dir: str | Path,
    workers: int = 4,
    fsync: bool = True,
    progress: bool = True,
    observer: RetrieveObserver | None = None,
    pacer: Pacer | None = None,
    clean_spool: bool = True,
) -> RetrieveSummary:
    """Fetch ``items`` by WADO-RS into ``spool_dir`` over ``workers`` keep-alive connections.

    Instances already spooled are skipped (``already_present``). The spool says what arrived:
    every listed instance still missing after the retries is counted as failed, and its item,
    narrowed to what is missing, is in ``failures`` with the last reason. ``pacer``
    (``ingest.polite``) is asked before every WADO-RS request: the pull's window and rate limit.
    ``clean_spool=False`` leaves a killed process's temp files for the caller to remove.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: use 1 or more parallel HTTP connections")
    spool = Path(spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    if clean_spool:
        remove_stale_parts(spool)
    summary = RetrieveSummary()
    started = time.monotonic()
    wanted: list[RetrieveItem] = []
    for item in items:
        present = present_in_spool(spool, item.sop_instance_uids)
        missing = tuple(uid for uid in item.sop_instance_uids if uid not in present)
        summary.already_present += len(item.sop_instance_uids) - len(missing)
        summary.requested += len(item.sop_instance_uids) - len(missing)
        if missing:
            wanted.append(dataclasses.replace(item, sop_instance_uids=missing))
    counts = StoreCounts()
    if observer is not None:
        counts.subscribe(observer.on_stored)
    LOGGER.info(
        "retrieving %d item(s) by WADO-RS from %s over %d connection(s)",
        len(wanted),
        cfg.describe(),
        min(workers, len(wanted)),
    )
    with tqdm(total=len(wanted), unit="item", desc="WADO-RS", disable=not progress) as bar:
        retriever = _Retriever(cfg, spool, counts, fsync, observer, bar, pacer, workers)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wado")
        try:
            list(pool.map(retriever.run, wanted))
        except BaseException:
            # Ctrl-C: start nothing more, wake threads waiting for the window, let running requests end.
            if pacer is not None:
                pacer.interrupt()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            retriever.close()
    summary.requested += retriever.requested
    summary.completed = retriever.completed
    summary.failed = retriever.requested - retriever.completed
    summary.failures = retriever.failures
    summary.bytes = counts.snapshot()["bytes"]
    summary.seconds = time.monotonic() - started
    log = LOGGER.warning if summary.failures else LOGGER.info
    log("WADO-RS from %s: %s", cfg.describe(), summary)
    for failure in summary.failures:
        LOGGER.warning("failed: %s: %s", failure.item.describe(), failure.reason)
    return summary

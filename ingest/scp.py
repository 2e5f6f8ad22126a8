"""DICOM Storage SCP: receives C-STORE requests into an atomic, de-duplicated spool.

Each instance lands at ``spool/<first 2 hex of sha1(uid)>/<SOPInstanceUID>.dcm`` as the exact bytes
the peer sent (file meta + data set, no re-encoding). A file is written to a temp name in its final
directory, fsynced, then linked into place only if absent, and the directory fsynced, before the
C-STORE is answered with Success: a reader never sees a partial file, concurrent duplicates from
several associations (or processes) leave exactly one copy, and an acknowledged instance survives a
crash. ``fsync=False`` (``ingest pull --no-fsync``) drops the two fsyncs: still atomic against a
crash of this process, but after an OS crash or power loss an instance acknowledged in the last
seconds may be empty or cut short in the spool; see ``write_spool_file``.

The store handler is a plain function bound to ``evt.EVT_C_STORE``; the C-GET client in
``ingest.scu`` binds the same handler to its own associations. ``tune_connection`` (EVT_CONN_OPEN)
trims pynetdicom's per-PDU cost on both. ``StorageSCP(share_port=True)`` lets several processes
listen on one port (SO_REUSEPORT), so the PACS's C-STORE associations spread over them.
"""

from __future__ import annotations

import argparse
import copy
import errno
import functools
import hashlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pydicom import uid as dicom_uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES, PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

LOGGER = logging.getLogger("ingest.scp")

# Uncompressed first, then the lossless codecs, then lossy ones: a PACS sends each instance in the
# syntax it was stored in (no transcoding, no second lossy generation) as long as we accept it.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEGLSLossless,
    dicom_uid.RLELossless,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEG2000,
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
    dicom_uid.ExplicitVRBigEndian,
)

# C-STORE status codes (PS3.4 Annex B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_UNABLE_TO_PROCESS = 0xC211

_OUT_OF_RESOURCES_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
# A DICOM UID: dot-separated digits, at most 64 characters. Checked before it becomes a file name.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# VRs whose value pydicom refuses to convert when garbled (a sequence that does not parse, a number
# whose length is not a multiple of its size). Text VRs only warn, so converting them is skipped.
_STRICT_VRS = frozenset({"SQ", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "OF", "OD", "OL", "OV"})


def spool_path(spool_dir: str | os.PathLike, sop_instance_uid: str) -> Path:
    """Where the instance ``sop_instance_uid`` lives in the spool (256 buckets keep directories small)."""
    uid = str(sop_instance_uid).strip()
    if len(uid) > 64 or not _UID_PATTERN.match(uid):
        raise ValueError(f"not a valid DICOM UID (digits and dots, at most 64 characters): {uid!r}")
    bucket = hashlib.sha1(uid.encode("ascii")).hexdigest()[:2]
    return Path(spool_dir) / bucket / f"{uid}.dcm"


def spooled_uids(spool_dir: str | os.PathLike) -> set[str]:
    """SOPInstanceUIDs already complete in the spool (temp files are dot-prefixed and never match)."""
    root = Path(spool_dir)
    if not root.is_dir():
        return set()
    return {path.name.removesuffix(".dcm") for path in root.glob("??/[0-9]*.dcm")}


class StoreCounts:
    """Thread-safe tallies of what the store handler did, for metrics and summaries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stored = 0
        self.duplicate = 0
        self.failed = 0
        self.bytes = 0
        self._listeners: list[Callable[[int], None]] = []

    def add_stored(self, nbytes: int) -> None:
        with self._lock:
            self.stored += 1
            self.bytes += nbytes
            listeners = list(self._listeners)
        for listener in listeners:
            listener(nbytes)

    def add_duplicate(self) -> None:
        with self._lock:
            self.duplicate += 1

    def add_failed(self) -> None:
        with self._lock:
            self.failed += 1

    def subscribe(self, on_stored: Callable[[int], None]) -> None:
        """Call ``on_stored(nbytes)`` for every newly stored instance (e.g. a Prometheus counter)."""
        with self._lock:
            self._listeners.append(on_stored)

    def unsubscribe(self, on_stored: Callable[[int], None]) -> None:
        with self._lock:
            self._listeners.remove(on_stored)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "stored": self.stored,
                "duplicate": self.duplicate,
                "failed": self.failed,
                "bytes": self.bytes,
            }

    def __repr__(self) -> str:
        return f"StoreCounts({self.snapshot()})"


def write_spool_file(
    final_path: Path, data: bytes | Sequence[bytes | memoryview], *, fsync: bool = True
) -> bool:
    """Atomically create ``final_path`` with ``data`` unless it exists; True when this call stored it.

    ``data`` may be a sequence of parts (file meta, then the data set) written one after another,
    which saves joining a large instance into one more copy.

    The temp file lives in the final directory (same file system) and is fsynced before it is
    hard-linked into place. ``os.link`` refuses to overwrite, so of two concurrent writers exactly
    one wins and the other sees a duplicate. Where the file system has no hard links, ``os.replace``
    still publishes a complete file atomically (a racing duplicate then overwrites identical bytes).

    ``fsync=False`` skips the file and directory fsyncs (about 5 ms per instance on this project's
    test machine). The file still appears only once completely written, so a killed process leaves
    nothing partial; but the kernel may write the directory entry before the data, so after an OS
    crash the file can exist empty or cut short. The next pull counts it as present (it goes by
    name) and the catalog scan marks it ``unreadable`` with the reason; delete those files and pull
    again to fetch them.
    """
    if final_path.exists():
        return False
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=final_path.parent, prefix=".", suffix=".part")
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    size = sum(len(part) for part in parts)
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        if os.path.getsize(temp_name) != size:
            raise OSError(errno.EIO, f"short write: {temp_name}")
        try:
            os.link(temp_name, final_path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            os.replace(temp_name, final_path)
        if fsync:
            _fsync_directory(final_path.parent)
        return True
    finally:
        if os.path.lexists(temp_name):
            os.unlink(temp_name)


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable, not just the file contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_truncated_element(dataset: Dataset) -> str | None:
    """The tag of a top-level element whose value is shorter than its declared length, if any.

    pydicom reads a cut-off stream without complaint, keeping the short value; storing that would
    put a truncated image in the spool, so the store handler looks at the raw lengths first.
    """
    for element in dataset.elements():
        if (
            isinstance(element, RawDataElement)
            and element.length != _UNDEFINED_LENGTH
            and element.value is not None
            and len(element.value) < element.length
        ):
            return f"{element.tag} ({len(element.value)} of {element.length} bytes)"
    return None


def check_convertible(dataset: Dataset) -> None:
    """Convert the elements whose garbling pydicom reports (sequences, binary numbers); raise if bad.

    Text values are left raw: pydicom only warns about them, and converting the ~50 strings of a
    radiograph header took ~0.9 ms per instance, a tenth of the receiving CPU (the catalog scan
    reads them later anyway).
    """
    for element in dataset.elements():
        vr = element.VR
        if vr is None or vr in _STRICT_VRS or " or " in vr:  # implicit VR: pydicom looks it up
            dataset[element.tag]


def handle_store(event: Event, spool_dir: Path, counts: StoreCounts, fsync: bool = True) -> int:
    """EVT_C_STORE handler: spool the instance, answer with a C-STORE status, never raise.

    Success is answered only once the instance is in the spool, and with ``fsync`` on disk.
    """
    request = event.request
    uid = str(request.AffectedSOPInstanceUID or "")
    peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
    try:
        final_path = spool_path(spool_dir, uid)
    except ValueError as exc:
        counts.add_failed()
        LOGGER.error("C-STORE from %s refused: %s", peer, exc)
        return STATUS_CANNOT_UNDERSTAND
    if final_path.exists():
        counts.add_duplicate()
        return STATUS_SUCCESS

    try:
        dataset = event.dataset
        truncated = first_truncated_element(dataset)
        if truncated is not None:
            raise ValueError(f"data set is truncated at element {truncated}")
        # Garbled sequences and numbers surface now, with a status the PACS sees, not at catalog time.
        check_convertible(dataset)
        dataset_uid = str(dataset.get("SOPInstanceUID", ""))
        dataset_class = str(dataset.get("SOPClassUID", ""))
    except Exception as exc:  # pydicom raises many exception types on malformed bytes
        counts.add_failed()
        LOGGER.error("C-STORE %s from %s: data set cannot be decoded: %s", uid, peer, exc)
        return STATUS_CANNOT_UNDERSTAND
    if dataset_uid != uid:
        counts.add_failed()
        LOGGER.error(
            "C-STORE from %s: SOPInstanceUID %r in data set != %r in request", peer, dataset_uid, uid
        )
        return STATUS_CANNOT_UNDERSTAND
    if dataset_class != str(request.AffectedSOPClassUID):
        counts.add_failed()
        LOGGER.error(
            "C-STORE %s from %s: SOPClassUID %r in data set != %r in request",
            uid,
            peer,
            dataset_class,
            str(request.AffectedSOPClassUID),
        )
        return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS

    # The data set as received, behind the file meta pynetdicom builds (encoded_dataset() would join
    # the two into one more copy of the whole instance).
    data_set = event.encoded_dataset(include_meta=False)
    data = (b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta), data_set)
    try:
        stored = write_spool_file(final_path, data, fsync=fsync)
    except OSError as exc:
        counts.add_failed()
        LOGGER.error("C-STORE %s from %s: cannot write %s: %s", uid, peer, final_path, exc)
        if exc.errno in _OUT_OF_RESOURCES_ERRNOS:
            return STATUS_OUT_OF_RESOURCES
        return STATUS_UNABLE_TO_PROCESS
    if stored:
        counts.add_stored(len(data[0]) + len(data[1]))
    else:
        counts.add_duplicate()
    return STATUS_SUCCESS


def _recv_whole(connection: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading into one buffer: all ``nr_bytes``, or what came before EOF."""
    buffer = bytearray(nr_bytes)
    nr_read = 0
    with memoryview(buffer) as view:
        while nr_read < nr_bytes:
            received = connection.socket.recv_into(view[nr_read:])
            if not received:
                break
            nr_read += received
    if nr_read < nr_bytes:
        del buffer[nr_read:]
    return buffer


def tune_connection(event: Event) -> None:
    """EVT_CONN_OPEN handler: send each PDU at once, and read each PDU in one go.

    A DIMSE message goes out as a command PDU then a data set PDU; with Nagle's algorithm the second
    waits for the peer's delayed ACK, about 40 ms per message on Linux, which caps C-FIND and C-STORE
    at a few dozen per second per association. And pynetdicom reads a PDU 4 KiB per ``recv`` call
    into a growing bytearray: ~200 Python-level calls per 800 KB radiograph, about a fifth of the
    receiving CPU time; reading into one buffer of the PDU's size makes that a handful of calls.
    """
    connection = event.assoc.dul.socket
    if connection is not None and connection.socket is not None:
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.recv = functools.partial(_recv_whole, connection)


def handle_rejected(event: Event, allowed_calling_aets: frozenset[str]) -> None:
    """EVT_REJECTED handler: say who was turned away and why (pynetdicom only logs 'Rejecting')."""
    requestor = event.assoc.requestor
    calling_aet = (requestor.ae_title or "").strip()
    if allowed_calling_aets and calling_aet not in allowed_calling_aets:
        reason = f"calling AE title not in the allowed list {sorted(allowed_calling_aets)}"
    else:
        reason = "too many concurrent associations"
    LOGGER.warning(
        "rejected association from %r at %s:%s: %s",
        calling_aet,
        requestor.address,
        requestor.port,
        reason,
    )


class SharedUIDContext(PresentationContext):
    """A supported presentation context that deep-copies without re-validating its UIDs.

    pynetdicom deep-copies every supported context for each incoming association. Deep-copying a
    pydicom ``UID`` re-runs its validation, so ~150 storage classes x 13 transfer syntaxes cost ~27 ms
    of GIL-bound CPU per association: most of the set-up time of each C-MOVE sub-association a PACS
    opens to us. UIDs are immutable strings, so sharing them keeps the copies independent.
    """

    def __deepcopy__(self, memo: dict) -> SharedUIDContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def shared_uid_context(abstract_syntax: str, transfer_syntaxes: Iterable[str]) -> SharedUIDContext:
    """A ``SharedUIDContext`` (default SCU/SCP roles) for one abstract syntax."""
    context = SharedUIDContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = list(transfer_syntaxes)
    return context


def storage_contexts() -> list[SharedUIDContext]:
    """Acceptor contexts: every storage SOP class with every accepted transfer syntax."""
    return [
        shared_uid_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts
    ]


class _SharedPortServer(ThreadedAssociationServer):
    """An association server whose port other processes of this user may bind too (SO_REUSEPORT).

    Linux hands each incoming connection to one of the listening sockets, so the C-STORE
    associations a PACS opens for C-MOVE requests spread over the processes of one pull.
    """

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class StorageSCP:
    """A Storage SCP (C-STORE + C-ECHO) on a background thread, spooling into ``spool_dir``.

    Use as a context manager, or call ``start()`` / ``stop()``. ``port=0`` binds a free port, read it
    back from ``.port``. ``allowed_calling_aets=None`` accepts any peer (logged as a warning).
    ``fsync=False`` answers Success before the instance is on disk (see ``write_spool_file``).
    ``share_port=True`` lets other processes of the same user listen on the same port (Linux
    SO_REUSEPORT), each taking a share of the incoming associations: how ``ingest.scu.retrieve``
    spreads a C-MOVE pull over several processes.
    """

    def __init__(
        self,
        spool_dir: str | os.PathLike,
        ae_title: str = "PEDXRAY",
        port: int = 0,
        allowed_calling_aets: Iterable[str] | None = None,
        host: str = "127.0.0.1",
        *,
        maximum_associations: int = 16,
        network_timeout: float = 60,
        dimse_timeout: float = 120,
        max_pdu: int = 0,
        share_port: bool = False,
        fsync: bool = True,
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"port must be 0 (pick a free one) or 1..65535, got {port}")
        if maximum_associations < 1:
            raise ValueError(f"maximum_associations must be >= 1, got {maximum_associations}")
        if allowed_calling_aets is not None and isinstance(allowed_calling_aets, str):
            raise ValueError("allowed_calling_aets must be a list of AE titles, not one string")
        self.spool_dir = Path(spool_dir)
        self.ae_title = ae_title
        self.host = host
        self.allowed_calling_aets = (
            None if allowed_calling_aets is None else frozenset(a.strip() for a in allowed_calling_aets)
        )
        if self.allowed_calling_aets is not None and not self.allowed_calling_aets:
            raise ValueError("allowed_calling_aets is empty: nobody could connect; pass None to allow any")
        if share_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("share_port=True needs SO_REUSEPORT (Linux, BSD, macOS): use one process")
        self.counts = StoreCounts()
        self._requested_port = port
        self._maximum_associations = maximum_associations
        self._network_timeout = network_timeout
        self._dimse_timeout = dimse_timeout
        self._max_pdu = max_pdu
        self.share_port = share_port
        self.fsync = fsync
        self._server = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("StorageSCP is not running: call start() first")
        return self._server.server_address[1]

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> StorageSCP:
        if self._server is not None:
            return self
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self._maximum_associations
        ae.network_timeout = self._network_timeout
        ae.dimse_timeout = self._dimse_timeout
        ae.maximum_pdu_size = self._max_pdu
        if self.allowed_calling_aets is None:
            LOGGER.warning("Storage SCP %s accepts associations from ANY calling AE title", self.ae_title)
        else:
            ae.require_calling_aet = sorted(self.allowed_calling_aets)
        handlers = [
            (evt.EVT_C_STORE, handle_store, [self.spool_dir, self.counts, self.fsync]),
            (evt.EVT_REJECTED, handle_rejected, [self.allowed_calling_aets or frozenset()]),
            (evt.EVT_CONN_OPEN, tune_connection),
        ]
        # Handed to the server as is: AE.supported_contexts would rebuild them as plain contexts.
        contexts = [*storage_contexts(), shared_uid_context(Verification, DEFAULT_TRANSFER_SYNTAXES)]
        address = (self.host, self._requested_port)
        if self.share_port:
            self._server = ae.make_server(
                address, contexts=contexts, evt_handlers=handlers, server_class=_SharedPortServer
            )
            ae._servers.append(self._server)  # what start_server does: shutdown() takes it out again
            threading.Thread(
                target=self._server.serve_forever, name=f"SharedPortSCP@{self.port}", daemon=True
            ).start()
        else:
            self._server = ae.start_server(address, block=False, contexts=contexts, evt_handlers=handlers)
        LOGGER.info(
            "Storage SCP %s listening on %s:%d, spooling into %s",
            self.ae_title,
            self.host,
            self.port,
            self.spool_dir,
        )
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        LOGGER.info("Storage SCP %s stopped: %s", self.ae_title, self.counts.snapshot())

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def settings(self) -> dict:
        """Keyword arguments that build an SCP like this one on the port it listens on (for a peer
        process sharing it)."""
        return {
            "spool_dir": self.spool_dir,
            "ae_title": self.ae_title,
            "port": self.port,
            "allowed_calling_aets": None
            if self.allowed_calling_aets is None
            else sorted(self.allowed_calling_aets),
            "host": self.host,
            "maximum_associations": self._maximum_associations,
            "network_timeout": self._network_timeout,
            "dimse_timeout": self._dimse_timeout,
            "max_pdu": self._max_pdu,
            "share_port": True,
            "fsync": self.fsync,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a Storage SCP that spools received instances.")
    parser.add_argument("--spool", required=True, type=Path, help="spool directory")
    parser.add_argument("--aet", default="PEDXRAY", help="our AE title (default PEDXRAY)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11112, help="port to bind (0 = any free port)")
    parser.add_argument(
        "--allow", nargs="+", metavar="AET", help="calling AE titles allowed to store (default: any)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with StorageSCP(args.spool, args.aet, args.port, args.allow, args.host) as scp:
        print(f"listening on {args.host}:{scp.port} as {args.aet}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

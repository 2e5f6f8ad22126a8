"""DICOM Storage SCP: receives C-STORE requests into an atomic, de-duplicated spool.

Each instance lands at ``spool/<first 2 hex of sha1(uid)>/<SOPInstanceUID>.dcm`` as the exact bytes
the peer sent (file meta + data set, no re-encoding). A file is written to a temp file in its final
directory, fsynced, then linked into place only if absent, and the directory fsynced, before the
C-STORE is answered with Success: a reader never sees a partial file, concurrent duplicates from
several associations (or processes) leave exactly one copy, and an acknowledged instance survives a
crash. ``fsync=False`` (``ingest pull --no-fsync``) drops the two fsyncs: still atomic against a
crash of this process, but after an OS crash or power loss an instance acknowledged in the last
seconds may be empty or cut short in the spool; see ``write_spool_file``.

``store_instance`` checks and spools one instance, whichever way it arrived. Two transports carry
the associations that bring images (``TRANSPORTS``, ``--transport`` on ``ingest pull``, ``ingest scu
pull`` and ``ingest scp``):

* ``fast`` (the default): ``StorageSCP`` (the C-MOVE destination) receives on
  ``ingest.dicom.acceptor``'s associations, and the C-GET client in ``ingest.dicom.scu`` passes
  ``store_instance`` as the ``on_store`` handler of its ``ingest.dicom.requestor`` associations: this
  project's own DICOM upper layer, measured faster than pynetdicom for bulk transfer.
* ``pynetdicom``: pynetdicom's own association server and requestor associations, with
  ``store_event`` bound to ``evt.EVT_C_STORE``. The spool is the same (``store_instance`` writes
  every instance, so file names, contents, de-duplication, statuses and counts do not change); it
  is slower. It is the path to switch to when a PACS vendor's implementation does not
  interoperate with the fast one: pynetdicom is the widely deployed implementation.

Our pynetdicom associations (C-ECHO, C-FIND, and all of them with ``pynetdicom``) bind
``tune_connection`` (EVT_CONN_OPEN), which turns Nagle off and pynetdicom's per-message log
chatter. ``StorageSCP(share_port=True)`` lets several processes listen on one port (SO_REUSEPORT),
so the PACS's C-STORE associations spread over them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import socket
import socketserver
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pydicom import uid as dicom_uid
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt

# Private to pynetdicom (pinned to 3.0.4 in pyproject.toml): the default handlers its associations
# bind for logging, which tune_connection unbinds. Check them again on a pynetdicom version bump.
from pynetdicom._handlers import standard_dimse_recv_handler, standard_dimse_sent_handler
from pynetdicom.dsutils import decode
from pynetdicom.events import Event
from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ingest.dicom.acceptor import StorageAcceptor
from ingest.dicom.upper_layer import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, ReceivedInstance

LOGGER = logging.getLogger("ingest.dicom.scp")

# Every syntax the catalog and preprocessing can decode. Uncompressed first, then the lossless codecs,
# then lossy ones: the order a C-GET proposes them in. As the acceptor we take the sender's order
# (see ingest.dicom.acceptor.negotiate), so each instance arrives in the syntax it was stored in.
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

# How the associations that carry images (receiving, C-MOVE and C-GET) run: see the module docstring.
TRANSPORTS: tuple[str, ...] = ("fast", "pynetdicom")
DEFAULT_TRANSPORT = "fast"
TRANSPORT_HELP = (
    "how the associations that carry images run: fast (default) is this project's own DICOM upper "
    "layer, measured faster for bulk transfer; pynetdicom uses pynetdicom's own associations and "
    "C-STORE handling, same spool, slower: switch to it when the PACS vendor's implementation does "
    "not interoperate with the fast one"
)

_OUT_OF_RESOURCES_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
# A DICOM UID: dot-separated digits, at most 64 characters. Checked before it becomes a file name.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# A spool temp file this old belongs to no live write (a 1 GB instance arrives in well under a minute).
STALE_PART_AGE_S = 3600
# How often the accept loop checks for stop(): socketserver's default (0.5 s) made every stop() wait
# up to 0.5 s, a third of a 190-instance C-MOVE pull in the retrieval benchmark.
_ACCEPT_LOOP_POLL_S = 0.02
_PIXEL_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"UN"})
# Bytes per value of the binary number VRs (and of "US or SS", whose choice pydicom makes later):
# pydicom refuses a value whose length is not a multiple of it, so that is all there is to check.
_NUMBER_SIZES = {"US": 2, "SS": 2, "US or SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "UV": 8, "SV": 8}
# VRs whose value pydicom parses on conversion and refuses when garbled. Text VRs only warn, and the
# other binary VRs (OB, OW, OF, ...) stay bytes, so converting those is skipped.
_PARSED_VRS = frozenset({"SQ", "AT"})
# Temp files without a name (Linux O_TMPFILE) are linked into place through /proc/self/fd. They save
# the temp name's create and unlink, and a killed writer leaves nothing behind.
_UNNAMED_TEMP_FILES = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


def check_transport(transport: str) -> None:
    """Raise ValueError, saying what to use, unless ``transport`` is one of TRANSPORTS."""
    if transport not in TRANSPORTS:
        raise ValueError(
            f"transport={transport!r}: use 'fast' (the default) or 'pynetdicom' (pynetdicom's own "
            "associations, for a PACS that does not interoperate with the fast one)"
        )


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


def present_in_spool(spool_dir: str | os.PathLike, uids: Iterable[str]) -> set[str]:
    """Which of ``uids`` are complete in the spool: one stat each, where ``spooled_uids`` lists it all."""
    return {uid for uid in uids if spool_path(spool_dir, uid).exists()}


def remove_stale_parts(spool_dir: str | os.PathLike, older_than_s: float = STALE_PART_AGE_S) -> int:
    """Delete the temp files (``.*.part``) a killed process left in the spool; how many went.

    Only those older than ``older_than_s``: a younger one may be a write another live process
    (a parallel pull into the same spool) has in progress.
    """
    cutoff = time.time() - older_than_s
    removed = 0
    for path in Path(spool_dir).glob("??/.*.part"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # its writer finished or another cleaner was first
    if removed:
        LOGGER.info("removed %d unfinished temp file(s) left by a killed process in %s", removed, spool_dir)
    return removed


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

    ``data`` may be a sequence of parts (file meta, then the data set), written by one ``writev``,
    which saves joining a large instance into one more copy.

    The data goes to an unnamed temp file in the final directory (``O_TMPFILE``; where the file
    system has none, a dot-named ``.part`` file), is verified complete (every byte taken by the
    kernel) and fsynced, then hard-linked into place. ``link`` refuses to overwrite, so of two
    concurrent writers exactly one wins and the other sees a duplicate. An unnamed temp file leaves
    nothing behind if the process dies; a ``.part`` file is removed by ``remove_stale_parts``. Where
    the file system has no hard links, ``os.replace`` still publishes a complete file atomically (a
    racing duplicate then overwrites identical bytes).

    ``fsync=False`` skips the file and directory fsyncs (about 5 ms per instance on a
    2-core test machine). The file still appears only once completely written, so a killed process leaves
    nothing partial; but the kernel may write the directory entry before the data, so after an OS
    crash the file can exist empty or cut short. The next pull counts it as present (it goes by
    name) and the catalog scan marks it ``unreadable`` with the reason; delete those files and pull
    again to fetch them.
    """
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    try:
        fd, temp_name = _open_temp(final_path.parent)
    except FileNotFoundError:  # the bucket's first instance: create the directory only then
        final_path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = _open_temp(final_path.parent)
    try:
        _write_all(fd, parts, final_path)
        if fsync:
            os.fsync(fd)
        stored = _link_into_place(fd, temp_name, final_path)
    finally:
        os.close(fd)
        if temp_name is not None:
            with contextlib.suppress(FileNotFoundError):  # os.replace moved it
                os.unlink(temp_name)
    if stored and fsync:
        _fsync_directory(final_path.parent)
    return stored


def _open_temp(directory: Path) -> tuple[int, str | None]:
    """A writable temp file in ``directory``: (fd, None) if unnamed, (fd, its path) otherwise."""
    if _UNNAMED_TEMP_FILES:
        try:
            # 0o600 as mkstemp gives: patient images are for this user only.
            return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
    return fd, temp_name


def _write_all(fd: int, parts: Sequence[bytes | bytearray | memoryview], final_path: Path) -> None:
    """Write ``parts`` in order; raise if the kernel stops taking bytes before the end."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        written = os.writev(fd, views)
        if written == 0:
            raise OSError(errno.EIO, f"short write: {final_path}")
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


def _link_into_place(fd: int, temp_name: str | None, final_path: Path) -> bool:
    """Give the written temp file its final name unless that exists; True if this call did."""
    try:
        if temp_name is None:
            # linkat(AT_SYMLINK_FOLLOW) links the file behind the magic link, not the link itself.
            # os.link calls plain link() unless given a dir fd; an absolute path ignores it.
            os.link(f"/proc/self/fd/{fd}", final_path, src_dir_fd=fd, follow_symlinks=True)
        else:
            os.link(temp_name, final_path)
    except FileExistsError:
        return False
    except OSError as exc:
        if temp_name is None or exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.replace(temp_name, final_path)
    return True


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


def _implicit_vr(tag: BaseTag) -> str:
    """The VR pydicom gives an implicit VR element: the dictionary's, or UN (any bytes) for the rest."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def check_convertible(dataset: Dataset) -> None:
    """Raise where pydicom would refuse to convert a value: a garbled sequence or binary number.

    Numbers are checked by length, sequences and tags by converting them (pydicom parses those).
    Text values are left raw: pydicom only warns about them, and converting the ~50 strings of a
    radiograph header took ~0.9 ms per instance, a tenth of the receiving CPU (the catalog scan
    reads them later anyway). Converting the numbers as well cost ~0.15 ms more. In implicit VR data
    the data dictionary says which elements those are.
    """
    for element in dataset.elements():
        if not isinstance(element, RawDataElement):
            continue
        vr = element.VR or _implicit_vr(element.tag)
        size = _NUMBER_SIZES.get(vr)
        if size is not None:
            length = len(element.value or b"")
            if length % size:
                raise ValueError(
                    f"element {element.tag} ({vr}) is {length} bytes long, not a multiple of {size}"
                )
        elif vr in _PARSED_VRS or " or " in vr:  # e.g. "US or OW": pydicom resolves it on conversion
            dataset[element.tag]


# Explicit VR little endian: VRs whose length is a 4-byte field after 2 reserved bytes (PS3.5 7.1.2).
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_LENGTH_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH"}
    | {b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_VR_SIZES = {vr.encode(): size for vr, size in _NUMBER_SIZES.items() if " " not in vr} | {b"AT": 4}
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_SOP_CLASS, _SOP_INSTANCE = (0x0008, 0x0016), (0x0008, 0x0018)
_CHARACTER_SET = (0x0008, 0x0005)
_PLAIN_CHARACTER_SET = re.compile(rb"[A-Z0-9_ \\]*")


class _Unusual(Exception):
    """Something the quick header walk does not vouch for: pydicom's full check decides."""


def plain_header_uids(data: bytes, syntax: UID) -> tuple[str, str] | None:
    """(SOPClassUID, SOPInstanceUID) of a data set whose header a quick walk finds sound; else None.

    Sound means what ``header_uids_by_pydicom`` accepts: every element within the bytes received,
    binary numbers of whole values, sequences that parse, and a complete Pixel Data as the last
    element. In implicit VR data the data dictionary gives each VR, as for pydicom's check. The
    walk only vouches: anything it does not expect (deflated or big endian data, an undefined
    length outside a sequence, tags out of order, a VR the dictionary leaves open, a UID that is
    not plain...) returns None, and pydicom then says what, if anything, is wrong. Parsing with
    pydicom and converting its sequences and numbers took ~0.35 ms per phantom instance, the
    largest part of receiving in Python; this walk takes ~0.05 ms.
    """
    if syntax.is_deflated or not syntax.is_little_endian:
        return None
    implicit = syntax.is_implicit_VR
    # pydicom reads a data set as explicit VR, whatever the syntax says, if its first element looks so.
    if implicit and len(data) >= 6 and all(0x40 < byte < 0x5B for byte in data[4:6]):
        return None
    uids: dict[tuple[int, int], str] = {}
    try:
        end = _walk_elements(data, 0, len(data), implicit, uids)
    except (_Unusual, struct.error, RecursionError):  # sequences nested thousands deep, for one
        return None
    if end != len(data):
        return None
    return uids.get(_SOP_CLASS, ""), uids.get(_SOP_INSTANCE, "")


def _walk_elements(
    data: bytes, offset: int, end: int, implicit: bool, uids: dict[tuple[int, int], str] | None = None
) -> int:
    """Walk the elements in ``data[offset:end]`` up to ``end`` or an item delimiter; where it stopped.

    ``uids`` is given for the top level only: it collects the SOP class and instance UIDs there.
    """
    top_level = uids is not None
    previous = (-1, -1)
    while offset < end:
        group, element = struct.unpack_from("<HH", data, offset)
        if (group, element) == _ITEM_END:
            return offset
        if (group, element) <= previous or group == 0xFFFE:
            raise _Unusual
        previous = (group, element)
        if implicit:
            (length,), value = struct.unpack_from("<L", data, offset + 4), offset + 8
            if top_level and group == 0x7FE0:
                return _pixel_data_end(data, group, element, None, length, value)
            vr = _dictionary_vr(group, element)
        else:
            vr = data[offset + 4 : offset + 6]
            if vr in _LONG_LENGTH_VRS:
                (length,), value = struct.unpack_from("<L", data, offset + 8), offset + 12
            elif vr in _SHORT_LENGTH_VRS:
                (length,), value = struct.unpack_from("<H", data, offset + 6), offset + 8
            else:
                raise _Unusual
            if top_level and group == 0x7FE0:
                return _pixel_data_end(data, group, element, vr, length, value)
        if vr == b"SQ":
            offset = _walk_sequence(data, value, length, end, implicit)
            continue
        if length == _UNDEFINED_LENGTH or value + length > end or length % _VR_SIZES.get(vr, 1):
            raise _Unusual
        # pydicom reads the character set while parsing, at every level, and can fail on it.
        if (group, element) == _CHARACTER_SET and not _PLAIN_CHARACTER_SET.fullmatch(
            data[value : value + length]
        ):
            raise _Unusual
        if top_level and (group, element) in (_SOP_CLASS, _SOP_INSTANCE):
            text = data[value : value + length].decode("iso8859").rstrip("\0 ")
            if not _UID_PATTERN.match(text):  # pydicom also strips other whitespace, splits at "\\"
                raise _Unusual
            uids[(group, element)] = text
        offset = value + length
    if offset != end:
        raise _Unusual
    return offset


def _dictionary_vr(group: int, element: int) -> bytes:
    """The VR of an implicit VR element as pydicom's check takes it; a VR left open (e.g. "US or OW")
    is pydicom's to resolve, except "US or SS", two bytes a value either way."""
    vr = _implicit_vr(BaseTag(group << 16 | element))
    if vr == "US or SS":
        return b"US"
    if " or " in vr:
        raise _Unusual
    return vr.encode()


def _walk_sequence(data: bytes, offset: int, length: int, end: int, implicit: bool) -> int:
    """Walk a sequence value's items; the offset just after the sequence."""
    undefined = length == _UNDEFINED_LENGTH
    stop = end if undefined else offset + length
    if stop > end:
        raise _Unusual
    while offset < stop:
        tag = struct.unpack_from("<HH", data, offset)
        (item_length,) = struct.unpack_from("<L", data, offset + 4)
        offset += 8
        if undefined and tag == _SEQUENCE_END and item_length == 0:
            return offset
        if tag != _ITEM:
            raise _Unusual
        if item_length == _UNDEFINED_LENGTH:
            offset = _walk_elements(data, offset, stop, implicit)
            if struct.unpack_from("<HHL", data, offset) != (*_ITEM_END, 0):
                raise _Unusual
            offset += 8
        else:
            if offset + item_length > stop:
                raise _Unusual
            offset = _walk_elements(data, offset, offset + item_length, implicit)
    if undefined or offset != stop:
        raise _Unusual
    return offset


def _pixel_data_end(data: bytes, group: int, element: int, vr: bytes | None, length: int, value: int) -> int:
    """Where the top-level Pixel Data value ends, if it is (7FE0,0010) (OB/OW: ``vr`` None in
    implicit VR data) and complete."""
    if (group, element) != (0x7FE0, 0x0010) or vr not in (None, b"OB", b"OW"):
        raise _Unusual
    if length == _UNDEFINED_LENGTH:
        try:
            return _encapsulated_end(data, value, "(7FE0,0010)")
        except ValueError:
            raise _Unusual from None
    if value + length > len(data):
        raise _Unusual
    return value + length


def header_uids(data: bytes, syntax: UID) -> tuple[str, str]:
    """(SOPClassUID, SOPInstanceUID) of a received data set; raise if pydicom could not read it whole.

    Garbled sequences and numbers surface here, with a status the PACS sees, not at catalog time.
    """
    uids = plain_header_uids(data, syntax)
    return uids if uids is not None else header_uids_by_pydicom(data, syntax)


def header_uids_by_pydicom(data: bytes, syntax: UID) -> tuple[str, str]:
    """``header_uids`` for any data set: parsed by pydicom, sequences and numbers converted."""
    dataset = decode_for_checks(data, syntax)
    truncated = first_truncated_element(dataset)
    if truncated is not None:
        raise ValueError(f"data set is truncated at element {truncated}")
    check_convertible(dataset)
    return str(dataset.get("SOPClassUID", "")), str(dataset.get("SOPInstanceUID", ""))


def decode_for_checks(data: bytes, syntax: UID) -> Dataset:
    """The data set's elements before Pixel Data, once the Pixel Data value is known to be complete.

    Parsing the Pixel Data value took about as long as everything else the receiver does per
    instance, and pydicom keeps no trace of an encapsulated value cut short (it warns and drops the
    element), so its bounds are checked here instead: a defined length against the bytes received,
    an encapsulated value by walking its items to the sequence delimiter. Where elements follow it
    (or the syntax is deflated or big endian) the whole data set is decoded.
    """
    if syntax.is_deflated or not syntax.is_little_endian:
        return decode(io.BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    stream = io.BytesIO(data)
    header = read_dataset(stream, syntax.is_implicit_VR, True, stop_when=_at_pixel_data)
    start = stream.tell()
    if start == len(data):
        return header  # no pixel data
    explicit_vr = data[start + 4 : start + 6]
    if len(data) < start + 12 or not (syntax.is_implicit_VR or explicit_vr in _PIXEL_VRS):
        return decode(io.BytesIO(data), syntax.is_implicit_VR, True)
    group, element = struct.unpack_from("<HH", data, start)
    tag = f"({group:04X},{element:04X})"
    if syntax.is_implicit_VR:
        (length,), value_start = struct.unpack_from("<L", data, start + 4), start + 8
    else:
        (length,), value_start = struct.unpack_from("<L", data, start + 8), start + 12
    if length == _UNDEFINED_LENGTH:
        end = _encapsulated_end(data, value_start, tag)
    else:
        end = value_start + length
        if end > len(data):
            available = max(len(data) - value_start, 0)
            raise ValueError(f"data set is truncated at element {tag} ({available} of {length} bytes)")
    if end == len(data):
        return header
    return decode(io.BytesIO(data), syntax.is_implicit_VR, True)


def _encapsulated_end(data: bytes, offset: int, tag: str) -> int:
    """Where the encapsulated value starting at ``offset`` ends: just after its sequence delimiter."""
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            return offset
        if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED_LENGTH:
            raise ValueError(f"element {tag}: ({group:04X},{element:04X}) where a fragment item belongs")
        offset += length
    raise ValueError(f"data set is truncated at element {tag} (no delimiter after its last fragment)")


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 == 0x7FE0


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes = b"\x00") -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_aet: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information (PS3.10 7.1) for a received data set.

    Encoded here: pydicom's dataset and writer validated every value again, ~0.5 ms per instance.
    """
    elements = (
        _meta_element(0x0001, b"OB", b"\x00\x01")
        + _meta_element(0x0002, b"UI", sop_class_uid.encode())
        + _meta_element(0x0003, b"UI", sop_instance_uid.encode())
        + _meta_element(0x0010, b"UI", transfer_syntax.encode())
        + _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode())
        + _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode(), b" ")
    )
    if source_aet:
        elements += _meta_element(0x0016, b"AE", source_aet.encode("ascii", "replace"), b" ")
    group_length = _meta_element(0x0000, b"UL", struct.pack("<L", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def store_instance(
    spool_dir: Path, counts: StoreCounts, instance: ReceivedInstance, fsync: bool = True
) -> int:
    """Check one received instance and spool it; the C-STORE status to answer. Never raises.

    Success is answered only once the instance is in the spool, and with ``fsync`` on disk.
    """
    uid, peer = instance.sop_instance_uid, instance.peer
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
        dataset_class, dataset_uid = header_uids(instance.dataset, instance.transfer_syntax)
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
    if dataset_class != instance.sop_class_uid:
        counts.add_failed()
        LOGGER.error(
            "C-STORE %s from %s: SOPClassUID %r in data set != %r in request",
            uid,
            peer,
            dataset_class,
            instance.sop_class_uid,
        )
        return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS

    # The data set as received, behind file meta naming this receiver.
    data = (
        part10_header(instance.sop_class_uid, uid, instance.transfer_syntax, instance.source_aet),
        instance.dataset,
    )
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


def received_instance(event: Event) -> ReceivedInstance:
    """The instance of a pynetdicom EVT_C_STORE event, as the fast transport hands one over: the
    data set as the peer sent it, with who sent it (the PACS, on a C-GET association too)."""
    request = event.request
    remote = event.assoc.remote
    source_aet = str(remote["ae_title"] or "").strip()
    return ReceivedInstance(
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
        sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        transfer_syntax=UID(event.context.transfer_syntax),
        dataset=event.encoded_dataset(include_meta=False),
        source_aet=source_aet,
        peer=f"{source_aet}@{remote['address']}:{remote['port']}",
    )


def store_event(event: Event, on_store: Callable[[ReceivedInstance], int]) -> int:
    """EVT_C_STORE handler of the pynetdicom transport: the status ``on_store`` (``store_instance``
    with its spool bound) answers for the event's instance."""
    return on_store(received_instance(event))


def setup_cli_logging() -> None:
    """INFO for this project's loggers; pynetdicom only from WARNING up: at INFO it writes every
    C-FIND match and DIMSE message, thousands of lines per pull."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def tune_connection(event: Event) -> None:
    """EVT_CONN_OPEN handler (our pynetdicom associations: C-ECHO, C-FIND, and on the pynetdicom
    transport every association): send each PDU at once and log only what is kept.

    A DIMSE message goes out as a command PDU then a data set PDU; with Nagle's algorithm the second
    waits for the peer's delayed ACK, about 40 ms per message on Linux, which caps C-FIND at a few
    dozen matches per second per association. pynetdicom's default handlers describe every DIMSE
    message (a C-FIND match element by element) before the logger decides whether to keep it;
    unless its logger is on at INFO they are unbound.
    """
    connection = event.assoc.dul.socket
    if connection is not None and connection.socket is not None:
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        event.assoc.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
        event.assoc.unbind(evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)


def storage_syntaxes() -> dict[str, tuple[str, ...]]:
    """What the SCP serves: every storage SOP class in every accepted transfer syntax, and C-ECHO."""
    syntaxes = {str(cx.abstract_syntax): ACCEPTED_TRANSFER_SYNTAXES for cx in AllStoragePresentationContexts}
    syntaxes[Verification] = tuple(DEFAULT_TRANSFER_SYNTAXES)
    return syntaxes


class _PynetdicomServer(ThreadedAssociationServer):
    """pynetdicom's association server (the pynetdicom transport), on a port other processes of
    this user may bind too when ``share_port`` (SO_REUSEPORT), and stopped as the fast one is."""

    def __init__(self, *args, share_port: bool = False, **kwargs) -> None:
        self.share_port = share_port
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.share_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        # Only the accept loop: AssociationServer.shutdown (pynetdicom 3.0.4, pinned) also closes the
        # socket and takes the server out of the AE's private list of those AE.start_server
        # started, a list this one (from AE.make_server) is not in. Re-check on a version bump.
        socketserver.BaseServer.shutdown(self)

    def close_connections(self) -> None:
        for assoc in self.active_associations:
            assoc.abort()


class StorageSCP:
    """A Storage SCP (C-STORE + C-ECHO) on background threads, spooling into ``spool_dir``.

    Use as a context manager, or call ``start()`` / ``stop()``. ``port=0`` binds a free port, read it
    back from ``.port``. ``allowed_calling_aets=None`` accepts any peer (logged as a warning); others
    are rejected, and the rejection logged. ``network_timeout`` aborts an association that sends
    nothing for that long. ``max_pdu`` is the largest PDU we accept (0 announces no maximum; a PDU
    over 256 MiB is refused all the same). ``fsync=False`` answers Success before the instance is on
    disk (see ``write_spool_file``). ``share_port=True`` lets other processes of the same user listen
    on the same port (Linux SO_REUSEPORT), each taking a share of the incoming associations: how
    ``ingest.dicom.scu.retrieve`` spreads a C-MOVE pull over several processes. The associations
    themselves run in ``ingest.dicom.acceptor`` (``transport="fast"``) or in pynetdicom's association
    server (``transport="pynetdicom"``, for a PACS that does not interoperate with the fast one);
    either way ``store_instance`` writes the spool.
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
        max_pdu: int = 0,
        share_port: bool = False,
        fsync: bool = True,
        transport: str = DEFAULT_TRANSPORT,
    ) -> None:
        check_transport(transport)
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
        self._max_pdu = max_pdu
        self.share_port = share_port
        self.fsync = fsync
        self.transport = transport
        self._server: StorageAcceptor | _PynetdicomServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("StorageSCP is not running: call start() first")
        return self._server.server_address[1]

    @property
    def running(self) -> bool:
        return self._server is not None

    def _admit(self, calling_aet: str) -> str | None:
        if self.allowed_calling_aets is None or calling_aet in self.allowed_calling_aets:
            return None
        return f"calling AE title not in the allowed list {sorted(self.allowed_calling_aets)}"

    def _store(self, instance: ReceivedInstance) -> int:
        return store_instance(self.spool_dir, self.counts, instance, self.fsync)

    def _log_rejection(self, event: Event) -> None:
        """EVT_REJECTED handler (pynetdicom transport): who was turned away and why, as the fast one
        logs it (pynetdicom itself logs only "Rejecting Association", at INFO)."""
        requestor = event.assoc.requestor
        calling_aet = str(requestor.ae_title or "").strip()
        # pynetdicom rejects for a calling AE title it does not require, or a full house.
        reason = self._admit(calling_aet) or "too many concurrent associations"
        where = f"{requestor.address}:{requestor.port}"
        LOGGER.warning("rejected association from %r at %s: %s", calling_aet, where, reason)

    def _pynetdicom_server(self) -> _PynetdicomServer:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self._maximum_associations
        ae.network_timeout = self._network_timeout
        ae.maximum_pdu_size = self._max_pdu
        if self.allowed_calling_aets is not None:
            ae.require_calling_aet = sorted(self.allowed_calling_aets)
        syntaxes = storage_syntaxes()
        contexts = [build_context(abstract, list(accepted)) for abstract, accepted in syntaxes.items()]
        handlers = [
            (evt.EVT_C_STORE, store_event, [self._store]),
            (evt.EVT_REJECTED, self._log_rejection),
            (evt.EVT_CONN_OPEN, tune_connection),
        ]
        return ae.make_server(
            (self.host, self._requested_port),
            contexts=contexts,
            evt_handlers=handlers,
            server_class=_PynetdicomServer,
            share_port=self.share_port,
        )

    def start(self) -> StorageSCP:
        if self._server is not None:
            return self
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(self.spool_dir)
        if self.allowed_calling_aets is None:
            LOGGER.warning("Storage SCP %s accepts associations from ANY calling AE title", self.ae_title)
        if self.transport == "pynetdicom":
            self._server = self._pynetdicom_server()
        else:
            self._server = StorageAcceptor(
                (self.host, self._requested_port),
                on_store=self._store,
                admit=self._admit,
                syntaxes=storage_syntaxes(),
                maximum_associations=self._maximum_associations,
                network_timeout=self._network_timeout,
                max_pdu=self._max_pdu,
                share_port=self.share_port,
            )
        threading.Thread(
            target=self._server.serve_forever,
            args=(_ACCEPT_LOOP_POLL_S,),
            name=f"StorageSCP@{self.port}",
            daemon=True,
        ).start()
        LOGGER.info(
            "Storage SCP %s listening on %s:%d (%s transport), spooling into %s",
            self.ae_title,
            self.host,
            self.port,
            self.transport,
            self.spool_dir,
        )
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
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
            "max_pdu": self._max_pdu,
            "share_port": True,
            "fsync": self.fsync,
            "transport": self.transport,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest scp", description="Run a Storage SCP that spools received instances."
    )
    parser.add_argument("--spool", required=True, type=Path, help="spool directory")
    parser.add_argument("--aet", default="PEDXRAY", help="our AE title (default PEDXRAY)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11112, help="port to bind (0 = any free port)")
    parser.add_argument(
        "--allow", nargs="+", metavar="AET", help="calling AE titles allowed to store (default: any)"
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default=DEFAULT_TRANSPORT, help=TRANSPORT_HELP)
    args = parser.parse_args(argv)
    setup_cli_logging()
    with StorageSCP(args.spool, args.aet, args.port, args.allow, args.host, transport=args.transport) as scp:
        print(f"listening on {args.host}:{scp.port} as {args.aet}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

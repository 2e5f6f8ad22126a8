"""The Storage SCP: who may store, what lands in the spool, and the status a bad instance gets."""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from factories import make_instance
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom._handlers import standard_dimse_recv_handler
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

import ingest.dicom.scp as scp_module
from ingest.dicom.requestor import AssociationRejected, RequestorAssociation, Timeouts
from ingest.dicom.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    TRANSPORTS,
    StorageSCP,
    StoreCounts,
    check_convertible,
    header_uids_by_pydicom,
    plain_header_uids,
    spool_path,
    spooled_uids,
    store_instance,
    tune_connection,
    write_spool_file,
)
from ingest.dicom.upper_layer import ReceivedInstance

ALLOWED = "GOODPACS"
STUDY = "1.2.826.0.1.3680043.10.998.1"


def instance(tmp_path: Path, n: int, seed: int | None = None) -> Path:
    uid = f"{STUDY}.1.{n}"
    return make_instance(
        tmp_path / "src" / f"{uid}-{seed}.dcm",
        study_uid=STUDY,
        series_uid=f"{STUDY}.1",
        sop_uid=uid,
        seed=n if seed is None else seed,
    )


def associate(scp: StorageSCP, calling_aet: str = ALLOWED):
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)


def leftover_temp_files(spool: Path) -> list[Path]:
    return [path for path in spool.rglob(".*") if path.is_file()]


@pytest.fixture(params=TRANSPORTS)
def scp(tmp_path, request):
    """A running Storage SCP on each transport: both must give the same statuses, spool and counts."""
    with StorageSCP(tmp_path / "spool", "PEDXRAY", 0, [ALLOWED], transport=request.param) as server:
        yield server


def test_instances_are_accepted_in_the_syntax_the_pacs_stored_them(scp):
    ae = AE(ae_title=ALLOWED)
    ae.add_requested_context(ComputedRadiographyImageStorage, [JPEG2000Lossless])
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, [JPEGBaseline8Bit])
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
    try:
        accepted = {str(cx.abstract_syntax): cx.transfer_syntax for cx in assoc.accepted_contexts}
        assert assoc.send_c_echo().Status == STATUS_SUCCESS
    finally:
        assoc.release()
    assert accepted == {
        ComputedRadiographyImageStorage: [JPEG2000Lossless],
        DigitalXRayImageStorageForPresentation: [JPEGBaseline8Bit],
        Verification: [ImplicitVRLittleEndian],
    }


@pytest.mark.parametrize("pynetdicom_level", [logging.WARNING, logging.INFO])
def test_pynetdicom_describes_messages_only_when_its_log_is_kept(scp, pynetdicom_level):
    logger = logging.getLogger("pynetdicom")
    logger.setLevel(pynetdicom_level)
    try:
        ae = AE(ae_title=ALLOWED)
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1", scp.port, ae_title=scp.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)]
        )
        try:
            assert assoc.send_c_echo().Status == STATUS_SUCCESS
            bound = [handler for handler, _ in assoc.get_handlers(evt.EVT_DIMSE_RECV)]
        finally:
            assoc.release()
    finally:
        logger.setLevel(logging.NOTSET)
    assert (standard_dimse_recv_handler in bound) == (pynetdicom_level == logging.INFO)


def test_stored_instance_lands_at_its_spool_path_byte_for_byte_dataset(scp, tmp_path):
    source = instance(tmp_path, 1)
    assoc = associate(scp)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(pydicom.dcmread(source)).Status == STATUS_SUCCESS
        assert assoc.send_c_echo().Status == STATUS_SUCCESS
    finally:
        assoc.release()
    uid = pydicom.dcmread(source).SOPInstanceUID
    stored = pydicom.dcmread(spool_path(scp.spool_dir, uid))
    assert stored == pydicom.dcmread(source)
    assert stored.file_meta.MediaStorageSOPInstanceUID == uid
    assert spooled_uids(scp.spool_dir) == {uid}
    assert scp.counts.snapshot()["stored"] == 1
    assert leftover_temp_files(scp.spool_dir) == []


def test_unknown_calling_aet_is_rejected_and_logged(scp, caplog):
    # Our requestor, not pynetdicom's: pynetdicom 3.0.4 reports about 1 in 100 quick rejections as an
    # abort (its DUL thread closes the socket on the A-ASSOCIATE-RJ before ACSE checks the socket).
    caplog.set_level(logging.WARNING, logger="ingest.dicom")
    with pytest.raises(AssociationRejected) as rejection:
        RequestorAssociation.open(
            "127.0.0.1",
            scp.port,
            calling_aet="STRANGER",
            called_aet=scp.ae_title,
            contexts=[(Verification, [ImplicitVRLittleEndian])],
            max_pdu=16384,
            timeouts=Timeouts(connect=5, acse=5, dimse=5),
        )
    # PS3.8 9.3.4: rejected permanent, by the service user, calling AE title not recognised.
    assert (rejection.value.result, rejection.value.source, rejection.value.reason) == (0x01, 0x01, 0x03)
    assert "rejected association from 'STRANGER'" in caplog.text
    assert "not in the allowed list ['GOODPACS']" in caplog.text
    assert list(scp.spool_dir.iterdir()) == []


def test_duplicate_is_stored_once_and_the_first_copy_is_kept(scp, tmp_path):
    first, second = instance(tmp_path, 1, seed=1), instance(tmp_path, 1, seed=2)  # same UID, other pixels
    assoc = associate(scp)
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in (first, second, first)]
    finally:
        assoc.release()
    assert statuses == [STATUS_SUCCESS] * 3
    kept = pydicom.dcmread(spool_path(scp.spool_dir, pydicom.dcmread(first).SOPInstanceUID))
    assert kept.PixelData == pydicom.dcmread(first).PixelData
    assert len(list(scp.spool_dir.rglob("*.dcm"))) == 1
    assert scp.counts.snapshot()["stored"] == 1
    assert scp.counts.snapshot()["duplicate"] == 2


def test_concurrent_duplicates_from_parallel_associations_leave_one_file(scp, tmp_path):
    dataset = pydicom.dcmread(instance(tmp_path, 1))
    statuses: list[int] = []

    def store() -> None:
        assoc = associate(scp)
        try:
            statuses.append(assoc.send_c_store(dataset).Status)
        finally:
            assoc.release()

    threads = [threading.Thread(target=store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [STATUS_SUCCESS] * 6
    assert len(list(scp.spool_dir.rglob("*.dcm"))) == 1
    counts = scp.counts.snapshot()
    assert (counts["stored"], counts["duplicate"]) == (1, 5)
    assert leftover_temp_files(scp.spool_dir) == []


def raw_part10(path: Path, sop_uid: str, dataset_bytes: bytes) -> Path:
    """A Part 10 file whose meta names sop_uid but whose data set is dataset_bytes."""
    meta = pydicom.dcmread(instance(path.parent, 99)).file_meta
    meta.MediaStorageSOPInstanceUID = sop_uid
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes)
    return path


def explicit_le_bytes(dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, dataset)
    return buffer.getvalue()


def test_bad_data_gets_a_failure_status_and_the_association_survives(scp, tmp_path, monkeypatch, caplog):
    # Send files as raw bytes after their meta, as a faulty PACS would, instead of letting
    # pynetdicom parse (and refuse) them first.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    good = pydicom.dcmread(instance(tmp_path, 1))
    without_uid = pydicom.dcmread(instance(tmp_path, 2))
    del without_uid.SOPInstanceUID
    wrong_class = pydicom.dcmread(instance(tmp_path, 3))
    wrong_class.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture inside a CR request
    complete = explicit_le_bytes(pydicom.dcmread(instance(tmp_path, 4)))
    truncated = raw_part10(tmp_path / "cut.dcm", f"{STUDY}.1.4", complete[:-100])
    missing_uid = raw_part10(tmp_path / "no-uid.dcm", f"{STUDY}.1.2", explicit_le_bytes(without_uid))
    wrong = raw_part10(tmp_path / "wrong.dcm", f"{STUDY}.1.3", explicit_le_bytes(wrong_class))
    assoc = associate(scp)
    try:
        assert assoc.send_c_store(truncated).Status == STATUS_CANNOT_UNDERSTAND
        assert assoc.send_c_store(missing_uid).Status == STATUS_CANNOT_UNDERSTAND
        assert assoc.send_c_store(wrong).Status == STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert assoc.is_established
        assert assoc.send_c_store(good).Status == STATUS_SUCCESS
    finally:
        assoc.release()
    assert spooled_uids(scp.spool_dir) == {good.SOPInstanceUID}
    assert scp.counts.snapshot()["failed"] == 3
    assert "truncated at element (7FE0,0010)" in caplog.text
    assert leftover_temp_files(scp.spool_dir) == []


def test_a_garbled_number_gets_cannot_understand_though_text_values_are_not_decoded(
    scp, tmp_path, monkeypatch
):
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    source = pydicom.dcmread(instance(tmp_path, 5))
    encoded = explicit_le_bytes(source)
    rows = b"\x28\x00\x10\x00US\x02\x00" + source.Rows.to_bytes(2, "little")
    assert encoded.count(rows) == 1
    garbled = raw_part10(
        tmp_path / "rows.dcm", source.SOPInstanceUID, encoded.replace(rows, b"\x28\x00\x10\x00US\x03\x00abc")
    )
    assoc = associate(scp)
    try:
        assert assoc.send_c_store(garbled).Status == STATUS_CANNOT_UNDERSTAND
    finally:
        assoc.release()
    assert spooled_uids(scp.spool_dir) == set()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stop_returns_at_once(tmp_path, transport):
    # A pull stops its SCP at the end; socketserver's default accept-loop poll made that wait ~0.5 s.
    for _ in range(3):
        scp = StorageSCP(tmp_path / "spool", "PEDXRAY", 0, [ALLOWED], transport=transport).start()
        started = time.monotonic()
        scp.stop()
        assert time.monotonic() - started < 0.25


def test_implicit_vr_numbers_are_checked_by_their_dictionary_vr(tmp_path):
    # Implicit VR elements carry no VR: the data dictionary says Rows is US, so a 3-byte Rows is
    # refused though the text elements beside it are not converted.
    source = pydicom.dcmread(instance(tmp_path, 6))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, source)
    encoded = buffer.getvalue()
    rows = b"\x28\x00\x10\x00\x02\x00\x00\x00" + source.Rows.to_bytes(2, "little")
    assert encoded.count(rows) == 1
    garbled = encoded.replace(rows, b"\x28\x00\x10\x00\x03\x00\x00\x00abc")

    def received(data: bytes) -> ReceivedInstance:
        syntax = UID(ImplicitVRLittleEndian)
        return ReceivedInstance(source.SOPClassUID, source.SOPInstanceUID, syntax, data, "PACS", "PACS@test")

    counts = StoreCounts()
    assert store_instance(tmp_path / "spool", counts, received(garbled)) == STATUS_CANNOT_UNDERSTAND
    assert store_instance(tmp_path / "spool", counts, received(encoded)) == STATUS_SUCCESS
    assert spooled_uids(tmp_path / "spool") == {source.SOPInstanceUID}


# One tag of each binary number VR (its dictionary VR, for the implicit VR case).
_NUMBER_VR_TAGS = {
    "US": 0x00280010,  # Rows
    "SS": 0x00189219,  # Tag Angle Second Axis
    "US or SS": 0x00189810,  # Zero Velocity Pixel Value
    "UL": 0x00081161,  # Simple Frame List
    "SL": 0x00186020,  # Reference Pixel X0
    "FL": 0x00089459,  # Recommended Display Frame Rate in Float
    "FD": 0x00081163,  # Time Range
    "UV": 0x0008040C,  # File Offset in Container
    "SV": 0x00720082,  # Selector SV Value
}


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("vr", sorted(_NUMBER_VR_TAGS))
def test_numbers_are_refused_exactly_where_pydicom_cannot_convert_them(vr, implicit):
    # check_convertible checks numbers by length instead of converting them: it must agree with
    # pydicom's conversion on every length, or a garbled header gets into the spool (or a good one not).
    tag = Tag(_NUMBER_VR_TAGS[vr])
    wire_vr = None if implicit else ("US" if vr == "US or SS" else vr)

    def dataset(length: int) -> pydicom.Dataset:
        data = pydicom.Dataset()
        data[tag] = RawDataElement(tag, wire_vr, length, bytes(range(length)), 0, implicit, True)
        return data

    for length in range(17):
        try:
            dataset(length)[tag]
            converts = True
        except Exception:  # pydicom raises several types for a value of the wrong length
            converts = False
        try:
            check_convertible(dataset(length))
            accepted = True
        except ValueError as exc:
            accepted = False
            assert f"{length} bytes long" in str(exc)
        assert accepted == converts, (vr, length)


def _data_sets_as_received() -> list[tuple[str, bytes, UID]]:
    """(name, data set bytes, transfer syntax) of pydicom's own test files, as a C-STORE carries them."""
    found = []
    # The files pydicom ships (get_testdata_files would also try to download its larger ones).
    for path in sorted(Path(get_testdata_file("CT_small.dcm")).parent.glob("*.dcm")):
        raw = Path(path).read_bytes()
        stream = io.BytesIO(raw)
        try:
            read_preamble(stream, False)
            meta = _read_file_meta_info(stream)
            found.append((Path(path).name, raw[stream.tell() :], UID(meta.TransferSyntaxUID)))
        except Exception:  # files without file meta: nothing says their transfer syntax
            continue
    return found


def _pydicom_verdict(data: bytes, syntax: UID) -> tuple[str, str] | str:
    try:
        return header_uids_by_pydicom(data, syntax)
    except Exception as exc:
        return f"refused: {exc!r}"


def test_the_quick_header_walk_vouches_only_for_what_pydicom_reads_the_same_way():
    # Each of pydicom's test files whole, cut short at many points, and with bytes of its header
    # overwritten at random: wherever the quick walk vouches for a data set, pydicom's own parse
    # must accept it too and give the same UIDs, or a bad instance would be stored as good.
    rng = random.Random(0)
    vouched = 0

    def check(variant: bytes, syntax: UID, name: str) -> None:
        nonlocal vouched
        quick = plain_header_uids(variant, syntax)
        if quick is not None:
            vouched += 1
            assert quick == _pydicom_verdict(variant, syntax), (name, len(variant))

    for name, data, syntax in _data_sets_as_received():
        header = min(len(data), 2048)
        for cut in [*range(0, header, 7), len(data) - 1, len(data) // 2]:
            check(data[:cut], syntax, f"{name} cut at {cut}")
        garbled = bytearray(data)
        for _ in range(100):
            at = rng.randrange(header)
            garbled[at] = rng.randrange(256)
            check(bytes(garbled), syntax, f"{name} byte {at} set to {garbled[at]}")
            garbled[at] = data[at]
        check(data, syntax, name)
    # The walk is used at all: on the whole explicit VR files and their harmless variants.
    assert vouched > 2000, vouched


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_the_quick_header_walk_reads_a_radiograph_as_pydicom_does(tmp_path, implicit):
    for number in range(3):
        source = pydicom.dcmread(instance(tmp_path, number))
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
        pydicom.filewriter.write_dataset(buffer, source)
        encoded = buffer.getvalue()
        syntax = UID(ImplicitVRLittleEndian if implicit else source.file_meta.TransferSyntaxUID)
        expected = (str(source.SOPClassUID), str(source.SOPInstanceUID))
        assert plain_header_uids(encoded, syntax) == expected == header_uids_by_pydicom(encoded, syntax)


def test_sequences_nested_thousands_deep_are_refused_not_a_crash(tmp_path):
    nested = 5000
    opening = struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    data = opening * nested + closing * nested
    syntax = UID(ExplicitVRLittleEndian)
    assert plain_header_uids(data, syntax) is None  # the quick walk leaves it to pydicom
    counts = StoreCounts()
    sop_class = DigitalXRayImageStorageForPresentation
    received = ReceivedInstance(sop_class, "1.2.3.4", syntax, data, "PACS", "PACS@test")
    assert store_instance(tmp_path / "spool", counts, received) == STATUS_CANNOT_UNDERSTAND
    assert counts.snapshot()["failed"] == 1


def test_full_disk_answers_out_of_resources_and_writes_nothing(scp, tmp_path, monkeypatch):
    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scp_module.os, "fsync", disk_full)
    assoc = associate(scp)
    try:
        assert assoc.send_c_store(pydicom.dcmread(instance(tmp_path, 1))).Status == STATUS_OUT_OF_RESOURCES
    finally:
        assoc.release()
    assert [path for path in scp.spool_dir.rglob("*") if path.is_file()] == []


@pytest.mark.parametrize(("fsync", "fsyncs_per_instance"), [(True, 2), (False, 0)])
def test_an_instance_is_on_disk_before_success_unless_fsync_is_off(
    tmp_path, monkeypatch, fsync, fsyncs_per_instance
):
    synced: list[int] = []
    real_fsync = scp_module.os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(scp_module.os, "fsync", recording_fsync)
    source = instance(tmp_path, 1)
    with StorageSCP(tmp_path / "spool", "PEDXRAY", 0, [ALLOWED], fsync=fsync) as server:
        assoc = associate(server)
        try:
            assert assoc.send_c_store(pydicom.dcmread(source)).Status == STATUS_SUCCESS
            # The handler has returned Success by now: the file and its directory entry were synced.
            assert len(synced) == fsyncs_per_instance
        finally:
            assoc.release()
        stored = pydicom.dcmread(spool_path(server.spool_dir, f"{STUDY}.1.1"))
    assert stored.PixelData == pydicom.dcmread(source).PixelData
    assert leftover_temp_files(tmp_path / "spool") == []


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk's storescu is not installed")
def test_dcmtk_stores_compressed_instances_as_they_were_sent(scp):
    # dcmtk is a second, independent implementation of the sending side; the spool files must not
    # depend on the transport (the same bytes behind the same file meta).
    peer = ["-aet", ALLOWED, "-aec", "PEDXRAY", "127.0.0.1", str(scp.port)]
    for name, options in [("JPEG2000.dcm", ["-R", "-xw"]), ("CT_small.dcm", ["-pdu", "4096"])]:
        result = subprocess.run(["storescu", *options, *peer, get_testdata_file(name)], capture_output=True)
        assert result.returncode == 0, result.stderr.decode()
        source = pydicom.dcmread(get_testdata_file(name))
        stored = pydicom.dcmread(spool_path(scp.spool_dir, source.SOPInstanceUID))
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert stored.file_meta.SourceApplicationEntityTitle == ALLOWED
        assert stored.PixelData == source.PixelData
    assert scp.counts.snapshot()["stored"] == 2
    stranger = ["-aet", "STRANGER", *peer[2:]]
    assert subprocess.run(["echoscu", *stranger], capture_output=True).returncode != 0


def test_both_transports_write_the_same_spool_file(tmp_path):
    source = pydicom.dcmread(instance(tmp_path, 1))
    stored = {}
    for transport in TRANSPORTS:
        with StorageSCP(tmp_path / transport, "PEDXRAY", 0, [ALLOWED], transport=transport) as server:
            assoc = associate(server)
            try:
                assert assoc.send_c_store(source).Status == STATUS_SUCCESS
            finally:
                assoc.release()
        path = spool_path(server.spool_dir, source.SOPInstanceUID)
        stored[transport] = (path.relative_to(server.spool_dir), path.read_bytes())
    assert len(set(stored.values())) == 1, "the spool file depends on the transport"


def test_write_spool_file_never_replaces_a_complete_file(tmp_path):
    target = spool_path(tmp_path, "1.2.3.4")
    assert write_spool_file(target, b"first") is True
    assert write_spool_file(target, b"second") is False
    assert target.read_bytes() == b"first"
    assert leftover_temp_files(tmp_path) == []


@pytest.fixture(params=["unnamed", "named"])
def temp_file_kind(request, monkeypatch):
    """Both ways write_spool_file makes its temp file: O_TMPFILE, and a .part file where there is none."""
    if request.param == "named":
        real_open = os.open

        def no_tmpfile(path, flags, *args, **kwargs):
            if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(scp_module.os, "open", no_tmpfile)
    elif not scp_module._UNNAMED_TEMP_FILES:
        pytest.skip("no O_TMPFILE or /proc/self/fd here")
    return request.param


def test_write_spool_file_writes_every_part_however_the_kernel_splits_the_write(
    tmp_path, monkeypatch, temp_file_kind
):
    real_writev = os.writev
    calls = []

    def at_most_5000_bytes(fd, buffers):
        calls.append(1)
        kept, room = [], 5000
        for buffer in buffers:
            kept.append(memoryview(buffer)[:room])
            room -= len(kept[-1])
        return real_writev(fd, [view for view in kept if len(view)])

    monkeypatch.setattr(scp_module.os, "writev", at_most_5000_bytes)
    meta, body = b"M" * 333, bytes(range(256)) * 100
    target = spool_path(tmp_path, "1.2.3.4")
    assert write_spool_file(target, (meta, body)) is True
    assert target.read_bytes() == meta + body
    assert len(calls) == -(-len(meta + body) // 5000)
    assert leftover_temp_files(tmp_path) == []


def test_spool_files_are_readable_by_their_owner_only(tmp_path, temp_file_kind):
    target = spool_path(tmp_path, "1.2.3.4")
    write_spool_file(target, b"a patient's image")
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("failing", ["writev", "link", "fsync"])
def test_a_failed_write_leaves_nothing_in_the_spool(tmp_path, monkeypatch, temp_file_kind, failing):
    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(scp_module.os, failing, fail)
    target = spool_path(tmp_path, "1.2.3.4")
    with pytest.raises(OSError):
        write_spool_file(target, (b"meta", b"data set"))
    assert list(target.parent.iterdir()) == []


def test_a_kernel_that_takes_no_more_bytes_is_a_short_write(tmp_path, monkeypatch, temp_file_kind):
    monkeypatch.setattr(scp_module.os, "writev", lambda fd, buffers: 0)
    target = spool_path(tmp_path, "1.2.3.4")
    with pytest.raises(OSError, match="short write"):
        write_spool_file(target, b"data set")
    assert list(target.parent.iterdir()) == []


def test_temp_files_a_killed_process_left_are_removed_when_the_scp_starts(tmp_path):
    spool = tmp_path / "spool"
    write_spool_file(spool_path(spool, "1.2.3.4"), b"done")
    stale, fresh = spool_path(spool, "1.2.3.4").parent / ".dead.part", spool / "ab" / ".live.part"
    fresh.parent.mkdir(parents=True, exist_ok=True)
    for path in (stale, fresh):
        path.write_bytes(b"half")
    an_hour_and_more = time.time() - scp_module.STALE_PART_AGE_S - 60
    os.utime(stale, (an_hour_and_more, an_hour_and_more))
    with StorageSCP(spool, "PEDXRAY", 0, [ALLOWED]):
        pass
    assert not stale.exists()
    assert fresh.exists()  # may be a live write of another process sharing the spool
    assert spooled_uids(spool) == {"1.2.3.4"}


def test_spooled_uids_ignores_unfinished_temp_files(tmp_path):
    target = spool_path(tmp_path, "1.2.3.4")
    write_spool_file(target, b"done")
    (target.parent / ".1.2.3.5.dcm.part").write_bytes(b"half")
    assert spooled_uids(tmp_path) == {"1.2.3.4"}


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.abc", "", "1." + "2" * 70])
def test_spool_path_refuses_what_is_not_a_uid(tmp_path, uid):
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        spool_path(tmp_path, uid)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "port must be 0"),
        ({"allowed_calling_aets": "GOODPACS"}, "list of AE titles, not one string"),
        ({"allowed_calling_aets": []}, "allowed_calling_aets is empty"),
        ({"maximum_associations": 0}, "maximum_associations must be >= 1"),
        ({"transport": "dcmtk"}, "use 'fast' .* or 'pynetdicom'"),
    ],
)
def test_invalid_scp_settings_say_what_to_fix(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        StorageSCP(tmp_path, **kwargs)

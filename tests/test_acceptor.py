"""The Storage SCP's own upper layer: negotiation, the data phase, and what a misbehaving peer gets.

The peer side is built from pynetdicom's PDU and DIMSE encoders, an implementation independent of
``ingest.dicom.acceptor``, over a raw socket so the tests can break the protocol on purpose.
"""

from __future__ import annotations

import io
import logging
import shutil
import socket
import struct
import subprocess
import threading
import time

import pydicom
import pytest
from factories import make_instance
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from waiting import wait_until

from ingest.dicom import acceptor, upper_layer
from ingest.dicom.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SUCCESS,
    StorageSCP,
    StoreCounts,
    spool_path,
    spooled_uids,
    storage_syntaxes,
    store_instance,
)

ALLOWED = "GOODPACS"
STUDY = "1.2.826.0.1.3680043.10.998.7"
PEER_MAX_PDU = 16384


def context(context_id: int, abstract_syntax: str, transfer_syntaxes: list[str]):
    cx = build_context(abstract_syntax, transfer_syntaxes)
    cx.context_id = context_id
    return cx


def associate_rq(contexts, calling_aet: str = ALLOWED) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_aet
    primitive.called_ae_title = "PEDXRAY"
    primitive.presentation_context_definition_list = contexts
    maximum_length = MaximumLengthNotification()
    maximum_length.maximum_length_received = PEER_MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.10.998.99"
    primitive.user_information = [maximum_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


class RawPeer:
    """A requestor that sends whatever a test tells it to."""

    def __init__(self, port: int, contexts, calling_aet: str = ALLOWED) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(associate_rq(contexts, calling_aet))
        self.reply_type, self.reply = self.read_pdu()

    def read_pdu(self) -> tuple[int | None, bytes]:
        header = self._read(6)
        if len(header) < 6:
            return None, b""
        pdu_type, _, length = struct.unpack(">BBL", header)
        return pdu_type, self._read(length)

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def send_message(self, message, context_id: int) -> None:
        for primitive in message.encode_msg(context_id, PEER_MAX_PDU):
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            self.sock.sendall(pdu.encode())

    def response_status(self) -> int:
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x04, f"expected a P-DATA-TF, got {pdu_type}"
        command = b"".join(bytes(fragment) for _, _, fragment in upper_layer.iter_pdvs(memoryview(body)))
        return decode(io.BytesIO(command), True, True).Status

    def close(self) -> None:
        self.sock.close()


def echo_rq(message_id: int = 1):
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return message


def store_rq(dataset: pydicom.Dataset, encoded: bytes, message_id: int = 1):
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = dataset.SOPClassUID
    primitive.AffectedSOPInstanceUID = dataset.SOPInstanceUID
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return message


def explicit_le(dataset: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def pynetdicom_echo(port: int) -> int:
    ae = AE(ae_title=ALLOWED)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PEDXRAY")
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


@pytest.fixture
def scp(tmp_path):
    with StorageSCP(tmp_path / "spool", "PEDXRAY", 0, [ALLOWED], network_timeout=5) as server:
        yield server


def test_negotiation_takes_the_senders_first_syntax_and_says_why_a_context_is_refused():
    request = acceptor.parse_associate_rq(
        associate_rq(
            [
                context(1, CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
                context(7, CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
                context(3, StudyRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian]),
                context(5, ComputedRadiographyImageStorage, ["1.2.826.0.1.3680043.10.998.5"]),
            ]
        )[6:]
    )
    assert request.calling_aet.strip() == ALLOWED.encode()
    assert request.maximum_length == PEER_MAX_PDU
    results = acceptor.negotiate(request, storage_syntaxes())
    encoded = acceptor.encode_associate_ac(request, results, max_pdu=0)

    pdu = A_ASSOCIATE_AC()
    pdu.decode(encoded)
    decoded = pdu.to_primitive()
    by_id = {cx.context_id: cx for cx in decoded.presentation_context_definition_results_list}
    assert by_id[1].result == 0x00 and by_id[1].transfer_syntax == [JPEG2000Lossless]  # as stored
    assert by_id[7].result == 0x00 and by_id[7].transfer_syntax == [ExplicitVRLittleEndian]
    assert by_id[3].result == 0x03  # abstract syntax not supported
    assert by_id[5].result == 0x04  # none of the transfer syntaxes is supported
    assert decoded.calling_ae_title == ALLOWED
    assert decoded.implementation_class_uid == upper_layer.IMPLEMENTATION_CLASS_UID
    assert decoded.maximum_length_received == 0


def test_echo_an_unsupported_command_and_release(scp):
    peer = RawPeer(scp.port, [context(1, Verification, [ImplicitVRLittleEndian])])
    try:
        assert peer.reply_type == 0x02  # A-ASSOCIATE-AC
        peer.send_message(echo_rq(), 1)
        assert peer.response_status() == STATUS_SUCCESS
        find = C_FIND()
        find.MessageID, find.AffectedSOPClassUID, find.Priority = 2, Verification, 0
        find.Identifier = io.BytesIO(b"")
        message = C_FIND_RQ()
        message.primitive_to_message(find)
        message.command_set.CommandDataSetType = 0x0101
        peer.send_message(message, 1)
        assert peer.response_status() == acceptor.STATUS_UNRECOGNIZED_OPERATION
        peer.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        assert peer.read_pdu()[0] == 0x06  # A-RELEASE-RP
    finally:
        peer.close()


def test_a_stored_instance_is_spooled_whatever_the_fragment_size(scp, tmp_path):
    dataset = pydicom.dcmread(
        make_instance(tmp_path / "a.dcm", study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.1")
    )
    peer = RawPeer(scp.port, [context(1, dataset.SOPClassUID, [ExplicitVRLittleEndian])])
    try:
        peer.send_message(store_rq(dataset, explicit_le(dataset)), 1)  # fragments of <= 16 KiB
        assert peer.response_status() == STATUS_SUCCESS
    finally:
        peer.close()
    stored = pydicom.dcmread(spool_path(scp.spool_dir, dataset.SOPInstanceUID))
    assert stored.PixelData == dataset.PixelData
    assert stored.file_meta.SourceApplicationEntityTitle == ALLOWED
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_a_pdv_on_a_context_that_was_not_accepted_aborts_and_the_scp_serves_on(scp, caplog):
    caplog.set_level(logging.WARNING, logger="ingest.dicom.acceptor")
    peer = RawPeer(scp.port, [context(1, Verification, [ImplicitVRLittleEndian])])
    try:
        peer.send_message(echo_rq(), 7)
        assert peer.read_pdu()[0] == 0x07  # A-ABORT
        assert peer.read_pdu()[0] is None  # and the connection is closed
    finally:
        peer.close()
    assert "context 7, which was not accepted" in caplog.text
    assert pynetdicom_echo(scp.port) == STATUS_SUCCESS


def test_a_pdu_claiming_more_than_the_limit_is_refused_before_anything_is_allocated(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ingest.dicom.acceptor")
    with StorageSCP(tmp_path / "spool", "PEDXRAY", 0, [ALLOWED], max_pdu=65536) as server:
        peer = RawPeer(server.port, [context(1, Verification, [ImplicitVRLittleEndian])])
        try:
            peer.sock.sendall(struct.pack(">BBL", 0x04, 0, 65537))  # P-DATA-TF header, no body
            assert peer.read_pdu()[0] == 0x07  # A-ABORT
        finally:
            peer.close()
    assert "of 65537 bytes is over the limit of 65536" in caplog.text


def test_an_unexpected_error_ends_only_its_association_and_is_logged(scp, monkeypatch, caplog):
    def broken(message: bytes):
        raise RuntimeError("a bug in the command decoder")

    monkeypatch.setattr(acceptor, "decode_command", broken)
    peer = RawPeer(scp.port, [context(1, Verification, [ImplicitVRLittleEndian])])
    try:
        peer.send_message(echo_rq(), 1)
        assert peer.read_pdu()[0] == 0x07  # A-ABORT
    finally:
        peer.close()
    assert "failed" in caplog.text and "a bug in the command decoder" in caplog.text
    monkeypatch.undo()
    assert pynetdicom_echo(scp.port) == STATUS_SUCCESS


def test_a_peer_that_drops_or_releases_mid_instance_leaves_nothing_behind(scp, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ingest.dicom.acceptor")
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # 39 kB: ten 4 KiB PDUs
    pdus = list(store_rq(dataset, explicit_le(dataset)).encode_msg(1, 4096))
    assert len(pdus) > 3
    for ending in ("drop", "release"):
        peer = RawPeer(scp.port, [context(1, dataset.SOPClassUID, [ExplicitVRLittleEndian])])
        for primitive in pdus[:3]:
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            peer.sock.sendall(pdu.encode())
        if ending == "release":
            peer.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            assert peer.read_pdu()[0] == 0x06
        peer.close()
    wait_until(lambda: "lost" in caplog.text, 5, "the dropped association was not logged as lost")
    assert "released the association in the middle of a message" in caplog.text
    assert [path for path in scp.spool_dir.rglob("*") if path.is_file()] == []
    assert scp.counts.snapshot() == {"stored": 0, "duplicate": 0, "failed": 0, "bytes": 0}


def test_an_idle_association_is_aborted_after_the_network_timeout(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ingest.dicom.acceptor")
    with StorageSCP(tmp_path / "spool", "PEDXRAY", 0, [ALLOWED], network_timeout=0.3) as server:
        peer = RawPeer(server.port, [context(1, Verification, [ImplicitVRLittleEndian])])
        try:
            assert peer.reply_type == 0x02
            started = time.monotonic()
            assert peer.read_pdu()[0] == 0x07  # A-ABORT
            assert time.monotonic() - started < 3
        finally:
            peer.close()
    assert "nothing received for 0.3 s" in caplog.text


def test_associations_over_the_limit_are_rejected_as_transient(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ingest.dicom.acceptor")
    with StorageSCP(tmp_path / "spool", "PEDXRAY", 0, [ALLOWED], maximum_associations=1) as server:
        first = RawPeer(server.port, [context(1, Verification, [ImplicitVRLittleEndian])])
        second = RawPeer(server.port, [context(1, Verification, [ImplicitVRLittleEndian])])
        try:
            assert first.reply_type == 0x02
            assert second.reply_type == 0x03  # A-ASSOCIATE-RJ
            assert tuple(second.reply[1:4]) == acceptor.REJECT_BUSY
        finally:
            first.close()
            second.close()
    assert "too many concurrent associations" in caplog.text


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk's storescu is not installed")
def test_dcmtk_stores_compressed_and_fragmented_instances_as_they_were_sent(scp):
    # dcmtk is a second, independent implementation of the requesting side.
    sends = [
        ("JPEG2000.dcm", ["-R", "-xw"]),  # proposes JPEG 2000 only for this class: no transcoding
        ("SC_rgb_rle.dcm", ["-R", "-xr"]),
        ("CT_small.dcm", ["-pdu", "4096"]),  # ten P-DATA-TF PDUs
    ]
    peer = ["-aet", ALLOWED, "-aec", "PEDXRAY", "127.0.0.1", str(scp.port)]
    assert subprocess.run(["echoscu", *peer], capture_output=True).returncode == 0
    for name, options in sends:
        result = subprocess.run(["storescu", *options, *peer, get_testdata_file(name)], capture_output=True)
        assert result.returncode == 0, result.stderr.decode()
        source = pydicom.dcmread(get_testdata_file(name))
        stored = pydicom.dcmread(spool_path(scp.spool_dir, source.SOPInstanceUID))
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert stored.PixelData == source.PixelData
    stranger = ["-aet", "STRANGER", *peer[2:]]
    assert subprocess.run(["echoscu", *stranger], capture_output=True).returncode != 0


def test_p_data_tf_splits_a_message_to_the_peers_maximum_pdu():
    message = bytes(range(256)) * 2
    encoded = upper_layer.p_data_tf(3, message, max_pdu=100, command=True)
    pieces, offset = [], 0
    while offset < len(encoded):
        pdu_type, _, length = struct.unpack_from(">BBL", encoded, offset)
        assert pdu_type == 0x04 and length <= 100
        pieces += list(upper_layer.iter_pdvs(memoryview(encoded[offset + 6 : offset + 6 + length])))
        offset += 6 + length
    assert b"".join(bytes(fragment) for _, _, fragment in pieces) == message
    assert [control for _, control, _ in pieces] == [0x01] * (len(pieces) - 1) + [0x03]
    assert {context_id for context_id, _, _ in pieces} == {3}


def test_pdu_reader_hands_out_each_pdu_whole_however_the_bytes_arrive():
    # PDUs smaller and larger than the reader's buffer, sent in odd-sized pieces: each must come
    # out whole and in order, though the reader receives many PDUs at once and moves leftovers.
    pdus = [(0x04, bytes([n % 251]) * size) for n, size in enumerate([0, 10, 5000, 70_000, 3, 300_000, 17])]
    stream = b"".join(struct.pack(">BBL", pdu_type, 0, len(body)) + body for pdu_type, body in pdus)
    sender, receiver = socket.socketpair()
    with sender, receiver:

        def send_in_pieces() -> None:
            try:
                for start in range(0, len(stream), 7919):
                    sender.sendall(stream[start : start + 7919])
                sender.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reader failed and closed its end

        thread = threading.Thread(target=send_in_pieces)
        thread.start()
        reader = upper_layer.PduReader(receiver, buffer_size=4096)
        try:
            for pdu_type, body in pdus:
                got_type, got_body = reader.read(limit=1 << 20)
                assert (got_type, bytes(got_body)) == (pdu_type, body)
            with pytest.raises(ConnectionError, match="without releasing"):
                reader.read(limit=1 << 20)
        finally:
            receiver.shutdown(socket.SHUT_RDWR)
            thread.join()


def test_pdu_reader_says_when_the_peer_closes_in_the_middle_of_a_pdu():
    sender, receiver = socket.socketpair()
    with sender, receiver:
        sender.sendall(struct.pack(">BBL", 0x04, 0, 100) + b"x" * 40)
        sender.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError, match="in the middle of a PDU"):
            upper_layer.PduReader(receiver).read(limit=1 << 20)


def test_encoded_responses_decode_with_pydicom_and_carry_their_group_length():
    command = upper_layer.Command(
        command_field=upper_layer.C_STORE_RQ,
        message_id=41,
        has_data_set=True,
        sop_class_uid=CTImageStorage,
        sop_instance_uid="1.2.3.45",
    )
    encoded = upper_layer.encode_response(command, 0xA700)
    response = decode(io.BytesIO(encoded), True, True)
    assert response.CommandField == 0x8001
    assert response.MessageIDBeingRespondedTo == 41
    assert response.Status == 0xA700
    assert response.AffectedSOPInstanceUID == "1.2.3.45"
    assert response.CommandDataSetType == 0x0101
    assert response.CommandGroupLength == len(encoded) - 12
    with pytest.raises(upper_layer.ProtocolError, match="lacks Command Field, Message ID"):
        upper_layer.decode_command(encoded)  # a response has no Message ID of its own
    with pytest.raises(upper_layer.ProtocolError, match="is malformed"):
        upper_layer.decode_command(b"\x08\x00\x10\x00\x02\x00\x00\x00ab")


def received(path: str, cut: int = 0) -> upper_layer.ReceivedInstance:
    dataset = pydicom.dcmread(path)
    data = explicit_le(dataset)
    return upper_layer.ReceivedInstance(
        sop_class_uid=dataset.SOPClassUID,
        sop_instance_uid=dataset.SOPInstanceUID,
        transfer_syntax=dataset.file_meta.TransferSyntaxUID,
        dataset=data[: len(data) - cut],
        source_aet=ALLOWED,
        peer=f"{ALLOWED}@test",
    )


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "JPEG2000.dcm"])
def test_an_encapsulated_image_cut_short_is_refused_and_a_whole_one_kept(tmp_path, caplog, name):
    path = get_testdata_file(name)
    counts = StoreCounts()
    # pydicom alone would read the cut one with a warning and no Pixel Data element at all.
    assert store_instance(tmp_path, counts, received(path, cut=100)) == STATUS_CANNOT_UNDERSTAND
    assert "no delimiter after its last fragment" in caplog.text
    assert spooled_uids(tmp_path) == set()
    whole = received(path)
    assert store_instance(tmp_path, counts, whole) == STATUS_SUCCESS
    stored = pydicom.dcmread(spool_path(tmp_path, whole.sop_instance_uid))
    assert stored.PixelData == pydicom.dcmread(path).PixelData
    assert counts.snapshot()["failed"] == 1


def test_elements_after_pixel_data_are_checked_too(tmp_path):
    path = get_testdata_file("CT_small.dcm")  # ends with a (FFFC,FFFC) padding element
    assert "DataSetTrailingPadding" in pydicom.dcmread(path)
    counts = StoreCounts()
    assert store_instance(tmp_path, counts, received(path, cut=20)) == STATUS_CANNOT_UNDERSTAND
    assert store_instance(tmp_path, counts, received(path)) == STATUS_SUCCESS

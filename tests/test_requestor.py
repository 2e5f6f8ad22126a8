"""The associations ``retrieve`` opens for C-MOVE and C-GET (ingest.dicom.requestor), against pynetdicom's
PDU decoder and SCPs, and a raw-socket peer for what a real PACS does rarely: refuse, go silent.
Retrieval against Orthanc is in test_scu.py and test_pull.py."""

from __future__ import annotations

import socket
import threading
import time

import pydicom
import pytest
from factories import make_instance
from pacs_peers import GetPacs
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from ingest.dicom import acceptor, upper_layer
from ingest.dicom.requestor import (
    REQUEST_SYNTAXES,
    AssociationRejected,
    RequestorAssociation,
    Timeouts,
    encode_associate_rq,
)
from ingest.dicom.scp import spooled_uids
from ingest.dicom.scu import PacsConfig, RetrieveItem, retrieve

STUDY = "1.2.826.0.1.3680043.10.995.1"
SERIES = f"{STUDY}.1"
QUICK = Timeouts(connect=2, acse=2, dimse=2)


def test_associate_rq_says_what_pynetdicom_reads_back():
    contexts = [
        (StudyRootQueryRetrieveInformationModelGet, REQUEST_SYNTAXES),
        (ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.4.90"]),
        (DigitalXRayImageStorageForPresentation, ["1.2.840.10008.1.2.1"]),
    ]
    encoded = encode_associate_rq(
        "PEDXRAY",
        "PACS",
        contexts,
        65536,
        [ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation],
    )
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(encoded)
    assert (pdu.calling_ae_title, pdu.called_ae_title) == ("PEDXRAY", "PACS")
    assert pdu.application_context_name == upper_layer.APPLICATION_CONTEXT
    proposed = [(cx.context_id, cx.abstract_syntax, cx.transfer_syntax) for cx in pdu.presentation_context]
    assert proposed == [
        (2 * n + 1, abstract, list(syntaxes)) for n, (abstract, syntaxes) in enumerate(contexts)
    ]
    info = {type(sub).__name__: sub for sub in pdu.user_information.user_data}
    assert info["MaximumLengthSubItem"].maximum_length_received == 65536
    assert (
        info["ImplementationClassUIDSubItem"].implementation_class_uid == upper_layer.IMPLEMENTATION_CLASS_UID
    )
    roles = [
        sub for sub in pdu.user_information.user_data if type(sub).__name__ == "SCP_SCU_RoleSelectionSubItem"
    ]
    # A C-GET receives the storage classes' C-STOREs: SCP role only.
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in roles] == [
        (ComputedRadiographyImageStorage, 0, 1),
        (DigitalXRayImageStorageForPresentation, 0, 1),
    ]


@pytest.fixture
def instances(tmp_path) -> list[Dataset]:
    paths = [
        make_instance(
            tmp_path / f"{n}.dcm", study_uid=STUDY, series_uid=SERIES, sop_uid=f"{SERIES}.{n}", seed=n
        )
        for n in (1, 2, 3)
    ]
    return [pydicom.dcmread(path) for path in paths]


def item_for(datasets: list[Dataset]) -> RetrieveItem:
    uids = tuple(ds.SOPInstanceUID for ds in datasets)
    return RetrieveItem(STUDY, SERIES, uids, (ComputedRadiographyImageStorage,))


def test_an_instance_the_spool_refuses_is_a_failed_sub_operation_the_pacs_names(instances, tmp_path):
    # Rows (US) 3 bytes long: pydicom cannot convert it, so the spool answers 0xC210.
    garbled = instances[1]
    garbled[0x00280010] = RawDataElement(Tag(0x00280010), "US", 3, b"\x01\x02\x03", 0, False, True)
    pacs = GetPacs(instances)
    try:
        cfg = PacsConfig("127.0.0.1", pacs.port, "FLAKYPACS", retries=0)
        spool = tmp_path / "spool"
        summary = retrieve(cfg, [item_for(instances)], method="get", spool_dir=spool, progress=False)
    finally:
        pacs.server.shutdown()
    # The C-STORE status reached the PACS, which counted that sub-operation failed and named it.
    assert spooled_uids(spool) == {instances[0].SOPInstanceUID, instances[2].SOPInstanceUID}
    (failure,) = summary.failures
    assert "2 sub-operation(s) completed, 1 failed" in failure.reason
    assert f"failed instances: {garbled.SOPInstanceUID}" in failure.reason
    assert (summary.completed, summary.failed) == (2, 1)


def test_a_rejected_retrieve_association_is_not_retried_and_says_why(instances, tmp_path):
    pacs = GetPacs(instances, require=["SOMEONE"])
    try:
        cfg = PacsConfig("127.0.0.1", pacs.port, "FLAKYPACS", retries=3, backoff_s=5)
        started = time.monotonic()
        summary = retrieve(cfg, [item_for(instances)], method="get", spool_dir=tmp_path, progress=False)
    finally:
        pacs.server.shutdown()
    assert time.monotonic() - started < 5, "a permanent rejection waited for back-offs"
    (failure,) = summary.failures
    assert "failed after 1 attempt" in failure.reason
    assert (
        "Rejected (Permanent), source: Service User, reason: Calling AE title not recognised"
        in failure.reason
    )
    assert "check that the PACS knows calling AE 'PEDXRAY'" in failure.reason


class SilentPacs:
    """Accepts every association and every context, then never answers a request."""

    def __init__(self, reject: tuple[int, int, int] | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reject = reject
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            _type, body = upper_layer.PduReader(connection).read(limit=1 << 20)
            request = acceptor.parse_associate_rq(bytes(body))
            if self.reject is not None:
                connection.sendall(acceptor.encode_associate_rj(self.reject))
                continue
            everything = {abstract: syntaxes for abstract, syntaxes in request.contexts.values()}
            results = acceptor.negotiate(request, everything)
            connection.sendall(acceptor.encode_associate_ac(request, results, 0))

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


def test_a_pacs_silent_past_the_dimse_timeout_ends_the_association():
    pacs = SilentPacs()
    try:
        assoc = RequestorAssociation.open(
            "127.0.0.1",
            pacs.port,
            calling_aet="PEDXRAY",
            called_aet="SILENT",
            contexts=[(StudyRootQueryRetrieveInformationModelMove, REQUEST_SYNTAXES)],
            max_pdu=0,
            timeouts=Timeouts(connect=2, acse=2, dimse=0.5),
        )
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", STUDY
        started = time.monotonic()
        final = assoc.send_c_move(query, "PEDXRAY", StudyRootQueryRetrieveInformationModelMove, 1)
    finally:
        pacs.close()
    assert 0.4 < time.monotonic() - started < 3
    assert final == (Dataset(), None)
    assert not assoc.is_established and assoc.lost_reason == "no response within dimse_timeout=0.5 s"


def test_a_transient_rejection_is_retried_then_reported(instances, tmp_path):
    pacs = SilentPacs(reject=acceptor.REJECT_BUSY)
    try:
        cfg = PacsConfig("127.0.0.1", pacs.port, "SILENT", retries=1, backoff_s=0.01)
        summary = retrieve(cfg, [item_for(instances)], method="get", spool_dir=tmp_path, progress=False)
    finally:
        pacs.close()
    (failure,) = summary.failures
    assert "failed after 2 attempts" in failure.reason
    assert "Rejected (Transient), source: Service Provider (Presentation), reason: Local limit exceeded" in (
        failure.reason
    )


def test_open_refuses_a_peer_that_answers_with_something_else():
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_garbage():
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(upper_layer.RELEASE_RP_PDU)
        time.sleep(0.5)  # the peer's behaviour, not a wait: keep the socket open while the PDU is read
        connection.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        with pytest.raises(upper_layer.ProtocolError, match="expected an A-ASSOCIATE-AC, got PDU type 0x06"):
            RequestorAssociation.open(
                "127.0.0.1",
                listener.getsockname()[1],
                calling_aet="PEDXRAY",
                called_aet="ODD",
                contexts=[(StudyRootQueryRetrieveInformationModelMove, REQUEST_SYNTAXES)],
                max_pdu=0,
                timeouts=QUICK,
            )
    finally:
        listener.close()


def test_rejection_reasons_read_as_ps3_8_words():
    assert AssociationRejected(0x01, 0x01, 0x07).describe() == (
        "Rejected (Permanent), source: Service User, reason: Called AE title not recognised"
    )
    assert not AssociationRejected(0x02, 0x02, 0x02).permanent

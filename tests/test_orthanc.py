"""The real PACS: Orthanc 1.10.1 started by ingest.demo.orthanc, queried with pynetdicom and dcmtk."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

import ingest.demo.orthanc as orthanc
from ingest.demo.orthanc import (
    OrthancError,
    OrthancNotFoundError,
    OrthancServer,
    free_port,
    port_accepts_connections,
)
from ingest.demo.pacs import main as demo_main
from ingest.dicom.scp import TRANSPORTS, StorageSCP, spooled_uids

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PENDING = (0xFF00, 0xFF01)
CANCEL_MATCHING_TERMINATED = 0xFE00
MOVE_FAILED_UNABLE_TO_PROCESS = 0xC000


def study_uids_of(paths: list[Path]) -> set[str]:
    return {pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID for path in paths}


def study_level_find(server: OrthancServer) -> tuple[list[str], int]:
    """C-FIND at STUDY level for every study: the matched StudyInstanceUIDs and the final status."""
    ae = AE(ae_title="PEDXTEST")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
    assert assoc.is_established, "Orthanc refused the association"
    matches, final_status = [], None
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status.Status in PENDING:
                matches.append(identifier.StudyInstanceUID)
            else:
                final_status = status.Status
    finally:
        assoc.release()
    return matches, final_status


def c_echo_status(host: str, port: int, aet: str) -> int:
    ae = AE(ae_title="PEDXTEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=aet)
    assert assoc.is_established, f"no association with {aet} at {host}:{port}"
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def loaded_pacs(orthanc_binary, tmp_path_factory, pydicom_testfiles):
    """One Orthanc holding pydicom's sample files, shared by the read-only tests below."""
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload(pydicom_testfiles, progress=False)
        yield server


def test_upload_stores_each_file_once(loaded_pacs, pydicom_testfiles):
    assert loaded_pacs.instance_count() == len(pydicom_testfiles)
    assert loaded_pacs.study_uids() == sorted(study_uids_of(pydicom_testfiles))
    # OverwriteInstances is off: a second upload is accepted without new instances.
    assert loaded_pacs.upload(pydicom_testfiles[:2], progress=False) == 2
    assert loaded_pacs.instance_count() == len(pydicom_testfiles)


def test_c_echo_succeeds(loaded_pacs):
    assert c_echo_status(loaded_pacs.host, loaded_pacs.dicom_port, loaded_pacs.aet) == 0x0000


def test_study_level_c_find_returns_uploaded_studies(loaded_pacs, pydicom_testfiles):
    matches, final_status = study_level_find(loaded_pacs)
    assert final_status == 0x0000
    assert sorted(matches) == sorted(study_uids_of(pydicom_testfiles))


@pytest.mark.skipif(shutil.which("findscu") is None, reason="dcmtk's findscu is not installed")
def test_findscu_finds_uploaded_studies(loaded_pacs, pydicom_testfiles):
    command = [
        "findscu", "-v", "-S", "-aet", "PEDXTEST", "-aec", loaded_pacs.aet,
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
        loaded_pacs.host, str(loaded_pacs.dicom_port),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # findscu -v logs each answer's dataset (the request's StudyInstanceUID is empty); dcmtk shows
    # the NUL that pads an odd-length UID.
    found = set(re.findall(r"\(0020,000d\) UI \[([0-9.]+)\x00?\]", result.stdout + result.stderr))
    assert found == study_uids_of(pydicom_testfiles)


def test_limit_find_results_truncates_with_cancel_status(orthanc_server, pydicom_testfiles):
    # The ingest pages C-FIND on this: Orthanc sends the first N matches, then status 0xFE00.
    server = orthanc_server(limit_find_results=2)
    server.upload(pydicom_testfiles, progress=False)
    matches, final_status = study_level_find(server)
    assert len(matches) == 2
    assert set(matches) <= study_uids_of(pydicom_testfiles)
    assert final_status == CANCEL_MATCHING_TERMINATED


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_c_move_reaches_a_modality_added_at_runtime(orthanc_server, pydicom_testfiles, tmp_path, transport):
    # Our Storage SCP on either transport is the destination Orthanc stores to.
    with StorageSCP(tmp_path / "spool", "PEDXRAY", 0, transport=transport) as scp:
        scp_port = scp.port
        server = orthanc_server()
        server.upload(pydicom_testfiles[:1], progress=False)
        study_uid = server.study_uids()[0]

        def move_status() -> int:
            ae = AE(ae_title="PEDXTEST")
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study_uid
            assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
            try:
                responses = list(
                    assoc.send_c_move(query, "PEDXRAY", StudyRootQueryRetrieveInformationModelMove)
                )
            finally:
                assoc.release()
            return responses[-1][0].Status

        # An unregistered destination fails as "unable to process", not 0xA801.
        assert move_status() == MOVE_FAILED_UNABLE_TO_PROCESS
        server.add_modality("pedxray", "PEDXRAY", "127.0.0.1", scp_port)
        assert move_status() == 0x0000
        sop_uid = pydicom.dcmread(pydicom_testfiles[0], stop_before_pixels=True).SOPInstanceUID
        assert spooled_uids(scp.spool_dir) == {sop_uid}
        assert scp.counts.snapshot()["stored"] == 1
        assert "pedxray" in server.modalities()


def test_delete_all_empties_the_pacs(orthanc_server, pydicom_testfiles):
    server = orthanc_server()
    server.upload(pydicom_testfiles, progress=False)
    assert server.delete_all() == len(study_uids_of(pydicom_testfiles))  # one patient per file here
    assert server.instance_count() == 0
    assert server.study_uids() == []


def test_upload_names_files_that_are_not_dicom(orthanc_server, tmp_path, pydicom_testfiles):
    server = orthanc_server()
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not an image")
    with pytest.raises(OrthancError, match=r"(?s)refused 1 of 2 files.*notes\.txt.*Bad file format"):
        server.upload([pydicom_testfiles[0], not_dicom], progress=False)
    assert server.instance_count() == 1


def test_stop_ends_the_process_and_frees_the_ports(orthanc_binary, tmp_path):
    server = OrthancServer(tmp_path / "orthanc").start()
    pid, ports = server.pid, (server.dicom_port, server.http_port)
    assert all(port_accepts_connections(port) for port in ports)
    server.stop()
    server.stop()  # idempotent
    assert not server.is_running()
    assert not any(port_accepts_connections(port) for port in ports)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_stopped_pacs_restarts_at_once_on_its_own_ports(orthanc_binary, tmp_path):
    first = OrthancServer(tmp_path / "orthanc").start()
    ports = {"dicom_port": first.dicom_port, "http_port": first.http_port}
    for _ in range(3):  # connections the server closes first leave its port in TIME-WAIT
        with socket.create_connection(("127.0.0.1", first.http_port), timeout=5) as conn:
            conn.sendall(b"GET /system HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while conn.recv(65536):
                pass
    first.stop()
    second = OrthancServer(tmp_path / "orthanc", **ports).start()
    try:
        assert (second.dicom_port, second.http_port) == (ports["dicom_port"], ports["http_port"])
    finally:
        second.stop()


def test_missing_binary_error_says_how_to_install():
    with pytest.raises(
        OrthancNotFoundError, match=r"not found on PATH; install it with: apt-get install -y orthanc"
    ):
        OrthancServer(binary="no-such-orthanc-binary").start()


def test_binary_that_is_not_orthanc_is_reported(tmp_path):
    with pytest.raises(OrthancError, match=r"exited with code 1 during startup"):
        OrthancServer(tmp_path / "orthanc", binary="false").start()


def test_orthanc_rejecting_its_config_reports_the_cause(orthanc_binary, tmp_path):
    server = OrthancServer(tmp_path / "orthanc", extra_options={"DicomThreadsCount": "many"})
    with pytest.raises(OrthancError, match=r'exited .*: Bad type.*"DicomThreadsCount" must be an integer'):
        server.start()
    assert not server.is_running()


def test_busy_fixed_port_is_reported(orthanc_binary, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            OrthancError, match=rf"dicom_port {port} is already in use.*leave dicom_port unset"
        ):
            OrthancServer(tmp_path / "orthanc", dicom_port=port).start()


@pytest.mark.slow
def test_start_retries_when_a_probed_port_is_taken(orthanc_binary, tmp_path, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        probes = iter([(free_port(), taken)])  # first probe: the HTTP port gets grabbed by someone else
        real_probe = orthanc._two_free_ports
        monkeypatch.setattr(orthanc, "_two_free_ports", lambda: next(probes, None) or real_probe())
        with OrthancServer(tmp_path / "orthanc") as server:
            assert server.http_port != taken
            assert server.instance_count() == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aet": "A_TITLE_LONGER_THAN_16"}, r"not a valid DICOM AE title"),
        ({"modalities": {"pedxray": ("PEDXRAY", "127.0.0.1")}}, r"must be \(aet, host, port\)"),
        ({"modalities": {"pedxray": ("PEDXRAY", "127.0.0.1", 70000)}}, r"not a TCP port"),
        ({"limit_find_results": -1}, r"limit_find_results must be an integer >= 0"),
        ({"extra_options": {"DicomPort": 104}}, r"extra_options may not set \['DicomPort'\]"),
        ({"dicom_port": 4242, "http_port": 4242}, r"must differ"),
    ],
)
def test_invalid_settings_say_what_to_fix(options, message):
    with pytest.raises(ValueError, match=message):
        OrthancServer(**options)


def test_demo_refuses_a_data_dir_without_dicom(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("no images here")
    assert demo_main(["--data", str(tmp_path)]) == 1
    assert "none is DICOM Part 10" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    # The banner ends with the marker; a dead or silent demo fails the test instead of hanging it.
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"demo exited early ({process.wait()}):\n{''.join(lines)}")
        lines.append(line)
        if marker in line:
            return "".join(lines)
    pytest.fail(f"no {marker!r} within {timeout} s:\n{''.join(lines)}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child pids from Linux /proc")
def test_demo_pacs_stops_cleanly_on_sigint(orthanc_binary, pydicom_testfiles, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in pydicom_testfiles:
        shutil.copy(path, data / path.name)
    process = subprocess.Popen(
        [sys.executable, "-m", "ingest", "demo-pacs", "--data", str(data)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = _read_until(process, "Press Ctrl-C to stop.", timeout=60)
        port = int(re.search(r"DICOM port\s*:\s*(\d+)", banner).group(1))
        assert f"{len(pydicom_testfiles)} instances" in banner
        assert "findscu -v -S -aet PEDXRAY -aec PEDXPACS" in banner
        assert c_echo_status("127.0.0.1", port, "PEDXPACS") == 0x0000
        (orthanc_pid,) = _children(process.pid)

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert "Demo PACS stopped." in process.stdout.read()
        with pytest.raises(ProcessLookupError):
            os.kill(orthanc_pid, 0)
        assert not port_accepts_connections(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

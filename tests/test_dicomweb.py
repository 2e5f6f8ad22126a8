"""The DICOMweb pull (QIDO-RS, WADO-RS) and the instance ledger, against Orthanc's DICOMweb plugin and a
misbehaving DICOMweb peer on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from factories import radiograph, write
from pacs_peers import DicomwebPeer

from ingest import dicomweb
from ingest.dataset.balance import BalanceConfig
from ingest.demo.orthanc import DICOMWEB_INSTALL_HINT, DICOMWEB_PLUGIN
from ingest.dicom.scp import spool_path, spooled_uids
from ingest.dicom.scu import RetrieveFailure, RetrieveItem
from ingest.dicomweb import DicomwebConfig, authorization_from, multipart_parts, received_from_part10
from ingest.imaging.preprocess import PreprocessParams
from ingest.ledger import build_ledger, incomplete_studies, read_ledger, refusal_status
from ingest.polite import Pacer, Window
from ingest.pull import PullConfig, main, pull

SECRET = "s3cr3t-Pa55word"
UID_ROOT = "1.2.826.0.1.3680043.10.1337"


# ---------------------------------------------------------------------------------------- units


def test_multipart_parts_split_with_and_without_content_length() -> None:
    boundary = "b0undary"
    # A part whose bytes contain the delimiter: only its Content-Length keeps it whole.
    tricky = b"head\r\n--b0undary\r\ntail"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(tricky)}\r\n\r\n".encode()
        + tricky
        + f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + b"second"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary="{boundary}"'
    # However the body is cut into pieces as it arrives, the same parts come out.
    for size in (1, 7, 64, len(body)):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        parts = list(multipart_parts(content_type, chunks))
        assert [part for _, part in parts] == [tricky, b"second"], size
        assert parts[0][0]["content-type"] == "application/dicom"
    with pytest.raises(ValueError, match="no boundary"):
        list(multipart_parts("multipart/related", [body]))
    with pytest.raises(ValueError, match="ends before its close delimiter"):
        list(multipart_parts(content_type, [body[:-30]]))


def test_part10_file_meta_is_read_as_pydicom_reads_it(study_files) -> None:
    for path in study_files[:3]:
        data = path.read_bytes()
        received = received_from_part10(data, "peer")
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert received.sop_class_uid == meta.MediaStorageSOPClassUID
        assert received.sop_instance_uid == meta.MediaStorageSOPInstanceUID
        assert received.transfer_syntax == meta.TransferSyntaxUID
        assert received.dataset == data[144 + meta.FileMetaInformationGroupLength :]
    with pytest.raises(ValueError, match="DICM"):
        received_from_part10(b"\0" * 200, "peer")


def test_credentials_come_from_env_or_file_and_never_show(tmp_path: Path) -> None:
    assert authorization_from(environ={}) is None
    assert authorization_from(environ={dicomweb.TOKEN_ENV: "tok\n"}) == "Bearer tok"
    basic = authorization_from(environ={dicomweb.USER_ENV: "u", dicomweb.PASSWORD_ENV: SECRET})
    assert basic.startswith("Basic ")
    (tmp_path / "token").write_text("tok2\n")
    assert authorization_from(token_file=tmp_path / "token") == "Bearer tok2"
    (tmp_path / "basic").write_text("nocolon")
    with pytest.raises(ValueError, match="user:password"):
        authorization_from(basic_file=tmp_path / "basic")
    cfg = DicomwebConfig("https://pacs.example.org/dicom-web", authorization=f"Bearer {SECRET}")
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.to_dict())
    assert cfg.to_dict()["authorization"] == "Bearer"
    with pytest.raises(ValueError, match="carries credentials"):
        DicomwebConfig(f"https://u:{SECRET}@pacs.example.org/dicom-web")
    with pytest.raises(ValueError, match="service root"):
        DicomwebConfig("pacs.example.org")


def test_ledger_states_follow_the_spool_and_the_failures(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    uids = [f"{UID_ROOT}.9.{n}" for n in range(5)]
    for uid in uids[:2]:
        path = spool_path(spool, uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    def instance(uid: str) -> dict:
        return {"SeriesInstanceUID": f"{UID_ROOT}.8", "SOPInstanceUID": uid, "SOPClassUID": "1.2.3"}

    promised = {
        f"{UID_ROOT}.1": [instance(uids[0])],
        f"{UID_ROOT}.2": [instance(uids[1]), instance(uids[2])],
        f"{UID_ROOT}.3": [instance(uids[3]), instance(uids[4])],
    }
    failures = [
        RetrieveFailure(RetrieveItem(f"{UID_ROOT}.2", None, (uids[2],)), "C-MOVE: status 0xA702 (out)"),
        RetrieveFailure(RetrieveItem(f"{UID_ROOT}.3", None, (uids[3],)), "WADO-RS: HTTP 404 Not Found"),
    ]
    ledger = build_ledger(promised, spool, failures).set_index("sop_instance_uid")
    states = ["stored", "stored", "refused", "refused", "missing"]
    assert ledger["state"].to_dict() == dict(zip(uids, states, strict=True))
    assert ledger.loc[uids[2], "status"] == "0xA702" and ledger.loc[uids[3], "status"] == "HTTP 404"
    assert ledger["study_state"].tolist() == ["complete", "partial", "partial", "failed", "failed"]
    table = incomplete_studies(ledger.reset_index())
    assert table["study_uid"].tolist() == [f"{UID_ROOT}.2", f"{UID_ROOT}.3"]
    assert table[["stored", "refused", "missing"]].values.tolist() == [[1, 1, 0], [0, 1, 1]]
    assert refusal_status("association aborted") == ""


# --------------------------------------------------------------------------- against real servers


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> list[Path]:
    data = tmp_path_factory.mktemp("dicomweb-data")
    paths = []
    for s in range(6):
        for k in range(2):
            ds = radiograph(
                patient_id=f"W{s}",
                study_key=f"web-{s}",
                instance=k,
                study_date=date(2016 + s // 3, 1 + s, 3),
                body_part="CHEST",
                view_position="PA",
                study_description="XR CHEST PA",
            )
            paths.append(write(ds, data))
    return paths


def web_config(url: str, work: Path, authorization: str | None = None, **options) -> PullConfig:
    return PullConfig(
        dicomweb=DicomwebConfig(url, authorization=authorization, retries=1, backoff_s=0.05),
        work_dir=work,
        workers=2,
        write_shards=False,
        balance=BalanceConfig(granularity=7, per_class=2, reference_date=date(2017, 7, 1)),
        preprocessing=PreprocessParams(size=32),
        **options,
    )


@pytest.fixture
def web_orthanc(orthanc_server, study_files):
    if not DICOMWEB_PLUGIN.is_file():  # missing: skip locally, fail in CI (CI installs it)
        message = f"{DICOMWEB_PLUGIN} not found; {DICOMWEB_INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = orthanc_server(dicomweb_plugin=DICOMWEB_PLUGIN, http_users={"puller": SECRET})
    server.upload(study_files, progress=False)
    return server


@pytest.mark.slow
def test_dicomweb_pull_from_orthanc_stores_instances_as_sent_and_resumes(
    web_orthanc, study_files, tmp_path: Path, capsys, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study_files}
    (tmp_path / "basic").write_text(f"puller:{SECRET}\n")
    work = tmp_path / "work"
    args = ["--dicomweb", web_orthanc.dicomweb_url, "--basic-auth-file", str(tmp_path / "basic")]
    args += ["--work", str(work), "--no-shards", "--scheduler", "sync", "--page-limit", "2"]
    # Polite, inside a window around now: the pull runs at once.
    now = datetime.now()
    window = f"{now - timedelta(hours=1):%H:%M}-{now + timedelta(hours=1):%H:%M}"
    args += ["--workers", "3", "--window", window, "--max-rate", "1000", "--retrieve-timeout", "60"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"6 studies, {len(uids)} instances to fetch" in out
    assert spooled_uids(work / "spool") == uids
    # Stored as sent: the data set of every instance is the uploaded file's, byte for byte.
    for path in study_files:
        original = pydicom.dcmread(path)
        stored = pydicom.dcmread(spool_path(work / "spool", original.SOPInstanceUID))
        assert stored.PixelData == original.PixelData and stored.PatientID == original.PatientID
    ledger = read_ledger(work / "ledger.parquet")
    assert len(ledger) == len(uids) and set(ledger["state"]) == {"stored"}
    assert set(ledger["study_state"]) == {"complete"}
    # The password is nowhere: not in the console, the log, nor the saved config.
    saved = (work / "pull-config.json").read_text()
    assert json.loads(saved)["window"] == window
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for text in (out, saved, logged):
        assert SECRET not in text and "cHVsbGVy" not in text  # base64 of "puller"

    for path in sorted((work / "spool").rglob("*.dcm"))[:3]:
        path.unlink()
    cfg = web_config(web_orthanc.dicomweb_url, work, authorization_from(basic_file=tmp_path / "basic"))
    again = pull(cfg, id_salt="s", scheduler="sync", progress=False)
    assert again.ok and again.planned_instances == 3 and again.retrieval.completed == 3
    assert spooled_uids(work / "spool") == uids

    wrong = [*args[:2], "--work", str(tmp_path / "w2"), "--scheduler", "sync", "--retries", "0"]
    assert main(wrong) == 1  # no credentials at all
    assert "HTTP 401" in capsys.readouterr().out


@pytest.mark.slow
def test_partial_transfers_are_in_the_ledger_exit_3_and_a_rerun_completes_them(
    study_files, tmp_path: Path, capsys
) -> None:
    with DicomwebPeer(study_files, token=SECRET) as peer:
        victims = sorted(peer.instances)[:3]
        peer.drop = set(victims)  # left out of their study's answer, and 404 when asked alone
        peer.throttle = 2  # the first two requests are throttled (429, Retry-After: 0)
        work = tmp_path / "work"
        args = ["--dicomweb", peer.url, "--token-file", str(tmp_path / "token"), "--work", str(work)]
        args += ["--no-shards", "--scheduler", "sync", "--retries", "2"]
        (tmp_path / "token").write_text(SECRET)
        assert main(args) == 3
        out = capsys.readouterr().out
        assert "incomplete study(ies)" in out
        ledger = read_ledger(work / "ledger.parquet").set_index("sop_instance_uid")
        assert set(ledger.loc[victims, "state"]) == {"refused"}
        assert set(ledger.loc[victims, "status"]) == {"HTTP 404"}
        assert (ledger["state"] == "stored").sum() == len(peer.instances) - 3
        incomplete = ledger.loc[victims, "study_uid"].unique()
        for study in incomplete:
            assert study in out
        assert set(ledger[ledger["study_uid"].isin(incomplete)]["study_state"]) <= {"partial", "failed"}
        assert all(a == f"Bearer {SECRET}" for a in peer.authorizations)

        peer.drop = set()
        requests_before = len(peer.requests)
        assert main(args) == 0
        ledger = read_ledger(work / "ledger.parquet")
        assert set(ledger["state"]) == {"stored"} and len(ledger) == len(peer.instances)
        assert spooled_uids(work / "spool") == set(peer.instances) == set(ledger["sop_instance_uid"])
        # The re-run fetched only from the incomplete studies (a study with nothing spooled whole,
        # the others instance by instance).
        rerun = peer.requests[requests_before:]
        wado = [p for p in rerun if p.count("/") == 3 or "/instances/" in p]
        assert wado and {p.split("/")[3] for p in wado} == set(incomplete)


@pytest.mark.slow
def test_dicomweb_pull_keeps_to_the_rate_limit(study_files, tmp_path: Path) -> None:
    with DicomwebPeer(study_files) as peer:
        cfg = web_config(peer.url, tmp_path, max_rate=20)
        started = time.monotonic()
        result = pull(cfg, id_salt="s", scheduler="sync", progress=False)
        elapsed = time.monotonic() - started
    assert result.ok and result.retrieval.completed == len(peer.instances) == 12
    # 6 study requests of 2 instances at 20 instances/s: the last starts 0.5 s after the first.
    assert elapsed >= 0.5
    assert json.loads((tmp_path / "pull-config.json").read_text())["max_rate"] == 20


def test_wado_answers_are_read_to_the_end_so_one_connection_serves_every_study(study_files, tmp_path) -> None:
    with DicomwebPeer(study_files) as peer:
        cfg = DicomwebConfig(peer.url, retries=0)
        items = dicomweb.plan_retrieval(
            cfg, tmp_path, [s["StudyInstanceUID"] for s in dicomweb.find_studies(cfg)]
        )
        before = peer.connections
        summary = dicomweb.retrieve(cfg, items, spool_dir=tmp_path, workers=1, progress=False)
        used = peer.connections - before
    assert summary.ok and summary.completed == 12
    assert used == 1, f"6 study answers over {used} connections: keep-alive lost"


@pytest.mark.slow
def test_a_wado_answer_that_stalls_is_cut_at_the_retrieve_timeout_and_retried(study_files, tmp_path) -> None:
    with DicomwebPeer(study_files) as peer:
        peer.stall, peer.stall_s = 1, 5.0
        cfg = PullConfig(
            dicomweb=DicomwebConfig(peer.url, retries=2, backoff_s=0.05, retrieve_timeout=0.5),
            work_dir=tmp_path,
            workers=1,
            write_shards=False,
        )
        started = time.monotonic()
        result = pull(cfg, id_salt="s", scheduler="sync", progress=False)
        elapsed = time.monotonic() - started
    assert result.ok and spooled_uids(tmp_path / "spool") == set(peer.instances)
    assert elapsed < 4, "the stalled answer was cut after 0.5 s, not waited for"


@pytest.mark.slow
def test_http_429_storm_backs_off_the_wado_connections(study_files, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ingest.polite")
    with DicomwebPeer(study_files) as peer:
        cfg = DicomwebConfig(peer.url, retries=3, backoff_s=0.05)
        studies = [s["StudyInstanceUID"] for s in dicomweb.find_studies(cfg)]
        items = dicomweb.plan_retrieval(cfg, tmp_path, studies)
        peer.throttle = 4  # the first burst of 4 parallel requests: all 429
        summary = dicomweb.retrieve(cfg, items, spool_dir=tmp_path, workers=4, progress=False)
    assert summary.ok and spooled_uids(tmp_path) == set(peer.instances)
    changes = [r.getMessage() for r in caplog.records if r.name == "ingest.polite"]
    assert changes and changes[0].startswith("concurrent WADO-RS requests 4 -> 2: HTTP 429")


@pytest.mark.slow
def test_a_pacs_down_mid_pull_leaves_missing_instances_fetched_once_later(study_files, tmp_path) -> None:
    with DicomwebPeer(study_files) as peer:
        peer.down_after = 2  # two studies, then nothing answers
        cfg = dataclasses.replace(web_config(peer.url, tmp_path), workers=1)
        first = pull(cfg, id_salt="s", scheduler="sync", progress=False)
        assert not first.ok and first.retrieval.completed == 4
        ledger = read_ledger(tmp_path / "ledger.parquet")
        assert (ledger["state"] == "stored").sum() == 4 and set(ledger["state"]) == {"stored", "missing"}
        incomplete = first.incomplete_studies
        assert set(incomplete["study_state"]) == {"failed"} and len(incomplete) == 4

        peer.down_after = None  # back up
        again = pull(cfg, id_salt="s", scheduler="sync", progress=False)
    assert again.ok and again.planned_instances == 8 and again.retrieval.completed == 8
    ledger = read_ledger(tmp_path / "ledger.parquet")
    spooled = spooled_uids(tmp_path / "spool")
    # Nothing lost, nothing twice: the ledger's stored instances are exactly the spool's files.
    files = list((tmp_path / "spool").rglob("*.dcm"))
    assert set(ledger["state"]) == {"stored"} and len(ledger) == len(spooled) == len(files)
    assert set(ledger["sop_instance_uid"]) == spooled == set(peer.instances)


@pytest.mark.slow
def test_outside_the_window_the_pull_waits_and_then_runs(study_files, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ingest.polite")
    clock = {"now": datetime(2026, 3, 2, 18, 59, 50)}  # 10 s before the window opens
    asked_while_paused: list[int] = []

    def wait(seconds: float) -> bool:
        asked_while_paused.append(len(peer.requests))
        clock["now"] += timedelta(seconds=seconds)
        return False

    window = Window.parse("19:00-07:00")
    pacer = Pacer(window, now=lambda: clock["now"], wait=wait)
    with DicomwebPeer(study_files) as peer:
        cfg = web_config(peer.url, tmp_path, window=window)
        result = pull(cfg, id_salt="s", scheduler="sync", progress=False, pacer=pacer)
        assert asked_while_paused == [0] and peer.requests, "nothing asked before 19:00, all after"
    assert result.ok and clock["now"] >= datetime(2026, 3, 2, 19, 0)
    messages = [r.getMessage() for r in caplog.records if r.name == "ingest.polite"]
    assert messages[:2] == [
        "outside the pull window 19:00-07:00: pausing until 2026-03-02 19:00 (local time)",
        "inside the pull window 19:00-07:00 again: resuming",
    ]

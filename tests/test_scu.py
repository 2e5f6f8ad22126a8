"""Query/retrieve against real associations: Orthanc with a tiny C-FIND cap, dcmtk's dcmqrscp, and
a PACS that aborts.

One Orthanc (LimitFindResults=3) holding the synthetic studies and pydicom's sample files serves
the whole module; each retrieval test pulls into its own spool. The representative retrieval tests
run on both transports (this project's upper layer and pynetdicom's).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from factories import SYNTHETIC_STUDIES, make_instance
from pacs_peers import GetPacs
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

import ingest.dicom.scu as scu
from ingest.demo.orthanc import OrthancServer, free_port, port_accepts_connections
from ingest.dicom.scp import TRANSPORTS, StorageSCP, spool_path, spooled_uids
from ingest.dicom.scu import (
    AssociationError,
    PacsConfig,
    PacsError,
    RetrieveItem,
    echo,
    find_instances,
    find_series,
    find_studies,
    plan_retrieval,
    retrieve,
)

FIND_CAP = 3
OUR_AET = "PEDXRAY"


class CountingObserver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.found = self.stored = self.stored_bytes = 0
        self.failures: list[str] = []

    def on_found(self, n: int) -> None:
        with self.lock:
            self.found += n

    def on_stored(self, nbytes: int) -> None:
        with self.lock:
            self.stored += 1
            self.stored_bytes += nbytes

    def on_failed(self, reason: str) -> None:
        with self.lock:
            self.failures.append(reason)


def synthetic_study_uids(*, modalities=("CR", "DX"), first="00000000", last="99999999") -> set[str]:
    return {
        f"1.2.826.0.1.3680043.10.999.{n + 1}"
        for n, (date, _time, modality, _sizes) in enumerate(SYNTHETIC_STUDIES)
        if modality in modalities and first <= date <= last
    }


@pytest.fixture(scope="module")
def pacs(orthanc_binary, tmp_path_factory, synthetic_files, pydicom_testfiles):
    with OrthancServer(tmp_path_factory.mktemp("orthanc"), limit_find_results=FIND_CAP) as server:
        server.upload([*synthetic_files, *pydicom_testfiles], progress=False)
        yield server


@pytest.fixture(scope="module")
def originals(synthetic_files, pydicom_testfiles) -> dict[str, Dataset]:
    """Every instance in the PACS by SOPInstanceUID, as uploaded."""
    datasets = (pydicom.dcmread(path) for path in [*synthetic_files, *pydicom_testfiles])
    return {ds.SOPInstanceUID: ds for ds in datasets}


@pytest.fixture
def cfg(pacs) -> PacsConfig:
    return PacsConfig("127.0.0.1", pacs.dicom_port, pacs.aet, calling_aet=OUR_AET, retries=1, backoff_s=0.01)


def assert_spool_matches_pacs(spool: Path, originals: dict[str, Dataset]) -> None:
    assert spooled_uids(spool) == set(originals)
    for uid, original in originals.items():
        received = pydicom.dcmread(spool_path(spool, uid))
        assert received.SOPInstanceUID == uid
        assert received.PixelData == original.PixelData, f"pixel data of {uid} changed in transit"
    assert [path for path in spool.rglob(".*") if path.is_file()] == [], "temp files left in the spool"


def test_echo_succeeds(cfg):
    echo(cfg)


def test_every_quick_rejection_is_reported_as_a_rejection_not_an_abort(tmp_path):
    # Our SCP rejects at once, which makes pynetdicom 3.0.4 take ~1 in 100 rejections for aborts:
    # 300 echoes miss that with a probability of 0.99**300 = 5% if the workaround is gone.
    with StorageSCP(tmp_path / "spool", "PEDXRAY", 0, ["SOMEONE"]) as scp:
        cfg = PacsConfig("127.0.0.1", scp.port, scp.ae_title, calling_aet=OUR_AET, retries=2, backoff_s=0)
        for _ in range(300):
            with pytest.raises(PacsError) as error:
                echo(cfg)
            assert "failed after 1 attempt: association rejected" in str(error.value)  # not retried
            assert "reason: Calling AE title not recognised" in str(error.value)
            assert isinstance(error.value.__cause__, AssociationError)


def test_echo_to_a_closed_port_fails_after_bounded_retries():
    cfg = PacsConfig("127.0.0.1", free_port(), "NOBODY", retries=2, backoff_s=0.01, network_timeout=2)
    started = time.monotonic()
    with pytest.raises(PacsError, match=r"C-ECHO .* failed after 3 attempts: no association"):
        echo(cfg)
    assert time.monotonic() - started < 10


def test_orthanc_cuts_a_study_query_at_the_cap(pacs):
    # The premise of the paging tests: one plain C-FIND returns only FIND_CAP studies.
    ae = AE(ae_title=OUR_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    assoc = ae.associate(pacs.host, pacs.dicom_port, ae_title=pacs.aet)
    try:
        responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert len(responses) - 1 == FIND_CAP < len(pacs.study_uids())


def test_find_studies_pages_past_the_cap_to_every_radiograph_study(cfg):
    studies = list(find_studies(cfg))
    uids = [study["StudyInstanceUID"] for study in studies]
    assert len(uids) == len(set(uids)), "a study was yielded twice"
    assert set(uids) == synthetic_study_uids()  # 11 CR/DX studies; the MR and pydicom's files left out
    by_uid = {study["StudyInstanceUID"]: study for study in studies}
    first = by_uid["1.2.826.0.1.3680043.10.999.1"]
    assert (first["StudyDate"], first["ModalitiesInStudy"], first["NumberOfStudyRelatedInstances"]) == (
        "20150302",
        ("CR",),
        3,
    )


@pytest.mark.parametrize(
    ("date_range", "modalities", "expected"),
    [
        (
            ("2016-01-01", "2018-12-31"),
            ("DX",),
            synthetic_study_uids(modalities=("DX",), first="20160101", last="20181231"),
        ),
        # Four CR/DX studies on one day with a cap of 3: the day is split by StudyTime.
        (("20180101", "20180101"), ("CR", "DX"), synthetic_study_uids(first="20180101", last="20180101")),
        ((None, "2015-12-31"), ("CR", "DX"), synthetic_study_uids(last="20151231")),
        (("2022-01-01", None), ("MR",), synthetic_study_uids(modalities=("MR",), first="20220101")),
    ],
)
def test_find_studies_filters_by_date_range_and_modality(cfg, date_range, modalities, expected):
    assert expected, "the parametrization must select some studies"
    found = {s["StudyInstanceUID"] for s in find_studies(cfg, date_range=date_range, modalities=modalities)}
    assert found == expected


def test_find_studies_uses_a_known_page_limit(cfg):
    found = {s["StudyInstanceUID"] for s in find_studies(cfg, page_limit=FIND_CAP)}
    assert found == synthetic_study_uids()


def test_find_series_and_instances_of_a_study(cfg):
    study = "1.2.826.0.1.3680043.10.999.1"  # two series: one and two instances
    series = find_series(cfg, study)
    assert sorted(s["SeriesInstanceUID"] for s in series) == [f"{study}.1", f"{study}.2"]
    assert {s["Modality"] for s in series} == {"CR"}
    instances = find_instances(cfg, study)
    assert sorted(i["SOPInstanceUID"] for i in instances) == [f"{study}.1.1", f"{study}.2.1", f"{study}.2.2"]
    assert {i["SOPClassUID"] for i in instances} == {ComputedRadiographyImageStorage}
    assert [i["SOPInstanceUID"] for i in find_instances(cfg, study, f"{study}.2")] != []


def test_bad_query_arguments_say_what_to_fix(cfg):
    with pytest.raises(ValueError, match="date_range starts after it ends"):
        list(find_studies(cfg, date_range=("2020-01-02", "2020-01-01")))
    with pytest.raises(ValueError, match="is not a date: use YYYY-MM-DD"):
        list(find_studies(cfg, date_range=("last tuesday", None)))
    with pytest.raises(ValueError, match="pass a sequence such as"):
        list(find_studies(cfg, modalities="CR"))
    with pytest.raises(ValueError, match="is not a DICOM UID"):
        find_series(cfg, "1.2.x")


def record_associations(monkeypatch) -> list[str]:
    """Names of the threads that opened a retrieving association with the PACS, one entry each."""
    opened: list[str] = []
    real = scu._open_retrieving

    def counting(*args, **kwargs):
        opened.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(scu, "_open_retrieving", counting)
    return opened


def record_requests(monkeypatch) -> list[Dataset]:
    """The identifier of every C-MOVE / C-GET request ``retrieve`` sends."""
    sent: list[Dataset] = []
    real = scu._Retriever._send

    def recording(self, conn, identifier):
        sent.append(identifier)
        return real(self, conn, identifier)

    monkeypatch.setattr(scu._Retriever, "_send", recording)
    return sent


def pull_and_resume(cfg, pacs, originals, spool, monkeypatch, **retrieve_kwargs):
    """Full pull, a re-run that transfers nothing, then a run that refetches only deleted files."""
    observer = CountingObserver()
    plan = plan_retrieval(cfg, spool, pacs.study_uids(), observer=observer)
    assert observer.found == len(originals)
    assert sum(len(item.sop_instance_uids) for item in plan) == len(originals)
    assert {item.level for item in plan} == {"STUDY"}, "nothing spooled yet: whole studies"
    opened = record_associations(monkeypatch)
    sent = record_requests(monkeypatch)
    summary = retrieve(cfg, plan, workers=3, progress=False, observer=observer, **retrieve_kwargs)
    assert summary.ok, summary.failures
    assert (summary.requested, summary.completed, summary.failed) == (len(originals),) * 2 + (0,)
    # At most one association per worker, each reused (a worker that starts after the others have
    # taken every request opens none).
    assert len(plan) > 3 and 1 <= len(opened) <= 3 and len(set(opened)) == len(opened), opened
    # One StudyInstanceUID list per association instead of one request per series.
    assert len(sent) == 3 and sorted(uid for ds in sent for uid in ds.StudyInstanceUID) == sorted(
        item.study_uid for item in plan
    )
    assert observer.stored == len(originals) and observer.failures == []
    assert summary.bytes == observer.stored_bytes > 0
    assert_spool_matches_pacs(spool, originals)

    assert plan_retrieval(cfg, spool, pacs.study_uids()) == []
    again = retrieve(cfg, plan, workers=3, progress=False, **retrieve_kwargs)
    assert (again.completed, again.already_present, again.bytes) == (0, len(originals), 0)

    deleted = sorted(originals)[::7]
    for uid in deleted:
        spool_path(spool, uid).unlink()
    resumed_plan = plan_retrieval(cfg, spool, pacs.study_uids())
    assert sorted(uid for item in resumed_plan for uid in item.sop_instance_uids) == deleted
    for item in resumed_plan:
        study = {uid for uid, ds in originals.items() if ds.StudyInstanceUID == item.study_uid}
        # Whole studies only where none of the study is left; elsewhere just the missing instances.
        assert item.level == ("STUDY" if study <= set(deleted) else "IMAGE")
    resumed = retrieve(cfg, resumed_plan, workers=3, progress=False, **retrieve_kwargs)
    assert (resumed.completed, resumed.failed) == (len(deleted), 0)
    assert_spool_matches_pacs(spool, originals)


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_c_get_pulls_every_instance_and_resumes(cfg, pacs, originals, tmp_path, monkeypatch, transport):
    spool = tmp_path / "spool"
    kwargs = {"method": "get", "spool_dir": spool, "transport": transport}
    pull_and_resume(cfg, pacs, originals, spool, monkeypatch, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_c_move_into_the_storage_scp_pulls_every_instance_and_resumes(
    cfg, pacs, originals, tmp_path, monkeypatch, transport
):
    with StorageSCP(tmp_path / "spool", OUR_AET, 0, [pacs.aet], transport=transport) as scp:
        pacs.add_modality("pedxray", OUR_AET, "127.0.0.1", scp.port)
        kwargs = {"method": "move", "scp": scp, "transport": transport}
        pull_and_resume(cfg, pacs, originals, scp.spool_dir, monkeypatch, **kwargs)


def pull_in_processes(cfg, pacs, spool, observer=None, **retrieve_kwargs):
    plan = plan_retrieval(cfg, spool, pacs.study_uids())
    summary = retrieve(
        cfg, plan, workers=1, processes=2, progress=False, observer=observer, **retrieve_kwargs
    )
    return plan, summary


@pytest.mark.slow
@pytest.mark.parametrize(("method", "transport"), [("move", "fast"), ("get", "fast"), ("move", "pynetdicom")])
def test_pull_in_two_processes_stores_each_instance_once_and_resumes(
    cfg, pacs, originals, tmp_path, method, transport
):
    spool = tmp_path / "spool"
    with StorageSCP(spool, OUR_AET, 0, [pacs.aet], share_port=True, transport=transport) as scp:
        pacs.add_modality("pedxray", OUR_AET, "127.0.0.1", scp.port)
        kwargs = {"method": method, "scp": scp} if method == "move" else {"method": "get", "spool_dir": spool}
        kwargs["transport"] = transport
        observer = CountingObserver()
        _, summary = pull_in_processes(cfg, pacs, spool, observer, **kwargs)
        assert summary.ok, summary.failures
        assert (summary.requested, summary.completed, summary.failed) == (len(originals),) * 2 + (0,)
        # Stores made in the children reach the parent's observer (the Prometheus metrics).
        assert observer.stored == len(originals) and summary.bytes == observer.stored_bytes > 0
        assert_spool_matches_pacs(spool, originals)

        deleted = sorted(originals)[::5]
        for uid in deleted:
            spool_path(spool, uid).unlink()
        plan, resumed = pull_in_processes(cfg, pacs, spool, **kwargs)
        assert sorted(uid for item in plan for uid in item.sop_instance_uids) == deleted
        assert (resumed.completed, resumed.failed) == (len(deleted), 0)
        assert_spool_matches_pacs(spool, originals)


class CrashOnFirstStore(CountingObserver):
    """SIGKILLs every retrieving child process when the first instance arrives: a pull cut short."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: list[int] = []

    def on_stored(self, nbytes: int) -> None:
        super().on_stored(nbytes)
        if not self.killed:
            for child in multiprocessing.active_children():
                if child.name.startswith("retrieve-process"):
                    os.kill(child.pid, signal.SIGKILL)
                    self.killed.append(child.pid)


@pytest.mark.slow
def test_a_pull_whose_processes_die_reports_what_is_missing_and_the_rerun_fetches_only_that(
    cfg, pacs, originals, tmp_path
):
    spool = tmp_path / "spool"
    observer = CrashOnFirstStore()
    plan = plan_retrieval(cfg, spool, pacs.study_uids())
    summary = retrieve(
        cfg,
        plan,
        method="get",
        spool_dir=spool,
        workers=1,
        processes=2,
        max_studies_per_request=1,
        progress=False,
        observer=observer,
    )
    assert len(observer.killed) == 2
    missing = set(originals) - spooled_uids(spool)
    assert missing, "killed at the first instance, the pull cannot have finished"
    # The summary accounts for every instance: what is missing is what it says failed.
    assert (summary.completed, summary.failed) == (len(originals) - len(missing), len(missing))
    assert not summary.ok and all("retrieving process died" in f.reason for f in summary.failures)
    for uid in spooled_uids(spool):  # whatever was stored is complete
        assert pydicom.dcmread(spool_path(spool, uid)).PixelData == originals[uid].PixelData

    rerun_plan = plan_retrieval(cfg, spool, pacs.study_uids())
    assert {uid for item in rerun_plan for uid in item.sop_instance_uids} == missing
    rerun = retrieve(cfg, rerun_plan, method="get", spool_dir=spool, workers=1, processes=2, progress=False)
    assert rerun.ok and rerun.completed == len(missing)
    assert spooled_uids(spool) == set(originals)


@pytest.fixture(scope="module")
def dcmtk_pacs(tmp_path_factory, synthetic_files):
    """dcmtk's dcmqrscp holding the synthetic studies: a second PACS implementation. Yields its
    config and the port its C-MOVE destination (our AE title) must listen on."""
    if shutil.which("dcmqrscp") is None or shutil.which("storescu") is None:
        pytest.skip("dcmtk's dcmqrscp and storescu are not installed")
    root = tmp_path_factory.mktemp("dcmqrscp")
    (root / "db").mkdir()
    port, destination_port = free_port(), free_port()
    config = root / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\npedxray = ({OUR_AET}, 127.0.0.1, {destination_port})\nHostTable END\n"
        "VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nDCMTKPACS {root / 'db'} RW (200, 1024mb) ANY\nAETable END\n"
    )
    # Forking, not --single-process: dcmqrscp 3.6.7 crashed after its first association in that mode.
    process = subprocess.Popen(
        ["dcmqrscp", "-c", str(config), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not port_accepts_connections(port):
            assert process.poll() is None and time.monotonic() < deadline, "dcmqrscp did not start"
            time.sleep(0.05)
        load = ["storescu", "-aet", "LOADER", "-aec", "DCMTKPACS", "127.0.0.1", str(port), *synthetic_files]
        subprocess.run(load, check=True, capture_output=True)
        yield (
            PacsConfig("127.0.0.1", port, "DCMTKPACS", calling_aet=OUR_AET, retries=1, backoff_s=0.01),
            (destination_port),
        )
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("method", ["get", "move"])
def test_pull_from_dcmtk_stores_every_instance(dcmtk_pacs, synthetic_files, tmp_path, method, transport):
    cfg, destination_port = dcmtk_pacs
    originals = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, synthetic_files)}
    studies = sorted({ds.StudyInstanceUID for ds in originals.values()})
    spool = tmp_path / "spool"
    with StorageSCP(spool, OUR_AET, destination_port, ["DCMTKPACS"], transport=transport) as scp:
        plan = plan_retrieval(cfg, spool, studies)
        kwargs = {"scp": scp} if method == "move" else {"spool_dir": spool}
        summary = retrieve(cfg, plan, method=method, progress=False, transport=transport, **kwargs)
    assert summary.ok, summary.failures
    assert (summary.requested, summary.completed) == (len(originals),) * 2
    assert_spool_matches_pacs(spool, originals)
    assert plan_retrieval(cfg, spool, studies) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_c_move_of_a_whole_study_counts_the_pacs_sub_operations(cfg, pacs, tmp_path, transport):
    study = "1.2.826.0.1.3680043.10.999.1"
    with StorageSCP(tmp_path / "spool", OUR_AET, 0, [pacs.aet], transport=transport) as scp:
        pacs.add_modality("pedxray", OUR_AET, "127.0.0.1", scp.port)
        summary = retrieve(
            cfg, [RetrieveItem(study)], method="move", scp=scp, progress=False, transport=transport
        )
    assert summary.ok and (summary.requested, summary.completed) == (3, 3)
    assert spooled_uids(scp.spool_dir) == {f"{study}.1.1", f"{study}.2.1", f"{study}.2.2"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_c_move_to_an_unknown_destination_fails_with_a_reason(cfg, pacs, tmp_path, transport):
    stranger = PacsConfig(cfg.host, cfg.port, cfg.called_aet, move_destination="NOTKNOWN", retries=0)
    item = RetrieveItem("1.2.826.0.1.3680043.10.999.1")
    with StorageSCP(tmp_path / "spool", OUR_AET, 0, [pacs.aet], transport=transport) as scp:
        summary = retrieve(stranger, [item], method="move", scp=scp, progress=False, transport=transport)
    assert not summary.ok
    (failure,) = summary.failures
    assert "C-MOVE study 1.2.826.0.1.3680043.10.999.1" in failure.reason
    assert spooled_uids(scp.spool_dir) == set()


def test_whole_study_item_requests_the_study_and_lists_what_it_expects():
    study = "1.2.826.0.1.3680043.10.999.1"
    item = RetrieveItem(study, sop_instance_uids=(f"{study}.1.1", f"{study}.2.1"))
    identifier = item.identifier()
    assert (item.level, identifier.QueryRetrieveLevel, identifier.StudyInstanceUID) == (
        "STUDY",
        "STUDY",
        study,
    )
    assert "SOPInstanceUID" not in identifier
    assert item.describe() == f"study {study} (2 instance(s))"
    listed = scu._study_list_identifier([item, RetrieveItem("1.2.3")])
    assert list(listed.StudyInstanceUID) == [study, "1.2.3"]


def test_retrieve_arguments_are_checked(cfg, tmp_path):
    with pytest.raises(ValueError, match="use 'move'"):
        retrieve(cfg, [], method="ftp", spool_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a started StorageSCP"):
        retrieve(cfg, [], method="move")
    with pytest.raises(ValueError, match="use 1 or more parallel associations"):
        retrieve(cfg, [], method="get", spool_dir=tmp_path, workers=0)
    with pytest.raises(ValueError, match=r"max_studies_per_request=0: use 1 \(no UID lists\)"):
        retrieve(cfg, [], method="get", spool_dir=tmp_path, max_studies_per_request=0)
    with pytest.raises(ValueError, match="use 1 \\(this process\\) or more"):
        retrieve(cfg, [], method="get", spool_dir=tmp_path, processes=0)
    with pytest.raises(ValueError, match="transport='dcmtk': use 'fast'"):
        retrieve(cfg, [], method="get", spool_dir=tmp_path, transport="dcmtk")
    with (
        StorageSCP(tmp_path / "spool", OUR_AET, 0) as unshared,
        pytest.raises(ValueError, match="share_port=True"),
    ):
        retrieve(cfg, [], method="move", scp=unshared, processes=2)


# -- a PACS that drops the association in the middle of a C-GET -------------------------------------

FLAKY_STUDY = "1.2.826.0.1.3680043.10.997.1"
FLAKY_SERIES = f"{FLAKY_STUDY}.1"


@pytest.fixture
def flaky_pacs(tmp_path):
    paths = [
        make_instance(
            tmp_path / "flaky" / f"{n}.dcm",
            study_uid=FLAKY_STUDY,
            series_uid=FLAKY_SERIES,
            sop_uid=f"{FLAKY_SERIES}.{n}",
            seed=n,
        )
        for n in range(1, 7)
    ]
    pacs = GetPacs([pydicom.dcmread(path) for path in paths])
    yield pacs
    pacs.server.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_aborted_c_get_reports_the_rest_as_failed_keeps_what_arrived_and_a_retry_completes(
    flaky_pacs, tmp_path, transport
):
    cfg = PacsConfig("127.0.0.1", flaky_pacs.port, "FLAKYPACS", retries=1, backoff_s=0.01)
    spool = tmp_path / "spool"
    uids = tuple(sorted(flaky_pacs.datasets))
    item = RetrieveItem(FLAKY_STUDY, FLAKY_SERIES, uids, (ComputedRadiographyImageStorage,))
    observer = CountingObserver()
    flaky_pacs.abort_after = 1

    summary = retrieve(
        cfg, [item], method="get", spool_dir=spool, progress=False, observer=observer, transport=transport
    )

    # Two attempts (retries=1), each storing one instance before the abort: four are missing.
    assert flaky_pacs.requests == 2
    assert (summary.requested, summary.completed, summary.failed) == (6, 2, 4)
    (failure,) = summary.failures
    assert "failed after 2 attempts" in failure.reason and "association aborted" in failure.reason
    assert observer.failures == [failure.reason]
    kept = spooled_uids(spool)
    assert kept == set(uids[:2])
    kept_bytes = {uid: spool_path(spool, uid).read_bytes() for uid in kept}

    flaky_pacs.abort_after = None
    retried = retrieve(cfg, [item], method="get", spool_dir=spool, progress=False, transport=transport)
    assert retried.ok
    assert (retried.already_present, retried.completed) == (2, 4)
    assert spooled_uids(spool) == set(uids)
    assert {uid: spool_path(spool, uid).read_bytes() for uid in kept} == kept_bytes


class ListRefusingPacs(GetPacs):
    """Sends whole studies by C-GET, but answers a request naming several studies with ``answer``:
    a failure status, or None for a Success without sending anything (a list taken as one UID)."""

    def __init__(self, datasets: list[Dataset], answer: int | None) -> None:
        super().__init__(datasets)
        self.answer = answer
        self.studies_per_request: list[int] = []

    def on_get(self, event):
        studies = event.identifier.StudyInstanceUID
        studies = [studies] if isinstance(studies, str) else list(studies)
        self.studies_per_request.append(len(studies))
        if len(studies) > 1:
            yield 0 if self.answer is None else len(studies)
            if self.answer is not None:
                yield self.answer, None
            return
        selected = [ds for ds in self.datasets.values() if ds.StudyInstanceUID == studies[0]]
        yield len(selected)
        for dataset in selected:
            yield 0xFF00, dataset


@pytest.mark.parametrize("answer", [0xA900, 0xC000, None])
def test_a_pacs_without_study_uid_lists_gets_one_study_per_request(tmp_path, caplog, answer):
    studies = [f"1.2.826.0.1.3680043.10.996.{n}" for n in range(1, 4)]
    paths = [
        make_instance(
            tmp_path / "pacs" / f"{s}-{n}.dcm",
            study_uid=study,
            series_uid=f"{study}.1",
            sop_uid=f"{study}.1.{n}",
            seed=10 * s + n,
        )
        for s, study in enumerate(studies)
        for n in (1, 2)
    ]
    pacs = ListRefusingPacs([pydicom.dcmread(path) for path in paths], answer)
    try:
        cfg = PacsConfig("127.0.0.1", pacs.port, "FLAKYPACS", retries=1, backoff_s=0.01)
        items = [
            RetrieveItem(study, None, (f"{study}.1.1", f"{study}.1.2"), (ComputedRadiographyImageStorage,))
            for study in studies
        ]
        spool = tmp_path / "spool"
        summary = retrieve(cfg, items, method="get", spool_dir=spool, workers=1, progress=False)
    finally:
        pacs.server.shutdown()
    assert summary.ok, summary.failures
    assert (summary.requested, summary.completed) == (6, 6)
    assert spooled_uids(spool) == set(pacs.datasets)
    assert pacs.studies_per_request == [3, 1, 1, 1]
    assert "does not take StudyInstanceUID lists, so this run sends one study per request" in caplog.text


def test_retrieve_from_an_unreachable_pacs_fails_every_item_without_waiting_for_each(tmp_path):
    cfg = PacsConfig("127.0.0.1", free_port(), "NOBODY", retries=2, backoff_s=0.01, network_timeout=2)
    items = [
        RetrieveItem(FLAKY_STUDY, FLAKY_SERIES, (f"{FLAKY_SERIES}.{n}",), (ComputedRadiographyImageStorage,))
        for n in range(1, 6)
    ]
    started = time.monotonic()
    summary = retrieve(cfg, items, method="get", spool_dir=tmp_path, workers=1, progress=False)
    assert time.monotonic() - started < 10
    assert (summary.requested, summary.failed, len(summary.failures)) == (5, 5, 5)
    assert "failed after 3 attempts" in summary.failures[0].reason
    assert all("no association" in failure.reason for failure in summary.failures)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("PACS@10.0.0.5:104", ("10.0.0.5", 104, "PACS")),
        ("[::1]:11112", ("::1", 11112, "GIVEN")),
    ],
)
def test_pacs_address_parsing(address, expected):
    cfg = PacsConfig.parse(address, called_aet="GIVEN" if "@" not in address else None)
    assert (cfg.host, cfg.port, cfg.called_aet) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "must be an integer in 1..65535"),
        ({"called_aet": "A" * 17}, "is not a valid AE title"),
        ({"dimse_timeout": 0}, "timeouts are seconds and must be > 0"),
        ({"max_pdu": 100}, "use 0 \\(unlimited\\) or a size"),
        ({"retries": -1}, "use 0 \\(one attempt only\\) or more"),
    ],
)
def test_invalid_pacs_config_says_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PacsConfig(**{"host": "127.0.0.1", "port": 104, "called_aet": "PACS", **kwargs})


def test_back_to_back_queries_on_one_association_lose_no_match(cfg):
    # pynetdicom's reactor could take a response meant for send_c_find (issue #875): about 2% of
    # queries lost a match here before ingest.dicom.scu parked it properly.
    expected = synthetic_study_uids(first="20150101", last="20151231")  # under FIND_CAP
    query = scu._query("STUDY", scu.STUDY_KEYS, StudyDate="20150101-20151231", ModalitiesInStudy="CR\\DX")
    with scu._find_connection(cfg) as conn:
        answers = [scu._find_once(conn, query, scu.STUDY_KEYS) for _ in range(150)]
    assert all({m["StudyInstanceUID"] for m in matches} == expected for matches, _ in answers)

"""`python -m ingest pull` end to end against a real Orthanc on 127.0.0.1: C-MOVE, C-GET, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import tarfile
import threading
from datetime import date
from pathlib import Path

import pytest
from factories import radiograph, write
from waiting import wait_until

from ingest.dataset.balance import BalanceConfig
from ingest.dataset.catalog import read_catalog
from ingest.dataset.deid import pseudonymise_rows
from ingest.demo.orthanc import OrthancServer, free_port
from ingest.dicom import scu
from ingest.dicom.scp import spooled_uids
from ingest.dicom.scu import PacsConfig, find_studies, plan_retrieval
from ingest.imaging.preprocess import PreprocessParams
from ingest.ledger import read_ledger
from ingest.metrics import IngestMetrics
from ingest.pull import PullConfig, main, pull

pytestmark = pytest.mark.slow

# (BodyPartExamined, ViewPosition, StudyDescription) → 7-class region, as a modality fills them.
EXAMS = [
    ("CHEST", "PA", "XR CHEST PA", "Chest"),
    ("HAND", "PA", "XR HAND PA LEFT", "Upper_Extremity"),
    ("KNEE", "AP", "XR KNEE AP RT", "Lower_Extremity"),
    ("SKULL", "AP", "XR SKULL AP", "Head"),
]
PER_EXAM = 6


@pytest.fixture(scope="module")
def pacs(orthanc_binary, tmp_path_factory):
    data = tmp_path_factory.mktemp("pacs-data")
    uids = set()
    for e, (part, view, desc, _) in enumerate(EXAMS):
        for i in range(PER_EXAM):
            when = date(2016, 1 + i, 3) if i < 4 else date(2019, i, 3)
            ds = radiograph(
                patient_id=f"P{e}{i}",
                study_key=f"pull-{e}-{i}",
                study_date=when,
                body_part=part,
                view_position=view,
                study_description=desc,
            )
            write(ds, data)
            uids.add(ds.SOPInstanceUID)
    scp_port = free_port()
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc"),
        aet="TESTPACS",
        modalities={"pedxray": ("PEDXRAY", "127.0.0.1", scp_port)},
    )
    with server:
        assert server.upload(sorted(data.glob("*.dcm")), progress=False) == len(uids)
        yield server, scp_port, uids


def config(pacs, work: Path, method: str, processes: int = 1, transport: str = "fast") -> PullConfig:
    server, scp_port, _ = pacs
    return PullConfig(
        pacs=PacsConfig("127.0.0.1", server.dicom_port, "TESTPACS", retries=1, backoff_s=0.1),
        work_dir=work,
        method=method,
        transport=transport,
        scp_port=scp_port,
        workers=2,
        processes=processes,
        balance=BalanceConfig(
            granularity=7, per_class=4, finetune_fraction=0.25, reference_date=date(2018, 7, 1)
        ),
        preprocessing=PreprocessParams(size=32),
        shard_size=4,
    )


def metric(metrics: IngestMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("method", "processes", "transport"),
    [
        ("move", 1, "fast"),
        ("get", 1, "fast"),
        ("move", 2, "fast"),
        ("move", 1, "pynetdicom"),
        ("get", 1, "pynetdicom"),
    ],
)
def test_pull_retrieves_everything_once_and_resumes(
    pacs, tmp_path: Path, method: str, processes: int, transport: str
) -> None:
    _, _, uids = pacs
    cfg = config(pacs, tmp_path / "work", method, processes, transport)
    metrics = IngestMetrics()
    result = pull(cfg, id_salt="s", metrics=metrics, scheduler="sync", progress=False)
    assert result.ok and result.studies == len(uids)
    assert result.retrieval.completed == len(uids) == result.planned_instances
    assert spooled_uids(cfg.spool_dir) == uids
    ledger = read_ledger(cfg.ledger_path)
    assert set(ledger["sop_instance_uid"]) == uids and set(ledger["state"]) == {"stored"}
    assert set(ledger["study_state"]) == {"complete"} and result.incomplete_studies.empty
    assert metric(metrics, "pedx_ingest_instances_found_total") == len(uids)
    assert metric(metrics, "pedx_ingest_instances_retrieved_total") == len(uids)
    assert metric(metrics, "pedx_ingest_bytes_retrieved_total") == result.retrieval.bytes > 0
    assert metric(metrics, "pedx_ingest_instances_cataloged_total", status="ok") == len(uids)

    catalog = read_catalog(cfg.catalog_path)
    assert set(catalog["sop_instance_uid"]) == uids
    assert catalog.groupby("label_7").size().to_dict() == {region: PER_EXAM for *_, region in EXAMS}
    manifest = result.manifest
    assert json.loads((cfg.shards_dir / "manifest.json").read_text())["shards"] == manifest["shards"]
    # 4 per class: 3 train + 1 fine-tuning; validation = the studies after 2018-07.
    for _, _, _, region in EXAMS:
        assert manifest["counts"]["train"][region] == 3 and manifest["counts"]["finetune"][region] == 1
        assert manifest["counts"]["val"][region] == 1
    saved = json.loads((cfg.work_dir / "pull-config.json").read_text())
    assert (saved["method"], saved["processes"], saved["transport"]) == (method, processes, transport)

    # Interrupted runs resume: delete part of the spool, and only that part is fetched again.
    lost = sorted(cfg.spool_dir.rglob("*.dcm"))[:5]
    for path in lost:
        path.unlink()
    again = pull(cfg, id_salt="s", scheduler="sync", progress=False)
    assert again.planned_instances == 5 and again.retrieval.completed == 5
    assert spooled_uids(cfg.spool_dir) == uids
    assert set(read_ledger(cfg.ledger_path)["state"]) == {"stored"}, "every promised instance"
    assert again.catalog["reused"] == len(uids) - 5
    assert again.manifest["shards"] == manifest["shards"], "same data, same shards"
    done = pull(cfg, id_salt="s", scheduler="sync", progress=False)
    assert done.planned_instances == 0 and done.retrieval.completed == 0
    assert done.manifest["skipped_shards"] == len(manifest["shards"])


def test_refused_retrievals_are_in_the_ledger_and_the_pull_exits_3(pacs, tmp_path: Path, capsys) -> None:
    server, scp_port, uids = pacs
    args = ["--pacs", f"127.0.0.1:{server.dicom_port}", "--called-aet", "TESTPACS", "--work", str(tmp_path)]
    # A C-MOVE destination the PACS does not know: every request is refused (Orthanc: 0xC000).
    args += ["--move-dest", "NOBODY", "--scp-port", str(scp_port), "--no-shards", "--scheduler", "sync"]
    args += ["--retries", "0"]
    assert main(args) == 3
    out = capsys.readouterr().out
    assert f"{len(EXAMS) * PER_EXAM} incomplete study(ies)" in out and "failed" in out
    ledger = read_ledger(tmp_path / "ledger.parquet")
    assert set(ledger["sop_instance_uid"]) == uids
    assert set(ledger["state"]) == {"refused"} and ledger["status"].str.fullmatch("0x[0-9A-F]{4}").all()
    assert set(ledger["study_state"]) == {"failed"}


def test_config_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give one source"):
        PullConfig(work_dir=tmp_path)


def test_config_names_the_transports_when_given_another(tmp_path: Path) -> None:
    pacs = PacsConfig("127.0.0.1", 104, "TESTPACS")
    with pytest.raises(ValueError, match="transport='dcmtk': use 'fast' .* or 'pynetdicom'"):
        PullConfig(pacs=pacs, work_dir=tmp_path, transport="dcmtk")


@pytest.fixture
def pynetdicom_log_level():
    yield
    logging.getLogger("pynetdicom").setLevel(logging.NOTSET)


def test_cli_runs_with_metrics_and_fails_clearly_without_a_pacs(
    pacs, tmp_path: Path, capsys, caplog, pynetdicom_log_level
) -> None:
    caplog.set_level(logging.INFO)
    server, scp_port, uids = pacs
    args = [
        "--pacs",
        f"127.0.0.1:{server.dicom_port}",
        "--called-aet",
        "TESTPACS",
        "--work",
        str(tmp_path / "w"),
        "--scp-port",
        str(scp_port),
        "--metrics-port",
        str(free_port()),
        "--per-class",
        "4",
        "--image-size",
        "32",
        "--reference-date",
        "2018-07-01",
        "--scheduler",
        "sync",
        "--transport",
        "pynetdicom",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{len(uids)} studies" in out and "metrics: http://127.0.0.1:" in out and "shards in" in out
    assert json.loads((tmp_path / "w" / "pull-config.json").read_text())["transport"] == "pynetdicom"
    # pynetdicom at INFO writes every C-FIND match (and, on its transport, every DIMSE message)
    # element by element: kept out of the console.
    chatter = [r for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno < logging.WARNING]
    assert chatter == []
    assert any(r.name.startswith("ingest") and r.levelno == logging.INFO for r in caplog.records)
    dead = [
        "--pacs",
        f"127.0.0.1:{free_port()}",
        "--called-aet",
        "NOBODY",
        "--work",
        str(tmp_path / "x"),
        "--retries",
        "0",
        "--scheduler",
        "sync",
    ]
    assert main(dead) == 1
    assert "error:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def phantom_pacs(orthanc_binary, tmp_path_factory):
    from ingest import phantoms

    data = tmp_path_factory.mktemp("phantoms")
    truth = phantoms.generate(data, studies=40, seed=7)
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-phantoms"), aet="PHANTOMS")
    with server:
        assert server.upload(sorted(data.rglob("*.dcm")), progress=False) == len(truth)
        yield server, truth


def test_pull_of_the_phantom_pacs_labels_correctly_and_shards_match_the_catalog(
    phantom_pacs, tmp_path
) -> None:
    server, truth = phantom_pacs
    cfg = PullConfig(
        pacs=PacsConfig("127.0.0.1", server.dicom_port, "PHANTOMS"),
        work_dir=tmp_path,
        method="get",
        balance=BalanceConfig(granularity=7, per_class=8, reference_date=date(2020, 7, 1)),
        preprocessing=PreprocessParams(size=32),
        shard_size=16,
    )
    result = pull(cfg, id_salt="s", scheduler="sync", progress=False)
    assert result.ok and result.retrieval.completed == len(truth)
    catalog = read_catalog(cfg.catalog_path).astype({"sop_instance_uid": str, "label_68": object})
    merged = truth.merge(catalog, on="sop_instance_uid", suffixes=("_truth", ""))
    assert len(merged) == len(truth)
    mapped = merged[merged["status"] == "ok"]
    # Phantom headers include deliberate quirks (missing body part, wrong ViewPosition, abbreviations).
    assert len(mapped) >= 0.95 * len(truth)
    assert (mapped["label_68"] == mapped["label_68_truth"]).mean() >= 0.98

    manifest = result.manifest
    # Shards carry pseudonymised UIDs: map each catalog row to its pseudonym with the pull's salt.
    rows = catalog.to_dict("records")
    labels = {
        fake["sop_instance_uid"]: row["label_7"]
        for row, fake in zip(rows, pseudonymise_rows(rows, "s"), strict=True)
    }
    sharded: dict[tuple[str, str], int] = {}
    for shard in manifest["shards"]:
        with tarfile.open(cfg.shards_dir / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    assert labels[meta["sop_instance_uid"]] == meta["label_7"]
                    key = (meta["split"], meta["label_7"])
                    sharded[key] = sharded.get(key, 0) + 1
    for split, per_class in manifest["counts"].items():
        for cls, n in per_class.items():
            assert sharded.get((split, cls), 0) == n, (split, cls)
        assert sum(per_class.values()) == manifest["samples"][split]
    for cls in manifest["classes"]:
        total = sum(manifest["counts"][s][cls] for s in ("train", "finetune"))
        assert total + manifest["balance_report"]["shortfall"].get(cls, 0) == 8, "short classes are reported"


def test_parallel_planning_gives_the_plan_of_one_association(pacs, tmp_path: Path) -> None:
    server, _, uids = pacs
    cfg = PacsConfig("127.0.0.1", server.dicom_port, "TESTPACS", retries=1, backoff_s=0.1)
    studies = [s["StudyInstanceUID"] for s in find_studies(cfg)]
    one, many = {}, {}
    serial = plan_retrieval(cfg, tmp_path, studies, promised=one)
    parallel = plan_retrieval(cfg, tmp_path, studies, promised=many, workers=4)
    assert parallel == serial, "same items, in the order of the studies"
    assert many == one and list(many) == studies
    assert {uid for item in parallel for uid in item.sop_instance_uids} == uids


def spy_on_series_searches(monkeypatch) -> list[str]:
    searched: list[str] = []
    find_series = scu._find_series

    def spy(conn, study_uid):
        searched.append(study_uid)
        return find_series(conn, study_uid)

    monkeypatch.setattr(scu, "_find_series", spy)
    return searched


def test_relational_planning_asks_for_many_studies_at_once_and_checks_the_counts(
    pacs, tmp_path: Path, monkeypatch
) -> None:
    server, _, uids = pacs
    cfg = PacsConfig("127.0.0.1", server.dicom_port, "TESTPACS", retries=1, backoff_s=0.1)
    found = list(find_studies(cfg))
    studies = [s["StudyInstanceUID"] for s in found]
    counts = {s["StudyInstanceUID"]: s["NumberOfStudyRelatedInstances"] for s in found}
    hierarchical, relational = {}, {}
    expected = plan_retrieval(cfg, tmp_path, studies, promised=hierarchical)
    searched = spy_on_series_searches(monkeypatch)
    plan = plan_retrieval(
        cfg,
        tmp_path,
        studies,
        promised=relational,
        relational=True,
        studies_per_query=10,
        expected_instances=counts,
    )
    assert plan == expected and relational == hierarchical
    assert searched == [], "every study answered by the 3 list queries"

    short = studies[5]  # the study search promised more than the relational answer holds
    plan = plan_retrieval(cfg, tmp_path, studies, relational=True, expected_instances=counts | {short: 2})
    assert searched == [short] and plan == expected


def test_relational_answers_a_pacs_cuts_short_are_asked_again_in_halves(
    orthanc_binary, tmp_path: Path, monkeypatch
) -> None:
    data = tmp_path / "data"
    uids = set()
    for i in range(8):
        ds = radiograph(patient_id=f"C{i}", study_key=f"cut-{i}")
        write(ds, data)
        uids.add(ds.SOPInstanceUID)
    # Orthanc ends an instance answer at LimitFindInstances and says so (0xFE00).
    with OrthancServer(tmp_path / "orthanc", aet="TESTPACS", limit_find_instances=3) as server:
        server.upload(sorted(data.glob("*.dcm")), progress=False)
        cfg = PacsConfig("127.0.0.1", server.dicom_port, "TESTPACS", retries=1, backoff_s=0.1)
        found = list(find_studies(cfg))
        counts = {s["StudyInstanceUID"]: s["NumberOfStudyRelatedInstances"] for s in found}
        searched = spy_on_series_searches(monkeypatch)
        plan = plan_retrieval(cfg, tmp_path, list(counts), relational=True, expected_instances=counts)
    assert {uid for item in plan for uid in item.sop_instance_uids} == uids
    assert searched == [], "halves of 4, 2 and 1 studies fit under the cap: no per-series search"


def test_a_rerun_searches_only_the_studies_its_ledger_does_not_record_complete(
    pacs, tmp_path: Path, monkeypatch
) -> None:
    _, _, uids = pacs
    cfg = config(pacs, tmp_path / "work", "get")
    assert pull(cfg, id_salt="s", scheduler="sync", progress=False).ok
    lost = sorted(cfg.spool_dir.rglob("*.dcm"))[0]
    lost.unlink()
    lost_study = read_ledger(cfg.ledger_path).set_index("sop_instance_uid").at[lost.stem, "study_uid"]

    searched = spy_on_series_searches(monkeypatch)
    again = pull(cfg, id_salt="s", scheduler="sync", progress=False)
    assert searched == [lost_study], "only the study with an instance gone from the spool"
    assert again.ok and again.planned_instances == 1 and spooled_uids(cfg.spool_dir) == uids
    ledger = read_ledger(cfg.ledger_path)
    assert set(ledger["sop_instance_uid"]) == uids and set(ledger["state"]) == {"stored"}

    searched.clear()
    pull(dataclasses.replace(cfg, requery_complete=True), id_salt="s", scheduler="sync", progress=False)
    assert len(searched) == len(set(ledger["study_uid"])), "--requery-complete searches every study"


@pytest.mark.parametrize("method", ["get", "move"])
def test_a_pacs_restarted_mid_pull_loses_and_duplicates_nothing(
    orthanc_binary, tmp_path: Path, method
) -> None:
    """Orthanc limited to one DICOM thread (fewer than our 2 associations) is killed while a paced
    pull runs and comes back on its ports: after at most one re-run every instance is in the spool
    once, and the ledger's count matches the spool."""
    data = tmp_path / "data"
    uids = set()
    for i in range(16):
        ds = radiograph(patient_id=f"R{i}", study_key=f"restart-{i}", study_date=date(2017, 1 + i % 12, 5))
        write(ds, data)
        uids.add(ds.SOPInstanceUID)
    scp_port = free_port()
    options = {
        "aet": "TESTPACS",
        "modalities": {"pedxray": ("PEDXRAY", "127.0.0.1", scp_port)},
        "extra_options": {"DicomThreadsCount": 1},
    }
    server = OrthancServer(tmp_path / "orthanc", **options).start()
    restarted = None
    try:
        server.upload(sorted(data.glob("*.dcm")), progress=False)
        ports = {"dicom_port": server.dicom_port, "http_port": server.http_port}
        cfg = PullConfig(
            pacs=PacsConfig("127.0.0.1", server.dicom_port, "TESTPACS", retries=4, backoff_s=0.5),
            work_dir=tmp_path / "work",
            method=method,
            scp_port=scp_port,
            workers=2,
            studies_per_request=1,
            max_rate=8,  # ~2 s of retrieval: time to restart the PACS in the middle of it
            write_shards=False,
        )
        outcome: dict = {}
        puller = threading.Thread(
            target=lambda: outcome.update(result=pull(cfg, id_salt="s", scheduler="sync", progress=False))
        )
        puller.start()
        wait_until(lambda: len(spooled_uids(cfg.spool_dir)) >= 3, 60, "the pull stored nothing")
        os.kill(server.pid, signal.SIGKILL)  # a crash: Orthanc's own stop would let running requests end
        server.stop()
        assert len(spooled_uids(cfg.spool_dir)) < len(uids), "the PACS went down after the pull had ended"
        restarted = OrthancServer(tmp_path / "orthanc", **options, **ports).start()
        puller.join(timeout=120)
        assert not puller.is_alive(), "the pull hangs after the PACS came back"
        result = outcome["result"]
        if not result.ok:  # what the restart cut short is fetched by the re-run
            result = pull(cfg, id_salt="s", scheduler="sync", progress=False)
        assert result.ok
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()
    assert spooled_uids(cfg.spool_dir) == uids
    assert sorted(path.stem for path in cfg.spool_dir.rglob("*.dcm")) == sorted(uids), "each once"
    assert not list(cfg.spool_dir.rglob(".*")), "no temporary file left"
    ledger = read_ledger(cfg.ledger_path)
    assert len(ledger) == ledger["sop_instance_uid"].nunique() == len(uids)
    assert set(ledger["state"]) == {"stored"} and set(ledger["study_state"]) == {"complete"}


def test_planning_runs_ahead_of_the_retrieval_in_chunks(pacs, tmp_path: Path, monkeypatch) -> None:
    """The first retrieval starts before the last study is searched: each later chunk's plan is made
    while the chunk before it is retrieved, and no chunk lists the whole spool again."""
    import ingest.pull

    _, _, uids = pacs
    monkeypatch.setattr(ingest.pull, "PLAN_AHEAD", 5)
    retrieving = threading.Event()
    planned_while_retrieving: list[bool] = []
    plan_retrieval, retrieve = ingest.pull.plan_retrieval, ingest.pull.retrieve

    def plan_spy(*args, **kwargs):
        if planned_while_retrieving or retrieving.is_set():
            planned_while_retrieving.append(retrieving.wait(timeout=10))
        else:
            planned_while_retrieving.append(False)  # the first chunk: nothing to overlap yet
        return plan_retrieval(*args, **kwargs)

    def retrieve_spy(*args, **kwargs):
        retrieving.set()
        return retrieve(*args, **kwargs)

    monkeypatch.setattr(ingest.pull, "plan_retrieval", plan_spy)
    monkeypatch.setattr(ingest.pull, "retrieve", retrieve_spy)

    def no_listing(spool):
        raise AssertionError("a chunk listed the whole spool: the pull lists it once, up front")

    monkeypatch.setattr(scu, "spooled_uids", no_listing)
    cfg = config(pacs, tmp_path / "work", "get")
    result = pull(cfg, id_salt="s", scheduler="sync", progress=False)
    assert result.ok and result.planned_instances == len(uids) and spooled_uids(cfg.spool_dir) == uids
    assert planned_while_retrieving == [False] + [True] * 4, "5 chunks of 5 studies, 4 planned ahead"
    assert set(read_ledger(cfg.ledger_path)["study_state"]) == {"complete"}

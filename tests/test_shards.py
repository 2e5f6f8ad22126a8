"""`python -m ingest shards`: balanced, patient-disjoint WebDataset shards + manifest; atomic, re-runnable."""

from __future__ import annotations

import hashlib
import json
import tarfile
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from factories import radiograph, write

from ingest.dataset.balance import BalanceConfig
from ingest.dataset.catalog import read_catalog, scan
from ingest.dataset.deid import pseudonymise_rows
from ingest.dataset.shards import (
    MANIFEST_FORMAT,
    RECORD_VERSION,
    ShardError,
    main,
    spread_classes,
    write_shards,
)
from ingest.dataset.taxonomy import load_taxonomy
from ingest.imaging.preprocess import PreprocessParams

# One 68-class view per 7-class region, selected by a site code table so the test does not depend on rules.
VIEWS = ("Abdomen_KUB", "Ankle_AP", "C_Spine_AP", "Chest_Clavicle", "Cochlea", "Elbow_Lateral", "Pelvis_AP")
PER_VIEW = 12  # 8 before the reference date, 4 after
IMAGE = 64


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("shards")
    spool = root / "spool"
    for v, view in enumerate(VIEWS):
        for i in range(PER_VIEW):
            when = date(2016 + i % 2, 1 + i, 10) if i < 8 else date(2019, i - 7, 5)
            write(
                radiograph(
                    patient_id=f"P{v}-{i}",
                    study_key=f"{view}-{i}",
                    study_date=when,
                    procedure_code=f"SITE-{v}",
                    body_part=None,
                    view_position=None,
                    study_description="XR",
                    shape=(40 + 4 * v, 48),
                ),
                spool,
            )
    table = root / "codes.csv"
    table.write_text("code,label_68\n" + "".join(f"SITE-{v},{view}\n" for v, view in enumerate(VIEWS)))
    taxonomy = load_taxonomy(code_table=table)
    scan(spool, root / "catalog", id_salt="s", taxonomy=taxonomy, scheduler="sync", progress=False)
    return root, root / "catalog", taxonomy


SALT = "shard-test-salt"
CONFIG = BalanceConfig(
    granularity=7, per_class=6, finetune_fraction=1 / 3, reference_date=date(2018, 7, 1), seed=3
)


def make_shards(out: Path, catalog_path: Path, taxonomy, **options) -> dict:
    return write_shards(
        catalog_path,
        out,
        balance_config=options.pop("config", CONFIG),
        params=PreprocessParams(size=IMAGE),
        shard_size=5,
        taxonomy=taxonomy,
        scheduler="sync",
        progress=False,
        id_salt=options.pop("id_salt", SALT),
        **options,
    )


def catalog_by_pseudonym(catalog_path: Path, salt: str = SALT) -> dict[str, dict]:
    """The catalog rows (real values) keyed by the pseudonymous SOP Instance UID shards carry."""
    df = read_catalog(catalog_path)
    rows = [{k: (None if v is pd.NA else v) for k, v in r.items()} for r in df.to_dict("records")]
    return {p["sop_instance_uid"]: r for r, p in zip(rows, pseudonymise_rows(rows, salt), strict=True)}


def read_samples(shard: Path) -> list[tuple[np.ndarray, dict]]:
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        keys = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
        # WebDataset groups a sample's files by key: they must be adjacent, image first.
        assert names == [f"{k}.{ext}" for k in keys for ext in ("png", "json")]
        samples = []
        for key in keys:
            png = np.frombuffer(tar.extractfile(f"{key}.png").read(), np.uint8)
            samples.append(
                (cv2.imdecode(png, cv2.IMREAD_UNCHANGED), json.load(tar.extractfile(f"{key}.json")))
            )
    return samples


def test_manifest_counts_match_the_shards_and_splits_are_patient_disjoint(catalog, tmp_path: Path) -> None:
    _, catalog_path, taxonomy = catalog
    out = tmp_path / "s7"
    manifest = make_shards(out, catalog_path, taxonomy)
    assert manifest["format"] == MANIFEST_FORMAT and manifest["granularity"] == 7
    assert manifest["classes"] == list(taxonomy.classes(7))
    assert manifest["taxonomy_version"] == taxonomy.version and manifest["seed"] == 3
    assert manifest["preprocessing"]["size"] == IMAGE
    # per_class 6 with a third for fine-tuning: 4 train + 2 finetune per class, 2 validation (the share).
    for cls in manifest["classes"]:
        assert (
            manifest["counts"]["train"][cls],
            manifest["counts"]["finetune"][cls],
            manifest["counts"]["val"][cls],
        ) == (4, 2, 2)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["shards"] == manifest["shards"]
    assert manifest["records"] == RECORD_VERSION and not manifest["deidentification"]["mask_text"]
    real = catalog_by_pseudonym(catalog_path)
    shifted: dict[str, set[int]] = {}
    patients: dict[str, set[str]] = {}
    seen = 0
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        samples = read_samples(path)
        assert len(samples) == shard["samples"]
        for image, meta in samples:
            seen += 1
            assert image.shape == (IMAGE, IMAGE) and image.dtype == np.uint8 and image.max() > 0
            assert meta["split"] == shard["split"] and shard["name"].startswith(meta["split"])
            assert meta["label_7"] in manifest["classes"] and meta["label_68"] in VIEWS
            # De-identified: pseudonymous UIDs, the date moved back by the patient's own shift, and the
            # split still made on the real date.
            row = real[meta["sop_instance_uid"]]
            assert meta["key"] == meta["sop_instance_uid"].replace(".", "_")
            assert meta["study_instance_uid"] != row["study_instance_uid"]
            assert meta["series_instance_uid"] != row["series_instance_uid"]
            assert meta["patient_id_hash"] == row["patient_id_hash"] and meta["label_7"] == row["label_7"]
            assert meta["patient_sex"] == row["patient_sex"]
            assert meta["patient_age_months"] == pytest.approx(row["patient_age_months"])
            shift = (row["study_date"] - date.fromisoformat(meta["study_date"])).days
            assert 62 <= shift <= 731
            shifted.setdefault(meta["patient_id_hash"], set()).add(shift)
            if meta["split"] == "val":
                assert row["study_date"] >= date(2018, 7, 1)
            patients.setdefault(meta["split"], set()).add(meta["patient_id_hash"])
    assert seen == sum(manifest["samples"].values()) == 7 * 8
    assert all(len(shifts) == 1 for shifts in shifted.values()), "one shift per patient"
    assert len({next(iter(s)) for s in shifted.values()}) > 1, "patients are shifted differently"
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["finetune"]
    assert not patients["finetune"] & patients["val"]


def test_rerun_skips_verified_shards_and_rebuilds_a_damaged_one(catalog, tmp_path: Path) -> None:
    _, catalog_path, taxonomy = catalog
    out = tmp_path / "s7"
    first = make_shards(out, catalog_path, taxonomy)
    again = make_shards(out, catalog_path, taxonomy)
    assert again["skipped_shards"] == len(first["shards"]) and again["shards"] == first["shards"]
    damaged = out / first["shards"][0]["name"]
    damaged.write_bytes(damaged.read_bytes()[:-700])
    repaired = make_shards(out, catalog_path, taxonomy)
    assert repaired["skipped_shards"] == len(first["shards"]) - 1
    assert repaired["shards"] == first["shards"], "same plan, same bytes"
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.is_file()], "no temp files left"


def test_same_seed_same_bytes_other_seed_other_selection(catalog, tmp_path: Path) -> None:
    _, catalog_path, taxonomy = catalog
    a = make_shards(tmp_path / "a", catalog_path, taxonomy)
    b = make_shards(tmp_path / "b", catalog_path, taxonomy)
    assert a["shards"] == b["shards"]
    other = make_shards(
        tmp_path / "c",
        catalog_path,
        taxonomy,
        config=BalanceConfig(
            granularity=7, per_class=6, finetune_fraction=1 / 3, reference_date=date(2018, 7, 1), seed=4
        ),
    )
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in a["shards"]]


def test_a_file_that_went_bad_is_quarantined_and_the_rest_written(catalog, tmp_path: Path) -> None:
    root, catalog_path, taxonomy = catalog
    out = tmp_path / "s7"
    manifest = make_shards(out, catalog_path, taxonomy)
    _, meta = read_samples(out / manifest["shards"][0]["name"])[0]
    victim = Path(catalog_by_pseudonym(catalog_path)[meta["sop_instance_uid"]]["path"])
    original = victim.read_bytes()
    try:
        victim.write_bytes(b"\0" * 132)  # replaced after the scan, e.g. a disk error
        redo = make_shards(tmp_path / "again", catalog_path, taxonomy)
    finally:
        victim.write_bytes(original)
    quarantine = (tmp_path / "again" / "quarantine.csv").read_text().splitlines()
    assert redo["quarantined"] == 1 and len(quarantine) == 2
    assert quarantine[0] == "sop_instance_uid,sha256,reason", "no path leaves the site"
    assert quarantine[1].startswith(f"{meta['sop_instance_uid']},{meta['sha256']},not_dicom")
    assert sum(redo["samples"].values()) == sum(manifest["samples"].values()) - 1


def test_another_salt_rebuilds_every_shard_with_other_pseudonyms(catalog, tmp_path: Path) -> None:
    _, catalog_path, taxonomy = catalog
    out = tmp_path / "s7"
    first = make_shards(out, catalog_path, taxonomy)
    other = make_shards(out, catalog_path, taxonomy, id_salt="another secret")
    assert other["skipped_shards"] == 0, "records made under another salt are not reused"
    uids = {m["sop_instance_uid"] for s in first["shards"] for _, m in read_samples(out / s["name"])}
    assert not uids & set(catalog_by_pseudonym(catalog_path, SALT)), "the old pseudonyms are gone"
    assert uids == set(catalog_by_pseudonym(catalog_path, "another secret")) & uids


def test_granularity_mismatch_and_cli(catalog, tmp_path: Path, capsys) -> None:
    _, catalog_path, taxonomy = catalog
    out = tmp_path / "s7"
    make_shards(out, catalog_path, taxonomy)
    with pytest.raises(ShardError, match="7-class shards"):
        make_shards(out, catalog_path, taxonomy, config=BalanceConfig(granularity=30, per_class=2))
    code_table = catalog[0] / "codes.csv"
    args = [
        str(catalog_path),
        "--out",
        str(tmp_path / "cli"),
        "--granularity",
        "7",
        "--per-class",
        "6",
        "--finetune-fraction",
        "0.34",
        "--reference-date",
        "2018-07-01",
        "--image-size",
        "32",
        "--code-table",
        str(code_table),
        "--scheduler",
        "sync",
    ]
    assert main(args) == 0
    assert "train=28" in capsys.readouterr().out


def test_a_shard_set_written_to_object_storage_is_verified_and_completed_on_rerun(
    catalog, s3_bucket, tmp_path: Path
) -> None:
    from ingest import storage
    from pedx_ray.data import read_manifest, verify_shards

    _, catalog_path, taxonomy = catalog
    remote = f"{s3_bucket}/{tmp_path.name}/s7"
    first = make_shards(remote, catalog_path, taxonomy)
    local = make_shards(tmp_path / "s7", catalog_path, taxonomy)
    assert first["shards"] == local["shards"], "the same bytes as on a disk"
    verify_shards(read_manifest(remote), remote, progress=False)
    damaged, deleted = first["shards"][0]["name"], first["shards"][1]["name"]
    storage.write_bytes(f"{remote}/{damaged}", b"damaged")
    storage.delete_file(f"{remote}/{deleted}")
    repaired = make_shards(remote, catalog_path, taxonomy)
    assert repaired["skipped_shards"] == len(first["shards"]) - 2 and repaired["shards"] == first["shards"]
    assert storage.read_bytes(f"{remote}/{damaged}") == (tmp_path / "s7" / damaged).read_bytes()
    assert not [name for name in storage.list_files(remote) if ".partial" in name], "no temporary keys left"


def test_short_classes_are_spread_over_the_whole_split_not_left_out_of_its_tail() -> None:
    # 30 / 10 / 5 rows, as a split of short classes kept under short_class_policy=keep: every stretch of
    # 15 rows (a shard, or what a shuffle buffer holds) carries each class in its share of the split.
    rows = pd.DataFrame({"label_7": ["Chest"] * 30 + ["Head"] * 10 + ["Spine"] * 5, "n": range(45)})
    spread = spread_classes(rows, "label_7")
    assert sorted(spread["n"]) == list(range(45))
    for start in range(0, 45, 15):
        counts = spread["label_7"].iloc[start : start + 15].value_counts()
        assert (counts["Chest"], counts["Head"]) in {(10, 3), (10, 4), (9, 4)} and counts["Spine"] in (1, 2)
    # within a class the order is kept (the balancer's seeded order)
    assert list(spread.loc[spread["label_7"] == "Head", "n"]) == list(range(30, 40))

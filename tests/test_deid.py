"""De-identified outputs: cleaned catalogs (v2), `python -m ingest export --deidentify`, burned-in text."""

from __future__ import annotations

import json
import shutil
import tarfile
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from factories import identifiable_radiograph, write

from ingest.dataset.balance import BalanceConfig
from ingest.dataset.catalog import (
    CATALOG_VERSION,
    METADATA_KEY,
    CatalogError,
    catalog_info,
    read_catalog,
    scan,
)
from ingest.dataset.deid import pseudonymise_rows
from ingest.dataset.shards import write_shards
from ingest.export import ExportConfig, export, main
from ingest.imaging.preprocess import PreprocessParams, preprocess_dataset, resize_pad, stored_values
from ingest.imaging.textmask import mask_text
from ingest.phantoms import generate

SALT = "deid-test-salt"
PATIENTS = {"P100": "Oakley^Marta", "P200": "Quade^Benno"}
# Two studies per patient, 400 days apart; the second patient's first study has burned-in text.
STUDIES = [
    ("P100", "s1", date(2016, 2, 10), False),
    ("P100", "s2", date(2017, 3, 16), False),
    ("P200", "s3", date(2018, 8, 1), True),
    ("P200", "s4", date(2019, 9, 5), False),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, Path]:
    """A spool of identifiable radiographs and its catalog."""
    root = tmp_path_factory.mktemp("deid")
    for patient, key, when, burned in STUDIES:
        ds = identifiable_radiograph(
            patient_id=patient,
            patient_name=PATIENTS[patient],
            study_key=key,
            study_date=when,
            burned_in_text=burned,
        )
        write(ds, root / "spool" / patient)
    scan(root / "spool", root / "catalog", id_salt=SALT, scheduler="sync", progress=False)
    return root / "spool", root / "catalog"


def catalog_rows(catalog: Path) -> list[dict]:
    return [
        {k: (None if v is pd.NA else v) for k, v in r.items()}
        for r in read_catalog(catalog).to_dict("records")
    ]


def identifiers(spool: Path) -> set[str]:
    """Every value an exported file must not contain, as text."""
    found = set()
    for path in spool.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        found |= {
            ds.PatientID,
            ds.AccessionNumber,
            ds.SOPInstanceUID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
        }
        found |= {ds.StudyDate, ds.PatientBirthDate, "EXAMPLE CHILDREN"}
        found |= set(str(ds.PatientName).split("^"))
    return found


def test_the_catalog_keeps_no_name_in_descriptions_and_says_its_version(site) -> None:
    spool, catalog = site
    df = read_catalog(catalog)
    assert catalog_info(catalog) == {"version": CATALOG_VERSION, "deidentified": False, "paths": "absolute"}
    assert set(df["study_description"]) == {"XR CHEST PA"}, "the family name is cleaned out"
    assert (df["label_68"] == "Chest_Frontal").all() and (df["status"] == "ok").all()
    assert not set(df["patient_id_hash"]) & set(PATIENTS)


def test_an_older_catalog_is_read_and_rescanned_and_a_newer_one_refused(site, tmp_path: Path) -> None:
    spool, catalog = site
    table = pq.read_table(catalog)
    old = tmp_path / "v1"
    old.mkdir()
    pq.write_table(table.replace_schema_metadata(None), old / "part-00000.parquet")
    assert catalog_info(old)["version"] == 1 and len(read_catalog(old)) == len(STUDIES)
    totals = scan(spool, old, id_salt=SALT, scheduler="sync", progress=False)
    assert totals["reused"] == 0, "version 1 rows are read again (their descriptions were not cleaned)"
    assert catalog_info(old)["version"] == CATALOG_VERSION
    newer = tmp_path / "v99"
    newer.mkdir()
    metadata = {METADATA_KEY: json.dumps({"version": 99}).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), newer / "part-00000.parquet")
    with pytest.raises(CatalogError, match="newer than this code reads"):
        read_catalog(newer)


def test_export_writes_deidentified_dicom_that_matches_shards_and_its_catalog(
    site, tmp_path: Path, capsys
) -> None:
    spool, catalog = site
    out = tmp_path / "share"
    args = [str(catalog), "--out", str(out), "--id-salt", SALT, "--scheduler", "sync"]
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2 and "add --deidentify" in capsys.readouterr().err
    assert main([*args, "--deidentify"]) == 0
    printed = capsys.readouterr().out
    assert "3 images (3 written" in printed and "1 left out for burned-in text" in printed

    secrets = identifiers(spool)
    files = sorted((out / "dicom").rglob("*.dcm"))
    assert len(files) == 3
    for path in files:
        data = path.read_bytes()
        leaked = [s for s in secrets if s.encode() in data or s.upper().encode() in data]
        assert not leaked, f"{path.name} still holds {leaked}"
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113105", "113107", "113108"}
        assert not any(element.tag.is_private for element in ds) and "ImageComments" not in ds
        assert ds.PatientSex == "F" and ds.PatientAge == "007Y", "patient characteristics retained"
        assert ds.StudyDescription == "XR CHEST PA"

    shared = read_catalog(out / "catalog")
    assert (
        catalog_info(out / "catalog")["deidentified"] and catalog_info(out / "catalog")["paths"] == "relative"
    )
    assert sorted(map(Path, shared["path"])) == files
    expected = {r["sop_instance_uid"]: r for r in pseudonymise_rows(catalog_rows(catalog), SALT)}
    originals = {
        p["sop_instance_uid"]: r for r, p in zip(catalog_rows(catalog), expected.values(), strict=True)
    }
    for row in shared.to_dict("records"):
        ds = pydicom.dcmread(row["path"])
        assert ds.SOPInstanceUID == row["sop_instance_uid"] and ds.PatientID == row["patient_id_hash"]
        assert row["study_instance_uid"] == expected[row["sop_instance_uid"]]["study_instance_uid"]
        assert row["study_date"] == expected[row["sop_instance_uid"]]["study_date"]
        assert row["study_date"].strftime("%Y%m%d") == ds.StudyDate
    # Dates move per patient and keep the interval between the patient's studies.
    first, second = (originals[u] for u in sorted(originals, key=lambda u: originals[u]["study_date"])[:2])
    shifted = {r["sop_instance_uid"]: r["study_date"] for r in shared.to_dict("records")}
    pseudo = {r["study_instance_uid"]: u for u, r in zip(expected, catalog_rows(catalog), strict=True)}
    a, b = shifted[pseudo[first["study_instance_uid"]]], shifted[pseudo[second["study_instance_uid"]]]
    assert (b - a) == (second["study_date"] - first["study_date"]) and a != first["study_date"]

    # Shards made from the site's catalog and from the shared one name the same samples the same way.
    # The site's catalog still holds the burned-in image: shards leave it out by default, as the export did.
    config = BalanceConfig(granularity=7, per_class=9, finetune_fraction=0.0, reference_date=date(2030, 1, 1))
    options = dict(balance_config=config, params=PreprocessParams(size=32), scheduler="sync", progress=False)
    from_site = write_shards(catalog, tmp_path / "s-site", id_salt=SALT, **options)
    from_share = write_shards(out / "catalog", tmp_path / "s-share", id_salt="not used", **options)
    assert from_site["samples"] == from_share["samples"] == {"train": 3, "finetune": 0, "val": 0}
    assert from_site["deidentification"]["burned_in_left_out"] == 1

    def uids(directory: Path) -> set[str]:
        found = set()
        for shard in directory.glob("*.tar"):
            with tarfile.open(shard) as tar:
                found |= {
                    json.load(tar.extractfile(m))["sop_instance_uid"] for m in tar if m.name.endswith(".json")
                }
        return found

    assert uids(tmp_path / "s-site") == uids(tmp_path / "s-share") == set(shared["sop_instance_uid"])


def test_burned_in_images_are_left_out_masked_or_kept_and_reruns_follow_the_setting(
    site, tmp_path: Path
) -> None:
    spool, catalog = site
    out = tmp_path / "share"
    burned_source = next(p for p in spool.rglob("*.dcm") if pydicom.dcmread(p).BurnedInAnnotation == "YES")

    def run(mode: str) -> dict:
        return export(ExportConfig(catalog, out, SALT, burned_in=mode), scheduler="sync", progress=False)

    excluded = run("exclude")
    assert excluded["counts"]["exported"] == 3 and excluded["left_out"][0]["reason"].startswith("burned_in")
    assert run("exclude")["counts"]["skipped"] == 3, "the same settings: nothing rewritten"

    masked = run("mask")
    assert masked["counts"]["written"] == 4 and masked["counts"]["masked_boxes"] >= 1
    shared = read_catalog(out / "catalog")
    sha = {r["sop_instance_uid"]: r for r in catalog_rows(catalog)}
    pseudo = pseudonymise_rows([r for r in sha.values() if r["path"] == str(burned_source)], SALT)[0]
    path = Path(shared.set_index("sop_instance_uid").loc[pseudo["sop_instance_uid"], "path"])
    ds = pydicom.dcmread(path)
    assert ds.BurnedInAnnotation == "NO" and ds.PatientIdentityRemoved == "YES"
    assert "113101" in {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    before, after = stored_values(pydicom.dcmread(burned_source)), stored_values(ds)
    patient, key, when, _ = next(s for s in STUDIES if s[3])
    plain = identifiable_radiograph(
        patient_id=patient, patient_name=PATIENTS[patient], study_key=key, study_date=when
    )
    text = before != stored_values(plain)
    black = after[text][0]
    assert (after[text] == black).mean() >= 0.99 and black <= np.percentile(before, 1), "text blacked out"
    changed = before != after
    assert changed.mean() <= 0.05 and not changed[100:, :].any(), "pixels away from the text are kept"

    kept = run("keep")
    assert kept["counts"]["written"] == 4
    ds = pydicom.dcmread(path)
    assert ds.BurnedInAnnotation == "YES" and ds.PatientIdentityRemoved == "NO"
    assert np.array_equal(stored_values(ds), before)

    run("exclude")
    assert not path.exists(), "a file no longer part of the export is removed"
    assert len(list((out / "dicom").rglob("*.dcm"))) == 3


def test_an_export_is_not_exported_again(site, tmp_path: Path) -> None:
    _, catalog = site
    export(ExportConfig(catalog, tmp_path / "share", SALT), scheduler="sync", progress=False)
    with pytest.raises(Exception, match="already a de-identified export"):
        export(
            ExportConfig(tmp_path / "share" / "catalog", tmp_path / "again", SALT),
            scheduler="sync",
            progress=False,
        )


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """The same phantom studies drawn plain and with burned-in text."""
    root = tmp_path_factory.mktemp("text-phantoms")
    truth = generate(root / "plain", studies=4, seed=11, workers=1)
    generate(root / "text", studies=4, seed=11, workers=1, burned_in_text=True)
    return root / "plain", root / "text", truth


def test_phantoms_with_burned_in_text_differ_from_plain_ones_only_in_the_text_box(phantoms) -> None:
    plain, text, truth = phantoms
    with_text = pd.read_csv(text / "ground_truth.csv")
    assert (truth["text_box"] == "").all() and (with_text["text_box"] != "").all()
    for rel, box in zip(with_text["path"], with_text["text_box"], strict=True):
        a, b = pydicom.dcmread(plain / rel), pydicom.dcmread(text / rel)
        assert a.BurnedInAnnotation == "NO" and b.BurnedInAnnotation == "YES"
        x0, y0, x1, y1 = map(int, box.split())
        differ = stored_values(a) != stored_values(b)
        assert differ.any() and not differ[:y0].any() and not differ[y1:].any()
        assert not differ[:, :x0].any() and not differ[:, x1:].any()


def test_the_text_detector_masks_phantom_text_and_little_else(phantoms) -> None:
    plain, text, truth = phantoms
    params = PreprocessParams(size=512)
    text_pixels = masked_text = anatomy = lost = 0
    for rel in truth["path"]:
        a, b = pydicom.dcmread(plain / rel), pydicom.dcmread(text / rel)
        drawn = resize_pad((stored_values(a) != stored_values(b)).astype(np.float32), 512) > 0.25
        masked, regions = mask_text(preprocess_dataset(b, params))
        clean = preprocess_dataset(a, params)
        assert regions >= 1
        text_pixels += drawn.sum()
        masked_text += (drawn & (masked == 0)).sum()
        plain_masked, _ = mask_text(clean)
        anatomy += (clean > 20).sum()
        lost += ((plain_masked == 0) & (clean > 20)).sum()
    assert masked_text / text_pixels >= 0.9
    assert lost / anatomy <= 0.01, "on images without text, almost nothing is masked"


def test_shards_leave_out_mask_or_keep_burned_in_images(phantoms, tmp_path: Path) -> None:
    _, text, truth = phantoms
    scan(text, tmp_path / "catalog", id_salt=SALT, scheduler="sync", progress=False)
    config = BalanceConfig(
        granularity=7, per_class=50, finetune_fraction=0.0, reference_date=date(2035, 1, 1)
    )
    options = dict(balance_config=config, params=PreprocessParams(size=256), scheduler="sync", progress=False)
    with pytest.raises(ValueError, match="no usable rows"):  # every phantom here says BurnedInAnnotation=YES
        write_shards(tmp_path / "catalog", tmp_path / "none", id_salt=SALT, **options)
    plain = write_shards(tmp_path / "catalog", tmp_path / "plain", id_salt=SALT, burned_in="keep", **options)
    masked = write_shards(
        tmp_path / "catalog", tmp_path / "masked", id_salt=SALT, burned_in="mask", **options
    )
    found = masked["deidentification"]
    assert found["burned_in"] == "mask" and found["text_regions_masked"] >= len(truth)
    assert plain["samples"] == masked["samples"] and sum(plain["samples"].values()) == len(truth)
    assert plain["deidentification"]["text_regions_masked"] == 0

    def images(directory: Path) -> dict[str, np.ndarray]:
        found = {}
        for shard in sorted(directory.glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.name.endswith(".png"):
                        data = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                        found[member.name] = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        return found

    before, after = images(tmp_path / "plain"), images(tmp_path / "masked")
    assert before.keys() == after.keys()
    blacked = [((after[k] == 0) & (before[k] > 0)).mean() for k in before]
    assert all(0 < share < 0.2 for share in blacked), blacked


def test_a_file_gone_since_the_scan_is_listed_without_its_path(site, tmp_path: Path) -> None:
    spool, _ = site
    copy = tmp_path / "spool"
    shutil.copytree(spool, copy)
    scan(copy, tmp_path / "catalog", id_salt=SALT, scheduler="sync", progress=False)
    gone = next(copy.rglob("*.dcm"))
    gone.unlink()
    manifest = export(
        ExportConfig(tmp_path / "catalog", tmp_path / "share", SALT), scheduler="sync", progress=False
    )
    failed = [x for x in manifest["left_out"] if x["action"] == "failed"]
    assert manifest["counts"]["failed"] == 1 and len(failed) == 1
    assert failed[0]["reason"] == "FileNotFoundError: No such file or directory"
    text = (tmp_path / "share" / "export.json").read_text()
    assert gone.stem not in text and str(copy) not in text, "no source path or UID in what is shared"

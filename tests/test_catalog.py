"""`python -m ingest scan`: one catalog row per file, bad files kept with a reason, ids hashed."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from factories import radiograph, write
from pydicom.data import get_testdata_file

from ingest.dataset.catalog import CATALOG_COLUMNS, CatalogError, main, parse_age_months, read_catalog, scan

SALT = "test-salt"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    for i, (part, view, desc) in enumerate(
        [("CHEST", "PA", "XR CHEST PA"), ("HAND", "PA", "XR HAND PA LT"), ("SKULL", "LL", "XR SKULL LATERAL")]
    ):
        write(
            radiograph(
                patient_id=f"MRN-00{i}",
                study_key=f"s{i}",
                body_part=part,
                view_position=view,
                study_description=desc,
            ),
            root / "good",
        )
    bad = root / "bad"
    bad.mkdir()
    shutil.copy(get_testdata_file("rtplan.dcm"), bad / "rtplan.dcm")  # no pixel data
    shutil.copy(get_testdata_file("SC_rgb_small_odd.dcm"), bad / "SC_rgb.dcm")  # colour, not a radiograph
    # Files some PACS exports write: no 128-byte preamble; no preamble and no file meta either.
    bare = write(
        radiograph(
            patient_id="MRN-010",
            study_key="bare",
            body_part="FOOT",
            view_position="AP",
            study_description="XR FOOT AP",
        ),
        tmp_path / "bare",
    )
    (root / "good" / "no_preamble.dcm").write_bytes(bare.read_bytes()[132:])
    no_meta = radiograph(
        patient_id="MRN-011",
        study_key="nometa",
        body_part="ELBOW",
        view_position="LAT",
        study_description="XR ELBOW LATERAL",
    )
    del no_meta.file_meta
    no_meta.save_as(root / "good" / "no_meta.dcm", implicit_vr=False, little_endian=True)
    (bad / "notes.txt").write_text("not a DICOM file\n")
    whole = write(radiograph(patient_id="MRN-009", study_key="cut"), tmp_path / "whole")
    (bad / "truncated.dcm").write_bytes(whole.read_bytes()[:-1000])
    return root


def by_name(catalog: pd.DataFrame) -> dict[str, dict]:
    return {Path(p).name: row for p, row in zip(catalog["path"], catalog.to_dict("records"), strict=True)}


def test_scan_keeps_every_file_with_a_status_and_reason(spool: Path, tmp_path: Path) -> None:
    out = tmp_path / "catalog"
    totals = scan(spool, out, id_salt=SALT, scheduler="sync", progress=False)
    catalog = read_catalog(out)
    assert list(catalog.columns) == list(CATALOG_COLUMNS)
    assert len(catalog) == 9 == totals["files"]
    rows = by_name(catalog)
    assert rows["rtplan.dcm"]["status"] == "unreadable"
    assert rows["rtplan.dcm"]["reason"].startswith("no_pixel_data")
    assert rows["SC_rgb.dcm"]["reason"].startswith("unsupported_photometric: RGB")
    assert rows["notes.txt"]["reason"].startswith("not_dicom")
    assert rows["truncated.dcm"]["reason"].startswith("truncated")
    good = catalog[catalog["path"].str.contains("/good/")]
    assert set(good["status"]) == {"ok"}
    assert set(good["label_7"]) == {"Chest", "Upper_Extremity", "Head", "Lower_Extremity"}
    assert rows["no_preamble.dcm"]["label_30"] == "Foot" and rows["no_meta.dcm"]["label_30"] == "Elbow"
    assert good["label_source"].eq("rule").all()
    assert good["study_date"].eq(date(2017, 3, 14)).all()
    assert good["patient_age_months"].eq(84).all()
    assert good["rows"].eq(48).all() and good["bits_stored"].eq(12).all()


def test_patient_ids_are_hashed_never_stored(spool: Path, tmp_path: Path) -> None:
    scan(spool, tmp_path / "a", id_salt=SALT, scheduler="sync", progress=False)
    scan(spool, tmp_path / "b", id_salt="another-site", scheduler="sync", progress=False)
    for part in (tmp_path / "a").glob("*.parquet"):
        assert b"MRN-00" not in part.read_bytes()
    a = read_catalog(tmp_path / "a").set_index("path")["patient_id_hash"].dropna()
    b = read_catalog(tmp_path / "b").set_index("path")["patient_id_hash"].dropna()
    assert a.str.len().eq(20).all() and a.nunique() == len(a)
    assert (a != b.loc[a.index]).all(), "the salt must change every hash"
    again = tmp_path / "again"
    scan(spool, again, id_salt=SALT, scheduler="sync", progress=False)
    assert (read_catalog(again).set_index("path")["patient_id_hash"].dropna() == a).all()


def test_rescan_reuses_unchanged_rows_and_sees_new_and_duplicate_files(spool: Path, tmp_path: Path) -> None:
    out = tmp_path / "catalog"
    scan(spool, out, id_salt=SALT, scheduler="sync", progress=False)
    first = read_catalog(out)
    added = write(
        radiograph(
            patient_id="MRN-100",
            study_key="new",
            body_part="KNEE",
            view_position="AP",
            study_description="XR KNEE AP RT",
        ),
        spool / "later",
    )
    copy = spool / "copies" / "same.dcm"
    copy.parent.mkdir()
    shutil.copy(next((spool / "good").iterdir()), copy)
    totals = scan(spool, out, id_salt=SALT, scheduler="sync", progress=False)
    assert totals["reused"] == len(first)
    catalog = read_catalog(out)
    assert len(catalog) == len(first) + 2
    rows = by_name(catalog)
    assert rows[added.name]["label_30"] == "Knee"
    # The same SOP instance twice is catalogued once as usable; the other copy is excluded, not lost.
    dup = catalog[catalog["sop_instance_uid"] == rows["same.dcm"]["sop_instance_uid"]]
    assert sorted(dup["status"]) == ["excluded", "ok"]
    assert "duplicate of" in dup.loc[dup["status"] == "excluded", "reason"].iloc[0]
    assert not list(tmp_path.glob(".catalog.*")), "temporary catalog directories must be cleaned up"


@pytest.mark.slow
def test_scan_on_a_dask_local_cluster_matches_the_in_process_scan(spool: Path, tmp_path: Path) -> None:
    scan(spool, tmp_path / "sync", id_salt=SALT, scheduler="sync", progress=False)
    scan(spool, tmp_path / "dask", id_salt=SALT, batch_size=2, progress=False)
    columns = [c for c in CATALOG_COLUMNS if c != "file_mtime_ns"]
    a = read_catalog(tmp_path / "sync").sort_values("path")[columns].reset_index(drop=True)
    b = read_catalog(tmp_path / "dask").sort_values("path")[columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_cli_reports_counts_and_rejects_a_missing_directory(spool: Path, tmp_path: Path, capsys) -> None:
    assert main([str(spool), "--out", str(tmp_path / "cat"), "--scheduler", "sync", "--id-salt", SALT]) == 0
    assert "ok=5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "cat2"), "--scheduler", "sync"])
    assert exc.value.code == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(CatalogError, match="python -m ingest scan"):
        read_catalog(tmp_path / "missing-catalog")


@pytest.mark.parametrize(
    ("age", "birth", "study", "months"),
    [
        ("007Y", None, None, 84.0),
        ("011M", None, None, 11.0),
        ("020D", None, None, 0.66),
        ("003W", None, None, 0.69),
        (None, "20100314", date(2017, 3, 14), 84.0),
        ("garbage", "20100314", date(2017, 3, 14), 84.0),
        (None, "20200101", date(2019, 1, 1), None),
    ],
)
def test_patient_age_from_age_or_birth_date(age, birth, study, months) -> None:
    result = parse_age_months(age, birth, study)
    assert result == (None if months is None else pytest.approx(months, abs=0.02))

"""Phantom PACS generator: valid DICOM, decodable pixels, determinism, ground truth, anatomy signals."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from ingest import phantoms
from ingest.dataset.taxonomy import load_taxonomy
from ingest.phantoms import build as build_module
from ingest.phantoms.__main__ import main
from ingest.phantoms.canvas import FRACTURE_KINDS, Scene
from ingest.phantoms.dicom import (
    Encoding,
    Identity,
    age_string,
    build_dataset,
    encode,
    save_dataset_atomic,
    stored_pixels,
)
from ingest.phantoms.headers import Header
from ingest.phantoms.maturity import maturity
from ingest.phantoms.plan import QUIRKS, plan_studies

CR, DX = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"
ALL_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("pacs")
    return out, phantoms.generate(out, studies=10, seed=5, workers=1)


def file_hashes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def test_ground_truth_csv_has_the_promised_columns_and_labels(pacs):
    out, table = pacs
    on_disk = pd.read_csv(out / phantoms.GROUND_TRUTH)
    required = {
        "path",
        "sop_instance_uid",
        "study_instance_uid",
        "series_instance_uid",
        "patient_id",
        "label_68",
        "label_30",
        "label_7",
        "sex",
        "age_months",
        "bone_age_months",
        "fracture",
        "transfer_syntax",
        "photometric",
        "header_quirk",
    }
    assert required <= set(on_disk.columns)
    assert len(on_disk) == len(table) == len(list(out.rglob("*.dcm")))
    assert on_disk["sop_instance_uid"].is_unique
    taxonomy = load_taxonomy()
    for row in on_disk.itertuples():
        assert (out / row.path).is_file()
        assert taxonomy.parents(row.label_68) == (row.label_30, row.label_7)
        assert pd.isna(row.fracture) == (row.label_68 not in phantoms.FRACTURE_VIEWS)
        assert pd.isna(row.bone_age_months) == (row.label_68 != "Hand_PA")
    assert on_disk["study_instance_uid"].nunique() == 10


def test_every_file_is_valid_dicom_with_the_headers_a_modality_writes(pacs):
    out, table = pacs
    for row in table.itertuples():
        ds = dcmread(out / row.path)
        assert ds.SOPClassUID in (CR, DX)
        assert ds.Modality == {CR: "CR", DX: "DX"}[ds.SOPClassUID]
        assert ds.SOPInstanceUID == row.sop_instance_uid == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == row.transfer_syntax
        assert ds.PhotometricInterpretation == row.photometric
        assert 10 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
        assert ds.PatientSex == row.sex and ds.PatientID == row.patient_id
        assert re.fullmatch(r"\d{3}[DMY]", ds.PatientAge)
        birth = dt.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        study = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        assert ds.PatientAge == age_string(birth, study)
        assert 0 <= (study - birth).days <= 19 * 365 and dt.date(2014, 1, 1) <= study <= dt.date(2022, 12, 31)
        assert ds.StudyDescription and ds.SeriesDescription and ds.ProtocolName
        assert ds.ProcedureCodeSequence[0].CodingSchemeDesignator == "99PEDX"
        assert len(ds.PixelSpacing) == 2 and float(ds.PixelSpacing[0]) > 0
        assert ("BodyPartExamined" in ds) == (row.header_quirk != "no_body_part")
        assert ds.Rows == row.rows and ds.Columns == row.columns and max(ds.Rows, ds.Columns) >= 600
        assert ds.pixel_array.shape == (row.rows, row.columns)


def test_headers_follow_the_taxonomy_except_for_recorded_quirks(pacs):
    out, table = pacs
    taxonomy = load_taxonomy()
    for row in table[table["header_quirk"] == ""].itertuples():
        ds = dcmread(out / row.path, stop_before_pixels=True)
        view = taxonomy.view(row.label_68)
        assert ds.BodyPartExamined == view.body_part
        assert ds.ViewPosition == view.view_position


@pytest.mark.parametrize("transfer_syntax", ALL_SYNTAXES, ids=lambda u: u.name)
@pytest.mark.parametrize(
    ("photometric", "bits"), [("MONOCHROME1", 10), ("MONOCHROME2", 16), ("MONOCHROME2", 13)]
)
def test_pixels_decode_losslessly_for_every_transfer_syntax(tmp_path, transfer_syntax, photometric, bits):
    image = phantoms.render_view(
        "Wrist_AP", np.random.default_rng(1), age_months=90, sex="F", long_side_px=600
    ).image
    enc = Encoding("DX", photometric, bits, str(transfer_syntax), (0.5, -100.0))
    pixels = stored_pixels(image, enc)
    assert pixels.max() < 1 << bits
    header = Header(
        "WRIST", "PA", "XR WRIST 2 VW LT", "WRIST PA LT", "WRIST PA LT", "RAD1", "XR WRIST", "PX1"
    )
    who = Identity(
        "P1",
        "DOE^JO",
        "F",
        dt.date(2012, 3, 4),
        dt.date(2020, 5, 6),
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
        "A0000001",
        1,
        "101500",
    )
    ds = build_dataset(
        pixels, enc, who, header, laterality="L", manufacturer="X", institution="Y", pixel_spacing_mm=0.15
    )
    encode(ds, pixels, str(transfer_syntax))
    save_dataset_atomic(ds, tmp_path / "x.dcm")
    back = dcmread(tmp_path / "x.dcm")
    assert back.file_meta.TransferSyntaxUID == transfer_syntax
    assert np.array_equal(back.pixel_array, pixels)
    if photometric == "MONOCHROME1":  # bone stored dark: the brightest rendered pixel has the lowest value
        assert back.pixel_array.flat[int(np.argmax(image))] == pixels.min()
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]  # no temporary file left behind


def test_generated_pixels_match_the_ground_truth_encoding(pacs):
    out, table = pacs
    for row in table.itertuples():
        ds = dcmread(out / row.path)
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and pixels.max() < 1 << row.bits_stored
        assert pixels.std() > 0.02 * (1 << row.bits_stored)  # an image, not a blank


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes(pacs, tmp_path):
    out, table = pacs
    again = phantoms.generate(tmp_path / "again", studies=10, seed=5, workers=2)
    assert file_hashes(out) == file_hashes(tmp_path / "again")
    assert (out / "ground_truth.csv").read_bytes() == (tmp_path / "again" / "ground_truth.csv").read_bytes()
    pd.testing.assert_frame_equal(again, table)
    other = phantoms.generate(tmp_path / "other", studies=3, seed=6, workers=1)
    assert not set(other["sha256"]) & set(table["sha256"])
    assert not set(other["sop_instance_uid"]) & set(table["sop_instance_uid"])


def test_rerun_skips_verified_files_and_remakes_damaged_ones(tmp_path, monkeypatch):
    first = phantoms.generate(tmp_path, studies=4, seed=2, workers=1)
    before = file_hashes(tmp_path)
    made = []
    real = build_module.study_rows
    monkeypatch.setattr(
        build_module, "study_rows", lambda plan, *a: made.append(plan.index) or real(plan, *a)
    )
    pd.testing.assert_frame_equal(phantoms.generate(tmp_path, studies=4, seed=2, workers=1), first)
    assert made == []
    victim = tmp_path / first["path"].iloc[-1]
    victim.write_bytes(b"truncated")
    phantoms.generate(tmp_path, studies=4, seed=2, workers=1)
    assert made == [int(victim.parts[-3][2:])]
    assert file_hashes(tmp_path) == before


@pytest.mark.slow
def test_all_68_views_render_distinct_images():
    labels = [v.label_68 for v in load_taxonomy().views]
    assert sorted(phantoms.REGISTRY) == sorted(labels)
    means = {}
    for label in labels:
        r = phantoms.render_view(label, np.random.default_rng(0), age_months=100, sex="M", long_side_px=320)
        assert r.image.dtype == np.float32 and 0.0 <= r.image.min() and r.image.max() <= 1.0
        assert r.image.std() > 0.05, label
        assert 0.05 < r.pixel_spacing_mm < 5.0
        means[label] = np.round(cv_small(r.image), 2).tobytes()
    assert len(set(means.values())) == len(labels)


def cv_small(image: np.ndarray) -> np.ndarray:
    h, w = image.shape
    return image[:: max(h // 8, 1), :: max(w // 8, 1)][:8, :8]


def ossified_fraction(bone_age_months: float, sex: str) -> float:
    """Share of the hand PA field that is bone: grows as centres appear and epiphyses cap the metaphyses."""
    spec = phantoms.REGISTRY["Hand_PA"]
    m = maturity(bone_age_months, sex)
    scene = Scene(np.random.default_rng(0), spec.field_for(m), m, long_side_px=500, rotate_deg=0.0)
    spec.draw(scene)
    return float((scene.bone > 0.2).mean())


def test_hand_maturity_increases_with_bone_age_and_earlier_in_girls():
    fractions = [ossified_fraction(months, "M") for months in (6, 24, 60, 108, 156)]
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0] * 1.1
    assert ossified_fraction(84, "F") > ossified_fraction(84, "M")
    radius = [maturity(months, "M").epiphysis("radius_distal") for months in (6, 36, 120, 180, 227)]
    assert not radius[0].present and radius[1].present
    physes = [e.physis for e in radius]
    assert physes == sorted(physes, reverse=True) and radius[-1].fused


def test_hand_pa_pixels_change_with_bone_age():
    a, b = (
        phantoms.render_view(
            "Hand_PA", np.random.default_rng(3), age_months=m, sex="F", long_side_px=400
        ).image
        for m in (24, 150)
    )
    assert np.abs(a - b).mean() > 0.02


def test_fracture_only_on_fracture_views():
    assert set(phantoms.FRACTURE_VIEWS) == {
        "Wrist_AP",
        "Wrist_Oblique",
        "Forearm_Oblique",
        "Ankle_AP",
        "Ankle_Lateral",
        "Ankle_Mortise",
        "Elbow_Lateral",
    }
    with pytest.raises(ValueError, match="cannot carry a fracture"):
        phantoms.render_view("Chest_Frontal", np.random.default_rng(0), age_months=50, sex="M", fracture=True)
    for label in phantoms.FRACTURE_VIEWS:
        plain = phantoms.render_view(
            label, np.random.default_rng(4), age_months=120, sex="M", long_side_px=400
        )
        broken = phantoms.render_view(
            label, np.random.default_rng(4), age_months=120, sex="M", long_side_px=400, fracture=True
        )
        assert broken.fracture and not plain.fracture
        assert not np.array_equal(plain.image, broken.image)


def test_fracture_task_set_is_balanced_and_labelled(tmp_path):
    table = phantoms.generate_task_set(tmp_path, "fracture", 6, seed=3, workers=1)
    assert set(table["label_68"]) <= set(phantoms.FRACTURE_VIEWS)
    assert table["fracture"].notna().all() and set(table["fracture"]) == {0, 1}
    on_disk = pd.read_csv(tmp_path / phantoms.GROUND_TRUTH, keep_default_na=False)
    broken, whole = on_disk[on_disk["fracture"] == 1], on_disk[on_disk["fracture"] == 0]
    # how visible each fracture is goes with the label, so results can be split by subtlety
    assert set(broken["fracture_kind"]) <= set(FRACTURE_KINDS) and "" not in set(broken["fracture_kind"])
    assert pd.to_numeric(broken["fracture_severity"]).between(0, 1).all()
    assert (whole["fracture_kind"] == "").all() and (whole["fracture_severity"] == "").all()


def test_rerun_fills_columns_an_older_ground_truth_lacks(tmp_path):
    first = phantoms.generate_task_set(tmp_path, "fracture", 3, seed=3, workers=1)
    truth = tmp_path / phantoms.GROUND_TRUTH
    pd.read_csv(truth).drop(columns=["fracture_kind", "fracture_severity"]).to_csv(truth, index=False)
    again = phantoms.generate_task_set(tmp_path, "fracture", 3, seed=3, workers=1)
    pd.testing.assert_frame_equal(again, first)


def test_bone_age_task_set_spreads_hand_pa_over_childhood(tmp_path):
    table = phantoms.generate_task_set(tmp_path, "bone_age", 6, seed=3, workers=1)
    assert set(table["label_68"]) == {"Hand_PA"} and len(table) == 6
    assert table["bone_age_months"].notna().all()
    assert table["bone_age_months"].min() < 40 and table["bone_age_months"].max() > 160
    with pytest.raises(ValueError, match="bone_age"):
        phantoms.generate_task_set(tmp_path, "views", 3)


def test_plan_mix_covers_every_view_with_realistic_skew():
    plans = plan_studies("views", 400, seed=0)
    rows = [(p, i) for p in plans for i in p.instances]
    taxonomy = load_taxonomy()
    labels = pd.Series([i.label_68 for _, i in rows])
    assert set(labels) == {v.label_68 for v in taxonomy.views}
    assert labels.value_counts().idxmax() == "Chest_Frontal"
    assert all(1 <= len(p.instances) <= 3 for p in plans)
    assert all(len({taxonomy.view(i.label_68).label_30 for i in p.instances}) == 1 for p in plans)
    top = pd.Series(
        [taxonomy.view(i.label_68).label_7 for p in plan_studies("views", 300, 0) for i in p.instances]
    )
    assert top.nunique() == 7 and top.value_counts().min() >= 15
    dates = [p.study_date for p in plans]
    cut = dt.date(2020, 7, 1)
    assert sum(d < cut for d in dates) > 50 and sum(d >= cut for d in dates) > 50
    assert max(pd.Series([p.patient.patient_id for p in plans]).value_counts()) >= 2  # follow-up studies
    assert all(0 <= p.age_days <= 19 * 365 for p in plans)
    quirks = pd.Series([i.quirk for _, i in rows])
    assert 0.05 < (quirks != "").mean() < 0.16 and set(quirks) - {""} == set(QUIRKS)
    assert {i.transfer_syntax for _, i in rows} == {str(u) for u in ALL_SYNTAXES}


def test_age_string_uses_days_months_years():
    born = dt.date(2010, 5, 20)
    assert age_string(born, dt.date(2010, 6, 9)) == "020D"
    assert age_string(born, dt.date(2011, 4, 25)) == "011M"
    assert age_string(born, dt.date(2017, 6, 1)) == "007Y"


def test_bad_input_is_rejected_with_a_fix():
    with pytest.raises(ValueError, match="bits_stored"):
        Encoding("DX", "MONOCHROME2", 8, str(ExplicitVRLittleEndian))
    with pytest.raises(ValueError, match="task"):
        plan_studies("ct", 3, 0)
    with pytest.raises(KeyError, match="no phantom drawing"):
        phantoms.render_view("Brain_MRI", np.random.default_rng(0), age_months=1, sex="M")


def test_cli_writes_a_directory(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "p"), "--studies", "2", "--seed", "1", "--workers", "1"]) == 0
    assert "instances" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "p" / phantoms.GROUND_TRUTH)) >= 2
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.slow
def test_cli_contact_sheet_and_bone_age_strip(tmp_path):
    sheet, strip = tmp_path / "sheet.png", tmp_path / "strip.png"
    assert main(["--contact-sheet", str(sheet), "--bone-age-strip", str(strip)]) == 0
    import cv2

    assert cv2.imread(str(sheet), cv2.IMREAD_GRAYSCALE).shape[0] > 1000
    assert cv2.imread(str(strip), cv2.IMREAD_GRAYSCALE).shape[1] > 1000


def test_path_lengths_follow_the_closed_form_chords():
    m = maturity(120, "M")
    scene = Scene(np.random.default_rng(0), (20.0, 20.0), m, long_side_px=400, rotate_deg=0.0)
    scene.tissue_capsule((-5.0, 0.0), (5.0, 0.0), 3.0)  # a 6 cm limb: 6 cm of water through its axis
    scene.long_bone((-5.0, 0.0), (5.0, 0.0), (1.6, 1.6, 1.6), tag="x")  # a straight tube, 1.6 cm across
    cy, cx = (int(v) for v in scene.px((0.0, 0.0))[0][::-1])
    assert scene.soft[cy, cx] == pytest.approx(6.0, rel=0.03)
    column = scene.cortical[:, cx]
    edge, centre = column[cy - int(scene.length(0.45))], column[cy]
    assert edge > centre > 0  # the cortex is brightest where the beam runs tangent to it
    assert scene.trabecular[cy, cx] > 0 and scene.trabecular[cy - int(scene.length(0.7)), cx] == 0


def test_a_bigger_child_attenuates_more():
    def mean_chest(age):
        return phantoms.render_view(
            "Chest_Frontal", np.random.default_rng(1), age_months=age, sex="F", long_side_px=300
        )

    from ingest.phantoms.render import body_size

    assert body_size(6) < body_size(120) < body_size(220) <= 1.0
    assert mean_chest(6).pixel_spacing_mm < mean_chest(200).pixel_spacing_mm


def test_rendering_is_deterministic_per_seed_and_modality_changes_processing():
    def draw(seed, modality="DX"):
        return phantoms.render_view(
            "Knee_AP",
            np.random.default_rng(seed),
            age_months=90,
            sex="M",
            modality=modality,
            long_side_px=300,
        ).image

    assert np.array_equal(draw(4), draw(4))
    assert not np.array_equal(draw(4), draw(5))
    assert not np.array_equal(draw(4), draw(4, "CR"))
    with pytest.raises(ValueError, match="modality"):
        draw(4, "MR")


@pytest.mark.parametrize(
    ("label", "kinds"),
    [
        ("Wrist_AP", {"buckle", "greenstick", "salter_harris_2"}),
        ("Elbow_Lateral", {"supracondylar"}),
    ],
)
def test_fracture_kinds_and_subtlety(label, kinds):
    seen, changes = set(), []
    for seed in range(12):
        plain = phantoms.render_view(
            label, np.random.default_rng(seed), age_months=100, sex="F", long_side_px=300
        )
        broken = phantoms.render_view(
            label, np.random.default_rng(seed), age_months=100, sex="F", long_side_px=300, fracture=True
        )
        assert broken.fracture and broken.fracture_kind in kinds
        seen.add(broken.fracture_kind)
        changes.append(float(np.abs(plain.image - broken.image).mean()))
    assert seen == kinds
    assert max(changes) > 2 * min(changes)  # from faint to obvious


def test_cast_only_on_castable_views_and_it_covers_the_forearm():
    bare = phantoms.render_view("Wrist_AP", np.random.default_rng(2), age_months=100, sex="M")
    cast = phantoms.render_view("Wrist_AP", np.random.default_rng(2), age_months=100, sex="M", cast=True)
    assert cast.cast and not bare.cast
    assert not np.array_equal(bare.image, cast.image)
    assert not phantoms.render_view(
        "Hand_PA", np.random.default_rng(2), age_months=100, sex="M", cast=True
    ).cast


def test_bone_age_spread_follows_greulich_pyle_and_stays_with_the_child():
    from ingest.phantoms.maturity import bone_age_sd_months

    assert bone_age_sd_months(6, "M") < 2.0 < 8.0 < bone_age_sd_months(120, "M") < 12.0
    plans = plan_studies("views", 600, seed=1)
    older = [p for p in plans if 72 < p.age_months < 190]  # clear of the 0-227 month clip
    offsets = np.array([p.bone_age_months - p.age_months for p in older])
    assert 8.0 < offsets.std() < 13.0 and abs(offsets.mean()) < 3.0
    by_patient: dict[str, list[float]] = {}
    for p in older:
        sd = bone_age_sd_months(p.age_months, p.patient.sex)
        by_patient.setdefault(p.patient.patient_id, []).append((p.bone_age_months - p.age_months) / sd)
    repeats = [z for z in by_patient.values() if len(z) > 1]
    assert repeats and all(np.ptp(z) < 0.2 for z in repeats)  # the child's maturity is a trait


def test_plan_puts_casts_only_on_fractured_castable_studies():
    plans = plan_studies("fracture", 300, seed=2)
    casts = [p for p in plans if p.cast]
    assert casts and all(p.fracture for p in casts)
    assert all(any(phantoms.REGISTRY[i.label_68].castable for i in p.instances) for p in casts)

"""Header → view label: rules, code-table precedence, unmapped reasons, catalog labelling and the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.dataset.catalog import CATALOG_COLUMNS, CATALOG_SCHEMA, read_catalog
from ingest.dataset.labels import LABEL_FIELDS, label_catalog, label_header, main
from ingest.dataset.taxonomy import load_taxonomy

TAXONOMY = load_taxonomy()

# (body_part, view_position, study_description, series_description, protocol_name) → label_68
CASES = [
    # Head
    ("SKULL", "AP", "XR SKULL 2 VIEWS", "AP", None, "Skull_AP"),
    ("SKULL", "LL", "XR SKULL 2 VIEWS", "LATERAL", None, "Skull_Lateral"),
    ("SKULL", "AP", "SKULL SERIES", "Towne", None, "Skull_Towne"),
    (None, None, "skull tangential view", None, None, "Skull_Tangential"),
    ("JAW", "PA", "XR MANDIBLE 3 VIEWS", None, None, "Mandible"),
    ("ZYGOMA", "", "ZYGOMATIC ARCHES", None, None, "Zygomatic"),
    ("MASTOID", "LL", "MASTOIDS SCHULLER BIL", None, None, "Mastoid"),
    ("EAR", "AP", "COCHLEAR IMPLANT STENVERS", None, None, "Cochlea"),
    (None, "PA", "XR ORBITS FOREIGN BODY", None, None, "Orbit"),
    ("SINUS", "PA", "XR SINUSES WATERS", None, None, "Nose_PNS"),
    ("NOSE", "LL", "XR NASAL BONES", None, None, "Nose_Lateral"),
    (None, None, "nasal bone", None, None, "Nose_Lateral"),  # documented default for NASAL
    # Spine
    ("CSPINE", "AP", "XR C-SPINE 3 VIEWS", "AP", None, "C_Spine_AP"),
    ("CSPINE", "LL", "XR C SPINE", None, None, "C_Spine_Lateral"),
    (None, "AP", "CERVICAL SPINE", "ODONTOID", None, "C_Spine_Atlas"),
    (None, "AP", "c-spine open mouth", None, None, "C_Spine_Atlas"),  # study refines ViewPosition AP
    ("CSPINE", "LL", "XR CSPINE FLEX/EXT", "FLEXION", None, "C_Spine_Lateral"),
    ("TSPINE", "AP", "XR T-SPINE 2V", None, None, "T_Spine_AP"),
    (None, None, "THORACIC SPINE AP", None, None, "T_Spine_AP"),
    ("LSPINE", "AP", "XR L-SPINE 2-3 VIEWS", "AP", None, "L_Spine_AP"),
    ("LSPINE", None, "L/S SPINE", "LAT", None, "L_Spine_Lateral"),
    (None, "RLO", "LUMBAR SPINE OBLIQUES", None, None, "L_Spine_Oblique"),
    ("TLSPINE", "AP", "XR T-L SPINE", None, None, "T_L_Spine"),
    (None, "LL", "THORACOLUMBAR SPINE", None, None, "T_L_Spine"),
    ("SPINE", "PA", "XR SCOLIOSIS STANDING", None, None, "Whole_Spine_AP"),
    # Chest
    ("CHEST", "PA", "CHEST 2 VIEWS PA/LAT", None, None, "Chest_Frontal"),
    ("CHEST", "LL", "CHEST 2 VIEWS PA/LAT", None, None, "Chest_Lateral"),
    ("CHEST", "AP", "XR CHEST PORTABLE", None, None, "Chest_Frontal"),
    (None, None, "cxr 1v", None, None, "Chest_Frontal"),
    ("CHEST", "", "CHEST DECUB", "LEFT LATERAL DECUBITUS", None, "Chest_Decubitus"),
    ("CHEST", "AP", "XR RIBS LT", None, None, "Chest_Rib"),
    ("CLAVICLE", "AP", "XR CLAVICLE RT", None, None, "Chest_Clavicle"),
    # Abdomen
    ("ABDOMEN", "AP", "XR KUB", None, None, "Abdomen_KUB"),
    ("ABDOMEN", "AP", "ABD 2 VIEWS", "SUPINE", None, "Abdomen_Supine"),
    ("ABDOMEN", "AP", "ABD 2 VIEWS", "UPRIGHT", None, "Abdomen_Upright"),
    (None, "LL", "abdomen cross-table lateral", None, None, "Abdomen_Lateral"),
    ("ABDOMEN", "AP", "XR ABDOMEN 1 VIEW", None, None, "Abdomen_Supine"),
    # Pelvis
    ("PELVIS", "AP", "XR PELVIS AP", None, None, "Pelvis_AP"),
    ("HIP", "AP", "HIPS AP AND FROG", "AP", None, "Pelvis_AP"),
    ("HIP", "AP", "HIPS AP AND FROG", "FROG LEG LATERAL", None, "Pelvis_Frogleg"),
    ("HIP", "AP", "Hip Frogleg", None, None, "Pelvis_Frogleg"),
    ("PELVIS", "LL", "PELVIS LATERAL", None, None, "Pelvis_Lateral"),
    ("PELVIS", "LLO", "PELVIS JUDET VIEWS", None, None, "Pelvis_Oblique"),
    ("SIJOINT", "AP", "XR SI JOINTS", None, None, "Pelvis_SI_Joint"),
    ("HIP", "LL", "HIP CROSS TABLE LATERAL RT", None, None, "Pelvis_Translateral"),
    ("SSPINE", "LL", "XR SACRUM AND COCCYX", None, None, "Pelvis_Coccyx_Sacrum"),
    # Upper extremity
    ("SHOULDER", "AP", "XR SHOULDER 2+ VW LT", "AP EXT ROT", None, "Shoulder_AP"),
    ("SHOULDER", "AP", "XR SHOULDER 2+ VW LT", "AXILLARY", None, "Shoulder_Axial"),
    ("HUMERUS", "RLO", "HUMERUS 2 VIEWS", None, None, "Humerus_Oblique"),
    ("ELBOW", "LL", "XR ELBOW 3 VIEWS RT", None, None, "Elbow_Lateral"),
    ("FOREARM", None, "FOREARM", "OBL", None, "Forearm_Oblique"),
    (None, "RLO", "XR RADIUS AND ULNA LT", None, None, "Forearm_Oblique"),
    ("WRIST", "PA", "RAD WRIST MIN 3 VIEWS RIGHT", None, None, "Wrist_AP"),
    ("WRIST", "PA", "RAD WRIST MIN 3 VIEWS RIGHT", "OBLIQUE", None, "Wrist_Oblique"),
    ("HAND", "PA", "XR HAND 3+ VW LT", "PA", None, "Hand_PA"),
    ("HAND", "PA", "XR HAND 3+ VW LT", "OBL", None, "Hand_Oblique"),  # series beats a default PA
    ("HAND", "LL", "xr hand 3+ vw lt", None, None, "Hand_Lateral"),
    ("HAND", None, "BONE AGE", None, None, "Hand_PA"),
    ("FINGER", "PA", "XR FINGER(S) LT HAND", None, None, "Finger"),
    (None, None, "THUMB 2 VIEWS", None, None, "Finger"),
    ("ARM", "AP", "UPPER EXTREMITY INFANT", None, None, "Upper_Extremity_Other"),
    # Lower extremity
    ("FEMUR", "AP", "XR FEMUR 2 VIEWS", None, None, "Femur_AP"),
    ("KNEE", "AP", "XR KNEE 3 VIEWS RT", None, None, "Knee_AP"),
    ("KNEE", "LL", "XR KNEE 3 VIEWS RT", None, None, "Knee_Lateral"),
    ("KNEE", "LLO", "KNEE 4 VIEWS", None, None, "Knee_Oblique"),
    ("KNEE", "AP", "KNEE SKYLINE BIL", None, None, "Knee_Skyline"),
    ("KNEE", "AP", "KNEE", "STRESS VIEW VALGUS", None, "Knee_Stress"),
    ("LEG", "AP", "XR TIB/FIB LT", None, None, "Leg_AP"),
    (None, "LLO", "tibia fibula 3 views", None, None, "Leg_Oblique"),
    ("ANKLE", "AP", "ANKLE 3 VIEWS", "AP", None, "Ankle_AP"),
    ("ANKLE", "LL", "ANKLE 3 VIEWS", None, None, "Ankle_Lateral"),
    ("ANKLE", "AP", "ANKLE 3 VIEWS", "MORTISE", None, "Ankle_Mortise"),
    ("ANKLE", "AP", "XR ANKLE STRESS VIEWS", None, None, "Ankle_Stress"),
    ("FOOT", "AP", "XR FOOT 3+ VW RT", None, None, "Foot_AP"),
    ("FOOT", "LL", "XR FOOT 3+ VW RT", None, None, "Foot_Lateral"),
    ("FOOT", "LLO", "XR FOOT 3+ VW RT", None, None, "Foot_Oblique"),
    ("FOOT", "AP", "HINDFOOT ALIGNMENT VIEW", None, None, "Foot_Hindfoot"),
    ("CALCANEUS", "LL", "XR CALCANEUS LT", None, None, "Foot_Calcaneus"),
    ("TOE", "AP", "GREAT TOE 3 VIEWS", None, None, "Toe"),
    ("LOWER EXTREMITY", "AP", "XR LEG LENGTH STANDING", None, None, "Whole_Lower_AP"),
    (None, "LL", "WHOLE LOWER EXTREMITY LATERAL", None, None, "Whole_Lower_Lateral"),
    # Body part only, description missing; protocol name only; body part contradicted by descriptions
    ("KNEE", "LL", None, None, None, "Knee_Lateral"),
    (None, "PA", None, None, "HAND_PA", "Hand_PA"),
    ("CHEST", "PA", "XR HAND 3 VIEWS", None, None, "Hand_PA"),
]


def fields(body_part, view_position, study, series, protocol, procedure_code=None) -> dict:
    return {
        "body_part": body_part,
        "view_position": view_position,
        "study_description": study,
        "series_description": series,
        "protocol_name": protocol,
        "procedure_code": procedure_code,
    }


def test_cases_cover_every_7_class_region_and_at_least_60_headers():
    covered = {TAXONOMY.coarsen(case[-1], 7) for case in CASES}
    assert covered == set(TAXONOMY.classes(7))
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[f"{c[2] or c[4] or c[0]}|{c[3]}|{c[1]}" for c in CASES])
def test_realistic_headers_map_to_the_expected_view(case):
    *header, expected = case
    result = label_header(fields(*header), TAXONOMY)
    assert (result.label_68, result.status, result.source, result.reason) == (expected, "ok", "rule", None)
    assert (result.label_30, result.label_7) == TAXONOMY.parents(expected)


@pytest.mark.parametrize(
    "spelling",
    [
        "XR C-SPINE LAT",
        "xr c spine lateral",
        "C_SPINE_LAT",
        "c.spine, lat.",
        "CSPINE (LAT) RT",
        "Cervical Spine - Lateral",
        "DX C SP LATERAL BIL",
    ],
)
def test_case_punctuation_and_laterality_do_not_matter(spelling):
    assert label_header(fields(None, None, spelling, None, None), TAXONOMY).label_68 == "C_Spine_Lateral"


def test_every_taxonomy_view_maps_from_its_own_typical_header():
    for view in TAXONOMY.views:
        header = fields(view.body_part, view.view_position, view.description, None, None)
        assert label_header(header, TAXONOMY).label_68 == view.label_68, view


@pytest.fixture
def site_taxonomy(tmp_path):
    table = tmp_path / "codes.csv"
    table.write_text("code,label_68\nXRHAND3,Hand_Oblique\nPEDS CHEST PORT,Chest_Frontal\nXRKNEE,Knee_AP\n")
    return load_taxonomy(code_table=table)


def test_code_table_wins_over_rules(site_taxonomy):
    header = fields("CHEST", "PA", "CHEST 2 VIEWS PA/LAT", None, None, procedure_code="99999|xrhand3")
    result = label_header(header, site_taxonomy)
    assert (result.label_68, result.source, result.status) == ("Hand_Oblique", "code-table", "ok")
    by_protocol = label_header(fields("HAND", "PA", "HAND", None, " peds  chest port "), site_taxonomy)
    assert (by_protocol.label_68, by_protocol.source) == ("Chest_Frontal", "code-table")


def test_unknown_codes_fall_back_to_rules(site_taxonomy):
    result = label_header(fields("HAND", "PA", "XR HAND", None, None, procedure_code="12345"), site_taxonomy)
    assert (result.label_68, result.source) == ("Hand_PA", "rule")


def test_contradicting_code_table_entries_are_a_conflict(site_taxonomy):
    result = label_header(
        fields("HAND", "PA", "XR HAND", None, None, procedure_code="XRHAND3|XRKNEE"), site_taxonomy
    )
    assert result.status == "unmapped" and result.label_68 is None
    assert result.reason.startswith("conflict: code table maps") and "XRKNEE→Knee_AP" in result.reason


@pytest.mark.parametrize(
    ("header", "reason_start"),
    [
        (fields(None, None, None, None, None), "no rule matched: all label fields empty"),
        (fields("", "", "", "", ""), "no rule matched: all label fields empty"),
        (fields("XYZZY", "QQ", "asdkjh 123", "foo", None), "no rule matched: body_part=XYZZY"),
        (fields(None, "AP", "CT HEAD W/O CONTRAST", None, None), "no rule matched"),
        (
            fields(None, None, "XR HAND/WRIST", None, None),
            "ambiguous region: study_description names HAND/WRIST",
        ),
        (fields(None, None, "CHEST 2 VIEWS PA/LAT", None, None), "ambiguous projection for CHEST"),
        (fields("HAND", None, "XR HAND 3 VIEWS", None, None), "projection unknown for region HAND"),
        (fields("ELBOW", "AP", "ELBOW 2 VIEWS", None, None), "no 68-class view for ELBOW with projection AP"),
        (
            fields(None, None, "HAND 3 VIEWS", "KNEE AP", "HAND PA"),
            "conflict: region: series_description says KNEE, protocol_name says HAND",
        ),
        (fields("HAND", None, "HAND", "PA", "LATERAL"), "conflict: projection for HAND"),
    ],
)
def test_unmappable_headers_say_why(header, reason_start):
    result = label_header(header, TAXONOMY)
    assert (result.status, result.source, result.label_68, result.label_7) == ("unmapped", "none", None, None)
    assert result.reason.startswith(reason_start), result.reason


def catalog_frame(headers: list[dict], statuses: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for i, header in enumerate(headers):
        row = {c: None for c in CATALOG_COLUMNS}
        row.update(
            header,
            sop_instance_uid=f"1.2.3.{i}",
            path=f"/spool/{i}.dcm",
            label_source="none",
            status=(statuses or ["ok"] * len(headers))[i],
            reason="",
        )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA).to_pandas(types_mapper=pd.ArrowDtype)


def test_label_catalog_equals_per_row_labels_and_leaves_unreadable_rows_alone():
    rng = np.random.default_rng(7)
    pool = [fields(*case[:-1]) for case in CASES] + [
        fields(None, None, "gibberish", None, None),
        fields(None, None, None, None, None),
    ]
    headers = [pool[i] for i in rng.integers(0, len(pool), 3000)]
    statuses = list(rng.choice(["ok", "ok", "ok", "unreadable", "excluded"], len(headers)))
    df = catalog_frame(headers, statuses)
    df.loc[df["status"] == "unreadable", "reason"] = "truncated: pixel data has 1 of 2 bytes"
    labelled = label_catalog(df, TAXONOMY)
    assert len(labelled) == len(df) and (labelled.index == df.index).all()
    for i, header in enumerate(headers):
        row = labelled.iloc[i]
        if statuses[i] in ("unreadable", "excluded"):
            assert row["status"] == statuses[i] and pd.isna(row["label_68"]) and row["label_source"] == "none"
            continue
        expected = label_header(header, TAXONOMY)
        got = (
            row["label_68"],
            row["label_30"],
            row["label_7"],
            row["label_source"],
            row["status"],
            row["reason"],
        )
        got = tuple(None if pd.isna(v) else v for v in got)
        assert got == (
            expected.label_68,
            expected.label_30,
            expected.label_7,
            expected.source,
            expected.status,
            expected.reason,
        )
    assert (
        labelled.loc[labelled["status"] == "unreadable", "reason"]
        .eq("truncated: pixel data has 1 of 2 bytes")
        .all()
    )
    # The frame still fits the catalog schema (it is written back by --relabel).
    pa.Table.from_pandas(labelled[list(CATALOG_COLUMNS)], schema=CATALOG_SCHEMA, preserve_index=False)


def write_small_catalog(path, headers, statuses=None):
    path.mkdir()
    table = pa.Table.from_pandas(
        catalog_frame(headers, statuses), schema=CATALOG_SCHEMA, preserve_index=False
    )
    pq.write_table(table, path / "part-00000.parquet")


SMALL = [fields("HAND", "PA", "XR HAND 3+ VW LT", "PA", None)] * 3 + [
    fields("CHEST", "LL", "CHEST 2 VIEWS PA/LAT", None, None),
    fields(None, None, "PEDS MYSTERY EXAM", None, "PROTO42"),
    fields(None, None, "PEDS MYSTERY EXAM", None, "PROTO42"),
    fields(None, None, None, None, None),
]


def test_cli_reports_counts_and_top_unmapped(tmp_path, capsys):
    catalog = tmp_path / "catalog"
    write_small_catalog(catalog, SMALL, ["ok"] * 6 + ["unreadable"])
    relabel_free = read_catalog(catalog)
    assert main([str(catalog), "--relabel"]) == 0
    out = capsys.readouterr().out
    assert "Hand_PA" in out and "Upper_Extremity" in out and "Chest_Lateral" in out
    assert "study_description='PEDS MYSTERY EXAM'" in out and "protocol_name='PROTO42'" in out
    lines = [line for line in out.splitlines() if "PEDS MYSTERY EXAM" in line]
    assert lines and lines[0].split()[0] == "2"
    after = read_catalog(catalog)
    assert list(after["sop_instance_uid"]) == list(relabel_free["sop_instance_uid"])
    assert list(after["status"]) == ["ok"] * 4 + ["unmapped"] * 2 + ["unreadable"]
    assert list(after["label_68"][:4]) == ["Hand_PA"] * 3 + ["Chest_Lateral"]
    # Report-only run reads the stored labels and changes nothing.
    before = after.copy()
    assert main([str(catalog), "--top", "1"]) == 0
    assert "unmapped header combinations" in capsys.readouterr().out
    pd.testing.assert_frame_equal(read_catalog(catalog), before)


def test_cli_relabel_with_code_table_round_trip(tmp_path, capsys):
    catalog = tmp_path / "catalog"
    write_small_catalog(catalog, SMALL)
    assert main([str(catalog), "--relabel"]) == 0
    table = tmp_path / "codes.csv"
    table.write_text("code,label_68\nproto42,Abdomen_KUB\n")
    assert main([str(catalog), "--code-table", str(table)]) == 0  # dry run
    assert "dry run" in capsys.readouterr().out
    assert (read_catalog(catalog)["status"] == "unmapped").sum() == 3
    assert main([str(catalog), "--code-table", str(table), "--relabel"]) == 0
    after = read_catalog(catalog)
    mystery = after["study_description"] == "PEDS MYSTERY EXAM"
    assert after.loc[mystery, "label_68"].tolist() == ["Abdomen_KUB"] * 2
    assert after.loc[mystery, "label_source"].tolist() == ["code-table"] * 2
    assert after["status"].tolist() == ["ok"] * 6 + ["unmapped"]
    assert list(after.columns) == list(CATALOG_COLUMNS)


def test_cli_missing_catalog_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_label_fields_are_catalog_columns_or_documented_extras():
    assert set(LABEL_FIELDS) - set(CATALOG_COLUMNS) == {"procedure_code_meaning"}


@pytest.mark.parametrize(
    ("series", "protocol", "expected"),
    [
        ("KNEE SKYLINE RT", "KNEE AP RT", "Knee_Skyline"),  # protocol names the ViewPosition only
        ("ANKLE AP LT", "ANKLE MORTISE LT", "Ankle_Mortise"),  # either peer may be the specific one
        ("HIP FROGLEG", "HIP AP", "Pelvis_Frogleg"),
    ],
)
def test_a_generic_peer_yields_to_the_specific_view_it_is_written_as(series, protocol, expected):
    result = label_header(fields(None, None, "XR 3 VIEWS", series, protocol), TAXONOMY)
    assert (result.status, result.label_68) == ("ok", expected)


def test_peers_naming_two_different_specific_views_still_conflict():
    result = label_header(fields(None, None, None, "KNEE SKYLINE", "KNEE STRESS"), TAXONOMY)
    assert result.status == "unmapped" and result.reason.startswith("conflict: projection for KNEE")

"""Generate a phantom PACS directory: DICOM files plus ``ground_truth.csv`` (and the site's protocol codes).

Layout: ``OUT/<patient id>/<study>/<series>/<sop instance uid>.dcm``. Every byte is fixed by (task, studies,
seed): UIDs are hashes of the seed, dates come from the plan, each study renders from its own random stream,
so studies can be made in any order and in parallel. A re-run over the same directory reuses each study whose
files still hash to what ``ground_truth.csv`` recorded and makes the rest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ingest.dataset.taxonomy import load_taxonomy

from ..files import write_atomic
from .annotation import CORNERS, annotation_lines, burn_in_text
from .dicom import Encoding, Identity, build_dataset, encode, save_dataset_atomic, stored_pixels, uid
from .headers import header_for, protocol_code
from .plan import StudyPlan, plan_studies
from .render import FRACTURE_VIEWS, render_view

GROUND_TRUTH = "ground_truth.csv"
SITE_CODES = "site_codes.csv"
COLUMNS = (
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
    "fracture_kind",
    "fracture_severity",
    "laterality",
    "study_date",
    "modality",
    "transfer_syntax",
    "photometric",
    "bits_stored",
    "rows",
    "columns",
    "header_quirk",
    "text_box",
    "sha256",
)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def study_rows(plan: StudyPlan, seed: int, out_dir: Path, burned_in_text: bool = False) -> list[dict]:
    """Render and write every instance of one study; returns its ground-truth rows.

    ``burned_in_text`` prints the patient's name, IDs and study date into a corner of every image
    (``annotation.py``), marks it ``BurnedInAnnotation=YES`` and records the box as ``text_box``."""
    taxonomy = load_taxonomy()
    rng = np.random.default_rng([seed, 0x52454E44, plan.index])  # "REND"
    site = plan.site
    bits = int(site.bits_stored[int(rng.integers(len(site.bits_stored)))])
    study_time = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
    study_uid = uid(seed, "study", plan.index)
    accession = f"A{seed % 100:02d}{plan.index:07d}"
    names = [taxonomy.view(i.label_68).view_position for i in plan.instances]
    study_dir = f"{plan.patient.patient_id}/ST{plan.index:06d}"
    rows = []
    for number, inst in enumerate(plan.instances, start=1):
        view = taxonomy.view(inst.label_68)
        sided = view.label_7 in ("Upper_Extremity", "Lower_Extremity")
        is_fracture_view = inst.label_68 in FRACTURE_VIEWS
        rendered = render_view(
            inst.label_68,
            rng,
            age_months=plan.age_months,
            sex=plan.patient.sex,
            bone_age_months=plan.bone_age_months,
            laterality=plan.laterality,
            fracture=bool(plan.fracture) and is_fracture_view,
            cast=plan.cast,
            modality=site.modality,
            long_side_px=inst.long_side_px,
        )
        enc = Encoding(site.modality, site.photometric, bits, inst.transfer_syntax, site.rescale)
        pixels = stored_pixels(rendered.image, enc)
        text_box = ""
        if burned_in_text:
            text_rng = np.random.default_rng([seed, 0x54455854, plan.index, number])  # "TEXT"
            lines = annotation_lines(
                text_rng,
                name=plan.patient.name,
                patient_id=plan.patient.patient_id,
                accession=accession,
                date=plan.study_date.strftime("%Y%m%d"),
            )
            white = 0 if site.photometric == "MONOCHROME1" else (1 << bits) - 1
            corner = CORNERS[int(text_rng.integers(len(CORNERS)))]
            text_box = " ".join(map(str, burn_in_text(pixels, lines, corner, white)))
        header = header_for(view, site.style, len(plan.instances), plan.laterality, names, inst.quirk)
        series_uid, sop_uid = uid(seed, "series", plan.index, number), uid(seed, "sop", plan.index, number)
        who = Identity(
            plan.patient.patient_id,
            plan.patient.name,
            plan.patient.sex,
            plan.patient.birth_date,
            plan.study_date,
            study_uid,
            series_uid,
            sop_uid,
            accession,
            number,
            study_time,
        )
        ds = build_dataset(
            pixels,
            enc,
            who,
            header,
            laterality=plan.laterality if sided else None,
            manufacturer=site.manufacturer,
            institution=f"{site.name} CHILDREN'S HOSPITAL",
            pixel_spacing_mm=rendered.pixel_spacing_mm,
        )
        if burned_in_text:
            ds.BurnedInAnnotation = "YES"
        encode(ds, pixels, inst.transfer_syntax)
        rel = f"{study_dir}/SE{number:02d}/{sop_uid}.dcm"
        path = out_dir / rel
        save_dataset_atomic(ds, path)
        rows.append(
            {
                "path": rel,
                "sop_instance_uid": sop_uid,
                "study_instance_uid": study_uid,
                "series_instance_uid": series_uid,
                "patient_id": plan.patient.patient_id,
                "label_68": view.label_68,
                "label_30": view.label_30,
                "label_7": view.label_7,
                "sex": plan.patient.sex,
                "age_months": round(plan.age_months, 2),
                "bone_age_months": round(plan.bone_age_months, 2) if inst.label_68 == "Hand_PA" else None,
                "fracture": int(rendered.fracture) if is_fracture_view else None,
                "fracture_kind": rendered.fracture_kind,
                "fracture_severity": (
                    round(rendered.fracture_severity, 3) if rendered.fracture_severity is not None else None
                ),
                "laterality": plan.laterality if sided else "",
                "study_date": plan.study_date.isoformat(),
                "modality": site.modality,
                "transfer_syntax": inst.transfer_syntax,
                "photometric": site.photometric,
                "bits_stored": bits,
                "rows": pixels.shape[0],
                "columns": pixels.shape[1],
                "header_quirk": inst.quirk,
                "text_box": text_box,
                "sha256": sha256_file(path),
            }
        )
    return rows


def _study_job(args: tuple[StudyPlan, int, str, bool]) -> list[dict]:
    plan, seed, out_dir, burned_in_text = args
    return study_rows(plan, seed, Path(out_dir), burned_in_text)


def _previous_rows(out_dir: Path) -> dict[str, dict]:
    path = out_dir / GROUND_TRUTH
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {r["sop_instance_uid"]: r for r in csv.DictReader(f)}


def _reusable(
    plan: StudyPlan, seed: int, out_dir: Path, previous: dict[str, dict], burned_in_text: bool
) -> list[dict] | None:
    """The recorded rows of a study whose files are all present, unchanged and drawn with the same
    burned-in text setting, else None."""
    rows = []
    for number in range(1, len(plan.instances) + 1):
        row = previous.get(uid(seed, "sop", plan.index, number))
        if row is None or bool(row.get("text_box")) != burned_in_text or set(COLUMNS) - set(row):
            return None  # not made here, other text, or recorded before a column existed
        path = out_dir / row["path"]
        if not path.is_file() or sha256_file(path) != row["sha256"]:
            return None
        rows.append(row)
    return rows


def _run(
    out_dir: str | os.PathLike,
    task: str,
    studies: int,
    seed: int,
    progress: bool,
    workers: int | None,
    transfer_syntax: str | None = None,
    burned_in_text: bool = False,
) -> pd.DataFrame:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_studies(task, studies, seed, transfer_syntax=transfer_syntax)
    previous = _previous_rows(out)
    results: dict[int, list[dict]] = {}
    todo = []
    for plan in plans:
        reused = _reusable(plan, seed, out, previous, burned_in_text) if previous else None
        if reused is None:
            todo.append(plan)
        else:
            results[plan.index] = reused
    workers = workers if workers is not None else (min(os.cpu_count() or 1, 8) if len(todo) >= 16 else 1)
    jobs = [(plan, seed, str(out), burned_in_text) for plan in todo]
    bar = tqdm(
        total=len(plans), initial=len(results), unit="study", desc=f"phantoms ({task})", disable=not progress
    )
    with bar:
        if workers <= 1:
            done = map(_study_job, jobs)
            for plan, rows in zip(todo, done, strict=True):
                results[plan.index] = rows
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for plan, rows in zip(todo, pool.map(_study_job, jobs, chunksize=4), strict=True):
                    results[plan.index] = rows
                    bar.update()
    table = pd.DataFrame([row for index in sorted(results) for row in results[index]], columns=list(COLUMNS))
    table = _typed(table)
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    write_atomic(out / GROUND_TRUTH, buffer.getvalue())
    codes = "code,label_68\n" + "".join(
        f"{protocol_code(v.label_68)},{v.label_68}\n" for v in load_taxonomy().views
    )
    write_atomic(out / SITE_CODES, codes)
    return table


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """One dtype per column whether rows were just made or read back from an earlier run's CSV."""
    table = table.copy()
    for column in ("age_months", "bone_age_months", "fracture_severity"):
        table[column] = pd.to_numeric(table[column].replace({"": np.nan})).astype("float64")
    table["fracture"] = pd.to_numeric(table["fracture"].replace({"": np.nan})).astype("Int64")
    for column in ("bits_stored", "rows", "columns"):
        table[column] = pd.to_numeric(table[column]).astype("int64")
    for column in ("fracture_kind", "laterality", "header_quirk", "text_box"):
        table[column] = table[column].fillna("").astype(str)
    return table


def generate(
    out_dir: str | os.PathLike,
    studies: int = 300,
    seed: int = 0,
    progress: bool = False,
    workers: int | None = None,
    transfer_syntax: str | None = None,
    burned_in_text: bool = False,
) -> pd.DataFrame:
    """A mixed PACS of ``studies`` studies over all 68 views; returns (and writes) the ground truth.
    ``transfer_syntax`` (a UID) writes every instance in that syntax instead of the realistic mix;
    ``burned_in_text`` prints identifiers into every image (``study_rows``)."""
    return _run(out_dir, "views", studies, seed, progress, workers, transfer_syntax, burned_in_text)


def generate_task_set(
    out_dir: str | os.PathLike,
    task: str,
    n: int,
    seed: int = 0,
    progress: bool = False,
    workers: int | None = None,
    transfer_syntax: str | None = None,
    burned_in_text: bool = False,
) -> pd.DataFrame:
    """A fine-tuning set: ``bone_age`` (one hand PA per study, ages spread over 0-18 y) or ``fracture``
    (wrist / forearm / elbow / ankle studies, about half fractured)."""
    if task not in ("bone_age", "fracture"):
        raise ValueError(
            f"task must be 'bone_age' or 'fracture', got {task!r}; use generate() for the view mix"
        )
    return _run(out_dir, task, n, seed, progress, workers, transfer_syntax, burned_in_text)

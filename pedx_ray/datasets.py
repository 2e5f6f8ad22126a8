"""Fine-tuning data: every supported source as one table, patient-level splits, and an image cache.

Sources (``--data KIND:PATH``):
- ``phantom:DIR`` — a set from ``ingest.phantoms.generate_task_set`` (DIR/ground_truth.csv + DICOM);
- ``rsna:CSV`` — RSNA Pediatric Bone Age: CSV ``id,boneage,male`` and ``--images DIR`` of ``<id>.png``
  (searched recursively); the official validation / 200-image test lists via ``--val-list`` /
  ``--test-list`` (their own columns ``Image ID,male,Bone Age (months)`` and
  ``Case ID,Sex,Ground truth bone age (months)`` are understood, as is a plain ``id`` column);
- ``grazpedwri:CSV`` — GRAZPEDWRI-DX's dataset CSV (``filestem``, ``fracture_visible``, optional
  ``patient_id``, ``gender``, ``age`` in years) and ``--images DIR`` of ``<filestem>.png``;
- ``dicom:CATALOG`` — an ingest catalog (Parquet) plus ``--labels CSV`` with ``sop_instance_uid``
  and the task's column (``bone_age_months`` or ``fracture``; the phantom ground truth fits).

The table has one row per image: ``id, path, target, sex (1 male, 0 female, 0.5 unknown),
age_months, patient_id, split``. Sets without official splits are split by patient: a hash of
(seed, patient) places each patient in train, val or test, so the split does not depend on row
order and adding patients never moves the others. Preprocessed images are cached on disk under a
key of the file's sha256 and the preprocessing parameters, so runs and epochs never decode a
DICOM twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ingest.files import replacing
from ingest.imaging.preprocess import PreprocessParams, preprocess_array, preprocess_file

DATA_KINDS = ("phantom", "rsna", "grazpedwri", "dicom")
SPLITS = ("train", "val", "test")
TABLE_COLUMNS = ("id", "path", "target", "sex", "age_months", "patient_id", "split")
TARGET_COLUMN = {"bone_age": "bone_age_months", "fracture": "fracture"}
BUILTIN_ENHANCE = ("none", "clahe")
UNKNOWN_SEX = 0.5


class DatasetError(ValueError):
    """The data cannot be used as given; the message says what is wrong and how to fix it."""


def parse_data(spec: str) -> tuple[str, str]:
    kind, _, path = spec.partition(":")
    if kind not in DATA_KINDS or not path:
        raise DatasetError(
            f"data {spec!r}: use phantom:DIR, rsna:CSV, grazpedwri:CSV or dicom:CATALOG "
            "(with --images / --labels where the kind needs them)"
        )
    return kind, path


def _read_csv(path: str | Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{what} {path} is not a readable CSV: {exc}") from exc
    absent = [c for c in required if c not in frame.columns]
    if absent:
        raise DatasetError(
            f"{what} {path} lacks column(s) {absent}; it has {list(frame.columns)}. "
            f"Expected at least {list(required)}"
        )
    return frame


def _pick(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in frame.columns), None)


def _sex(values: pd.Series) -> pd.Series:
    """M/F, male/female, True/False or 1/0 → 1.0 (male) / 0.0 (female), anything else UNKNOWN_SEX."""
    mapping = {"m": 1.0, "male": 1.0, "true": 1.0, "1": 1.0, "1.0": 1.0}
    mapping |= {"f": 0.0, "female": 0.0, "false": 0.0, "0": 0.0, "0.0": 0.0}
    return values.astype(str).str.strip().str.lower().map(mapping).fillna(UNKNOWN_SEX).astype(float)


def _image_index(images: str | Path, suffix: str = ".png") -> dict[str, Path]:
    root = Path(images)
    if not root.is_dir():
        raise DatasetError(
            f"image folder {root} does not exist; pass the folder of {suffix} files with --images"
        )
    return {p.stem: p for p in sorted(root.rglob(f"*{suffix}"))}


def _paths_for(ids: pd.Series, index: dict[str, Path], images: str | Path) -> pd.Series:
    missing = [i for i in ids.astype(str) if i not in index]
    if missing:
        raise DatasetError(
            f"{len(missing)} image file(s) missing in {images}: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} (expected <id>.png); fix --images or drop those rows"
        )
    return ids.astype(str).map(lambda i: str(index[i]))


# ---------------------------------------------------------------- sources


def phantom_table(root: str | Path, task: str) -> pd.DataFrame:
    root = Path(root)
    truth = _read_csv(
        root / "ground_truth.csv",
        ("path", "sop_instance_uid", "patient_id", "sex", "age_months", TARGET_COLUMN[task]),
        "phantom ground truth (write it with ingest.phantoms.generate_task_set)",
    )
    truth = truth[truth[TARGET_COLUMN[task]].notna()]
    if truth.empty:
        raise DatasetError(
            f"{root} has no {task} labels; generate it with generate_task_set(..., task={task!r})"
        )
    return pd.DataFrame(
        {
            "id": truth["sop_instance_uid"].astype(str),
            "path": [str(root / p) for p in truth["path"]],
            "target": truth[TARGET_COLUMN[task]].astype(float),
            "sex": _sex(truth["sex"]),
            "age_months": truth["age_months"].astype(float),
            "patient_id": truth["patient_id"].astype(str),
            "split": "",
        }
    )


RSNA_ID = ("id", "Image ID", "Case ID")
RSNA_AGE = ("boneage", "Bone Age (months)", "Ground truth bone age (months)")
RSNA_SEX = ("male", "Sex")


def _rsna_rows(frame: pd.DataFrame, index: dict[str, Path], images: str | Path, split: str) -> pd.DataFrame:
    ids = frame[_pick(frame, RSNA_ID)].astype(str)
    return pd.DataFrame(
        {
            "id": ids,
            "path": _paths_for(ids, index, images).to_numpy(),
            "target": frame[_pick(frame, RSNA_AGE)].astype(float).to_numpy(),
            "sex": _sex(frame[_pick(frame, RSNA_SEX)]).to_numpy(),
            "age_months": np.nan,  # RSNA gives no chronological age
            "patient_id": ids.to_numpy(),  # one radiograph per patient
            "split": split,
        }
    )


def rsna_table(csv: str | Path, images: str | Path, val_list: str = "", test_list: str = "") -> pd.DataFrame:
    if not images:
        raise DatasetError("rsna data needs --images DIR: the folder holding <id>.png")
    index = _image_index(images)
    table = _rsna_rows(_read_csv(csv, ("id", "boneage", "male"), "RSNA bone age CSV"), index, images, "")
    for split, path in (("val", val_list), ("test", test_list)):
        if not path:
            continue
        listed = _read_csv(path, (), f"RSNA {split} list")
        if _pick(listed, RSNA_ID) is None:
            raise DatasetError(f"RSNA {split} list {path} has none of the id columns {list(RSNA_ID)}")
        if _pick(listed, RSNA_AGE) and _pick(listed, RSNA_SEX):  # an official list with its own labels
            rows = _rsna_rows(listed, index, images, split)
            table = pd.concat([table[~table["id"].isin(rows["id"])], rows], ignore_index=True)
            continue
        ids = set(listed[_pick(listed, RSNA_ID)].astype(str))
        unknown = sorted(ids - set(table["id"]))
        if unknown:
            raise DatasetError(f"RSNA {split} list {path} names ids not in {csv}: {unknown[:5]}")
        table.loc[table["id"].isin(ids), "split"] = split
    return table


def grazpedwri_table(csv: str | Path, images: str | Path) -> pd.DataFrame:
    if not images:
        raise DatasetError("grazpedwri data needs --images DIR: the folder holding <filestem>.png")
    frame = _read_csv(csv, ("filestem", "fracture_visible"), "GRAZPEDWRI-DX CSV")
    ids = frame["filestem"].astype(str)
    # The published CSV marks fractures with 1 and leaves the cell empty otherwise.
    target = pd.to_numeric(frame["fracture_visible"], errors="coerce").fillna(0).clip(0, 1)
    patient = frame["patient_id"].astype(str) if "patient_id" in frame else ids.str.split("_").str[0]
    return pd.DataFrame(
        {
            "id": ids,
            "path": _paths_for(ids, _image_index(images), images).to_numpy(),
            "target": target.astype(float).to_numpy(),
            "sex": _sex(frame["gender"]).to_numpy() if "gender" in frame else UNKNOWN_SEX,
            "age_months": (pd.to_numeric(frame["age"], errors="coerce") * 12).to_numpy()
            if "age" in frame
            else np.nan,
            "patient_id": patient.to_numpy(),
            "split": "",
        }
    )


def dicom_table(catalog: str | Path, labels: str | Path, task: str) -> pd.DataFrame:
    from ingest.dataset.catalog import CatalogError, read_catalog

    if not labels:
        raise DatasetError(
            f"dicom data needs --labels CSV with columns sop_instance_uid,{TARGET_COLUMN[task]}"
        )
    try:
        cat = read_catalog(
            catalog,
            ["sop_instance_uid", "path", "patient_id_hash", "patient_sex", "patient_age_months", "status"],
        )
    except CatalogError as exc:
        raise DatasetError(str(exc)) from exc
    cat = pd.DataFrame({c: cat[c].astype(object) for c in cat.columns})
    # "unmapped" only means the view label is unknown; the pixels are as usable as "ok" ones.
    cat = cat[cat["status"].isin(["ok", "unmapped"])]
    frame = _read_csv(labels, ("sop_instance_uid", TARGET_COLUMN[task]), "labels CSV")
    frame = frame[frame[TARGET_COLUMN[task]].notna()]
    merged = frame.merge(cat, on="sop_instance_uid", how="left")
    absent = merged[merged["path"].isna()]["sop_instance_uid"].tolist()
    if absent:
        raise DatasetError(
            f"{len(absent)} labelled instance(s) are not readable images in catalog {catalog}: "
            f"{absent[:5]}; re-scan the DICOM folder or drop those labels"
        )
    return pd.DataFrame(
        {
            "id": merged["sop_instance_uid"].astype(str),
            "path": merged["path"].astype(str),
            "target": merged[TARGET_COLUMN[task]].astype(float),
            "sex": _sex(merged["patient_sex"]),
            "age_months": pd.to_numeric(merged["patient_age_months"], errors="coerce"),
            "patient_id": merged["patient_id_hash"].astype(str),
            "split": merged["split"].fillna("").astype(str) if "split" in merged else "",
        }
    )


# ---------------------------------------------------------------- splits


def _unit_hash(*parts: object) -> float:
    """A stable pseudo-random number in [0, 1) from the parts (same on every machine and run)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:13], 16) / 16**13


def assign_splits(table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Fill empty ``split`` cells by patient; rows that already have a split keep it."""
    table = table.copy()
    todo = table["split"] == ""
    draw = table.loc[todo, "patient_id"].map(lambda p: _unit_hash("split", seed, p))
    table.loc[todo, "split"] = np.where(
        draw < test_fraction, "test", np.where(draw < test_fraction + val_fraction, "val", "train")
    )
    return table


def subsample_train(
    table: pd.DataFrame, *, fraction: float = 1.0, size: int = 0, seed: int = 0
) -> pd.DataFrame:
    """Keep ``size`` (or ``fraction`` of the) training rows, chosen by a seeded hash of the id.

    Smaller subsets are nested in larger ones for the same seed, so an ablation over sizes adds
    data rather than redrawing it. Val and test are never touched.
    """
    train = table[table["split"] == "train"]
    keep = size or round(fraction * len(train))
    if keep > len(train):
        raise DatasetError(
            f"--train-size {keep} exceeds the {len(train)} training images; use a smaller size"
        )
    if keep < 1:
        raise DatasetError(
            f"train fraction {fraction} of {len(train)} images leaves none; use a larger fraction"
        )
    rank = train["id"].map(lambda i: _unit_hash("subsample", seed, i)).sort_values(kind="stable")
    return table.drop(index=rank.index[keep:])


def load_table(config) -> pd.DataFrame:
    """The split, subsampled table a `FinetuneConfig` describes."""
    kind, path = parse_data(config.data)
    if kind == "phantom":
        table = phantom_table(path, config.task)
    elif kind == "rsna":
        if config.task != "bone_age":
            raise DatasetError("rsna data holds bone ages; use --task bone_age")
        table = rsna_table(path, config.images, config.val_list, config.test_list)
    elif kind == "grazpedwri":
        if config.task != "fracture":
            raise DatasetError("grazpedwri data holds fracture labels; use --task fracture")
        table = grazpedwri_table(path, config.images)
    else:
        table = dicom_table(path, config.labels, config.task)
    if config.task == "fracture" and not table["target"].isin([0.0, 1.0]).all():
        raise DatasetError(f"{config.data}: fracture labels must be 0 or 1")
    missing = [p for p in table["path"] if not Path(p).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} image file(s) listed by {config.data} do not exist: {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}"
        )
    table = assign_splits(table, config.val_fraction, config.test_fraction, config.split_seed)
    for split in ("train", "val"):
        if not (table["split"] == split).any():
            raise DatasetError(
                f"{config.data}: the {split} split is empty ({len(table)} images); add data or "
                "raise --val-fraction"
            )
    table = subsample_train(table, fraction=config.train_fraction, size=config.train_size, seed=config.seed)
    return table.reset_index(drop=True)[list(TABLE_COLUMNS)]


# ---------------------------------------------------------------- image cache


def _preprocess(path: str, params: PreprocessParams, enhance: str) -> np.ndarray:
    if path.lower().endswith((".png", ".jpg", ".jpeg")):
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise DatasetError(f"{path} is not a readable image file")
        image = preprocess_array(raw, params)
    else:
        image = preprocess_file(path, params)
    if enhance not in BUILTIN_ENHANCE:
        from pedx_ray.enhance import ENHANCERS

        image = ENHANCERS[enhance](image)
    return image


def _cached(path: str, params: PreprocessParams, enhance: str, cache_dir: Path, recipe_key: str) -> str:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    out = cache_dir / f"{digest[:40]}-{recipe_key}.png"
    if out.is_file():
        return str(out)
    image = _preprocess(path, params, enhance)
    with replacing(out, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), image) or cv2.imread(str(tmp), cv2.IMREAD_GRAYSCALE) is None:
            raise DatasetError(f"could not write a readable cache file {tmp}; check the disk")
    return str(out)


def cache_images(
    table: pd.DataFrame, *, image_size: int, enhance: str, cache_dir: str | Path, progress: bool = True
) -> pd.DataFrame:
    """Preprocess every image once (DICOM pipeline or PNG path, then CLAHE or the recipe's
    enhancement) into ``cache_dir``; returns the table with an ``image`` column of cached PNG paths."""
    params = PreprocessParams(size=image_size, clahe=enhance == "clahe")
    recipe = json.dumps({"params": params.to_dict(), "enhance": enhance}, sort_keys=True)
    recipe_key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        jobs = pool.map(lambda p: _cached(p, params, enhance, cache, recipe_key), table["path"])
        cached = list(tqdm(jobs, total=len(table), desc="preprocess", unit="img", disable=not progress))
    return table.assign(image=cached)


def read_images(paths) -> np.ndarray:
    """Cached PNGs → (N, H, W) uint8."""
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
    unreadable = [str(p) for p, image in zip(paths, images, strict=True) if image is None]
    if unreadable:
        raise DatasetError(f"cached image(s) unreadable: {unreadable[:3]}; delete them to rebuild the cache")
    return np.stack(images)

"""CLI: ``python -m ingest.phantoms --out DIR --studies N --seed S [--task ...] [--contact-sheet PNG]``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .build import generate, generate_task_set
from .plan import SYNTAX_NAMES
from .render import render_view
from .spec import REGISTRY

TILE = 220
LABEL_BAND = 22


def _tile(image: np.ndarray, caption: str) -> np.ndarray:
    h, w = image.shape
    scale = TILE / max(h, w)
    small = cv2.resize(
        (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8),
        (max(int(w * scale), 1), max(int(h * scale), 1)),
        interpolation=cv2.INTER_AREA,
    )
    tile = np.full((TILE + LABEL_BAND, TILE), 40, np.uint8)
    y0, x0 = (TILE - small.shape[0]) // 2, (TILE - small.shape[1]) // 2
    tile[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    cv2.putText(tile, caption[:27], (3, TILE + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1, cv2.LINE_AA)
    return tile


def _grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    blank = np.zeros_like(tiles[0])
    tiles = tiles + [blank] * (-len(tiles) % columns)
    return np.vstack([np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)])


def contact_sheet(seed: int = 0, age_years: float = 9.0, columns: int = 10) -> np.ndarray:
    """One labelled example of every view (a child of ``age_years``), wrist / ankle views fractured."""
    tiles = []
    for i, label in enumerate(sorted(REGISTRY)):
        rng = np.random.default_rng([seed, i])
        fractured = bool(REGISTRY[label].fracture_sites)
        r = render_view(
            label,
            rng,
            age_months=age_years * 12,
            sex="M" if i % 2 else "F",
            fracture=fractured,
            laterality="L" if i % 3 else "R",
            long_side_px=700,
        )
        tiles.append(_tile(r.image, label + (" +fx" if r.fracture else "")))
    return _grid(tiles, columns)


STRIP_VIEWS = (
    "Chest_Frontal",
    "Chest_Lateral",
    "Hand_PA",
    "Wrist_AP",
    "Skull_Lateral",
    "Pelvis_AP",
    "Knee_AP",
    "L_Spine_Lateral",
    "Abdomen_Supine",
    "Elbow_Lateral",
)


def sheet_tile(sheet: np.ndarray, label: str, columns: int = 10) -> np.ndarray:
    """The tile of ``label`` cut out of a contact sheet laid out as ``contact_sheet`` lays it out."""
    index = sorted(REGISTRY).index(label)
    row, col = divmod(index, columns)
    h = TILE + LABEL_BAND
    tile = sheet[row * h : (row + 1) * h, col * TILE : (col + 1) * TILE]
    if tile.shape != (h, TILE):
        raise ValueError(f"the sheet is too small to hold {label!r} at row {row}, column {col}")
    return tile


def before_after(before_sheet: np.ndarray, after_sheet: np.ndarray) -> np.ndarray:
    """Two rows of the same views: cut from an earlier contact sheet (before) and from this one (after)."""
    rows = []
    for name, sheet in (("before", before_sheet), ("after", after_sheet)):
        band = np.full((LABEL_BAND + 6, TILE * len(STRIP_VIEWS)), 20, np.uint8)
        cv2.putText(band, name, (6, LABEL_BAND), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 255, 2, cv2.LINE_AA)
        rows += [band, np.hstack([sheet_tile(sheet, label) for label in STRIP_VIEWS])]
    return np.vstack(rows)


def bone_age_strip(ages_years=(1, 3, 6, 9, 12, 15, 18), sex: str = "M", seed: int = 0) -> np.ndarray:
    """Hand PA at several bone ages, same child otherwise: the maturity signal a model must learn."""
    tiles = []
    for age in ages_years:
        months = min(age * 12, 227)
        r = render_view("Hand_PA", np.random.default_rng(seed), age_months=months, sex=sex, long_side_px=800)
        tiles.append(_tile(r.image, f"Hand PA {sex} {age} y"))
    return _grid(tiles, len(tiles))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest.phantoms", description=__doc__)
    parser.add_argument("--out", type=Path, help="output directory (created; re-runs skip verified files)")
    parser.add_argument("--studies", type=int, default=300, help="number of studies (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument(
        "--task",
        choices=("views", "bone_age", "fracture"),
        default="views",
        help="views: all 68 views (default); bone_age: hand PA only; fracture: wrist/forearm/elbow/ankle",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (default: all cores for big runs)"
    )
    parser.add_argument(
        "--contact-sheet", type=Path, help="also write a PNG with one labelled example per view"
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="an earlier contact sheet PNG: put a before/after strip of the same views above the new one",
    )
    parser.add_argument("--bone-age-strip", type=Path, help="also write a PNG of hand PA at 1-18 years")
    parser.add_argument(
        "--transfer-syntax",
        choices=sorted(SYNTAX_NAMES),
        help="write every instance in this syntax (default: a realistic mix; htj2k only on request)",
    )
    parser.add_argument(
        "--burned-in-text",
        action="store_true",
        help="print the patient's name, IDs and date into a corner of every image (BurnedInAnnotation=YES)",
    )
    args = parser.parse_args(argv)
    if args.out is None and args.contact_sheet is None and args.bone_age_strip is None:
        parser.error("nothing to do: give --out DIR (and/or --contact-sheet PNG / --bone-age-strip PNG)")
    if args.studies < 1:
        parser.error(f"--studies must be at least 1, got {args.studies}")
    for png in (args.contact_sheet, args.bone_age_strip):
        if png is not None and png.suffix.lower() != ".png":
            parser.error(f"{png}: image outputs must end in .png")
    if args.out is not None:
        start = time.perf_counter()
        syntax = str(SYNTAX_NAMES[args.transfer_syntax]) if args.transfer_syntax else None
        if args.task == "views":
            table = generate(
                args.out,
                studies=args.studies,
                seed=args.seed,
                progress=True,
                workers=args.workers,
                transfer_syntax=syntax,
                burned_in_text=args.burned_in_text,
            )
        else:
            table = generate_task_set(
                args.out,
                args.task,
                args.studies,
                seed=args.seed,
                progress=True,
                workers=args.workers,
                transfer_syntax=syntax,
                burned_in_text=args.burned_in_text,
            )
        seconds = time.perf_counter() - start
        print(
            f"{len(table)} instances in {table['study_instance_uid'].nunique()} studies, "
            f"{table['label_68'].nunique()} views, under {args.out} ({seconds:.1f} s, "
            f"{len(table) / max(seconds, 1e-9):.1f} instances/s)"
        )
    if args.contact_sheet is not None:
        args.contact_sheet.parent.mkdir(parents=True, exist_ok=True)
        sheet = contact_sheet(args.seed)
        if args.before is not None:
            before = cv2.imread(str(args.before), cv2.IMREAD_GRAYSCALE)
            if before is None:
                parser.error(f"--before {args.before}: not a readable image")
            strip = before_after(before, sheet)
            sheet = np.vstack([strip, np.full((12, sheet.shape[1]), 20, np.uint8), sheet])
        cv2.imwrite(str(args.contact_sheet), sheet)
        print(f"contact sheet: {args.contact_sheet}")
    if args.bone_age_strip is not None:
        args.bone_age_strip.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.bone_age_strip), bone_age_strip(seed=args.seed))
        print(f"bone-age strip: {args.bone_age_strip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The burned-in text detector (ingest.imaging.textmask) measured on phantoms that carry known text.

    .venv/bin/python bench/text_mask.py --studies 60 [--size 512] [--work DIR] [--json PATH]

Draws the same phantom studies twice (same seed): once plain, once with the patient's name, IDs and
date printed into a corner (``ingest.phantoms --burned-in-text``). The two differ only where text was
drawn, so every image has an exact text mask. Both are preprocessed as the shard writer does and
masked with ``mask_text``; it reports, pooled over all images:

- text pixels masked: of the text's pixels (in the preprocessed image), the share set to black;
- anatomy pixels lost: of the non-background, non-text pixels, the share masked (with text drawn,
  and on the plain images, where everything masked is a false alarm);
- images whose text was masked to 90% or more.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from results import write_results

from ingest.imaging.preprocess import PreprocessParams, preprocess_dataset, resize_pad, stored_values
from ingest.imaging.textmask import mask_text
from ingest.phantoms import generate

BACKGROUND = 20  # preprocessed level under which a pixel is background (air, collimation)


def text_pixels(with_text: pydicom.Dataset, plain: pydicom.Dataset, size: int) -> np.ndarray:
    """Where text was drawn, in the preprocessed image's geometry."""
    drawn = (stored_values(with_text) != stored_values(plain)).astype(np.float32)
    return resize_pad(drawn, size) > 0.25


def measure(studies: int, seed: int, size: int, work: Path) -> dict:
    plain_dir, text_dir = work / "plain", work / "text"
    start = time.perf_counter()
    truth = generate(plain_dir, studies=studies, seed=seed, workers=2)
    generate(text_dir, studies=studies, seed=seed, workers=2, burned_in_text=True)
    generated = time.perf_counter() - start
    params = PreprocessParams(size=size)
    totals = dict.fromkeys(
        ("text", "text_masked", "anatomy", "anatomy_lost", "plain_anatomy", "plain_anatomy_lost"), 0
    )
    images_90 = 0
    seconds = 0.0
    for rel in truth["path"]:
        plain_ds, text_ds = pydicom.dcmread(plain_dir / rel), pydicom.dcmread(text_dir / rel)
        text = text_pixels(text_ds, plain_ds, size)
        plain_image = preprocess_dataset(plain_ds, params)
        anatomy = (plain_image > BACKGROUND) & ~text
        begin = time.perf_counter()
        masked, _ = mask_text(preprocess_dataset(text_ds, params))
        seconds += time.perf_counter() - begin
        hit = masked == 0
        plain_masked, _ = mask_text(plain_image)
        plain_anatomy = plain_image > BACKGROUND
        totals["text"] += int(text.sum())
        totals["text_masked"] += int((hit & text).sum())
        totals["anatomy"] += int(anatomy.sum())
        totals["anatomy_lost"] += int((hit & anatomy).sum())
        totals["plain_anatomy"] += int(plain_anatomy.sum())
        totals["plain_anatomy_lost"] += int(((plain_masked == 0) & plain_anatomy).sum())
        images_90 += bool(text.sum()) and (hit & text).sum() >= 0.9 * text.sum()
    return {
        "images": len(truth),
        "studies": studies,
        "size": size,
        "text_pixels_masked": round(totals["text_masked"] / max(totals["text"], 1), 4),
        "anatomy_pixels_lost": round(totals["anatomy_lost"] / max(totals["anatomy"], 1), 5),
        "anatomy_pixels_lost_without_text": round(
            totals["plain_anatomy_lost"] / max(totals["plain_anatomy"], 1), 5
        ),
        "images_text_masked_90pct": int(images_90),
        "detector_ms_per_image": round(1000 * seconds / max(len(truth), 1), 2),
        "phantom_seconds": round(generated, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--size", type=int, default=512, help="preprocessed image side, as for shards")
    parser.add_argument("--work", type=Path, help="phantom directory to reuse (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here (docs/benchmarks/results/...)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="text-mask-") as tmp:
        results = measure(args.studies, args.seed, args.size, args.work or Path(tmp))
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        write_results(args.json, "text_mask", argv, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

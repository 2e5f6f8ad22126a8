"""Preprocessing throughput per transfer syntax: decode + preprocess + PNG encode, beside bare decode.

    .venv/bin/python bench/preprocess_throughput.py --n 8 --workers 2 [--json PATH]

Writes N synthetic 2000×2500 12-bit MONOCHROME2 radiographs per transfer syntax into a temp dir
(pydicom's ``ds.compress`` for the compressed ones), then times, per syntax:
- ``decode``: ``dcmread`` + first-frame decode, the ceiling no preprocessing can beat;
- ``full``: ``preprocess_file`` + ``encode_png``, what the shard writer does per image, split into its
  ``preprocess_file`` part (decode included) and the PNG encode;
both on one core (one process, OpenCV limited to one thread). The scaling is ``full``'s wall-time
rate in a pool of ``--workers`` processes over that in a pool of one, each the best of ``--repeat``
passes. Prints images/s, the ms per image of each part, and the full/decode ratio.
Single-core figures are CPU seconds of this one-thread process (not wall time, so other load on a
shared machine does not count), the best of ``--repeat`` runs of each image with decode and full
interleaved.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import (
    JPEG2000,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from results import write_results
from tqdm import tqdm

from ingest.imaging.png import encode_png
from ingest.imaging.preprocess import PreprocessParams, preprocess_file

# transfer syntax → keyword arguments for ds.compress (None: written uncompressed)
SYNTAXES = {
    "ExplicitVRLittleEndian": (ExplicitVRLittleEndian, None),
    "RLELossless": (RLELossless, {}),
    "JPEGLSLossless": (JPEGLSLossless, {}),
    "JPEGLSNearLossless": (JPEGLSNearLossless, {"jls_error": 2}),
    "JPEG2000Lossless": (JPEG2000Lossless, {}),
    "JPEG2000": (JPEG2000, {"j2k_cr": [20]}),
}


def synthetic_radiograph(rows: int, cols: int, seed: int) -> np.ndarray:
    """Smooth anatomy-like structure plus detector noise, 12 bits stored: compresses like a real image."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((rows // 100 + 2, cols // 100 + 2)).astype(np.float32)
    body = cv2.resize(coarse, (cols, rows), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 0.02, (rows, cols)).astype(np.float32)
    return np.clip((body + noise) * 3000 + 500, 0, 4095).astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, syntax: str) -> None:
    uid, compress_args = SYNTAXES[syntax]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = pixels.tobytes()
    if compress_args is not None:
        ds.compress(uid, **compress_args)
    ds.save_as(path, enforce_file_format=True)


def decode_only(path: Path) -> int:
    return decode_pixels(pydicom.dcmread(path), index=0).size


PARAMS = PreprocessParams()  # the paper's defaults: 512×512 uint8, no CLAHE (the shard writer's work)


def full_pipeline(path: Path) -> int:
    return len(encode_png(preprocess_file(path, PARAMS)))


def _one_thread() -> None:
    cv2.setNumThreads(1)  # one core per process: OpenCV would otherwise spread resize/CLAHE over all cores


def best_single_core_seconds(paths: list[Path], repeat: int) -> dict[str, float]:
    """Seconds per image (mean over images of each image's best run): decode, full and full's two parts."""
    totals = dict.fromkeys(("decode", "full", "preprocess", "png"), 0.0)
    for path in paths:
        best_decode, best_full = float("inf"), (float("inf"), 0.0, 0.0)
        for _ in range(repeat):
            start = time.process_time()
            decode_only(path)
            best_decode = min(best_decode, time.process_time() - start)
            start = time.process_time()
            img = preprocess_file(path, PARAMS)
            preprocessed = time.process_time()
            encode_png(img)
            end = time.process_time()
            best_full = min(best_full, (end - start, preprocessed - start, end - preprocessed))
        totals["decode"] += best_decode
        for key, seconds in zip(("full", "preprocess", "png"), best_full, strict=True):
            totals[key] += seconds
    return {key: total / len(paths) for key, total in totals.items()}


def scaling_rates(paths: list[Path], workers: int, repeat: int) -> tuple[float, float]:
    """Wall-time images/s of ``full`` in a pool of one process and in a pool of ``workers``: the best of
    ``repeat`` passes over ``paths``, the two pools' passes alternated so drift in the machine's other
    load reaches both alike."""
    with (
        ProcessPoolExecutor(1, initializer=_one_thread) as one,
        ProcessPoolExecutor(workers, initializer=_one_thread) as many,
    ):
        for pool, size in ((one, 1), (many, workers)):  # start the workers, import the codecs
            list(pool.map(full_pipeline, paths[:size]))
        best = [0.0, 0.0]
        for _ in range(repeat):
            for i, pool in enumerate((one, many)):
                start = time.perf_counter()
                list(pool.map(full_pipeline, paths, chunksize=1))
                best[i] = max(best[i], len(paths) / (time.perf_counter() - start))
        return best[0], best[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="images per transfer syntax (default 8)")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for the scaling run")
    parser.add_argument(
        "--syntax", action="append", choices=list(SYNTAXES), help="repeat to pick (default all)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per image, best kept (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/results.py's format)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.workers < 1 or args.repeat < 1:
        parser.error("--n, --workers and --repeat must be at least 1")
    _one_thread()
    syntaxes = args.syntax or list(SYNTAXES)
    images = [synthetic_radiograph(args.rows, args.cols, seed) for seed in range(args.n)]
    print(
        f"{args.n} images of {args.cols}×{args.rows} per syntax; full = decode + preprocess + PNG encode; "
        f"pydicom {pydicom.__version__}, {os.cpu_count()} cores"
    )
    scaled_column = f"wall/s {args.workers}p"
    header = (
        f"{'transfer syntax':<24}{'MB/img':>8}{'decode ms':>11}{'prep ms':>9}{'png ms':>8}"
        f"{'decode/s 1c':>13}{'full/s 1c':>11}{'full/decode':>13}{'wall/s 1p':>11}{scaled_column:>12}"
        f"{'scaling':>9}"
    )
    rows, figures = [], []
    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        for syntax in syntaxes:
            paths = [Path(tmp) / f"{syntax}-{i}.dcm" for i in range(args.n)]
            for path, pixels in zip(tqdm(paths, desc=f"writing {syntax}", leave=False), images, strict=True):
                write_dicom(path, pixels, syntax)
            full_pipeline(paths[0])  # warm-up: codec plugin imports, OpenCV init
            megabytes = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
            seconds = best_single_core_seconds(paths, args.repeat)
            decode, full = 1 / seconds["decode"], 1 / seconds["full"]
            # preprocess_file decodes too: its share beyond the bare decode is the preprocessing proper
            preprocessing_ms = (seconds["preprocess"] - seconds["decode"]) * 1000
            one, scaled = scaling_rates(paths, args.workers, args.repeat)
            rows.append(
                f"{syntax:<24}{megabytes:>8.2f}{seconds['decode'] * 1000:>11.1f}{preprocessing_ms:>9.1f}"
                f"{seconds['png'] * 1000:>8.1f}{decode:>13.2f}{full:>11.2f}{full / decode:>13.2f}"
                f"{one:>11.2f}{scaled:>12.2f}{scaled / one:>8.2f}×"
            )
            figures.append(
                {
                    "transfer_syntax": syntax,
                    "mb_per_image": round(megabytes, 3),
                    "decode_ms": round(seconds["decode"] * 1000, 2),
                    "preprocess_ms": round(preprocessing_ms, 2),
                    "png_ms": round(seconds["png"] * 1000, 2),
                    "full_over_decode": round(full / decode, 3),
                    "images_per_s_1_process": round(one, 2),
                    f"images_per_s_{args.workers}_processes": round(scaled, 2),
                    "scaling": round(scaled / one, 3),
                }
            )
    print(header, *rows, sep="\n")
    if args.json:
        settings = {"n": args.n, "rows": args.rows, "cols": args.cols, "workers": args.workers}
        settings |= {"repeat": args.repeat, "pydicom": pydicom.__version__}
        write_results(args.json, "preprocess_throughput", argv, {"settings": settings, "syntaxes": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

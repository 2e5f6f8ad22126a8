"""JPEG 2000 and HTJ2K decoded at the resolution the output needs (``--decode reduced``) against the full
decode (``--decode full``, the default): time per image and how far the two outputs differ.

    .venv/bin/python bench/decode_levels.py --n 4 [--json PATH]

Writes N synthetic 2500×2000 12-bit radiographs (smooth structure plus Gaussian detector noise,
σ = each ``--noise`` value of full scale) per syntax: JPEG 2000 lossless (pydicom's encoder,
OpenJPEG) and HTJ2K lossless (OpenJPH through imagecodecs). Each image goes through
``preprocess_file`` to the paper's 512 px with each decode mode, on one core: CPU seconds of this
one-thread process, the best of ``--repeat`` runs, the two modes interleaved. Fidelity compares
the reduced output with the full one: mean absolute difference (MAD, grey levels of 255) and PSNR
in dB. The goal for making ``reduced`` the default is MAD ≤ 1 and PSNR ≥ 45 dB at ≥ 3× the speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pydicom
from preprocess_throughput import write_dicom
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless
from results import write_results
from tqdm import tqdm

from ingest.imaging.preprocess import PreprocessParams, preprocess_file

SYNTAXES = ("JPEG2000Lossless", "HTJ2KLossless")
MODES = ("full", "reduced")


def radiograph(rows: int, cols: int, noise: float, seed: int) -> np.ndarray:
    """Smooth anatomy-like structure plus Gaussian detector noise, 12 bits stored."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((rows // 100 + 2, cols // 100 + 2)).astype(np.float32)
    body = cv2.resize(coarse, (cols, rows), interpolation=cv2.INTER_CUBIC)
    body += rng.normal(0, noise, (rows, cols)).astype(np.float32)
    return np.clip(body * 3000 + 500, 0, 4095).astype(np.uint16)


def write_image(path: Path, pixels: np.ndarray, syntax: str) -> None:
    if syntax == "JPEG2000Lossless":
        write_dicom(path, pixels, syntax)
        return
    write_dicom(path, pixels, "ExplicitVRLittleEndian")  # pydicom has no HTJ2K encoder
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(np.ascontiguousarray(pixels), reversible=True)])
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(path, enforce_file_format=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure(paths: list[Path], repeat: int) -> dict:
    seconds = dict.fromkeys(MODES, 0.0)
    mad, worst_psnr = [], float("inf")
    for path in paths:
        best = dict.fromkeys(MODES, float("inf"))
        outputs = {}
        for _ in range(repeat):
            for mode in MODES:
                start = time.process_time()
                outputs[mode] = preprocess_file(path, PreprocessParams(decode=mode))
                best[mode] = min(best[mode], time.process_time() - start)
        for mode in MODES:
            seconds[mode] += best[mode] / len(paths)
        mad.append(float(np.abs(outputs["full"].astype(np.int16) - outputs["reduced"]).mean()))
        worst_psnr = min(worst_psnr, psnr(outputs["full"], outputs["reduced"]))
    return {
        "ms_per_image": {mode: round(1000 * s, 1) for mode, s in seconds.items()},
        "speedup": round(seconds["full"] / seconds["reduced"], 2),
        "mad_mean": round(float(np.mean(mad)), 2),
        "mad_max": round(float(np.max(mad)), 2),
        "psnr_min_db": round(worst_psnr, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4, help="images per syntax (default 4)")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2000)
    parser.add_argument(
        "--noise", type=float, nargs="+", default=[0.0, 0.005, 0.02], help="detector noise σ values"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per image and mode, best kept (default 3)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/results.py's format)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for syntax in SYNTAXES:
            for noise in args.noise:
                paths = []
                for i in tqdm(range(args.n), desc=f"write {syntax} σ={noise}", leave=False):
                    path = Path(tmp) / f"{syntax}-{noise}-{i}.dcm"
                    write_image(path, radiograph(args.rows, args.cols, noise, seed=i), syntax)
                    paths.append(path)
                f = figures[f"{syntax} σ={noise}"] = measure(paths, args.repeat) | {"noise": noise}
                ms = f["ms_per_image"]
                print(
                    f"{syntax:18} σ={noise:<5} full {ms['full']:7.1f} ms  reduced {ms['reduced']:6.1f} ms"
                    f"  {f['speedup']:5.2f}×  MAD {f['mad_mean']:.2f} (max {f['mad_max']:.2f})"
                    f"  PSNR ≥ {f['psnr_min_db']:.1f} dB"
                )
    if args.json:
        settings = {"n": args.n, "rows": args.rows, "cols": args.cols, "size": 512}
        write_results(args.json, "decode_levels", argv, {"settings": settings, "rows": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

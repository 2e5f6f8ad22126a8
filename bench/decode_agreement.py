"""Does a view model answer the same when its inputs are decoded at reduced resolution?

    .venv/bin/python bench/decode_agreement.py RUN/best --shards demo/ingest/shards-7 \
        --catalog demo/ingest/catalog --json docs/benchmarks/results/decode_agreement.json

For every sample of one split of the shard set the model was trained on (default ``val``), the
source DICOM (found in the catalog by the sha256 the shard records) is preprocessed twice with the
shard set's parameters, once with ``decode=full`` and once with ``decode=reduced``
(``ingest.imaging.preprocess``), brought to the model's input as Serve does
(``deploy.inputs.Recipe``), and classified (``deploy.models.Predictor``). Reported: the share of
samples given the same label, overall and among the JPEG 2000 files (the only ones a reduced decode
changes), and the mean absolute difference between the two model inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pydicom
from results import write_results

from deploy.models import Predictor, inspect_checkpoint
from ingest.dataset.catalog import read_catalog
from ingest.imaging.jpeg2000 import JPEG2000_SYNTAXES
from ingest.imaging.preprocess import preprocess_dataset


def split_hashes(shards: Path, split: str) -> list[str]:
    """The source-file sha256 of every sample in the split's shards, in shard order."""
    hashes = []
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    hashes.append(json.load(tar.extractfile(member))["sha256"])
    return hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a view model checkpoint directory (RUN/best)")
    parser.add_argument("--shards", required=True, type=Path, help="the shard set it was trained on")
    parser.add_argument("--catalog", required=True, help="the catalog the shards were written from")
    parser.add_argument("--split", default="val", help="which split's samples (default val)")
    parser.add_argument("--json", type=Path, help="write the figures here (bench/results.py's format)")
    args = parser.parse_args(argv)
    manifest = json.loads((args.shards / "manifest.json").read_text())
    granularity = manifest["granularity"]
    spec = inspect_checkpoint(
        f"view_{granularity}", args.checkpoint, view_preprocessing=manifest["preprocessing"]
    )
    predictor = Predictor(spec)
    catalog = read_catalog(args.catalog, columns=["sha256", "path", "transfer_syntax"]).set_index("sha256")
    hashes = split_hashes(args.shards, args.split)
    rows = catalog.loc[hashes]
    modes = {mode: dataclasses.replace(spec.recipe.params, decode=mode) for mode in ("full", "reduced")}
    inputs = {mode: [] for mode in modes}
    for path in rows["path"]:
        dataset = pydicom.dcmread(path)
        for mode, params in modes.items():
            inputs[mode].append(spec.recipe.apply(preprocess_dataset(dataset, params)))
    labels = {
        mode: [r["label"] for r in predictor.predict(np.stack(images))] for mode, images in inputs.items()
    }
    same = np.array(labels["full"]) == np.array(labels["reduced"])
    is_j2k = rows["transfer_syntax"].isin(JPEG2000_SYNTAXES).to_numpy()
    difference = np.array(
        [
            np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()
            for a, b in zip(inputs["full"], inputs["reduced"], strict=True)
        ]
    )
    results = {
        "checkpoint": str(args.checkpoint),
        "granularity": granularity,
        "split": args.split,
        "samples": len(rows),
        "jpeg2000_samples": int(is_j2k.sum()),
        "same_label": round(float(same.mean()), 4),
        "same_label_jpeg2000": round(float(same[is_j2k].mean()), 4) if is_j2k.any() else None,
        "input_mad_jpeg2000": round(float(np.mean(np.array(difference)[is_j2k])), 3)
        if is_j2k.any()
        else None,
    }
    print(
        f"{results['samples']} {args.split} samples ({results['jpeg2000_samples']} JPEG 2000): same label "
        f"{results['same_label']:.1%} overall, {results['same_label_jpeg2000']:.1%} of JPEG 2000; "
        f"model inputs differ by {results['input_mad_jpeg2000']} grey levels on average (JPEG 2000)"
    )
    if args.json:
        write_results(args.json, "decode_agreement", argv, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Scale check: a catalog of N synthetic header rows (no pixels) through labelling, balancing, splitting.

    .venv/bin/python bench/catalog_scale.py --rows 1000000 [--json PATH]

Rows are drawn from realistic header vocabularies (body parts, view positions, descriptions in
several spellings, some missing) so labelling sees a realistic number of distinct combinations.
Prints wall time per step and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from results import write_results

from ingest.dataset.balance import BalanceConfig, balance
from ingest.dataset.labels import label_catalog
from ingest.dataset.taxonomy import load_taxonomy


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_headers(rows: int, seed: int) -> pd.DataFrame:
    taxonomy = load_taxonomy()
    rng = np.random.default_rng(seed)
    views = taxonomy.views
    view = rng.integers(0, len(views), rows)
    spellings = [
        lambda d: d,
        str.upper,
        str.lower,
        lambda d: "XR " + d.upper(),
        lambda d: d.replace(" ", "_"),
    ]
    description = np.array([[s(v.description) for s in spellings] for v in views], dtype=object)
    body_part = np.array([v.body_part for v in views], dtype=object)
    view_position = np.array([v.view_position for v in views], dtype=object)
    spelling = rng.integers(0, len(spellings), rows)
    missing_body = rng.random(rows) < 0.05
    patients = rng.integers(0, rows // 4, rows)
    days = rng.integers(0, 9 * 365, rows)
    df = pd.DataFrame(
        {
            "sop_instance_uid": np.char.add("1.2.826.0.1.3680043.10.1.", np.arange(rows).astype(str)),
            "study_instance_uid": np.char.add(
                "1.2.826.0.1.3680043.10.2.", (np.arange(rows) // 2).astype(str)
            ),
            "patient_id_hash": np.char.add("p", patients.astype(str)),
            "study_date": [date(2014, 1, 1) + timedelta(days=int(d)) for d in days],
            "modality": np.where(rng.random(rows) < 0.5, "CR", "DX"),
            "body_part": np.where(missing_body, None, body_part[view]),
            "view_position": view_position[view],
            "laterality": np.where(rng.random(rows) < 0.5, "L", "R"),
            "study_description": description[view, spelling],
            "series_description": description[view, 0],
            "protocol_name": description[view, (spelling + 1) % len(spellings)],
            "procedure_code": None,
            "status": "ok",
            "reason": "",
        }
    )
    for column in ("label_68", "label_30", "label_7", "label_source"):
        df[column] = None
    return df


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/results.py's format)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    df = synthetic_headers(args.rows, args.seed)
    t1 = time.perf_counter()
    labelled = label_catalog(df, load_taxonomy())
    t2 = time.perf_counter()
    selected, report = balance(labelled, BalanceConfig(granularity=7, seed=args.seed))
    t3 = time.perf_counter()
    print(f"rows: {args.rows:,}  ok after labelling: {(labelled['status'] == 'ok').sum():,}")
    print("| step | seconds |\n|---|---|")
    print(f"| build synthetic headers | {t1 - t0:.1f} |")
    print(f"| label (7/30/68) | {t2 - t1:.1f} |")
    print(f"| balance + split (7C, 10,000/class) | {t3 - t2:.1f} |")
    print(f"peak RSS: {peak_rss_mib():,.0f} MiB")
    print(report.summary())
    if args.json:
        write_results(
            args.json,
            "catalog_scale",
            argv,
            {
                "rows": args.rows,
                "ok_after_labelling": int((labelled["status"] == "ok").sum()),
                "seconds": {
                    "build synthetic headers": round(t1 - t0, 2),
                    "label (7/30/68)": round(t2 - t1, 2),
                    "balance + split (7C, 10,000/class)": round(t3 - t2, 2),
                },
                "peak_rss_mib": round(peak_rss_mib()),
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

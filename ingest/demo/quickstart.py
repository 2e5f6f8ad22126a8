"""The embedded demo's ingest half: phantom PACS → ``ingest pull`` → catalog + shards, on this machine.

``python -m ingest.demo --work demo --studies 400`` generates phantom studies (once; kept in
``WORK/phantoms``), starts Orthanc on free 127.0.0.1 ports with our AE title registered as a C-MOVE
destination, runs the whole ingest stage against it exactly as against a hospital PACS, prints the
label report and where the shards are, and stops Orthanc. Re-running resumes: nothing is fetched twice.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from ingest.dataset.balance import BalanceConfig
from ingest.dataset.catalog import read_catalog
from ingest.dataset.labels import label_report
from ingest.dataset.shards import format_manifest_summary
from ingest.demo.orthanc import OrthancError, OrthancServer, free_port
from ingest.demo.pacs import DemoDataError, prepare_data
from ingest.dicom.scu import PacsConfig, PacsError
from ingest.imaging.preprocess import PreprocessParams
from ingest.pull import PullConfig, pull

# Phantom study dates span 2014-2022; this splits them roughly 3:1 like the paper's 2018-07 cut.
DEMO_REFERENCE_DATE = date(2020, 7, 1)


def run(work: Path, *, studies: int, seed: int, per_class: int, image_size: int, method: str) -> Path:
    """Run the demo ingest; returns the shard directory."""
    files = prepare_data(work / "phantoms", studies, seed)
    scp_port = free_port()
    with OrthancServer(
        work / "orthanc", aet="DEMOPACS", modalities={"pedxray": ("PEDXRAY", "127.0.0.1", scp_port)}
    ) as server:
        server.upload(files)
        print(
            f"demo PACS: DEMOPACS@127.0.0.1:{server.dicom_port} (web UI {server.url}/), "
            f"{server.instance_count()} instances",
            flush=True,
        )
        cfg = PullConfig(
            pacs=PacsConfig("127.0.0.1", server.dicom_port, "DEMOPACS"),
            work_dir=work / "ingest",
            method=method,
            scp_port=scp_port,
            modalities=("CR", "DX"),
            balance=BalanceConfig(
                granularity=7, per_class=per_class, reference_date=DEMO_REFERENCE_DATE, seed=seed
            ),
            preprocessing=PreprocessParams(size=image_size),
            shard_size=256,
        )
        result = pull(cfg, id_salt=f"demo-{seed}", scheduler="sync" if studies <= 50 else None)
    print(f"retrieval: {result.retrieval}")
    print(label_report(read_catalog(cfg.catalog_path), top=10))
    print(format_manifest_summary(result.manifest, cfg.shards_dir))
    return cfg.shards_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("demo"), help="demo directory (default ./demo)")
    parser.add_argument("--studies", type=int, default=400, help="phantom studies (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=100, help="shard instances per 7-class view")
    parser.add_argument("--image-size", type=int, default=256, help="preprocessed image side (paper: 512)")
    parser.add_argument("--method", choices=("move", "get"), default="move")
    args = parser.parse_args(argv)
    try:
        shards = run(
            args.work,
            studies=args.studies,
            seed=args.seed,
            per_class=args.per_class,
            image_size=args.image_size,
            method=args.method,
        )
    except (OrthancError, DemoDataError, PacsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"shards: {shards}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

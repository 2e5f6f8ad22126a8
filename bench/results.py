"""The JSON every benchmark writes with ``--json PATH``: what ran, on which machine, and its figures.

    {"benchmark": "catalog_scale", "command": "python bench/catalog_scale.py --rows 200000",
     "machine": {...}, "results": ...}

``bench/report.py`` renders these files as the tables in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path


def machine() -> dict:
    """The facts a reader needs to compare two runs: CPUs, platform, Python, load when it ran."""
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def write_results(path: Path, benchmark: str, argv: list[str] | None, results: object) -> None:
    """Write one benchmark run's JSON (atomically: a temp file renamed into place)."""
    args = sys.argv[1:] if argv is None else argv
    document = {
        "benchmark": benchmark,
        "command": shlex.join(["python", f"bench/{benchmark}.py", *args]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)

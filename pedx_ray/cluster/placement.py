"""Which node each training worker ran on: ``RUN/workers/rank-<r>.json``, one entry per (re)start.

Each rank appends its node to its own file when its training loop starts, so a run's record shows the
workers spread over nodes and, after a failure, where each restart ran and from which epoch."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ingest.files import write_json_atomic

WORKERS_DIR = "workers"


def record_worker_start(run_dir: Path, rank: int, start_epoch: int) -> None:
    """Append this worker's node (Ray node id and labels, host, pid) and start epoch to its rank file."""
    import ray

    context = ray.get_runtime_context()
    path = Path(run_dir) / WORKERS_DIR / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    starts = json.loads(path.read_text())["starts"] if path.exists() else []
    starts.append(
        {
            "node_id": context.get_node_id(),
            "node_labels": context.get_node_labels(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "start_epoch": start_epoch,
            "time": time.time(),
        }
    )
    write_json_atomic(path, {"rank": rank, "starts": starts})


def read_worker_starts(run_dir: Path) -> dict[int, list[dict]]:
    """Rank → its starts (oldest first), as ``record_worker_start`` wrote them."""
    records = (json.loads(p.read_text()) for p in sorted((Path(run_dir) / WORKERS_DIR).glob("rank-*.json")))
    return {record["rank"]: record["starts"] for record in records}

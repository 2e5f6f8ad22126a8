"""Which node each training worker ran on: ``RUN/workers/rank-<r>.json``, one entry per (re)start.

Each rank appends its node to its own file when its training loop starts, so a run's record shows the
workers spread over nodes and, after a failure, where each restart ran and from which epoch."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ingest import storage

WORKERS_DIR = "workers"


def record_worker_start(run_dir: Path | str, rank: int, start_epoch: int) -> None:
    """Append this worker's node (Ray node id and labels, host, pid) and start epoch to its rank file
    (``run_dir`` a directory or an object-store URI, ingest.storage)."""
    import ray

    context = ray.get_runtime_context()
    path = storage.join(run_dir, WORKERS_DIR, f"rank-{rank}.json")
    starts = storage.read_json(path)["starts"] if storage.exists(path) else []
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
    storage.makedirs(storage.join(run_dir, WORKERS_DIR))
    storage.write_json_atomic(path, {"rank": rank, "starts": starts})


def read_worker_starts(run_dir: Path | str) -> dict[int, list[dict]]:
    """Rank → its starts (oldest first), as ``record_worker_start`` wrote them."""
    directory = storage.join(run_dir, WORKERS_DIR)
    names = sorted(n for n in storage.list_files(directory) if n.startswith("rank-") and n.endswith(".json"))
    records = (storage.read_json(storage.join(directory, name)) for name in names)
    return {record["rank"]: record["starts"] for record in records}

"""``python -m pedx_ray.cluster up``: multi-node Ray and Dask clusters on this machine until Ctrl-C.

Starts a Ray head plus ``--ray-workers`` worker nodes (token auth on) and a Dask scheduler plus
``--dask-workers`` workers, writes ``--env-file`` (shell ``export`` lines: the dashboard and GCS addresses,
``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``, ``DASK_SCHEDULER``) once all are up, and runs until
SIGINT or SIGTERM, which stop every process it started (by pid) and remove the env file.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from ingest.files import write_atomic
from pedx_ray.cluster.local import ClusterError, LocalDaskCluster, LocalRayCluster, NodeSpec

# SIGTERM stops like Ctrl-C, also while the clusters are starting: unwinding stops what was started.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def env_lines(ray_cluster: LocalRayCluster, dask_cluster: LocalDaskCluster | None) -> str:
    env = ray_cluster.client_env() | ({"DASK_SCHEDULER": dask_cluster.address} if dask_cluster else {})
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pedx_ray.cluster", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the clusters and keep them up until Ctrl-C / SIGTERM")
    up.add_argument(
        "--ray-workers", type=int, default=2, help="Ray worker nodes besides the head (default 2)"
    )
    up.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each Ray node offers (default 1)")
    up.add_argument(
        "--head-cpus", type=int, default=1, help="CPUs of the head node (default 1; 0 keeps work off it)"
    )
    up.add_argument("--dask-workers", type=int, default=2, help="Dask workers, 1 thread each (0: no Dask)")
    up.add_argument("--env-file", type=Path, required=True, help="where to write the clusters' env exports")
    return parser


def up(args: argparse.Namespace) -> int:
    previous = {signum: signal.signal(signum, _raise_keyboard_interrupt) for signum in _STOP_SIGNALS}
    try:
        with ExitStack() as stack:
            ray_cluster = stack.enter_context(
                LocalRayCluster(
                    head=NodeSpec("head", num_cpus=args.head_cpus),
                    workers=[
                        NodeSpec(f"worker-{i + 1}", num_cpus=args.cpus_per_node)
                        for i in range(args.ray_workers)
                    ],
                )
            )
            dask_cluster = (
                stack.enter_context(LocalDaskCluster(args.dask_workers)) if args.dask_workers else None
            )
            write_atomic(args.env_file, env_lines(ray_cluster, dask_cluster))
            stack.callback(args.env_file.unlink, missing_ok=True)
            nodes = ", ".join(f"{node.spec.name} (pid {node.pid})" for node in ray_cluster.nodes)
            print(
                f"Ray: {ray_cluster.gcs_address}, dashboard {ray_cluster.dashboard_url}; nodes {nodes}\n"
                + (f"Dask: {dask_cluster.address}\n" if dask_cluster else "")
                + f"env: source {args.env_file}\nCtrl-C (or SIGTERM) stops everything.",
                flush=True,
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("clusters stopped", flush=True)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return up(args)


if __name__ == "__main__":
    raise SystemExit(main())

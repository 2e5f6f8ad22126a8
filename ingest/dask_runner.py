"""Run independent ingest tasks on Dask: a LocalCluster by default, a real cluster with --scheduler.

Tasks are submitted with a bounded number in flight, so the client never holds more than a few
results at once whatever the number of tasks (millions of files), and a tqdm bar shows progress.
``--scheduler sync`` runs everything in this process, for debugging and small jobs.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

SYNC = "sync"


def add_scheduler_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="Dask scheduler address (tcp://host:8786) to run on a cluster; default: a LocalCluster "
        f"with one worker process per core; '{SYNC}' runs in this process",
    )
    parser.add_argument(
        "--dask-workers",
        type=int,
        default=None,
        help="LocalCluster worker processes (default: number of cores)",
    )


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None):
    """A distributed Client for ``scheduler`` (None: a LocalCluster on this machine), closed on exit.

    Yields None for ``sync``: pass it on to ``run_tasks`` with the same ``scheduler``.
    """
    from dask.distributed import Client, LocalCluster

    if scheduler == SYNC:
        yield None
        return
    if scheduler and scheduler != SYNC:
        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    # Workers are processes because pydicom decoding and hashing hold the GIL.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with (
        LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def run_tasks(
    fn: Callable,
    tasks: Iterable[tuple],
    *,
    total: int | None = None,
    scheduler: str | None = None,
    client=None,
    desc: str = "",
    unit: str = "task",
    progress: bool = True,
    max_in_flight: int | None = None,
) -> Iterator:
    """Yield ``fn(*task)`` for every task, in completion order.

    Uses ``client`` when given, else opens one for ``scheduler``. An exception in a task is raised
    here with the task's own traceback; ``fn`` should turn expected bad input into results instead.
    """
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    try:
        if scheduler == SYNC and client is None:
            for task in tasks:
                yield fn(*task)
                bar.update()
            return
        if client is not None:
            yield from _submit_bounded(client, fn, tasks, bar, max_in_flight)
            return
        with dask_client(scheduler) as own_client:
            yield from _submit_bounded(own_client, fn, tasks, bar, max_in_flight)
    finally:
        bar.close()


def _submit_bounded(client, fn, tasks, bar, max_in_flight):
    from dask.distributed import as_completed

    limit = max_in_flight or 4 * max(1, len(client.scheduler_info().get("workers", {})) or 1)
    task_iter = iter(tasks)
    pending = as_completed()
    in_flight = 0
    for task in task_iter:
        pending.add(client.submit(fn, *task, pure=False))
        in_flight += 1
        if in_flight >= limit:
            break
    for future in pending:
        result = future.result()
        future.release()
        bar.update()
        yield result
        next_task = next(task_iter, None)
        if next_task is not None:
            pending.add(client.submit(fn, *next_task, pure=False))

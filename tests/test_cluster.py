"""Jobs on a real multi-node Ray cluster (``ray_multinode``: head + 2 worker nodes, token auth on),
submitted through ``JobSubmissionClient`` as `ray job submit` does; plus the local-cluster library and the
entry points' dependency check without a cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_pretrain import write_tiny_shards

from ingest import storage
from ingest.dataset.catalog import read_catalog, scan
from ingest.dataset.shards import write_shards
from pedx_ray.cluster.local import NODE_LABEL, LocalDaskCluster, NodeSpec
from pedx_ray.cluster.placement import read_worker_starts
from pedx_ray.dependencies import EXIT_MISSING
from pedx_ray.models import METRICS_FILE, MODEL_FILE, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
JOB_DEADLINE_S = 240


@pytest.fixture
def run_storage(tmp_path) -> str:
    """Where cluster jobs keep their runs (--storage): a directory every node of this machine sees."""
    return str(tmp_path / "runs")


@pytest.fixture(scope="module")
def cluster_shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("cluster-shards"), size=64)


def job_runtime_env() -> dict:
    """configs/runtime_env.yaml with the project root as the working_dir, as `ray job submit` run from it."""
    runtime_env = yaml.safe_load((ROOT / "configs" / "runtime_env.yaml").read_text())
    return runtime_env | {"working_dir": str(ROOT)}


def submit_pretraining(cluster, shards: Path, storage: str, name: str, *extra: str) -> tuple:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers)
    entrypoint = (
        f"python -m pedx_ray.pretrain --shards {shards} --arch tiny_cnn --image-size 64 --batch-size 14 "
        f"--lr 1e-3 --warmup-epochs 1 --num-workers 2 --cpus-per-worker 1 --storage {storage} --name {name} "
        + " ".join(extra)
    )
    return client, client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env())


def wait_for_job(client, job_id: str, deadline_s: float = JOB_DEADLINE_S) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still running after {deadline_s} s:\n{client.get_job_logs(job_id)}")


def poll(predicate, deadline_s: float, what: str):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")


@pytest.mark.slow
def test_pretraining_job_runs_its_workers_on_two_nodes_and_exports_to_object_storage(
    ray_multinode, cluster_shards, s3_bucket, tmp_path
):
    # The run lives on the S3 server (moto on loopback): checkpoints, worker records and best/.
    run_storage = f"{s3_bucket}/{tmp_path.name}/runs"
    client, job_id = submit_pretraining(ray_multinode, cluster_shards, run_storage, "two-nodes", "--epochs 2")
    status = wait_for_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs
    run_dir = f"{run_storage}/two-nodes"
    starts = read_worker_starts(run_dir)
    assert sorted(starts) == [0, 1]
    nodes = {rank: s[-1]["node_id"] for rank, s in starts.items()}
    assert nodes[0] != nodes[1]  # one 1-CPU worker per node: Ray had to spread them
    assert set(nodes.values()) <= set(ray_multinode.node_ids().values())
    assert storage.is_file(f"{run_dir}/best/{MODEL_FILE}") and "best checkpoint (epoch" in logs
    model, config = load_checkpoint(f"{run_dir}/best")  # served from there as from a directory
    assert config.name == "two-nodes" and storage.read_json(f"{run_dir}/best/{METRICS_FILE}")["epoch"] in (
        1,
        2,
    )


@pytest.mark.slow
def test_killed_worker_node_resumes_the_run_from_its_last_checkpoint(
    ray_multinode, cluster_shards, run_storage
):
    client, job_id = submit_pretraining(
        ray_multinode, cluster_shards, run_storage, "node-lost", "--epochs 5", "--max-failures 2"
    )
    run_dir = Path(run_storage) / "node-lost"
    # The second checkpoint's directory appears once the first is registered with the controller.
    poll(lambda: (run_dir / "checkpoint_epoch_0002").is_dir(), JOB_DEADLINE_S, "the second checkpoint")
    # A node that runs a worker but is not the head (losing the head ends the job: it runs the driver).
    nodes = {start[-1]["node_labels"][NODE_LABEL] for start in read_worker_starts(run_dir).values()}
    victim = sorted(nodes - {ray_multinode.head_spec.name})[0]
    os.kill(ray_multinode.node(victim).raylet_pid(), signal.SIGKILL)
    # A replacement node, as an autoscaler would add: the restarted run needs two worker CPUs again.
    ray_multinode.add_worker(NodeSpec(f"{victim}-replacement"))

    status = wait_for_job(client, job_id)
    assert status == "SUCCEEDED", client.get_job_logs(job_id)
    starts = read_worker_starts(run_dir)
    restarts = [s[-1]["start_epoch"] for s in starts.values() if len(s) > 1]
    assert restarts and all(epoch >= 1 for epoch in restarts)  # resumed from a checkpoint, not epoch 0
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_epoch_*"))
    assert checkpoints[-1] == "checkpoint_epoch_0005"
    assert (run_dir / "best" / MODEL_FILE).is_file()


@pytest.mark.slow
def test_a_run_cut_short_by_a_head_restart_continues_with_resume(ray_multinode, cluster_shards, run_storage):
    client, job_id = submit_pretraining(ray_multinode, cluster_shards, run_storage, "head-lost", "--epochs 6")
    run_dir = Path(run_storage) / "head-lost"
    poll(lambda: (run_dir / "checkpoint_epoch_0003").is_dir(), JOB_DEADLINE_S, "the third checkpoint")
    # The whole cluster goes, head first in effect: the job's driver dies with it.
    ray_multinode.stop()
    ray_multinode.start()
    assert sorted(ray_multinode.node_ids()) == ["head", "worker-1", "worker-2"]

    client, job_id = submit_pretraining(ray_multinode, cluster_shards, run_storage, "head-lost", "--resume")
    status = wait_for_job(client, job_id)
    assert status == "SUCCEEDED", client.get_job_logs(job_id)
    starts = read_worker_starts(run_dir)
    assert all(s[0]["start_epoch"] == 0 for s in starts.values())
    assert all(s[-1]["start_epoch"] >= 2 for s in starts.values()), starts  # from a checkpoint, not epoch 0
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*"))[-1] == "checkpoint_epoch_0006"


@pytest.mark.slow
def test_dask_cluster_runs_tasks_on_its_workers_and_stops_them():
    from distributed import Client

    with LocalDaskCluster(n_workers=2) as dask_cluster:
        processes = [dask_cluster.scheduler, *dask_cluster.workers]
        with Client(dask_cluster.address) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        temp_dir = dask_cluster.temp_dir
    assert all(p.poll() is not None for p in processes) and not temp_dir.exists()


def test_entry_point_on_a_python_without_the_dependencies_says_what_is_missing():
    # -S: this interpreter without its site-packages, i.e. a node's Python lacking the project's packages.
    result = subprocess.run(
        [sys.executable, "-S", "-m", "pedx_ray.pretrain", "--help"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == EXIT_MISSING, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "lacks torch" in result.stderr and "pip install" in result.stderr


# ---------------------------------------------------------------- faults on the Dask cluster

DASK_VIEWS = (
    "Abdomen_KUB",
    "Ankle_AP",
    "C_Spine_AP",
    "Chest_Clavicle",
    "Cochlea",
    "Elbow_Lateral",
    "Pelvis_AP",
)


@pytest.fixture(scope="module")
def dask_spool(tmp_path_factory) -> tuple[Path, object]:
    """84 radiographs of 7 views (selected by a site code table) large enough that preprocessing takes
    a moment per shard, so a worker can be killed while it holds tasks."""
    from datetime import date

    from factories import radiograph, write

    from ingest.dataset.taxonomy import load_taxonomy

    root = tmp_path_factory.mktemp("dask-faults")
    for v, view in enumerate(DASK_VIEWS):
        for i in range(12):
            write(
                radiograph(
                    patient_id=f"P{v}-{i}",
                    study_key=f"{view}-{i}",
                    study_date=date(2016 + i % 2, 1 + i, 10) if i < 8 else date(2019, i - 7, 5),
                    procedure_code=f"SITE-{v}",
                    body_part=None,
                    view_position=None,
                    study_description="XR",
                    shape=(900, 720),
                ),
                root / "spool",
            )
    table = root / "codes.csv"
    table.write_text("code,label_68\n" + "".join(f"SITE-{v},{view}\n" for v, view in enumerate(DASK_VIEWS)))
    return root, load_taxonomy(code_table=table)


def run_while_killing_a_busy_worker(dask_cluster, run) -> None:
    """Run ``run(client)`` in a thread; SIGKILL (the whole process group of) the first Dask worker seen
    processing a task while it runs, and assert the kill landed before the run ended."""
    import threading

    from distributed import Client

    with Client(dask_cluster.address) as client:
        errors: list[BaseException] = []

        def target():
            try:
                run(client)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        busy = poll(lambda: [w for w, tasks in client.processing().items() if tasks], 120, "a busy worker")
        victim_name = client.scheduler_info()["workers"][busy[0]]["name"]
        victim = dask_cluster.workers[int(str(victim_name).rpartition("-")[2]) - 1]
        os.killpg(victim.pid, signal.SIGKILL)
        assert thread.is_alive(), "the run ended before the worker was killed"
        thread.join(timeout=300)
        assert not thread.is_alive() and not errors, errors


@pytest.mark.slow
def test_killed_dask_worker_during_scan_and_shards_loses_and_duplicates_nothing(dask_spool, tmp_path):
    from ingest.dataset.balance import BalanceConfig
    from ingest.imaging.preprocess import PreprocessParams

    root, taxonomy = dask_spool
    config = BalanceConfig(granularity=7, per_class=6, finetune_fraction=1 / 3, seed=3)
    options = dict(
        balance_config=config,
        params=PreprocessParams(size=64),
        shard_size=2,
        taxonomy=taxonomy,
        progress=False,
    )
    # The reference: the same catalog and shards in this process.
    scan(
        root / "spool",
        tmp_path / "ref-catalog",
        id_salt="s",
        taxonomy=taxonomy,
        scheduler="sync",
        progress=False,
    )
    reference = write_shards(tmp_path / "ref-catalog", tmp_path / "ref-shards", scheduler="sync", **options)

    with LocalDaskCluster(n_workers=2) as dask_cluster:
        run_while_killing_a_busy_worker(
            dask_cluster,
            lambda client: scan(
                root / "spool",
                tmp_path / "catalog",
                id_salt="s",
                taxonomy=taxonomy,
                client=client,
                batch_size=2,
                progress=False,
            ),
        )
        catalog = read_catalog(tmp_path / "catalog")
        assert len(catalog) == 84 and catalog["path"].is_unique, "every file catalogued exactly once"
        dask_cluster.add_worker("worker-3")  # the killed one's replacement
        dask_cluster.wait_for_workers(2)
        results = {}
        run_while_killing_a_busy_worker(
            dask_cluster,
            lambda client: results.update(
                write_shards(tmp_path / "catalog", tmp_path / "shards", client=client, **options)
            ),
        )
    # The same shards, byte for byte, as the run nothing happened to: no sample lost or duplicated.
    assert results["shards"] == reference["shards"]
    assert not [p.name for p in (tmp_path / "shards").rglob("*") if ".partial" in p.name], (
        "no half-written file"
    )

"""Scale-out of the three distributed stages, each figure a ratio of two runs made by one run of this script.

- ``dask``: ``python -m ingest scan`` then ``python -m ingest shards`` (their ``main``, in this process) on
  a Dask cluster (``--scheduler``) of 2 worker processes against 1, one thread each, over a phantom
  DICOM set. Goal: ≥ 1.8×.
- ``ray_train``: pretraining steps (InceptionV3 by default, the shards' 128 px, a fixed per-worker
  batch) with 2 Ray Train workers on 2 Ray nodes against 1 worker, 1 CPU each: global images/s.
  The train split is decoded into the object store first (no augmentation), so the figure is Ray
  Train's own scaling and no Ray Data task waits for a CPU the workers hold. Goal: ≥ 1.7×.
- ``ray_data``: the training input pipeline (``pedx_ray.data``: decode and per-epoch augmentation in
  Ray Data tasks, batches collated in this process) on 2 Ray nodes against 1, 1 CPU each: images/s
  over one epoch after an untimed one. Goal: ≥ 1.8×.

The clusters are local and started here as child processes, stopped by pid at the end: a
``dask scheduler`` and ``dask worker`` processes, and Ray nodes from ``ray start --head`` and
``ray start --address`` with token authentication. The shard set the ``dask`` stage writes
(``--image-size``, ``--shard-size`` samples per shard) feeds the Ray stages; the phantom DICOM set is
generated once into ``--workdir`` (default: a new temporary directory) and reused by later runs.

Every worker shares this machine's cores, so the ratios are only as good as the cores are free: run
on an idle machine with at least 2 cores.

    python bench/cluster_scaling.py [--studies 200] [--stages dask,ray_train,ray_data] [--json PATH]

Prints a table (each stage's figure on 1 and 2 units, their ratio and the goal) and writes the JSON
summary to ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/cluster_scaling.py` from anywhere
    sys.path.insert(0, str(REPO))

from results import write_results  # noqa: E402

from ingest.demo.orthanc import free_port  # noqa: E402

STAGES = ("dask", "ray_train", "ray_data")
GOALS = {"dask": 1.8, "ray_train": 1.7, "ray_data": 1.8}
UNITS = {"dask": "worker processes", "ray_train": "workers on as many nodes", "ray_data": "nodes"}
START_TIMEOUT_S = 180


class BenchError(RuntimeError):
    """A cluster or a stage did not come up or run; the message says which and where its log is."""


class ChildProcesses:
    """The cluster processes this benchmark starts, each logging to its own file; stopped by pid."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.processes: list[tuple[str, subprocess.Popen]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str]) -> Path:
        log = self.logs / f"{name}.log"
        with log.open("w") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self.processes.append((name, process))
        return log

    def wait_for_line(self, log: Path, text: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if text in log.read_text(errors="replace"):
                return
            for name, process in self.processes:
                if process.poll() is not None:
                    raise BenchError(f"{name} exited with {process.returncode}; see {self.logs / name}.log")
            time.sleep(0.5)
        raise BenchError(f"{log} did not say {text!r} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        for _, process in reversed(self.processes):  # worker nodes before the head
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not happen within {START_TIMEOUT_S} s")
        time.sleep(0.5)


def child_env() -> dict[str, str]:
    """This process's environment with the repository importable and a fresh Ray token for the nodes,
    which this process (the Ray driver) uses too."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    path = os.environ.get("PYTHONPATH")
    return os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


# ---------------------------------------------------------------- inputs


def phantom_dicom(workdir: Path, studies: int) -> Path:
    out = workdir / f"dicom-{studies}"
    argv = ["-m", "ingest.phantoms", "--out", str(out), "--studies", str(studies), "--seed", "0"]
    subprocess.run([sys.executable, *argv], check=True, env=child_env(), cwd=REPO)
    return out


# ---------------------------------------------------------------- dask


def run_dask(args, workdir: Path, dicom: Path, children: ChildProcesses) -> tuple[dict, Path]:
    """scan + shards on 1 then 2 Dask worker processes; returns the stage and the last shard set."""
    from dask.distributed import Client

    from ingest.dataset import catalog, shards

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = tool("dask")
    log = children.start(
        "dask-scheduler", [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    )
    children.wait_for_line(log, "Scheduler at")
    files = sum(1 for p in dicom.rglob("*") if p.is_file())
    figures, shard_dir = {}, None
    with Client(address) as client:
        for n in (1, 2):
            worker = [dask, "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard"]
            children.start(f"dask-worker-{n}", [*worker, "--memory-limit", "0", "--name", f"w{n}"])
            client.wait_for_workers(n, timeout=START_TIMEOUT_S)
            # Imports are paid before the clock starts, as on a cluster that has already run a job.
            client.run(importlib.import_module, "ingest.dataset.shards")
            run = workdir / f"dask-{n}"
            started = time.perf_counter()
            scan_argv = [str(dicom), "--out", str(run / "catalog"), "--id-salt", "bench"]
            scan_argv += ["--batch-size", str(max(1, files // 32)), "--scheduler", address]
            if catalog.main(scan_argv) != 0:
                raise BenchError(f"ingest scan failed on {n} Dask workers")
            scanned = time.perf_counter()
            shards_argv = [str(run / "catalog"), "--out", str(run / "shards"), "--granularity", "7"]
            shards_argv += ["--per-class", "1000000", "--short-class-policy", "keep", "--seed", "0"]
            shards_argv += ["--shard-size", str(args.shard_size), "--image-size", str(args.image_size)]
            if shards.main([*shards_argv, "--scheduler", address]) != 0:
                raise BenchError(f"ingest shards failed on {n} Dask workers")
            done = time.perf_counter()
            figures[n] = {"scan_s": scanned - started, "shards_s": done - scanned, "total_s": done - started}
            shard_dir = run / "shards"
    stage = {
        "unit": UNITS["dask"],
        "dicom_files": files,
        "figure": "seconds for scan + shards (lower is better)",
        "runs": figures,
        "ratio": figures[1]["total_s"] / figures[2]["total_s"],
    }
    return stage, shard_dir


# ---------------------------------------------------------------- ray


class RayNodes:
    """A local multi-node Ray cluster: a head and worker nodes of ``cpus`` CPUs each, from ``ray start``."""

    def __init__(self, children: ChildProcesses, temp_dir: Path, cpus: int = 1) -> None:
        self.children, self.cpus = children, cpus
        self.temp_dir = temp_dir  # short and private: no bare ray.init() elsewhere finds this cluster
        self.port = free_port()
        self.nodes = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_node(self) -> None:
        import ray

        ray_cli = [tool("ray"), "start", "--num-cpus", str(self.cpus), "--block", "--disable-usage-stats"]
        if self.nodes == 0:
            ray_cli += ["--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir)]
            ray_cli += ["--include-dashboard", "false"]
        else:
            ray_cli += ["--address", self.address]
        log = self.children.start(f"ray-node-{self.nodes}", ray_cli)
        self.children.wait_for_line(log, "Ray runtime started")
        self.nodes += 1
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="ERROR")
        wait_until(
            lambda: ray.cluster_resources().get("CPU", 0) >= self.nodes * self.cpus,
            f"the Ray cluster reaching {self.nodes} nodes",
        )


def shard_inputs(shard_dir: Path, repeat: int) -> tuple[dict, tuple[str, ...]]:
    from pedx_ray.data import check_manifest, read_manifest

    manifest = read_manifest(shard_dir)
    check_manifest(manifest, manifest["granularity"], shard_dir)
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    return {"shards": train * repeat}, tuple(manifest["classes"])


def pipeline_config(args, classes, **changes):
    from pedx_ray.config import PretrainConfig

    fields = dict(
        granularity=len(classes),
        classes=classes,
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=0,
        num_workers=1,
    )
    return PretrainConfig(**(fields | changes))


def measure_input(args, shard_dir: Path) -> dict:
    """Images/s of one epoch of the augmented train split, after an untimed epoch (worker start-up)."""
    from pedx_ray.data import build_datasets, train_batches

    manifest, classes = shard_inputs(shard_dir, args.repeat_shards)
    config = pipeline_config(args, classes, augment=True)
    dataset = build_datasets(
        manifest, shard_dir, classes, config.granularity, config.image_size, 0, splits=("train",)
    )["train"]
    for _ in train_batches(dataset, config, 0, pin_memory=False):
        pass
    images, started = 0, time.perf_counter()
    for _, labels in train_batches(dataset, config, 1, pin_memory=False):
        images += len(labels)
    elapsed = time.perf_counter() - started
    return {"images": images, "seconds": elapsed, "images_per_s": images / elapsed}


def train_loop(settings: dict) -> dict:
    """A Ray Train worker: ``steps`` pretraining steps after ``warmup`` untimed ones, epoch after epoch."""
    import itertools

    import ray.train
    import torch

    from pedx_ray.config import PretrainConfig
    from pedx_ray.data import to_model_input, train_batches
    from pedx_ray.models import build_model

    config = PretrainConfig.from_dict(settings["config"])
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model(config))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    data = ray.train.get_dataset_shard("train")
    batches = itertools.chain.from_iterable(
        train_batches(data, config, epoch, pin_memory=False) for epoch in itertools.count()
    )
    model.train()
    warmup, images, started = settings["warmup"], 0, time.perf_counter()
    for step, (x, y) in enumerate(itertools.islice(batches, warmup + settings["steps"])):
        if step == warmup:
            started = time.perf_counter()
        loss = loss_fn(model(to_model_input(x, torch.device("cpu"), False)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += len(y) if step >= warmup else 0
    elapsed = time.perf_counter() - started
    world = ray.train.get_context().get_world_size()
    # DDP steps in lockstep: every worker trains as many images as this one.
    return {"images": images * world, "seconds": elapsed, "images_per_s": images * world / elapsed}


def measure_training(args, shard_dir: Path, workers: int, storage: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pedx_ray.data import PretrainDataConfig, build_datasets

    manifest, classes = shard_inputs(shard_dir, args.repeat_shards)
    config = pipeline_config(
        args, classes, augment=False, num_workers=workers, batch_size=args.batch_size * workers
    )
    # Decoded up front while the CPUs are free: during training every CPU is a worker's.
    train = build_datasets(
        manifest, shard_dir, classes, config.granularity, config.image_size, 0, splits=("train",)
    )["train"].materialize()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "warmup": args.warmup, "steps": args.steps},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"scaling-{workers}", storage_path=str(storage)),
        datasets={"train": train},
        dataset_config=PretrainDataConfig(),
    )
    return trainer.fit().return_value


def run_ray(args, shard_dir: Path, workdir: Path, stages: list[str], children: ChildProcesses) -> dict:
    import ray

    nodes = RayNodes(children, Path(tempfile.mkdtemp(prefix=f"rb-{os.getpid()}-", dir="/tmp")))
    results = {}
    try:
        nodes.add_node()
        if "ray_data" in stages:
            results["ray_data"] = {1: measure_input(args, shard_dir)}
        nodes.add_node()
        if "ray_data" in stages:
            results["ray_data"][2] = measure_input(args, shard_dir)
        if "ray_train" in stages:
            storage = workdir / "ray-train"
            results["ray_train"] = {n: measure_training(args, shard_dir, n, storage) for n in (1, 2)}
    finally:
        ray.shutdown()
    return {
        stage: {
            "unit": UNITS[stage],
            "figure": "images/s (higher is better)",
            "runs": runs,
            "ratio": runs[2]["images_per_s"] / runs[1]["images_per_s"],
        }
        for stage, runs in results.items()
    }


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--workdir", type=Path, help="phantoms, catalogs, shards, logs (default: a temp dir)")
    parser.add_argument("--studies", type=int, default=200, help="phantom studies (about 1.8 instances each)")
    parser.add_argument(
        "--shards", type=Path, help="the Ray stages' shard set when the dask stage is not run"
    )
    parser.add_argument(
        "--shard-size", type=int, default=16, help="samples per shard: the Ray Data task unit"
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeat-shards", type=int, default=4, help="list each train shard N times an epoch")
    parser.add_argument("--arch", choices=("inception_v3", "tiny_cnn"), default="inception_v3")
    parser.add_argument("--batch-size", type=int, default=16, help="per Ray Train worker, and of the input")
    parser.add_argument("--steps", type=int, default=10, help="timed Ray Train steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed Ray Train steps first")
    parser.add_argument("--json", type=Path, help="write the summary here")
    return parser


def print_table(stages: dict) -> None:
    print(f"{'stage':<10} {'1 unit':>12} {'2 units':>12} {'ratio':>7} {'goal':>6}  figure")
    for name, stage in stages.items():
        runs = stage["runs"]
        key = "total_s" if name == "dask" else "images_per_s"
        ok = "ok" if stage["ratio"] >= GOALS[name] else "below"
        print(
            f"{name:<10} {runs[1][key]:12.2f} {runs[2][key]:12.2f} {stage['ratio']:7.2f} "
            f"{GOALS[name]:6.1f}  {stage['figure']}; units: {stage['unit']} ({ok})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if not stages or set(stages) - set(STAGES):
        parser.error(f"--stages takes a comma-separated list of {', '.join(STAGES)}")
    ray_stages = [s for s in stages if s != "dask"]
    if ray_stages and "dask" not in stages and not args.shards:
        parser.error("the Ray stages read a shard set: run the dask stage too, or give --shards DIR")
    if min(args.studies, args.shard_size, args.image_size, args.repeat_shards, args.steps) < 1:
        parser.error("--studies, --shard-size, --image-size, --repeat-shards and --steps must be positive")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pedx-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    children = ChildProcesses(workdir / "logs", child_env())
    results, shard_dir = {}, args.shards
    try:
        if "dask" in stages:
            dicom = phantom_dicom(workdir, args.studies)
            results["dask"], shard_dir = run_dask(args, workdir, dicom, children)
            children.stop()
        if ray_stages:
            results |= run_ray(args, shard_dir, workdir, ray_stages, children)
    except BenchError as exc:
        parser.exit(2, f"error: {exc}\n")
    finally:
        children.stop()
    print_table(results)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
        summary = {"settings": settings, "stages": results, "goals": {name: GOALS[name] for name in results}}
        write_results(args.json, "cluster_scaling", argv, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

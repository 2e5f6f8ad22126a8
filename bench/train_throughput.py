"""Training throughput (images/s) of the pretraining step: plain torch vs Ray Train with one worker.

Both modes run the same loop (next batch -> device -> float, forward, cross-entropy, backward,
Adam) through the same code, so the difference between them is Ray Train's overhead. Input:

- synthetic (default): one uint8 batch made up front and fed again every step, so the figure is
  the model step alone;
- ``--shards DIR`` (a shard set written by ``python -m ingest shards``): the pretraining input
  pipeline itself (``pedx_ray.data``): Ray Data reads and decodes the train split's shards
  (``build_datasets``) and ``train_batches`` yields per-epoch augmented, locally shuffled batches
  with ``iter_torch_batches``, epoch after epoch. Ray Train iterates its worker's
  ``get_dataset_shard("train")`` exactly as ``pedx_ray.pretrain`` does; plain torch iterates the
  same Ray Dataset in its own process with the same ``train_batches`` call. Both modes see the
  same shards, decoder, augmentations, batch size, prefetch depth and Ray Data CPU budget
  (``--data-cpus``; Ray Train's worker holds ``--worker-cpus`` more) and run ``--threads`` torch
  threads. Epoch restarts fall inside the timed steps when the split is short: that is end to end.
  ``--repeat-shards N`` lists each train shard N times per epoch, so that a set small enough to
  copy to a GPU machine still makes epochs of many steps (and N times as many read tasks).
- ``--mode input`` (with ``--shards``): the same pipeline iterated with no model, in this process:
  the most images/s the input can deliver to one training process on this machine.

Per mode it reports images/s over the timed steps (after ``--warmup`` untimed ones), the share
of that wall time spent waiting for the next batch (``data_wait_fraction``: the data-loading
stall), the time to the first batch, and on CUDA ``gpu_idle_fraction``: 1 - (sum over steps of the
CUDA-event time from a step's input copy to its optimizer step) / wall time, i.e. the share of
time the GPU had no training step in flight.

``--bf16``, ``--channels-last`` and ``--compile`` are honoured on the CPU too (slowly; so the code paths
run without a GPU), unlike ``pedx_ray.pretrain``, which ignores them on the CPU. Pinned memory and
GPU idle time only exist on CUDA: ``--pin-memory`` on the CPU is ignored with a note.

CPU here (small settings by default). On a GPU, the paper's settings:

    python bench/train_throughput.py --device cuda --image-size 512 --batch-size 60 \\
        --bf16 --channels-last [--compile] [--shards DIR]

Prints one line per mode and a JSON summary (``--json PATH`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from pedx_ray.cluster.connect import connect_ray
from pedx_ray.config import ARCHITECTURES, PretrainConfig
from pedx_ray.data import build_datasets, check_manifest, read_manifest, to_model_input, train_batches
from pedx_ray.models import build_model

RAY_MODE = "ray_train_1_worker"


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why."""


def bench_config(settings: dict) -> PretrainConfig:
    """The pretraining config the step and the input pipeline are built from (one worker)."""
    return PretrainConfig(
        shards=settings["shards"] or "",
        granularity=settings["granularity"],
        classes=tuple(settings["classes"]),
        arch=settings["arch"],
        image_size=settings["image_size"],
        batch_size=settings["batch_size"],
        augment=settings["augment"],
        prefetch_batches=settings["prefetch_batches"],
        seed=settings["seed"],
        num_workers=1,
    )


def synthetic_batches(settings: dict, pin_memory: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    size, batch = settings["image_size"], settings["batch_size"]
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    labels = torch.randint(0, settings["granularity"], (batch,))
    if pin_memory:
        images, labels = images.pin_memory(), labels.pin_memory()
    return itertools.repeat((images, labels))


def shard_batches(
    data, config: PretrainConfig, pin_memory: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pretraining's train-split batches, one epoch after another, for as many steps as are asked."""
    for epoch in itertools.count():
        yield from train_batches(data, config, epoch, pin_memory=pin_memory)


def measure(settings: dict, device: torch.device, batches: Iterator) -> dict:
    """Time ``settings['steps']`` training steps after ``settings['warmup']`` untimed ones."""
    torch.set_num_threads(settings["threads"])  # Ray sizes a worker's pool to its CPU share otherwise
    config = bench_config(settings)
    on_cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(config).to(device)
    if settings["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if settings["compile"] else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["bf16"])

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        x = to_model_input(images, device, settings["channels_last"])
        with autocast:
            loss = loss_fn(step_model(x), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(batches, None)
        if batch is None:
            raise BenchError("the input ran out of batches")
        return batch

    model.train()
    fetch = time.perf_counter()
    first = next_batch()
    first_batch_s = time.perf_counter() - fetch
    for i in range(settings["warmup"]):
        step(*(first if i == 0 else next_batch()))
    if on_cuda:
        torch.cuda.synchronize()
    events = []
    images_done, wait_s = 0, 0.0
    started = time.perf_counter()
    for i in range(settings["steps"]):
        if i == 0 and settings["warmup"] == 0:
            images, labels = first
        else:
            fetch = time.perf_counter()
            images, labels = next_batch()
            wait_s += time.perf_counter() - fetch
        if on_cuda:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        step(images, labels)
        if on_cuda:
            events[-1][1].record()
        images_done += len(labels)
    if on_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    gpu_busy_s = sum(start.elapsed_time(end) for start, end in events) / 1000
    return {
        "images_per_s": images_done / elapsed,
        "step_ms": 1000 * elapsed / settings["steps"],
        "images": images_done,
        "data_wait_fraction": wait_s / elapsed,
        "first_batch_s": first_batch_s,
        "gpu_idle_fraction": max(0.0, 1 - gpu_busy_s / elapsed) if on_cuda else None,
        "torch_threads": torch.get_num_threads(),
    }


def _pin(settings: dict, device: torch.device) -> bool:
    return device.type == "cuda" and settings["pin_memory"]


def _shard_dataset(settings: dict):
    return build_datasets(
        {"shards": settings["shard_entries"] * settings["repeat_shards"]},
        settings["shards"],
        tuple(settings["classes"]),
        settings["granularity"],
        settings["image_size"],
        settings["seed"],
        splits=("train",),
    )["train"]


def _connect(settings: dict):
    return connect_ray(
        num_workers=1,
        cpus_per_worker=settings["worker_cpus"],
        gpus_per_worker=1,
        use_gpu=settings["device"] == "cuda",
        extra_cpus=settings["data_cpus"] if settings["shards"] else 0,
        extra_what="Ray Data read tasks (--data-cpus)",
        error=BenchError,
    )


def measure_input(settings: dict, batches: Iterator) -> dict:
    """The input pipeline alone: batches/s as fast as the training process can take them."""
    for _ in range(settings["warmup"] + 1):
        next(batches)
    images_done, started = 0, time.perf_counter()
    for _ in range(settings["steps"]):
        images_done += len(next(batches)[1])
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": images_done / elapsed,
        "step_ms": 1000 * elapsed / settings["steps"],
        "images": images_done,
        "data_wait_fraction": 1.0,
        "gpu_idle_fraction": None,
    }


def run_plain(settings: dict, train: bool = True) -> dict:
    device = torch.device(settings["device"])
    if not settings["shards"]:
        return measure(settings, device, synthetic_batches(settings, _pin(settings, device)))
    _connect(settings)
    from ray.data import ExecutionResources

    dataset = _shard_dataset(settings)
    # The CPUs Ray Data gets beside a Ray Train worker, so both modes read and decode alike.
    dataset.context.execution_options.resource_limits = ExecutionResources(cpu=settings["data_cpus"])
    batches = shard_batches(dataset, bench_config(settings), _pin(settings, device))
    try:
        return measure(settings, device, batches) if train else measure_input(settings, batches)
    finally:
        batches.close()  # stops the Ray Data pipeline mid-epoch


def run_ray(settings: dict) -> dict:
    _connect(settings)
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pedx_ray.data import PretrainDataConfig

    def loop(loop_settings: dict) -> dict:
        device = ray.train.torch.get_device()
        if not loop_settings["shards"]:
            return measure(
                loop_settings, device, synthetic_batches(loop_settings, _pin(loop_settings, device))
            )
        data = ray.train.get_dataset_shard("train")
        batches = shard_batches(data, bench_config(loop_settings), _pin(loop_settings, device))
        try:
            return measure(loop_settings, device, batches)
        finally:
            batches.close()

    use_gpu = settings["device"] == "cuda"
    trainer = TorchTrainer(
        loop,
        train_loop_config=settings,
        scaling_config=ScalingConfig(
            num_workers=1,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": settings["worker_cpus"]} | ({"GPU": 1} if use_gpu else {}),
        ),
        run_config=RunConfig(
            name=f"bench-{int(time.time())}", storage_path=str(Path(settings["storage"]).resolve())
        ),
        **(
            {"datasets": {"train": _shard_dataset(settings)}, "dataset_config": PretrainDataConfig()}
            if settings["shards"]
            else {}
        ),
    )
    return trainer.fit().return_value  # Train V2 hands back the worker's return value


def shard_settings(shards: Path) -> dict:
    """The shard set's classes and train-split shards, checked as pretraining checks them."""
    manifest = read_manifest(shards)
    check_manifest(manifest, manifest["granularity"], shards)
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    return {
        "shards": str(shards.resolve()),
        "granularity": manifest["granularity"],
        "classes": list(manifest["classes"]),
        "shard_entries": train,
        "train_samples": sum(s["samples"] for s in train),  # per repeat
        "shard_image_size": manifest.get("preprocessing", {}).get("size"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode",
        choices=("torch", "ray", "both", "input"),
        default="both",
        help="input: with --shards, the input pipeline alone in this process (no model): its ceiling",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shards", type=Path, help="shard set to read (default: synthetic input)")
    parser.add_argument(
        "--repeat-shards",
        type=int,
        default=1,
        help="read each train shard N times per epoch: epochs long enough at GPU speed from a small set",
    )
    parser.add_argument("--arch", choices=ARCHITECTURES, default="inception_v3")
    parser.add_argument("--image-size", type=int, default=128, help="shards are resized to it on decode")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, cudnn autotune)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--pin-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pinned host batches (CUDA only; default on with CUDA)",
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the paper's augmentations on shard batches, as pretraining (default on)",
    )
    parser.add_argument("--prefetch-batches", type=int, default=PretrainConfig.prefetch_batches)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads in either mode"
    )
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="Ray CPUs the Ray Train worker holds")
    parser.add_argument(
        "--data-cpus",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="Ray CPUs for Ray Data read tasks with --shards (default: all CPUs but one)",
    )
    parser.add_argument("--storage", default="/tmp/pedx-bench", help="Ray Train run storage")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    return parser


SETTING_FIELDS = (
    "device",
    "arch",
    "image_size",
    "batch_size",
    "steps",
    "warmup",
    "bf16",
    "channels_last",
    "compile",
    "pin_memory",
    "augment",
    "prefetch_batches",
    "seed",
    "threads",
    "worker_cpus",
    "data_cpus",
    "storage",
    "repeat_shards",
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if args.steps < 1 or args.warmup < 0 or args.repeat_shards < 1:
        parser.error("--steps and --repeat-shards must be at least 1 and --warmup at least 0")
    if args.mode == "input" and not args.shards:
        parser.error("--mode input measures the shard pipeline: give --shards DIR")
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.pin_memory and not on_cuda:
        print("note: --pin-memory ignored: pinned memory needs CUDA")
    settings = {k: getattr(args, k) for k in SETTING_FIELDS}
    settings["pin_memory"] = on_cuda and args.pin_memory is not False
    settings |= {"shards": None, "granularity": 7, "classes": []}
    try:
        if args.shards:
            settings |= shard_settings(args.shards)
        bench_config(settings)  # a bad size or architecture fails here, not inside a worker
    except ValueError as exc:  # ConfigError, ShardSetError
        parser.exit(2, f"error: {exc}\n")
    if not on_cuda:
        print("note: GPU idle time is measured on CUDA only")
    results = {}
    try:
        if args.mode in ("torch", "both"):
            results["torch"] = run_plain(settings)
        if args.mode in ("ray", "both"):
            results[RAY_MODE] = run_ray(settings)
        if args.mode == "input":
            results["input_only"] = run_plain(settings, train=False)
    except BenchError as exc:
        parser.exit(2, f"error: {exc}\n")
    source = f"shards {settings['shards']}" if settings["shards"] else "synthetic input"
    print(f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {source}:")
    for mode, r in results.items():
        idle = "" if r["gpu_idle_fraction"] is None else f", GPU idle {100 * r['gpu_idle_fraction']:.1f}%"
        print(
            f"{mode:>20}: {r['images_per_s']:8.1f} img/s  ({r['step_ms']:.1f} ms/step, "
            f"waiting for data {100 * r['data_wait_fraction']:.1f}%{idle})"
        )
    if len(results) == 2:
        ratio = results[RAY_MODE]["images_per_s"] / results["torch"]["images_per_s"]
        print(f"{'ray / torch':>20}: {ratio:8.3f}")
    summary = {
        "input": "shards" if settings["shards"] else "synthetic",
        "settings": {k: v for k, v in settings.items() if k != "shard_entries"},
        "results": results,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name()
        if on_cuda
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

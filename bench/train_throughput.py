"""Training throughput (images/s) of the pretraining step: plain torch vs Ray Train with one worker.

Both run the same step (uint8 batch -> device -> float, forward, cross-entropy, backward, Adam) on
synthetic input, so the difference is Ray Train's overhead. CPU here (small settings by default);
on a GPU the paper's settings are:

    python bench/train_throughput.py --device cuda --image-size 512 --batch-size 60 \
        --bf16 --channels-last [--compile]

Prints one line per mode and a JSON summary (``--json PATH`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from pedx_ray.config import PretrainConfig
from pedx_ray.data import to_model_input
from pedx_ray.models import build_model


def measure(settings: dict, device: torch.device) -> dict:
    """Time ``settings['steps']`` training steps after ``settings['warmup']`` untimed ones."""
    config = PretrainConfig(arch=settings["arch"], image_size=settings["image_size"], granularity=7)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    channels_last = device.type == "cuda" and settings["channels_last"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if settings["compile"] else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    size, batch = settings["image_size"], settings["batch_size"]
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (batch,))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and settings["bf16"]
    )

    def step() -> None:
        x = to_model_input(images, device, channels_last)
        with autocast:
            loss = loss_fn(step_model(x), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    for _ in range(settings["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(settings["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": settings["steps"] * batch / elapsed,
        "step_ms": 1000 * elapsed / settings["steps"],
    }


def run_plain(settings: dict) -> dict:
    return measure(settings, torch.device(settings["device"]))


def run_ray(settings: dict) -> dict:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(loop_settings: dict) -> dict:
        return measure(loop_settings, ray.train.torch.get_device())

    if not ray.is_initialized():
        ray.init(num_cpus=max(os.cpu_count() or 1, torch.get_num_threads()), include_dashboard=False)
    use_gpu = settings["device"] == "cuda"
    # Ray sizes a worker's torch thread pool to its CPU share: give it the threads plain torch has.
    resources = {"CPU": torch.get_num_threads()} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        loop,
        train_loop_config=settings,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"bench-{int(time.time())}", storage_path=str(Path(settings["storage"]).resolve())
        ),
    )
    return trainer.fit().return_value  # Train V2 hands back the worker's return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("torch", "ray", "both"), default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=("inception_v3", "tiny_cnn"), default="inception_v3")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, cudnn autotune)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last memory format (CUDA only)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--storage", default="/tmp/pedx-bench", help="Ray Train run storage")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    settings = {
        k: getattr(args, k)
        for k in (
            "device",
            "arch",
            "image_size",
            "batch_size",
            "steps",
            "warmup",
            "bf16",
            "channels_last",
            "compile",
            "storage",
        )
    }
    results = {}
    if args.mode in ("torch", "both"):
        results["torch"] = run_plain(settings)
    if args.mode in ("ray", "both"):
        results["ray_train_1_worker"] = run_ray(settings)
    for mode, r in results.items():
        print(f"{mode:>20}: {r['images_per_s']:8.1f} img/s  ({r['step_ms']:.1f} ms/step)")
    if len(results) == 2:
        ratio = results["ray_train_1_worker"]["images_per_s"] / results["torch"]["images_per_s"]
        print(f"{'ray / torch':>20}: {ratio:8.3f}")
    summary = {
        "settings": settings,
        "results": results,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

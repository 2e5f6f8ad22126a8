"""Serving throughput and latency: closed-loop HTTP load on 127.0.0.1 against the Ray Serve app, with and
without dynamic batching, beside the model called directly in this process (the ceiling).

    python bench/serve_load.py --checkpoint demo/runs/smoke-7c-e10/best --clients 16 --requests 400

Every mode does the same work per image: the request body (a DICOM by default) is parsed, preprocessed
exactly as training did and classified by the view model. ``direct`` runs that in one process, in
batches of ``--max-batch-size`` (preprocessing a batch, then one forward pass); ``batched`` and
``unbatched`` send it over HTTP from ``--clients`` concurrent clients (each sends its next request when
the previous one is answered), bounded by ``--requests`` and ``--duration``, with the model deployment's
``max_batch_size`` at ``--max-batch-size`` or 1. A mode's latency is per request (per batch for direct).
``healthz`` sends ``GET /healthz`` the same way: the serving stack's fixed cost per request (proxy and
gateway, no upload, no model), which bounds how close a cheap model can come to the ceiling.

``gate`` measures the view gate's cost: ``POST /v1/bone-age`` on an app serving the view model and a
bone-age model (``--bone-age-checkpoint``, or with ``--synthetic`` an untrained one of the same
architecture), with ``?gate=off`` (row ``bone_age_ungated``) and with the gate on (``bone_age_gated``),
in ``--rounds`` alternating rounds. The gate's threshold is set so that every image passes, so both run
the bone-age model (with its default test-time augmentation) on every request and differ only by the
gate's view-model call; the summary's ``gated_over_ungated`` is the median of the rounds' throughput
ratios.

``--synthetic inception_v3:512`` benchmarks an untrained checkpoint of that architecture and input size
(what the paper serves) instead of ``--checkpoint``; on a GPU add ``--device cuda``.
Prints one line per mode and a JSON summary (``--json PATH`` also writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from results import machine

MODES = ("direct", "batched", "unbatched", "healthz", "gate")
PASS_EVERY_IMAGE = 1e-9  # gate_min_probability for the gate benchmark: it must pass, not refuse


def synthetic_dicom(size: int) -> bytes:
    """A 16-bit MONOCHROME2 radiograph-like DICOM (gradient, disc and noise), ``size`` pixels square."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    image = 400 + 2 * xx + yy + rng.integers(0, 200, (size, size))
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] += 1500
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientSex = "DX", "F"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.clip(image, 0, 4095).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def synthetic_checkpoint(spec: str, out: Path) -> tuple[Path, dict]:
    """An untrained 7-class view checkpoint ``ARCH:SIZE`` and the view_preprocessing it was 'trained' with."""
    from ingest.dataset.taxonomy import load_taxonomy
    from pedx_ray.config import PretrainConfig
    from pedx_ray.models import build_model, save_checkpoint

    arch, size = spec.split(":")
    config = PretrainConfig(arch=arch, image_size=int(size), classes=load_taxonomy().classes(7))
    return save_checkpoint(out / "best", build_model(config), config, {}), {"size": int(size)}


def synthetic_bone_age_checkpoint(spec: str, out: Path) -> Path:
    """An untrained bone-age checkpoint with an ``ARCH:SIZE`` backbone."""
    from pedx_ray.finetune import FinetuneConfig
    from pedx_ray.models import save_checkpoint
    from pedx_ray.tasks import build_task_model

    arch, size = spec.split(":")
    config = FinetuneConfig(task="bone_age", backbone=arch, image_size=int(size))
    return save_checkpoint(out / "bone_age", build_task_model(config), config, {})


def summarise(mode: str, latencies: list[float], images: int, elapsed: float, statuses: dict) -> dict:
    ordered = sorted(latencies)
    return {
        "mode": mode,
        "images": images,
        "seconds": round(elapsed, 2),
        "images_per_s": round(images / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "statuses": statuses,
    }


def run_direct(args, checkpoint: Path, view_preprocessing: dict, payload: bytes) -> dict:
    """The ceiling: parse + preprocess a batch of payloads, then one forward pass, in this process."""
    from deploy.app import resolve_device
    from deploy.inputs import Limits, decode, parse_body, prepare
    from deploy.models import Predictor, inspect_checkpoint

    spec = inspect_checkpoint("view_7", checkpoint, view_preprocessing=view_preprocessing)
    device = resolve_device(args.device)
    on_cuda = device == "cuda"
    predictor = Predictor(spec, device=device, bf16=on_cuda, channels_last=on_cuda)
    limits = Limits()

    def batch(n: int) -> None:
        images = [
            prepare(decode(parse_body(payload, "application/dicom"), limits), spec.recipe) for _ in range(n)
        ]
        predictor.predict(np.stack(images))

    for _ in range(args.warmup):
        batch(args.max_batch_size)
    latencies, done, started = [], 0, time.perf_counter()
    while done < args.requests and time.perf_counter() - started < args.duration:
        n = min(args.max_batch_size, args.requests - done)
        t0 = time.perf_counter()
        batch(n)
        latencies.append(time.perf_counter() - t0)
        done += n
    return summarise("direct", latencies, done, time.perf_counter() - started, {"ok": done})


async def closed_loop(url: str, payload: bytes | None, clients: int, total: int, duration: float) -> tuple:
    """``clients`` concurrent senders; each sends its next request when the last is answered.

    ``payload`` is POSTed as a DICOM; None sends GETs."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    sent = 0
    started = time.perf_counter()
    headers = {"Content-Type": "application/dicom"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < total and time.perf_counter() - started < duration:
            sent += 1
            t0 = time.perf_counter()
            send = session.get(url) if payload is None else session.post(url, data=payload, headers=headers)
            async with send as response:
                await response.read()
                statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                if response.status == 200:
                    latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return latencies, statuses, time.perf_counter() - started


def deploy(args, mode: str, checkpoint: Path, view_preprocessing: dict, bone_age: Path | None) -> None:
    """The app a mode measures, as application ``bench``: the view model (and bone age for ``gate``)."""
    from ray import serve

    from deploy.app import build_app
    from deploy.settings import ServeSettings

    batch = 1 if mode == "unbatched" else args.max_batch_size
    settings = ServeSettings(
        view_7=str(checkpoint),
        view_preprocessing=view_preprocessing,
        max_batch_size=batch,
        batch_wait_timeout_s="auto" if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
        device=args.device,
        num_gpus=1 if args.device == "cuda" else 0,
        # gate serves two models: each gets half, or the second replica could not be placed
        num_cpus=args.model_cpus or float(os.cpu_count() or 1) / (2 if mode == "gate" else 1),
        bone_age=str(bone_age) if mode == "gate" else "",
        gate_min_probability=PASS_EVERY_IMAGE,
    )
    # Generous queues: this measures throughput, not load shedding.
    model_options = {"max_ongoing_requests": max(2 * batch, args.clients), "max_queued_requests": -1}
    options = {
        "Gateway": {
            "num_replicas": args.gateway_replicas,
            "max_ongoing_requests": 4 * args.clients,
            "max_queued_requests": -1,
            "ray_actor_options": {"num_cpus": 0},
        },
        "view_7": model_options,
        "bone_age": model_options,
    }
    serve.run(build_app(settings, options), name="bench", route_prefix="/")


def run_served(
    args, mode: str, checkpoint: Path, view_preprocessing: dict, payload: bytes, port: int
) -> dict:
    from ray import serve

    deploy(args, mode, checkpoint, view_preprocessing, None)
    url = f"http://127.0.0.1:{port}/" + ("healthz" if mode == "healthz" else "v1/view")
    payload = None if mode == "healthz" else payload
    asyncio.run(closed_loop(url, payload, args.clients, args.warmup * args.clients, 600))
    latencies, statuses, elapsed = asyncio.run(
        closed_loop(url, payload, args.clients, args.requests, args.duration)
    )
    serve.delete("bench")
    return summarise(mode, latencies, len(latencies), elapsed, statuses)


def run_gate(
    args, checkpoint: Path, view_preprocessing: dict, payload: bytes, port: int, bone_age: Path
) -> tuple[list[dict], list[float]]:
    """Bone age with the gate off and on, in alternating rounds on one deployment (a shared machine's
    load drifts: each round's ratio compares runs a few seconds apart); returns the two rows and the
    per-round gated ÷ ungated ratios."""
    from ray import serve

    deploy(args, "gate", checkpoint, view_preprocessing, bone_age)
    base = f"http://127.0.0.1:{port}/v1/bone-age"
    urls = {"bone_age_ungated": f"{base}?gate=off", "bone_age_gated": base}
    for url in urls.values():
        asyncio.run(closed_loop(url, payload, args.clients, args.warmup * args.clients, 600))
    runs = {mode: ([], {}, 0.0) for mode in urls}
    ratios = []
    for round_ in range(args.rounds):
        rates = {}
        for mode in list(urls) if round_ % 2 == 0 else list(urls)[::-1]:
            latencies, statuses, elapsed = asyncio.run(
                closed_loop(
                    urls[mode],
                    payload,
                    args.clients,
                    args.requests // args.rounds,
                    args.duration / args.rounds,
                )
            )
            done, counts, seconds = runs[mode]
            runs[mode] = (
                done + latencies,
                counts | {k: counts.get(k, 0) + v for k, v in statuses.items()},
                seconds + elapsed,
            )
            rates[mode] = len(latencies) / elapsed
        ratios.append(round(rates["bone_age_gated"] / rates["bone_age_ungated"], 3))
    serve.delete("bench")
    rows = [summarise(mode, lat, len(lat), seconds, counts) for mode, (lat, counts, seconds) in runs.items()]
    return rows, ratios


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/serve_load.py", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a view checkpoint directory (contract 4)")
    source.add_argument(
        "--synthetic", metavar="ARCH:SIZE", help="an untrained checkpoint, e.g. inception_v3:512"
    )
    parser.add_argument(
        "--view-preprocessing-size", type=int, help="shard image size if the manifest is absent"
    )
    parser.add_argument("--bone-age-checkpoint", type=Path, help="bone-age checkpoint for mode gate")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of mode gate")
    parser.add_argument(
        "--image", type=Path, help="the request body (a DICOM file); default: a synthetic one"
    )
    parser.add_argument("--image-pixels", type=int, default=1024, help="side of the synthetic DICOM")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--requests", type=int, default=400, help="requests per mode (upper bound)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per mode (upper bound)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per client (batches, direct)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument(
        "--batch-wait-ms", type=float, help="batch wait (default: the app's auto, 5 ms GPU / 50 ms CPU)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--model-cpus",
        type=float,
        help="per model replica (default: all CPUs, shared between the models served)",
    )
    parser.add_argument("--gateway-replicas", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    if "gate" in modes and not (args.synthetic or args.bone_age_checkpoint):
        parser.error("mode gate needs --bone-age-checkpoint (or --synthetic)")

    payload = args.image.read_bytes() if args.image else synthetic_dicom(args.image_pixels)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            checkpoint, view_preprocessing = synthetic_checkpoint(args.synthetic, Path(tmp))
        else:
            checkpoint = args.checkpoint.resolve()
            view_preprocessing = (
                {"size": args.view_preprocessing_size} if args.view_preprocessing_size else {}
            )
        bone_age = args.bone_age_checkpoint
        if bone_age is None and args.synthetic:
            bone_age = synthetic_bone_age_checkpoint(args.synthetic, Path(tmp))
        results = []
        if "direct" in modes:
            results.append(run_direct(args, checkpoint, view_preprocessing, payload))
            print(json.dumps(results[-1]), flush=True)
        served = [m for m in modes if m != "direct"]
        if served:
            import ray
            from ray import serve

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for mode in served:
                if mode == "gate":
                    rows, ratios = run_gate(args, checkpoint, view_preprocessing, payload, port, bone_age)
                    results += rows
                    print(
                        *(json.dumps(row) for row in rows), f"gated ÷ ungated per round: {ratios}", sep="\n"
                    )
                    continue
                results.append(run_served(args, mode, checkpoint, view_preprocessing, payload, port))
                print(json.dumps(results[-1]), flush=True)
            serve.shutdown()
            ray.shutdown()
    summary = {
        "command": shlex.join(["python", "bench/serve_load.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine() | {"device": args.device},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    by_mode = {r["mode"]: r for r in results}
    if "direct" in by_mode and "batched" in by_mode:
        summary["batched_over_direct"] = round(
            by_mode["batched"]["images_per_s"] / by_mode["direct"]["images_per_s"], 3
        )
    if "gate" in modes:
        summary["gated_over_ungated_rounds"] = ratios
        summary["gated_over_ungated"] = round(statistics.median(ratios), 3)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

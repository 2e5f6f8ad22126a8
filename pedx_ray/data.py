"""Shard sets (contract 3 of docs/design.md) as Ray Data datasets, and the worker-side batch collation.

The driver checks the manifest and every shard's sha256 before any worker starts, so a damaged or
mismatched shard set fails with a message naming the file, not from inside a Ray task. Reading
and decoding (PNG -> uint8, resize to the configured size) run as Ray Data read tasks; training
augmentation runs in each worker's batch collation, where the epoch is known (see augment.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig
from tqdm import tqdm

from ingest import storage
from pedx_ray.augment import augment_images, build_augmentation

MANIFEST_FORMAT = "pedx-ray-shards/1"
SPLITS = ("train", "val", "finetune")
EVAL_SPLITS = ("val", "finetune")


class ShardSetError(ValueError):
    """The shard set is missing, damaged or does not fit the requested run."""


def read_manifest(shards_dir: str | Path) -> dict:
    """The shard set's manifest; ``shards_dir`` is a directory or an object-store URI (ingest.storage)."""
    root = storage.resolve(shards_dir)
    if not storage.is_dir(root):
        raise ShardSetError(
            f"shard directory {root} does not exist; write it with "
            f"`python -m ingest shards CATALOG --out {root}`"
        )
    path = storage.join(root, "manifest.json")
    if not storage.is_file(path):
        raise ShardSetError(
            f"{path} is missing: the shard set is incomplete or was never written; "
            "re-run `python -m ingest shards` to complete it"
        )
    try:
        manifest = json.loads(storage.read_bytes(path))
    except ValueError as exc:
        raise ShardSetError(f"{path} is not valid JSON ({exc}); re-run `python -m ingest shards`") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardSetError(f"{path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for key in ("granularity", "classes", "shards"):
        if key not in manifest:
            raise ShardSetError(f"{path} lacks {key!r}; re-run `python -m ingest shards`")
    return manifest


def check_manifest(manifest: dict, granularity: int, shards_dir: str | Path) -> None:
    """Granularity and per-split presence; raises ShardSetError with the fix."""
    if manifest["granularity"] != granularity:
        raise ShardSetError(
            f"{shards_dir} holds {manifest['granularity']}-class shards but the run asks for "
            f"granularity {granularity}; pass --granularity {manifest['granularity']} or "
            f"write {granularity}-class shards with `python -m ingest shards --granularity {granularity}`"
        )
    if len(manifest["classes"]) != granularity:
        raise ShardSetError(
            f"{shards_dir}/manifest.json lists {len(manifest['classes'])} classes for "
            f"granularity {granularity}; the manifest is inconsistent, re-write the shards"
        )
    for split in SPLITS:
        if not any(s["split"] == split and s["samples"] > 0 for s in manifest["shards"]):
            raise ShardSetError(
                f"{shards_dir} has no {split!r} samples; every run needs train, val and "
                "finetune splits (see `python -m ingest shards --finetune-fraction/--reference-date`)"
            )


def verify_shards(manifest: dict, shards_dir: str | Path, progress: bool = True) -> None:
    """Hash every shard the manifest lists and compare with its recorded sha256."""
    root = storage.resolve(shards_dir)
    for entry in tqdm(manifest["shards"], desc="verify shards", unit="shard", disable=not progress):
        path = storage.join(root, entry["name"])
        if not storage.is_file(path):
            raise ShardSetError(
                f"shard {path} listed in the manifest is missing; re-run `python -m ingest shards`"
            )
        if storage.sha256(path) != entry["sha256"]:
            raise ShardSetError(
                f"shard {path} does not match its sha256 in manifest.json (damaged or replaced); "
                "re-run `python -m ingest shards` to rebuild it"
            )


def shard_paths(manifest: dict, shards_dir: str | Path, split: str) -> list[str]:
    """Absolute paths or URIs of a split's non-empty shards, as Ray Data's readers take them."""
    root = storage.resolve(shards_dir)
    return [
        str(storage.join(root, s["name"]))
        for s in manifest["shards"]
        if s["split"] == split and s["samples"] > 0
    ]


class SampleDecoder:
    """WebDataset decoder run inside Ray Data read tasks: one sample -> {key, image, label}."""

    def __init__(self, classes: tuple[str, ...], granularity: int, image_size: int) -> None:
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.label_field = f"label_{granularity}"
        self.image_size = image_size

    def __call__(self, sample: dict) -> dict:
        image = cv2.imdecode(np.frombuffer(sample["png"], np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ShardSetError(
                f"sample {sample['__key__']} in {sample.get('__url__')} is not a decodable PNG"
            )
        if image.shape != (self.image_size, self.image_size):
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        record = json.loads(sample["json"])
        return {"key": sample["__key__"], "image": image, "label": self.class_index[record[self.label_field]]}


def build_datasets(
    manifest: dict,
    shards_dir: str | Path,
    classes: tuple[str, ...],
    granularity: int,
    image_size: int,
    seed: int,
    splits: tuple[str, ...] = SPLITS,
) -> dict:
    """One Ray Data dataset per split; training shards are read in a seeded random file order."""
    import ray.data
    from ray.data import DataContext, FileShuffleConfig

    # One line per epoch from the training loop says more than per-operator bars from every worker.
    DataContext.get_current().enable_progress_bars = False

    decoder = SampleDecoder(classes, granularity, image_size)
    datasets = {}
    for split in splits:
        datasets[split] = ray.data.read_webdataset(
            shard_paths(manifest, shards_dir, split),
            decoder=decoder,
            suffixes=["png", "json"],
            shuffle=FileShuffleConfig(seed=seed) if split == "train" else None,
        )
    return datasets


class PretrainDataConfig(DataConfig):
    """Train split: equal row counts per worker (DDP steps in lockstep). Eval splits: split without
    dropping rows (``equal=False``), since every sample must be scored once and eval has no collectives."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            splits = dataset.streaming_split(
                world_size, equal=name == "train", locality_hints=worker_node_ids
            )
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


class BatchCollator(NumpyBatchCollateFn):
    """Worker-side: numpy batch -> (images (N,1,S,S) uint8, labels int64), augmented when training.

    Images stay uint8 so the host-to-device copy is a quarter of float32's; `to_model_input`
    converts on the device.
    """

    def __init__(self, *, augment_p: float | None, seed: int, epoch: int) -> None:
        self.transform = build_augmentation(augment_p) if augment_p is not None else None
        self.seed, self.epoch = seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"]
        if self.transform is not None:
            images = augment_images(self.transform, images, batch["key"], seed=self.seed, epoch=self.epoch)
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)  # a writable copy
        return x, torch.from_numpy(np.array(batch["label"], dtype=np.int64))


def train_batches(data, config, epoch: int, *, pin_memory: bool):
    """One epoch of the train split as pretraining feeds it: (images, labels) batches of the per-worker
    size, augmented for ``epoch``, locally shuffled. ``data`` is a Ray Dataset or a worker's DataIterator."""
    collate = BatchCollator(
        augment_p=config.augment_p if config.augment else None, seed=config.seed, epoch=epoch
    )
    return data.iter_torch_batches(
        batch_size=config.per_worker_batch_size,
        collate_fn=collate,
        prefetch_batches=config.prefetch_batches,
        local_shuffle_buffer_size=config.shuffle_buffer or None,
        local_shuffle_seed=config.seed + epoch,
        pin_memory=pin_memory,
    )


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N,1,S,S) -> float32 in [0, 1] on ``device``, channels_last when asked."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(device, non_blocking=True).to(dtype=torch.float32, memory_format=memory_format)
    return x.div_(255.0)

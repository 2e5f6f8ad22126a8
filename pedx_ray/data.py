"""Shard sets (contract 3 of docs/design.md) as Ray Data datasets, and the worker-side batch collation.

The driver checks the manifest and every shard's sha256 before any worker starts, so a damaged or
mismatched shard set fails with a message naming the file, not from inside a Ray task. Reading
and decoding (PNG -> uint8, resize to the configured size) run as Ray Data read tasks, and so does
training augmentation: each epoch's train split is the decoded split mapped with that epoch's
augmentation (``epoch_dataset``), so any CPU of the cluster (CPU-only nodes too) prepares the
batches and the training workers only stack them into tensors.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def augment_batch(batch: dict[str, np.ndarray], *, p: float, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """Ray Data map: the paper's augmentations of ``epoch``; sample i depends on (seed, epoch, key) only."""
    batch["image"] = augment_images(_augmentation(p), batch["image"], batch["key"], seed=seed, epoch=epoch)
    return batch


@functools.lru_cache(maxsize=4)
def _augmentation(p: float):
    return build_augmentation(p)  # once per Ray worker process: the pipeline is reseeded per sample


def epoch_dataset(decoded, config, epoch: int):
    """The train split as epoch ``epoch`` trains on it: ``decoded`` (from ``build_datasets``) mapped with
    that epoch's augmentation in Ray Data tasks, or as decoded when ``config.augment`` is off."""
    if not config.augment:
        return decoded
    return decoded.map_batches(
        augment_batch,
        batch_format="numpy",
        fn_kwargs={"p": config.augment_p, "seed": config.seed, "epoch": epoch},
    )


class EpochSplitter:
    """One per Ray Train worker group (a 0-CPU actor): splits each epoch's augmented train dataset
    across the workers once, and hands every rank its share of that epoch.

    A dataset split once, as Ray Train does by default, replays one fixed pipeline every epoch; the
    augmentation depends on the epoch, so the split is made per epoch from ``epoch_dataset``."""

    def __init__(self, decoded, world_size: int, locality_hints, execution_options) -> None:
        self.decoded, self.world_size = decoded, world_size
        self.locality_hints, self.execution_options = locality_hints, execution_options
        self.epoch, self.splits = None, []

    def split(self, epoch: int, rank: int, config):
        # All ranks ask for epoch e before any can finish it (the split's start is a barrier), so
        # only the latest epoch's split is needed.
        if epoch != self.epoch:
            dataset = epoch_dataset(self.decoded, config, epoch)
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self.execution_options
            self.splits = dataset.streaming_split(
                self.world_size, equal=True, locality_hints=self.locality_hints
            )
            self.epoch = epoch
        return self.splits[rank]


@dataclass(frozen=True)
class TrainShard:
    """What ``ray.train.get_dataset_shard("train")`` gives a worker: its share of any epoch's train split."""

    splitter: Any  # ActorHandle of an EpochSplitter
    rank: int

    def epoch_iterator(self, config, epoch: int):
        import ray

        return ray.get(self.splitter.split.remote(epoch, self.rank, config))


class PretrainDataConfig(DataConfig):
    """Train split: one split per epoch (``EpochSplitter``), with equal row counts per worker (DDP steps
    in lockstep). Eval splits: split once without dropping rows (``equal=False``), since every sample
    must be scored once and eval has no collectives."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        import ray

        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            if name == "train":
                splitter = (
                    ray.remote(EpochSplitter)
                    .options(num_cpus=0)
                    .remote(dataset, world_size, worker_node_ids, self._resolve_execution_options(name))
                )
                for rank in range(world_size):
                    output[rank][name] = TrainShard(splitter, rank)
                continue
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            splits = dataset.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


class BatchCollator(NumpyBatchCollateFn):
    """Worker-side: numpy batch -> (images (N,1,S,S) uint8, labels int64).

    Images stay uint8 so the host-to-device copy is a quarter of float32's; `to_model_input`
    converts on the device.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.array(batch["image"], dtype=np.uint8)).unsqueeze(1)  # a writable copy
        return x, torch.from_numpy(np.array(batch["label"], dtype=np.int64))


def train_batches(data, config, epoch: int, *, pin_memory: bool):
    """One epoch of the train split as pretraining feeds it: (images, labels) batches of the per-worker
    size, augmented for ``epoch`` in Ray Data tasks, locally shuffled. ``data`` is a worker's
    ``TrainShard`` (``PretrainDataConfig``) or the decoded train Ray Dataset of ``build_datasets``."""
    from ray.data import Dataset

    if isinstance(data, TrainShard):
        iterator = data.epoch_iterator(config, epoch)
    elif isinstance(data, Dataset):
        iterator = epoch_dataset(data, config, epoch)
    else:
        raise TypeError(
            f"train_batches needs the train split as PretrainDataConfig hands it to a worker, or a Ray "
            f"Dataset, not {type(data).__name__}: give the TorchTrainer dataset_config=PretrainDataConfig()"
        )
    return iterator.iter_torch_batches(
        batch_size=config.per_worker_batch_size,
        collate_fn=BatchCollator(),
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

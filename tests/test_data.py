"""The pretraining input pipeline on Ray Data: decode and per-epoch augmentation run in Ray Data tasks,
reproducible per (seed, epoch, sample key), and split per epoch across Ray Train workers."""

from __future__ import annotations

import tarfile
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_pretrain import write_tiny_shards

from pedx_ray.augment import augment_images, build_augmentation
from pedx_ray.config import PretrainConfig
from pedx_ray.data import PretrainDataConfig, build_datasets, read_manifest, train_batches

SIZE = 32  # the shards are 128 px: decoding resizes them, as pretraining does


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))  # 28 train samples


def config_for(shards: Path, **changes) -> PretrainConfig:
    fields = dict(shards=str(shards), image_size=SIZE, arch="tiny_cnn", batch_size=8, seed=3, augment_p=0.9)
    return PretrainConfig(**(fields | changes))


def train_split(shards: Path, config: PretrainConfig, preserve_order: bool = True):
    manifest = read_manifest(shards)
    dataset = build_datasets(
        manifest, shards, tuple(manifest["classes"]), 7, SIZE, config.seed, splits=("train",)
    )["train"]
    # Parallel read tasks may deliver blocks in any order; compare batches in one fixed order.
    dataset.context.execution_options.preserve_order = preserve_order
    return dataset


def decoded_by_hand(shards: Path) -> dict[str, np.ndarray]:
    """key -> the train PNG decoded and resized outside Ray."""
    images = {}
    with tarfile.open(shards / "train-000000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".png"):
                png = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                image = cv2.imdecode(png, cv2.IMREAD_GRAYSCALE)
                key = member.name[: -len(".png")]
                images[key] = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return images


def epoch_samples(shards: Path, config: PretrainConfig, epoch: int) -> dict[str, np.ndarray]:
    """key -> image of one epoch of the train split (keys ride along: no collation)."""
    from pedx_ray.data import epoch_dataset

    rows = epoch_dataset(train_split(shards, config), config, epoch).take_all()
    return {row["key"]: row["image"] for row in rows}


def collect(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in batches]


@pytest.mark.slow
def test_same_seed_and_epoch_give_identical_batches(ray_session, shards):
    config = config_for(shards)
    first = collect(train_batches(train_split(shards, config), config, 1, pin_memory=False))
    second = collect(train_batches(train_split(shards, config), config, 1, pin_memory=False))
    assert [len(labels) for _, labels in first] == [8, 8, 8, 4]
    assert all(a[0].shape == (len(a[1]), 1, SIZE, SIZE) and a[0].dtype == torch.uint8 for a in first)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


@pytest.mark.slow
def test_augmentation_is_todays_per_sample_derivation_and_changes_with_the_epoch(ray_session, shards):
    config = config_for(shards)
    decoded = decoded_by_hand(shards)
    transform = build_augmentation(config.augment_p)
    per_epoch = {epoch: epoch_samples(shards, config, epoch) for epoch in (0, 1)}
    for epoch, samples in per_epoch.items():
        assert set(samples) == set(decoded)
        keys = sorted(samples)
        expected = augment_images(
            transform, np.stack([decoded[k] for k in keys]), keys, seed=config.seed, epoch=epoch
        )
        assert np.array_equal(np.stack([samples[k] for k in keys]), expected)
    changed = [k for k in decoded if not np.array_equal(per_epoch[0][k], per_epoch[1][k])]
    assert len(changed) > 0.8 * len(decoded)  # p=0.9 per transform: nearly every sample differs


@pytest.mark.slow
def test_without_augmentation_batches_are_the_exact_decode(ray_session, shards):
    config = config_for(shards, augment=False, shuffle_buffer=0)
    decoded = decoded_by_hand(shards)
    samples = epoch_samples(shards, config, 5)
    assert all(np.array_equal(samples[k], decoded[k]) for k in decoded)
    batches = train_batches(train_split(shards, config), config, 5, pin_memory=False)
    images = torch.cat([x for x, _ in batches])
    by_hand = np.stack([decoded[k] for k in samples])  # take_all and the batches share the preserved order
    assert np.array_equal(images.squeeze(1).numpy(), by_hand)


@pytest.mark.slow
def test_workers_get_equal_disjoint_shares_of_each_epochs_augmented_split(ray_session, shards):
    config = config_for(shards, num_workers=2, shuffle_buffer=0)
    dataset = train_split(shards, config, preserve_order=False)
    ranks = PretrainDataConfig().configure({"train": dataset}, 2, None, [None, None])
    expected = {epoch: epoch_samples(shards, config, epoch) for epoch in (0, 1)}
    for epoch in (0, 1):
        images = [[], []]

        def consume(rank: int, epoch: int = epoch, images: list = images) -> None:
            for x, _ in train_batches(ranks[rank]["train"], config, epoch, pin_memory=False):
                images[rank].extend(x.squeeze(1).numpy())

        # A streaming split starts an epoch once every worker asks for it, as Ray Train's workers do.
        threads = [threading.Thread(target=consume, args=(rank,)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(images[0]) == len(images[1]) == 14
        wanted = {image.tobytes() for image in expected[epoch].values()}
        got = [image.tobytes() for image in images[0] + images[1]]
        assert len(set(got)) == 28 and set(got) == wanted


def test_a_plain_data_iterator_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="PretrainDataConfig"):
        train_batches(object(), PretrainConfig(), 0, pin_memory=False)

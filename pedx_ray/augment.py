"""The paper's eight training augmentations (albumentations 2.x names), reproducible per seed.

The paper lists ShiftScaleRotate, HorizontalFlip, RandomBrightness, RandomContrast, RandomGamma,
GaussNoise, Sharpen and RandomBlur. In albumentations 2.x these are Affine (ShiftScaleRotate's
replacement), HorizontalFlip, RandomBrightnessContrast split into a brightness-only and a
contrast-only transform, RandomGamma, GaussNoise, Sharpen and Blur (random kernel size).

Each sample's randomness comes from (seed, epoch, sample key) alone, so a run's augmentations
are the same whatever the number of workers, the order batches arrive in, or a resume.

`tta_views` is the deterministic test-time counterpart: the views Serve and site recalibration average
a bone-age prediction over.
"""

from __future__ import annotations

import zlib

import albumentations as A
import cv2
import numpy as np


def build_augmentation(p: float) -> A.Compose:
    return A.Compose(
        [
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15), p=p),
            A.HorizontalFlip(p=p),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.0, p=p),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.2, p=p),
            A.RandomGamma(gamma_limit=(80, 120), p=p),
            A.GaussNoise(std_range=(0.01, 0.05), p=p),
            A.Sharpen(alpha=(0.1, 0.3), p=p),
            A.Blur(blur_limit=(3, 5), p=p),
        ]
    )


def sample_seed(seed: int, epoch: int, key: str) -> int:
    return zlib.crc32(f"{seed}:{epoch}:{key}".encode())


def augment_images(transform: A.Compose, images: np.ndarray, keys, *, seed: int, epoch: int) -> np.ndarray:
    """Augment a (N, H, W) uint8 batch; sample i depends only on (seed, epoch, keys[i])."""
    out = np.empty_like(images)
    for i, (image, key) in enumerate(zip(images, keys, strict=True)):
        transform.set_random_seed(sample_seed(seed, epoch, str(key)))
        out[i] = transform(image=image)["image"]
    return out


# Test-time views as (row shift, column shift) in units of ~2% of the side, and whether flipped.
_TTA_VIEWS = ((0, 0, False), (0, 0, True), (1, 1, False), (-1, -1, False), (1, -1, False), (-1, 1, False))
_TTA_VIEWS += ((1, 1, True), (-1, -1, True))
MAX_TTA_VIEWS = len(_TTA_VIEWS)
DEFAULT_TTA_VIEWS = 4  # what Serve (bone_age_tta) and site recalibration average over unless told


def tta_views(images: np.ndarray, views: int) -> np.ndarray:
    """(N·views, S, S): test-time augmentation, each image as is, flipped, and shifted by ~2% diagonally
    (transforms the training augmentation also applies).

    The first ``views`` of: identity, horizontal flip, shift (+d, +d), (-d, -d), (+d, -d), (-d, +d), and
    the flip shifted (+d, +d), (-d, -d); grouped per image, so a reshape (N, views) undoes it."""
    if not 1 <= views <= MAX_TTA_VIEWS:
        raise ValueError(f"views={views}: use 1 (the image alone) to {MAX_TTA_VIEWS}")
    size = images.shape[-1]
    d = max(1, round(0.02 * size))
    out = []
    for image in images:
        for sy, sx, flip in _TTA_VIEWS[:views]:
            dy, dx = sy * d, sx * d
            view = image[:, ::-1] if flip else image
            matrix = np.float32([[1, 0, dx], [0, 1, dy]])
            out.append(cv2.warpAffine(np.ascontiguousarray(view), matrix, (size, size)) if dx or dy else view)
    return np.ascontiguousarray(np.stack(out))

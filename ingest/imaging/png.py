"""Lossless PNG writing for preprocessed images, plots and overlays: fast, atomic, verified."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from isal import isal_zlib

from ingest.files import replacing

# PNG: written here rather than by cv2.imencode, for the compressor. Every row uses the Up filter (the
# byte above subtracted), which suits radiographs' smooth columns, and the zlib stream comes from ISA-L
# (``isal``) at level 1: measured on 512×512 preprocessed radiographs, 0.6–1.0 ms per uint8 image where
# OpenCV's fastest filter × strategy × level choice (Up, Z_RLE) takes 2.1–3.2 ms, for files 1–2%
# larger. Of the other fast deflaters, libdeflate at level 1 took 2.2–3 ms and zlib's Z_RLE 2.1 ms.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2
# channels → (PNG colour type, the channel order PNG stores, from OpenCV's order): grey, BGR, BGRA
_PNG_LAYOUTS = {1: (0, [0]), 3: (2, [2, 1, 0]), 4: (6, [2, 1, 0, 3])}
_PNG_SAMPLE_TYPES = {np.dtype(np.uint8): ">u1", np.dtype(np.uint16): ">u2"}  # PNG samples are big-endian


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 or uint16 image: grayscale (H×W), or BGR / BGRA (H×W×3 / H×W×4,
    OpenCV's channel order, as ``cv2.imencode`` takes and ``cv2.imdecode`` returns them)."""
    channels = img.shape[2] if img.ndim == 3 else 1
    sample_type = _PNG_SAMPLE_TYPES.get(img.dtype)
    if sample_type is None or img.ndim not in (2, 3) or channels not in _PNG_LAYOUTS or 0 in img.shape:
        raise ValueError(
            "PNG encoding takes a non-empty uint8 or uint16 image, H×W grey or H×W×3/4 BGR(A), "
            f"not {img.dtype} {img.shape}"
        )
    colour_type, png_order = _PNG_LAYOUTS[channels]
    height, width = img.shape[:2]
    pixels = img[:, :, png_order] if img.ndim == 3 else img
    samples = np.ascontiguousarray(pixels, dtype=sample_type).view(np.uint8).reshape(height, -1)
    scanlines = np.empty((height, samples.shape[1] + 1), np.uint8)
    scanlines[:, 0] = _PNG_FILTER_UP
    scanlines[0, 1:] = samples[0]  # the row above the first is zeros
    np.subtract(samples[1:], samples[:-1], out=scanlines[1:, 1:])  # modulo 256, as PNG's filters are
    header = struct.pack(">IIBBBBB", width, height, 8 * img.itemsize, colour_type, 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", isal_zlib.compress(scanlines, 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def write_png(img: np.ndarray, out: str | os.PathLike) -> Path:
    """Atomically write ``img`` as a PNG: temp file in the same directory, read back and compared, renamed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(img)
    with replacing(out) as tmp:
        tmp.write_bytes(data)
        check = cv2.imdecode(np.frombuffer(tmp.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        if check is None or not np.array_equal(check, img):
            raise OSError(f"{tmp} did not read back as the image just written")
    return out

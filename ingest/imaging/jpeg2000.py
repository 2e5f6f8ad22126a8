"""JPEG 2000 and HTJ2K frames decoded at the resolution the output needs, not at full size.

A JPEG 2000 codestream is a wavelet pyramid: it already holds the image at 1/2, 1/4, 1/8 ... of its size,
and decoding only the levels down to reduction ``r`` skips most of the work (a 2500×2000 lossless CR frame:
~680 ms in full, ~57 ms at r = 2, which is still 625×500). Preprocessing resizes to ``size`` pixels on the
long side anyway, so it decodes at the largest reduction whose long side is still at least ``size``.

JPEG 2000 (1.2.840.10008.1.2.4.90/91) and HTJ2K (1.2.840.10008.1.2.4.201–203) both go through OpenJPEG
(2.5 reads HTJ2K too) by way of ``glymur``, the maintained binding that exposes the reduce factor. glymur
reads from a file, so the frame goes through a scratch file in memory-backed ``/dev/shm`` where there is
one. (OpenJPH's ``skipres`` through ``imagecodecs`` is faster but returned unnormalised coefficients at
reduced levels, values outside the stored range, so it is not used for decoding.)

Everything else, and any frame the reduced decoders refuse, goes through pydicom's full decode; the
caller learns why from ``ReducedDecodeError.reason``.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile

import numpy as np
import pydicom
from pydicom.encaps import get_frame
from pydicom.uid import HTJ2K, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless

JPEG2000_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
HTJ2K_SYNTAXES = frozenset({HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
# PreprocessParams.decode: "full" is pydicom's decode at full size, "reduced" the pyramid level the output
# needs (this module), "gpu" nvImageCodec at full size (ingest.imaging.gpu_decode)
DECODE_MODES = ("full", "reduced", "gpu")
_SIZ, _COD, _SOC = 0xFF51, 0xFF52, 0xFF4F
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class ReducedDecodeError(Exception):
    """The frame cannot be decoded reduced; ``reason`` says why (the full decode is used instead)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def set_decoder_threads(threads: int) -> None:
    """OpenJPEG's thread count for one image: more for single-image latency (Serve, preview); keep 1 where
    processes already fill the cores (Dask workers, shard writing)."""
    import glymur

    glymur.set_option("lib.num_threads", max(1, int(threads)))


def is_reducible_syntax(ds: pydicom.Dataset) -> bool:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return syntax in JPEG2000_SYNTAXES or syntax in HTJ2K_SYNTAXES


def codestream_levels(codestream: bytes) -> tuple[int, int, int]:
    """(rows, columns, decomposition levels) from the codestream's main header (SIZ and COD segments)."""
    if codestream[:2] != struct.pack(">H", _SOC):
        raise ReducedDecodeError("the frame is not a JPEG 2000 codestream (no SOC)", "not_codestream")
    rows = columns = None
    offset = 2
    while offset + 4 <= len(codestream):
        marker, length = struct.unpack_from(">HH", codestream, offset)
        if marker == _SIZ:
            x1, y1, x0, y0 = struct.unpack_from(">IIII", codestream, offset + 6)
            rows, columns = y1 - y0, x1 - x0
        elif marker == _COD:
            if rows is None:
                break
            return rows, columns, codestream[offset + 9]  # Lcod, Scod, SGcod (4 bytes), then the levels
        offset += 2 + length
    raise ReducedDecodeError("no SIZ/COD segment in the codestream's main header", "no_main_header")


def reduction_for(rows: int, columns: int, size: int, levels: int) -> int:
    """The largest reduction r ≤ ``levels`` whose long side, ceil(long / 2**r), is still ≥ ``size``."""
    long_side = max(rows, columns)
    reduction = 0
    while reduction < levels and math.ceil(long_side / 2 ** (reduction + 1)) >= size:
        reduction += 1
    return reduction


def first_frame_codestream(ds: pydicom.Dataset) -> bytes:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        return get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception as exc:  # pydicom raises ValueError/KeyError on broken encapsulation
        raise ReducedDecodeError(f"unreadable encapsulated frame: {exc}", "bad_encapsulation") from exc


def decode_reduced(ds: pydicom.Dataset, size: int) -> np.ndarray | None:
    """The first frame's stored values at the largest reduction that keeps the long side ≥ ``size``.

    None when no reduction applies (the frame is already small): the full decode is then exactly right.
    Raises ``ReducedDecodeError`` when the reduced decoders cannot read the frame."""
    codestream = first_frame_codestream(ds)
    rows, columns, levels = codestream_levels(codestream)
    reduction = reduction_for(rows, columns, size, levels)
    if reduction == 0:
        return None
    try:
        values = _openjpeg_reduced(codestream, reduction)
    except Exception as exc:  # the codecs raise their own error types for corrupt or unusual streams
        raise ReducedDecodeError(f"{type(exc).__name__}: {exc}", "codec_refused") from exc
    expected = (math.ceil(rows / 2**reduction), math.ceil(columns / 2**reduction))
    if values.ndim != 2 or values.shape != expected:
        raise ReducedDecodeError(
            f"the reduced frame is {values.shape}, expected {expected} (one sample per pixel)", "bad_shape"
        )
    return as_stored_type(align_to_pixel_areas(values, reduction, (rows, columns)), ds)


def align_to_pixel_areas(values: np.ndarray, reduction: int, full_shape: tuple[int, int]) -> np.ndarray:
    """Resample a reduced frame onto the grid a resize of the full frame to the same size would have.

    The pyramid's low-pass sample k sits on the full frame's pixel k·2**r, and the reduced size is
    ceil(n / 2**r); a resize of the full frame to that size puts its pixel k at (k + ½)·n/size − ½.
    Left alone, the reduced path's output is shifted by up to (2**r − 1)/2 full-size pixels (1.5 at
    r = 2), a grey level or more along every edge. Because two centre-aligned resizes compose into
    one, the later resize to the output size then lands where the full path's does. Bicubic, in
    float, clipped back to the frame's own range (no overshoot past the stored bits)."""
    import cv2

    step = 2**reduction
    scales = [n / (size * step) for n, size in zip(full_shape, values.shape, strict=True)]
    (row_scale, col_scale) = scales
    # reduced coordinate = scale · (k + ½) − ½ / 2**r, per axis (x: columns, y: rows)
    grid = np.float32(
        [[col_scale, 0, 0.5 * col_scale - 0.5 / step], [0, row_scale, 0.5 * row_scale - 0.5 / step]]
    )
    source = values.astype(np.float32)
    moved = cv2.warpAffine(
        source,
        grid,
        (values.shape[1], values.shape[0]),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    np.clip(moved, source.min(), source.max(), out=moved)
    return np.rint(moved) if values.dtype.kind in "ui" else moved


def decode_on_gpu(ds: pydicom.Dataset) -> np.ndarray:
    """The first frame decoded by nvImageCodec; ``ReducedDecodeError`` when the GPU decoder refuses it."""
    from ingest.imaging.gpu_decode import decode_frames

    try:
        (values,) = decode_frames([first_frame_codestream(ds)])
    except ReducedDecodeError:
        raise
    except Exception as exc:  # nvImageCodec reports unsupported or corrupt streams with its own errors
        raise ReducedDecodeError(f"{type(exc).__name__}: {exc}", "gpu_refused") from exc
    if values.shape != (int(ds.Rows), int(ds.Columns)):
        raise ReducedDecodeError(f"the GPU decoded {values.shape}, not Rows × Columns", "bad_shape")
    return as_stored_type(values, ds)


def _openjpeg_reduced(codestream: bytes, reduction: int) -> np.ndarray:
    import glymur

    with tempfile.NamedTemporaryFile(suffix=".j2k", dir=_SCRATCH) as scratch:
        scratch.write(codestream)
        scratch.flush()
        step = 2**reduction
        return glymur.Jp2k(scratch.name)[::step, ::step]


def as_stored_type(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The dtype pydicom's decode gives (BitsAllocated, PixelRepresentation), so the rest is unchanged."""
    bits_allocated = int(ds.get("BitsAllocated", 8 * values.dtype.itemsize))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{max(1, bits_allocated // 8)}")
    return values if values.dtype == dtype else values.astype(dtype)

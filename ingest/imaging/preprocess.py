"""Pixel preprocessing: a DICOM radiograph (or a PNG/JPEG) → the PedXnet paper's 512×512 grayscale image.

``python -m ingest preview FILE.dcm --out FILE.png [--size N] [--clahe]`` writes one preprocessed
image, to look at what training will see. The core functions are pure (arrays in, arrays out).

The recipe (docs/design.md), in order:

1. Decode the first frame's stored values (pydicom 3; JPEG, JPEG-LS, JPEG 2000 and RLE go through the
   installed pylibjpeg / pyjpegls plugins). The unused high bits are masked when BitsStored <
   BitsAllocated and signed (PixelRepresentation=1) values sign-extended, as pydicom does; for 8/16-bit
   native little-endian and RLE data ``stored_values`` does this only when a pixel needs it, on a view
   of the file's (or codec's) bytes, which saves a frame copy and two passes. Multi-frame
   objects contribute their first frame only (logged). Only MONOCHROME1/MONOCHROME2 with one
   sample per pixel are radiographs; RGB, YBR_* and PALETTE COLOR raise ``UnsupportedPhotometric``.
2. Modality LUT: a Modality LUT Sequence is applied with ``pydicom.pixels.apply_modality_lut``.
   A linear RescaleSlope/RescaleIntercept is affine, and step 4 maps any increasing affine image to
   the same [0, 1] result, so only the slope's sign survives: it is folded into the polarity instead
   of computing a float64 copy of every pixel. The output equals applying the rescale first, up to
   float32 rounding (the tests check this against ``apply_modality_lut`` + ``np.percentile``).
3. MONOCHROME1 is inverted so bone is bright (also folded into the polarity: output = 1 - output).
   Presentation LUT Shape is ignored on purpose: in DX objects it restates the photometric
   interpretation (INVERSE with MONOCHROME1), so honouring it would invert those twice.
   VOI LUTs / windows are not applied: the percentile clip replaces windowing in the paper.
4. Clip and scale. The recipe's "min-max to [0,1] over the stored-bit range" is taken to mean: the
   0.5th and 99.5th percentiles ``lo``, ``hi`` are computed over the pixel values of the frame at the
   full stored-bit precision (after the modality LUT, before any resize, padding or down-cast), values
   are clipped to [lo, hi] and mapped linearly so lo → 0 and hi → 1. The percentiles are those of the
   bone-bright image: when the polarity is flipped (MONOCHROME1, negative slope) the stored values'
   (100 - high)th and (100 - low)th percentiles are used, so asymmetric clip settings clip the intended
   end. Pixels equal to PixelPaddingValue (up to PixelPaddingRangeLimit) lie outside the detector's
   image area: DICOM excludes them from grey-level statistics, so they are left out of the percentiles
   and set to 0 (black background). It does not mean dividing by
   ``2**BitsStored - 1``, which would leave a clipped image in a fraction of [0, 1]. Percentiles use
   numpy's default (linear interpolation) definition; for 8- and 16-bit integer data they are
   computed exactly from a histogram (cv2.calcHist), about 10× faster than ``np.percentile`` on a
   radiograph and identical to it. A constant image (hi == lo) maps to all zeros, never NaN.
   ``pixels_to_unit`` scales 8/16-bit data in float32, wider integers and float64 in float64, so huge
   values cannot overflow. The image pipeline (``preprocess_dataset``/``preprocess_array``) fuses steps
   4–6 for 8/16-bit integers (``_stretch_small_int``): one cv2 pass maps stored values to
   round(unit × 65535) as uint16 and the resize runs on that, within one grey level of the float
   path and about twice as fast (the histogram is then the largest cost, ~2 ms for 5 Mpixel).
5. Bicubic resize (cv2.INTER_CUBIC, as in the paper) so the long side is ``size``, keeping the
   aspect ratio, then zero padding centred to ``size``×``size`` (an odd remainder goes bottom/right).
   Bicubic samples a 4×4 neighbourhood, so a 5–8× reduction of a detector image aliases fine
   high-frequency texture (grids, noise) where INTER_AREA would average it; we keep the paper's choice.
   Bicubic overshoot is clipped back to [0, 1] before quantisation.
6. Quantise to uint8 (default) or uint16, rounding to nearest. Optional CLAHE (clip 2.0, 8×8 tiles,
   the downstream recipe) is applied last, on the padded image, exactly as a downstream stage reading
   a shard's PNG would apply it.

Errors are typed (``PreprocessError`` and its subclasses); each has a short ``reason`` code (one of
``REASONS``) that the catalog and the shard writer store as the quarantine reason, and a message saying
what is wrong, with the detail (photometric interpretation, transfer syntax, codec message).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from ingest.imaging.gpu_decode import GPU_FALLBACKS, resolve_gpu_decode
from ingest.imaging.jpeg2000 import (
    DECODE_MODES,
    ReducedDecodeError,
    decode_on_gpu,
    decode_reduced,
    is_reducible_syntax,
    set_decoder_threads,
)
from ingest.imaging.png import write_png

log = logging.getLogger("ingest.imaging.preprocess")

OUTPUT_DTYPES = ("uint8", "uint16")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Every PreprocessError.reason; stable codes that quarantine reports group by.
REASONS = (
    "not_dicom",  # no DICOM preamble/meta: not a DICOM file
    "unreadable_header",  # the header cannot be parsed
    "invalid_header",  # a header element needed for the pixels is missing or not a number
    "no_pixel_data",  # a report, RT plan, SR ...: nothing to preprocess
    "unsupported_photometric",  # colour or palette image
    "truncated",  # the pixel data is shorter than Rows × Columns × bits say
    "no_decoder",  # no installed plugin decodes this transfer syntax
    "decode_error",  # the codec rejected the pixel data (corrupt stream)
    "non_finite",  # float pixel data with NaN or infinity
    "bad_array",  # preprocess_array was given something that is not an image
)
# cv2.calcHist counts in float32, exact only below 2**24 pixels per bin; larger frames use bincount.
_CALCHIST_MAX_PIXELS = 2**24
_UNIT16 = 65535.0  # [0, 1] as uint16 in the fused integer path
# Syntaxes whose stored values stored_values reads without pydicom's copy and bit correction.
_FAST_DECODE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)


@dataclass(frozen=True)
class PreprocessParams:
    """The preprocessing recipe's numbers (docs/design.md's defaults); stored in every shard manifest."""

    size: int = 512
    clip_low_pct: float = 0.5
    clip_high_pct: float = 99.5
    clahe: bool = False
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    output_dtype: str = "uint8"
    # JPEG 2000 / HTJ2K: "reduced" decodes the wavelet level the size needs (ingest.imaging.jpeg2000), ~5-10×
    # faster on CR-size frames; "gpu" decodes on a CUDA device (ingest.imaging.gpu_decode); "full" (the
    # default) is pydicom's decode at full size.
    decode: str = "full"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8:
            raise ValueError(
                f"size must be an integer ≥ 8 (output is size×size pixels), got {self.size!r}; "
                "the paper uses 512"
            )
        for name in ("clip_low_pct", "clip_high_pct"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
                raise ValueError(f"{name} must be a percentile between 0 and 100, got {value!r}")
        if not self.clip_low_pct < self.clip_high_pct:
            raise ValueError(
                f"clip_low_pct ({self.clip_low_pct}) must be below clip_high_pct "
                f"({self.clip_high_pct}); the paper uses 0.5 and 99.5"
            )
        if not isinstance(self.clahe, bool):
            raise ValueError(f"clahe must be true or false, got {self.clahe!r}")
        if (
            isinstance(self.clahe_clip, bool)
            or not isinstance(self.clahe_clip, int | float)
            or self.clahe_clip <= 0
        ):
            raise ValueError(
                f"clahe_clip must be a positive number (the paper uses 2.0), got {self.clahe_clip!r}"
            )
        if (
            isinstance(self.clahe_tiles, bool)
            or not isinstance(self.clahe_tiles, int)
            or not 1 <= self.clahe_tiles <= self.size
        ):
            raise ValueError(
                f"clahe_tiles must be an integer from 1 to size ({self.size}), the number of tiles "
                f"per side (the paper uses 8), got {self.clahe_tiles!r}"
            )
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {self.output_dtype!r}")
        if self.decode not in DECODE_MODES:
            raise ValueError(
                f"decode must be one of {DECODE_MODES} (full: every frame at full size; reduced: JPEG "
                f"2000 at the resolution size needs; gpu: nvImageCodec), got {self.decode!r}"
            )

    def to_dict(self) -> dict:
        """Plain JSON-able fields; ``PreprocessParams(**params.to_dict())`` rebuilds the same params."""
        return asdict(self)


class PreprocessError(ValueError):
    """An image cannot be preprocessed; ``reason`` is the short code the catalog stores."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class NoPixelData(PreprocessError):
    def __init__(self, what: str):
        super().__init__(
            f"{what} has no Pixel Data element (a report, structured report, RT plan or other "
            "non-image object): nothing to preprocess",
            "no_pixel_data",
        )


class UnsupportedPhotometric(PreprocessError):
    def __init__(self, photometric: str, detail: str):
        super().__init__(
            f"unsupported photometric interpretation {photometric}: {detail}; "
            f"only grayscale radiographs ({' / '.join(MONOCHROME)}, 1 sample per pixel) are used",
            "unsupported_photometric",
        )


class DecodeError(PreprocessError):
    def __init__(self, detail: str, reason: str):
        super().__init__(f"cannot decode the pixel data: {detail}", reason)


# -- steps 1–4: DICOM stored values → float32 in [0, 1] --
def pixels_to_unit(ds: pydicom.Dataset, clip_low_pct: float = 0.5, clip_high_pct: float = 99.5) -> np.ndarray:
    """First frame decoded, modality-LUT'd, MONOCHROME1-inverted, percentile-clipped: float32 in [0, 1]."""
    values, flip, padding = _modality_values_and_polarity(ds)
    return _clip_to_unit(values, clip_low_pct, clip_high_pct, flip=flip, exclude=padding)


def _modality_values_and_polarity(
    ds: pydicom.Dataset, decode: str = "full", size: int = 0, notes: list[str] | None = None
) -> tuple[np.ndarray, bool, np.ndarray | None]:
    """Steps 1–3: values after the modality LUT, whether they must be flipped, the padding mask.

    ``decode`` (PreprocessParams.decode): for JPEG 2000 / HTJ2K, "reduced" decodes the smallest
    resolution level whose long side is still at least ``size``, "gpu" decodes on the GPU; a fallback to
    pydicom's full decode is logged and its reason appended to ``notes``."""
    inverted = _check_photometric(ds)
    values = _codec_first_frame(ds, decode, size, notes) if decode != "full" else None
    if values is None:
        values = _decode_first_frame(ds)
    padding = _padding_mask(values, ds)  # PixelPaddingValue is a stored value: mask before the modality LUT
    values, slope_sign = _modality_values(values, ds)
    if slope_sign == 0:  # RescaleSlope 0: every pixel has the same value
        return np.zeros(values.shape, np.uint8), False, None
    return values, inverted != (slope_sign < 0), padding


def _check_photometric(ds: pydicom.Dataset) -> bool:
    """Raise for non-grayscale images; True when the image is MONOCHROME1 (must be inverted)."""
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        if "Rows" in ds and "Columns" in ds:  # pydicom stops quietly at the end of a file cut short
            raise PreprocessError(
                f"{_describe(ds)} has an image header (Rows, Columns) but no Pixel Data: the "
                "file is probably truncated (an interrupted transfer); retrieve it again",
                "truncated",
            )
        raise NoPixelData(_describe(ds))
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = _header_int(ds, "SamplesPerPixel", default=1)
    if not photometric:
        raise DecodeError(
            "the header has Pixel Data but no PhotometricInterpretation, so the pixels cannot be interpreted",
            "invalid_header",
        )
    if photometric not in MONOCHROME:
        raise UnsupportedPhotometric(photometric, "colour and palette images are not radiographs")
    if samples != 1:
        raise UnsupportedPhotometric(photometric, f"{samples} samples per pixel")
    return photometric == "MONOCHROME1"


def _codec_first_frame(
    ds: pydicom.Dataset, decode: str, size: int, notes: list[str] | None
) -> np.ndarray | None:
    if not is_reducible_syntax(ds) or _header_int(ds, "SamplesPerPixel", default=1) != 1:
        return None
    try:
        return decode_on_gpu(ds) if decode == "gpu" else decode_reduced(ds, size)
    except ReducedDecodeError as exc:
        log.warning(
            "%s: %s decode failed (%s), full decode instead: %s", _describe(ds), decode, exc.reason, exc
        )
        if notes is not None:
            notes.append(f"{decode}_decode_fallback:{exc.reason}")
        return None


def _decode_first_frame(ds: pydicom.Dataset) -> np.ndarray:
    frames = _header_int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        log.info("%s has %d frames: using the first", _describe(ds), frames)
    transfer_syntax = _transfer_syntax(ds)
    try:
        values = stored_values(ds)
    except MemoryError:
        raise
    except Exception as exc:
        # every failure inside pydicom or a codec plugin is a decode failure of this file
        raise DecodeError(
            f"{type(exc).__name__}: {exc} (transfer syntax {transfer_syntax})",
            _decode_failure_code(exc, transfer_syntax),
        ) from exc
    if values.ndim != 2 or values.size == 0:
        raise DecodeError(f"decoded frame has shape {values.shape}, expected rows × columns", "decode_error")
    if not values.dtype.isnative:  # big-endian transfer syntaxes; cv2 needs native byte order
        values = values.astype(values.dtype.newbyteorder("="))
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DecodeError("float pixel data contains NaN or infinite values", "non_finite")
    return values


def stored_values(ds: pydicom.Dataset) -> np.ndarray:
    """The first frame's stored values, as ``decode_pixels(ds, index=0)`` returns them, but faster for
    the plain 8/16-bit radiograph in native little endian or RLE: a read-only view of the file's bytes
    instead of a copy (native), the codec's buffer instead of a copy into a new array (RLE), and the
    unused-bit correction only when a pixel needs it. Everything else goes through pydicom's decode."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not (
        syntax in _FAST_DECODE_SYNTAXES
        and "PixelData" in ds
        and ds.get("BitsAllocated") in (8, 16)
        and ds.get("SamplesPerPixel", 1) == 1
    ):
        return decode_pixels(ds, index=0)
    if syntax == RLELossless:
        buffer, meta = get_decoder(syntax).as_buffer(ds, index=0)
        shape = (int(meta["rows"]), int(meta["columns"]))
        itemsize = int(meta["bits_allocated"]) // 8
        if itemsize not in (1, 2) or len(buffer) != shape[0] * shape[1] * itemsize:
            return decode_pixels(ds, index=0)  # a plugin that widened the samples: pydicom's own handling
        kind = "i" if meta["pixel_representation"] else "u"
        values = np.frombuffer(buffer, dtype=f"<{kind}{itemsize}").reshape(shape)
        bits_stored = int(meta["bits_stored"])
    else:
        values = decode_pixels(ds, index=0, view_only=True, correct_unused_bits=False)
        bits_stored = _header_int(ds, "BitsStored", default=8 * values.dtype.itemsize)
    return _stored_bits_only(values, bits_stored)


def _stored_bits_only(values: np.ndarray, bits_stored: int) -> np.ndarray:
    """pydicom's unused-bit correction (mask unsigned, sign-extend signed values above BitsStored), done
    only when some pixel lies outside BitsStored's range: one min/max pass instead of two shifts and a
    copy, since the bits above BitsStored are nearly always already right."""
    bits_allocated = 8 * values.dtype.itemsize
    if not 0 < bits_stored < bits_allocated:
        return values
    if values.dtype.kind == "u":
        low, high = 0, (1 << bits_stored) - 1
    else:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    smallest, largest, _, _ = cv2.minMaxLoc(values)
    if low <= smallest and largest <= high:
        return values
    shift = bits_allocated - bits_stored
    corrected = np.left_shift(values, shift)
    np.right_shift(corrected, shift, out=corrected)  # arithmetic for signed: sign-extends
    return corrected


def _padding_mask(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Pixels outside the image area (PixelPaddingValue..PixelPaddingRangeLimit); None when there are none."""
    if ds.get("PixelPaddingValue") is None:
        return None
    first = _header_int(ds, "PixelPaddingValue", default=0)
    low, high = sorted((first, _header_int(ds, "PixelPaddingRangeLimit", default=first)))
    mask = (values >= low) & (values <= high)
    # an image that is all padding is a mislabelled header, not an empty image: keep every pixel
    return mask if mask.any() and not mask.all() else None


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return (uid.keyword or str(uid)) if uid else "missing"


def _decode_failure_code(exc: Exception, transfer_syntax: str) -> str:
    """The reason code of a pydicom / plugin exception (only its message tells them apart)."""
    text = str(exc)
    if "missing dependencies" in text or "No pixel data decoders" in text:
        return "no_decoder"
    if "less than expected" in text or "too short" in text:
        return "truncated"
    if "Transfer Syntax UID" in text or "Missing required element" in text:
        return "invalid_header"
    return "decode_error"


def _header_int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, default)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"header element {keyword} is not a number ({exc})", "invalid_header") from exc


def _describe(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPInstanceUID")
    name = getattr(ds, "filename", None)
    return f"{name or 'dataset'}" + (f" (SOP instance {uid})" if uid else "")


def _modality_values(values: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, int]:
    """Apply a Modality LUT Sequence; for a linear rescale return the slope's sign (module doc, step 2)."""
    if "ModalityLUTSequence" in ds:
        try:
            return apply_modality_lut(values, ds), 1
        except Exception as exc:
            raise DecodeError(
                f"invalid Modality LUT Sequence ({type(exc).__name__}: {exc})", "invalid_header"
            ) from exc
    if "RescaleSlope" not in ds:
        return values, 1
    try:
        slope = float(ds.RescaleSlope if ds.RescaleSlope not in (None, "") else 1.0)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"RescaleSlope is not a number ({exc})", "invalid_header") from exc
    if not np.isfinite(slope):
        raise DecodeError(f"RescaleSlope is {slope}", "invalid_header")
    return values, int(np.sign(slope))


def _clip_to_unit(
    values: np.ndarray, low_pct: float, high_pct: float, flip: bool = False, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Clip to the [low_pct, high_pct] percentiles and map linearly to [0, 1].

    ``flip``: the image is shown reversed (value → 1 - value), so the percentiles are taken of the
    reversed image. ``exclude``: a mask of pixels left out of the percentiles and set to 0.
    """
    lo, hi = _clip_bounds(values, low_pct, high_pct, flip, exclude)
    if not hi > lo:  # constant (or nearly constant) image: nothing to stretch
        return np.zeros(values.shape, np.float32)
    # float32 is exact enough for 8/16-bit data and half the memory traffic; wider data could overflow it
    work = np.float32 if values.dtype.itemsize <= 2 or values.dtype == np.float32 else np.float64
    if work is np.float32 and not np.isfinite(np.float32(hi) - np.float32(lo)):
        work = np.float64
    # bounds in the working precision, so the clipped ends map to exactly 0 and 1
    lo, hi = work(lo), work(hi)
    unit = values.astype(work)
    np.clip(unit, lo, hi, out=unit)
    if flip:
        np.subtract(hi, unit, out=unit)
    else:
        unit -= lo
    unit /= hi - lo
    if exclude is not None:
        unit[exclude] = 0
    return unit.astype(np.float32, copy=False)


def _clip_bounds(
    values: np.ndarray, low_pct: float, high_pct: float, flip: bool, exclude: np.ndarray | None
) -> tuple[float, float]:
    """The values mapped to 0 and 1 (to 1 and 0 when ``flip``): percentiles of the shown image."""
    if flip:
        low_pct, high_pct = 100 - high_pct, 100 - low_pct
    return percentiles(values if exclude is None else values[~exclude], low_pct, high_pct)


def _stretch_small_int(
    values: np.ndarray, params: PreprocessParams, flip: bool = False, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Steps 4–6 fused for 8/16-bit integer values, without a full-size float image.

    The clip and min-max map is one cv2 pass computed in float and saturated to uint16 (the
    saturation is the clip: unit × 65535, rounded). Bicubic resize then runs on uint16 (OpenCV
    interpolates 16-bit images in float and saturates the overshoot, the clip of step 5). The
    16-bit intermediate is 256× finer than uint8 output and within 0.5 of uint16 output, so the
    result differs from the float path (``_clip_to_unit`` → ``resize_pad`` → ``quantize``) by at most one
    grey level where a value lies on a rounding boundary; about twice as fast: it reads the frame twice
    (histogram, map) and writes a uint16 copy, instead of five float32 passes.
    """
    lo, hi = _clip_bounds(values, params.clip_low_pct, params.clip_high_pct, flip, exclude)
    if not hi > lo:  # constant (or nearly constant) image: nothing to stretch
        return _finish(np.zeros(values.shape, np.float32), params)
    scale = _UNIT16 / (hi - lo)
    alpha, beta = (-scale, hi * scale) if flip else (scale, -lo * scale)
    values = np.ascontiguousarray(values)
    unit16 = cv2.addWeighted(values, alpha, values, 0.0, beta, dtype=cv2.CV_16U)
    if exclude is not None:
        unit16[exclude] = 0
    resized = resize_pad(unit16, params.size)
    if params.output_dtype == "uint8":  # rint(unit × 255) = rint(unit16 / 257); ties cannot occur
        resized = ((resized.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return apply_clahe(resized, params.clahe_clip, params.clahe_tiles) if params.clahe else resized


def percentiles(values: np.ndarray, low_pct: float, high_pct: float) -> tuple[float, float]:
    """``np.percentile(values, [low_pct, high_pct])`` (linear method); exact and fast for 8/16-bit ints."""
    if values.dtype.itemsize > 2 or values.dtype.kind not in "ui":
        return tuple(float(p) for p in np.percentile(values, [low_pct, high_pct]))
    counts, offset = _histogram(values)
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    return _percentile_from_cumulative(cumulative, n, low_pct) + offset, _percentile_from_cumulative(
        cumulative, n, high_pct
    ) + offset


def _histogram(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts of every possible value (index i counts value i + offset) for 8/16-bit integer data."""
    offset = 0
    if values.dtype.kind == "i":  # flipping the sign bit maps signed order onto unsigned order
        unsigned = np.uint8 if values.dtype.itemsize == 1 else np.uint16
        offset = -(1 << (8 * values.dtype.itemsize - 1))
        values = values.view(unsigned) ^ unsigned(-offset)
    bins = 1 << (8 * values.dtype.itemsize)
    if values.size < _CALCHIST_MAX_PIXELS:
        counts = cv2.calcHist([np.ascontiguousarray(values)], [0], None, [bins], [0, bins]).ravel()
        return counts.astype(np.int64), offset
    return np.bincount(values.ravel(), minlength=bins), offset


def _percentile_from_cumulative(cumulative: np.ndarray, n: int, pct: float) -> float:
    """numpy's linear-interpolation percentile, reading order statistics off a cumulative histogram."""
    position = (np.float64(pct) / 100) * (n - 1)
    below = int(np.floor(position))
    gamma = float(position - below)
    a = float(np.searchsorted(cumulative, below, side="right"))
    b = float(np.searchsorted(cumulative, min(below + 1, n - 1), side="right"))
    # numpy's _lerp: interpolate from the nearer end so a gamma of 1 returns b exactly
    return a + (b - a) * gamma if gamma < 0.5 else b - (b - a) * (1 - gamma)


# -- step 5: geometry --
def resize_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize so the long side is ``size`` (aspect kept), zero-padded centred to size×size."""
    height, width = img.shape[:2]
    scale = size / max(height, width)
    new_height = min(size, max(1, round(height * scale)))
    new_width = min(size, max(1, round(width * scale)))
    if (new_height, new_width) != (height, width):
        img = cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_CUBIC)
    out = np.zeros((size, size) + img.shape[2:], dtype=img.dtype)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    out[top : top + new_height, left : left + new_width] = img
    return out


# -- step 6: output --
def quantize(unit: np.ndarray, output_dtype: str = "uint8") -> np.ndarray:
    """[0, 1] floats (bicubic overshoot clipped) → uint8 or uint16, rounded to nearest."""
    dtype = np.dtype(output_dtype)
    scaled = np.clip(unit, 0.0, 1.0) * np.float32(np.iinfo(dtype).max)
    return np.rint(scaled, out=scaled).astype(dtype)


def apply_clahe(img: np.ndarray, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 or uint16 grayscale image."""
    if img.dtype not in (np.uint8, np.uint16) or img.ndim != 2:
        raise ValueError(f"CLAHE needs a 2-D uint8 or uint16 image, got {img.dtype} of shape {img.shape}")
    return cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(tiles, tiles)).apply(img)


def _finish(unit: np.ndarray, params: PreprocessParams) -> np.ndarray:
    out = quantize(resize_pad(unit, params.size), params.output_dtype)
    return apply_clahe(out, params.clahe_clip, params.clahe_tiles) if params.clahe else out


# -- whole pipeline --
def preprocess_dataset(
    ds: pydicom.Dataset, params: PreprocessParams = PreprocessParams(), notes: list[str] | None = None
) -> np.ndarray:
    """All steps: a DICOM dataset → size×size uint8/uint16 image. ``notes`` collects what the caller may
    want to record about how it was made (a reduced decode that fell back to the full one)."""
    values, flip, padding = _modality_values_and_polarity(ds, params.decode, params.size, notes)
    return _stretch_to_output(values, params, flip, padding)


def _stretch_to_output(
    values: np.ndarray, params: PreprocessParams, flip: bool = False, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Steps 4–6: the fused path for 8/16-bit integers (nearly every radiograph), float otherwise."""
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 2:
        return _stretch_small_int(values, params, flip, exclude)
    return _finish(_clip_to_unit(values, params.clip_low_pct, params.clip_high_pct, flip, exclude), params)


def preprocess_file(
    path: str | os.PathLike, params: PreprocessParams = PreprocessParams(), notes: list[str] | None = None
) -> np.ndarray:
    """Read a DICOM Part 10 file and preprocess it. A missing or unreadable path raises OSError as usual."""
    return preprocess_dataset(read_dicom(path), params, notes)


def read_dicom(path: str | os.PathLike) -> pydicom.Dataset:
    """``dcmread`` with non-DICOM files and broken headers turned into ``PreprocessError``."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise PreprocessError(
            f"{path} is not a DICOM file (no 'DICM' preamble and no DICOM header): {exc}; "
            "check it is a DICOM instance, not a report, image export or partial download",
            "not_dicom",
        ) from exc
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # pydicom raises many types on corrupt headers; all mean "unreadable"
        raise PreprocessError(
            f"{path} has an unreadable DICOM header ({type(exc).__name__}: {exc})", "unreadable_header"
        ) from exc


def preprocess_array(img: np.ndarray, params: PreprocessParams = PreprocessParams()) -> np.ndarray:
    """Steps 4–6 for an image that is already display-oriented (PNG/JPEG, e.g. uploaded for serving).

    No modality LUT or inversion. Colour arrays (H×W×3 BGR or H×W×4 BGRA, as cv2.imdecode returns
    them) are reduced to luminance, since grayscale radiographs are often saved as RGB.
    """
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] in (3, 4) and img.dtype in (np.uint8, np.uint16, np.float32):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if img.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if img.ndim != 2 or img.size == 0 or img.dtype.kind not in "uif":
        raise PreprocessError(
            f"expected a non-empty grayscale image (H×W, or H×W×3/4 colour of uint8, uint16 or "
            f"float32), got {img.dtype} of shape {img.shape}",
            "bad_array",
        )
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise PreprocessError("image contains NaN or infinite values", "non_finite")
    return _stretch_to_output(img, params)


# -- CLI --
def build_parser(prog: str = "python -m ingest preview") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Preprocess one DICOM (or PNG/JPEG) image as training sees it and write a PNG."
    )
    parser.add_argument("file", type=Path, help="a DICOM file (or .png/.jpg, already display-oriented)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument(
        "--size", type=int, default=PreprocessParams.size, help="output side in pixels (default 512)"
    )
    parser.add_argument(
        "--clahe", action="store_true", help="apply CLAHE (clip 2.0, 8×8 tiles) as downstream does"
    )
    parser.add_argument(
        "--output-dtype",
        choices=OUTPUT_DTYPES,
        default=PreprocessParams.output_dtype,
        help="PNG bit depth (default uint8)",
    )
    add_decode_arguments(parser, threads=os.cpu_count() or 1)  # one image: its latency is what counts
    return parser


def add_decode_arguments(parser: argparse.ArgumentParser, *, threads: int | None = None) -> None:
    """``--decode`` (and ``--decoder-threads`` where one image's latency matters) for the commands that
    preprocess; ``threads`` is the default thread count, None to leave the option out."""
    parser.add_argument(
        "--decode",
        choices=DECODE_MODES,
        default=PreprocessParams.decode,
        help="JPEG 2000/HTJ2K frames: full (default), reduced (the wavelet level the output size needs, "
        "5-10× faster on CR-size images) or gpu (nvImageCodec on a CUDA device)",
    )
    parser.add_argument(
        "--gpu-fallback",
        choices=GPU_FALLBACKS,
        default="refuse",
        help="with --decode gpu where no GPU decoder can run: refuse (default) or decode on the CPU",
    )
    if threads is not None:
        parser.add_argument(
            "--decoder-threads",
            type=int,
            default=threads,
            help=f"OpenJPEG threads for one image (default {threads})",
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = resolve_gpu_decode(
            PreprocessParams(
                size=args.size, clahe=args.clahe, output_dtype=args.output_dtype, decode=args.decode
            ),
            args.gpu_fallback,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if not args.file.is_file():
        parser.error(f"{args.file} is not a file")
    set_decoder_threads(args.decoder_threads)
    notes: list[str] = []
    try:
        if args.file.suffix.lower() in IMAGE_SUFFIXES:
            img = cv2.imread(str(args.file), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise PreprocessError(f"{args.file} is not a readable PNG/JPEG image", "not_an_image")
            out = preprocess_array(img, params)
        else:
            out = preprocess_file(args.file, params, notes)
    except PreprocessError as exc:
        print(f"error: {args.file}: {exc} [reason: {exc.reason}]", file=sys.stderr)
        return 1
    write_png(out, args.out)
    print(f"wrote {args.out} ({out.shape[1]}×{out.shape[0]} {out.dtype})" + "".join(f"; {n}" for n in notes))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())

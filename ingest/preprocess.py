"""Pixel preprocessing: a DICOM radiograph (or a PNG/JPEG) → the PedXnet paper's 512×512 grayscale image.

``python -m ingest preview FILE.dcm --out FILE.png [--size N] [--clahe]`` writes one preprocessed
image, to look at what training will see. The core functions are pure (arrays in, arrays out).

The recipe (DESIGN.md), in order:

1. Decode the first frame's stored values (pydicom 3; JPEG, JPEG-LS, JPEG 2000 and RLE go through the
   installed pylibjpeg / pyjpegls plugins). pydicom already masks the unused high bits when
   BitsStored < BitsAllocated and sign-extends signed (PixelRepresentation=1) values. Multi-frame
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
4. Clip and scale. DESIGN.md's "min-max to [0,1] over the stored-bit range" is taken to mean: the
   0.5th and 99.5th percentiles ``lo``, ``hi`` are computed over all pixel values of the frame at the
   full stored-bit precision (after the modality LUT, before any resize, padding or down-cast), values
   are clipped to [lo, hi] and mapped linearly so lo → 0 and hi → 1. It does not mean dividing by
   ``2**BitsStored - 1``, which would leave a clipped image in a fraction of [0, 1]. Percentiles use
   numpy's default (linear interpolation) definition; for 8- and 16-bit integer data they are
   computed exactly from a histogram (cv2.calcHist), about 10× faster than ``np.percentile`` on a
   radiograph and identical to it. A constant image (hi == lo) maps to all zeros, never NaN.
5. Bicubic resize (cv2.INTER_CUBIC, as in the paper) so the long side is ``size``, keeping the
   aspect ratio, then zero padding centred to ``size``×``size`` (an odd remainder goes bottom/right).
   Bicubic samples a 4×4 neighbourhood, so a 5–8× reduction of a detector image aliases fine
   high-frequency texture (grids, noise) where INTER_AREA would average it; we keep the paper's choice.
   Bicubic overshoot is clipped back to [0, 1] before quantisation.
6. Quantise to uint8 (default) or uint16, rounding to nearest. Optional CLAHE (clip 2.0, 8×8 tiles,
   the downstream recipe) is applied last, on the padded image, exactly as a downstream stage reading
   a shard's PNG would apply it.

Errors are typed (``PreprocessError`` and its subclasses); each has a short ``reason`` code that the
catalog stores as the quarantine reason, and a message saying what is wrong and why.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixels

log = logging.getLogger("ingest.preprocess")

OUTPUT_DTYPES = ("uint8", "uint16")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# cv2.calcHist counts in float32, exact only below 2**24 pixels per bin; larger frames use bincount.
_CALCHIST_MAX_PIXELS = 2**24


@dataclass(frozen=True)
class PreprocessParams:
    """The preprocessing recipe's numbers (DESIGN.md defaults); stored in every shard manifest."""

    size: int = 512
    clip_low_pct: float = 0.5
    clip_high_pct: float = 99.5
    clahe: bool = False
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    output_dtype: str = "uint8"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"size must be an integer ≥ 8 (output is size×size pixels), got {self.size!r}; "
                             "the paper uses 512")
        for name in ("clip_low_pct", "clip_high_pct"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
                raise ValueError(f"{name} must be a percentile between 0 and 100, got {value!r}")
        if not self.clip_low_pct < self.clip_high_pct:
            raise ValueError(f"clip_low_pct ({self.clip_low_pct}) must be below clip_high_pct "
                             f"({self.clip_high_pct}); the paper uses 0.5 and 99.5")
        if not isinstance(self.clahe, bool):
            raise ValueError(f"clahe must be true or false, got {self.clahe!r}")
        if isinstance(self.clahe_clip, bool) or not isinstance(self.clahe_clip, int | float) or self.clahe_clip <= 0:
            raise ValueError(f"clahe_clip must be a positive number (the paper uses 2.0), got {self.clahe_clip!r}")
        if (isinstance(self.clahe_tiles, bool) or not isinstance(self.clahe_tiles, int)
                or not 1 <= self.clahe_tiles <= self.size):
            raise ValueError(f"clahe_tiles must be an integer from 1 to size ({self.size}), the number of tiles "
                             f"per side (the paper uses 8), got {self.clahe_tiles!r}")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {self.output_dtype!r}")

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
        super().__init__(f"{what} has no Pixel Data element (a report, structured report, RT plan or other "
                         "non-image object): nothing to preprocess", "no_pixel_data")


class UnsupportedPhotometric(PreprocessError):
    def __init__(self, photometric: str, detail: str):
        super().__init__(f"unsupported photometric interpretation {photometric}: {detail}; "
                         f"only grayscale radiographs ({' / '.join(MONOCHROME)}, 1 sample per pixel) are used",
                         f"unsupported_photometric:{photometric.replace(' ', '_')}")


class DecodeError(PreprocessError):
    def __init__(self, detail: str, code: str):
        super().__init__(f"cannot decode the pixel data: {detail}", f"decode_failed:{code}")


# -- steps 1–4: DICOM stored values → float32 in [0, 1] -----------------------------------------------
def pixels_to_unit(ds: pydicom.Dataset, clip_low_pct: float = 0.5, clip_high_pct: float = 99.5) -> np.ndarray:
    """The first frame decoded, modality-LUT'd, MONOCHROME1-inverted, percentile-clipped, as float32 in [0, 1]."""
    inverted = _check_photometric(ds)
    values = _decode_first_frame(ds)
    values, slope_sign = _modality_values(values, ds)
    if slope_sign == 0:  # RescaleSlope 0: every pixel has the same value
        return np.zeros(values.shape, np.float32)
    return _clip_to_unit(values, clip_low_pct, clip_high_pct, flip=inverted != (slope_sign < 0))


def _check_photometric(ds: pydicom.Dataset) -> bool:
    """Raise for non-grayscale images; True when the image is MONOCHROME1 (must be inverted)."""
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        raise NoPixelData(_describe(ds))
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = _header_int(ds, "SamplesPerPixel", default=1)
    if not photometric:
        raise DecodeError("the header has Pixel Data but no PhotometricInterpretation, so the pixels cannot be "
                          "interpreted", "missing_element")
    if photometric not in MONOCHROME:
        raise UnsupportedPhotometric(photometric, "colour and palette images are not radiographs")
    if samples != 1:
        raise UnsupportedPhotometric(photometric, f"{samples} samples per pixel")
    return photometric == "MONOCHROME1"


def _decode_first_frame(ds: pydicom.Dataset) -> np.ndarray:
    frames = _header_int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        log.info("%s has %d frames: using the first", _describe(ds), frames)
    transfer_syntax = _transfer_syntax(ds)
    try:
        values = decode_pixels(ds, index=0)
    except MemoryError:
        raise
    except Exception as exc:  # every failure inside pydicom or a codec plugin is a decode failure of this file
        raise DecodeError(f"{type(exc).__name__}: {exc} (transfer syntax {transfer_syntax})",
                          _decode_failure_code(exc, transfer_syntax)) from exc
    if values.ndim != 2 or values.size == 0:
        raise DecodeError(f"decoded frame has shape {values.shape}, expected rows × columns", "bad_shape")
    if not values.dtype.isnative:  # big-endian transfer syntaxes; cv2 needs native byte order
        values = values.astype(values.dtype.newbyteorder("="))
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DecodeError("float pixel data contains NaN or infinite values", "non_finite")
    return values


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return (uid.keyword or str(uid)) if uid else "missing"


def _decode_failure_code(exc: Exception, transfer_syntax: str) -> str:
    """Short, groupable codes for the catalog; the message keeps the full detail."""
    text = str(exc)
    if "missing dependencies" in text or "No pixel data decoders" in text:
        return f"no_decoder:{transfer_syntax}"
    if "less than expected" in text or "too short" in text:
        return "truncated"
    if "Transfer Syntax UID" in text:
        return "no_transfer_syntax"
    if "Missing required element" in text:
        return "missing_element"
    if "Unable to decode" in text:
        return f"codec_error:{transfer_syntax}"
    return type(exc).__name__


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
    """Apply a Modality LUT Sequence; for a linear rescale return the slope's sign instead (module doc, step 2)."""
    if "ModalityLUTSequence" in ds:
        try:
            return apply_modality_lut(values, ds), 1
        except Exception as exc:
            raise DecodeError(f"invalid Modality LUT Sequence ({type(exc).__name__}: {exc})",
                              "invalid_modality_lut") from exc
    if "RescaleSlope" not in ds:
        return values, 1
    try:
        slope = float(ds.RescaleSlope if ds.RescaleSlope not in (None, "") else 1.0)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"RescaleSlope is not a number ({exc})", "invalid_header") from exc
    if not np.isfinite(slope):
        raise DecodeError(f"RescaleSlope is {slope}", "invalid_header")
    return values, int(np.sign(slope))


def _clip_to_unit(values: np.ndarray, low_pct: float, high_pct: float, flip: bool = False) -> np.ndarray:
    """Clip to the [low_pct, high_pct] percentiles and map linearly to [0, 1] (reversed when ``flip``)."""
    lo, hi = percentiles(values, low_pct, high_pct)
    if not hi > lo:  # constant (or nearly constant) image: nothing to stretch
        return np.zeros(values.shape, np.float32)
    unit = values.astype(np.float32)
    np.clip(unit, lo, hi, out=unit)
    if flip:
        np.subtract(hi, unit, out=unit)
    else:
        unit -= lo
    unit *= np.float32(1.0 / (hi - lo))
    return unit


def percentiles(values: np.ndarray, low_pct: float, high_pct: float) -> tuple[float, float]:
    """``np.percentile(values, [low_pct, high_pct])`` (linear method), exact and fast for 8/16-bit integers."""
    if values.dtype.itemsize > 2 or values.dtype.kind not in "uib":
        return tuple(float(p) for p in np.percentile(values, [low_pct, high_pct]))
    counts, offset = _histogram(values)
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    return _percentile_from_cumulative(cumulative, n, low_pct) + offset, \
        _percentile_from_cumulative(cumulative, n, high_pct) + offset


def _histogram(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts of every possible value (index i counts value i + offset) for 8/16-bit integer data."""
    if values.dtype.kind == "b":
        values = values.view(np.uint8)
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


# -- step 5: geometry -------------------------------------------------------------------------------------------
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
    out[top:top + new_height, left:left + new_width] = img
    return out


# -- step 6: output ---------------------------------------------------------------------------------------------
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


# -- whole pipeline ---------------------------------------------------------------------------------------------
def preprocess_dataset(ds: pydicom.Dataset, params: PreprocessParams = PreprocessParams()) -> np.ndarray:
    """All steps: a DICOM dataset → size×size uint8/uint16 image."""
    return _finish(pixels_to_unit(ds, params.clip_low_pct, params.clip_high_pct), params)


def preprocess_file(path: str | os.PathLike, params: PreprocessParams = PreprocessParams()) -> np.ndarray:
    """Read a DICOM Part 10 file and preprocess it. A missing or unreadable path raises OSError as usual."""
    return preprocess_dataset(read_dicom(path), params)


def read_dicom(path: str | os.PathLike) -> pydicom.Dataset:
    """``dcmread`` with non-DICOM and broken headers turned into ``DecodeError``."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise DecodeError(f"{path} is not a DICOM Part 10 file (no 'DICM' preamble): {exc}", "not_dicom") from exc
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # pydicom raises many types on corrupt headers; all mean "unreadable"
        raise DecodeError(f"{path} has an unreadable header ({type(exc).__name__}: {exc})",
                          "unreadable_header") from exc


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
    if img.ndim != 2 or img.size == 0 or img.dtype.kind not in "uifb":
        raise PreprocessError(f"expected a non-empty grayscale image (H×W, or H×W×3/4 colour of uint8, uint16 or "
                              f"float32), got {img.dtype} of shape {img.shape}", "bad_array")
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise PreprocessError("image contains NaN or infinite values", "non_finite")
    return _finish(_clip_to_unit(img, params.clip_low_pct, params.clip_high_pct), params)


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 or uint16 grayscale image."""
    ok, buffer = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"PNG encoding failed for a {img.dtype} image of shape {img.shape}")
    return buffer.tobytes()


def write_png(img: np.ndarray, out: str | os.PathLike) -> Path:
    """Atomically write ``img`` as a PNG: temp file in the same directory, read back and compared, renamed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(img)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        check = cv2.imdecode(np.frombuffer(tmp.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        if check is None or not np.array_equal(check, img):
            raise OSError(f"{tmp} did not read back as the image just written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# -- CLI ---------------------------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m ingest preview") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Preprocess one DICOM (or PNG/JPEG) image as training sees it and write a PNG.")
    parser.add_argument("file", type=Path, help="a DICOM file (or .png/.jpg, already display-oriented)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--size", type=int, default=PreprocessParams.size, help="output side in pixels (default 512)")
    parser.add_argument("--clahe", action="store_true", help="apply CLAHE (clip 2.0, 8×8 tiles) as downstream does")
    parser.add_argument("--output-dtype", choices=OUTPUT_DTYPES, default=PreprocessParams.output_dtype,
                        help="PNG bit depth (default uint8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = PreprocessParams(size=args.size, clahe=args.clahe, output_dtype=args.output_dtype)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.file.is_file():
        parser.error(f"{args.file} is not a file")
    try:
        if args.file.suffix.lower() in IMAGE_SUFFIXES:
            img = cv2.imread(str(args.file), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise PreprocessError(f"{args.file} is not a readable PNG/JPEG image", "not_an_image")
            out = preprocess_array(img, params)
        else:
            out = preprocess_file(args.file, params)
    except PreprocessError as exc:
        print(f"error: {args.file}: {exc} [reason: {exc.reason}]", file=sys.stderr)
        return 1
    write_png(out, args.out)
    print(f"wrote {args.out} ({out.shape[1]}×{out.shape[0]} {out.dtype})")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())

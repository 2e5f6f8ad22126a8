"""Uploads → the image a model was trained on. Pure functions: bytes and a content type in, arrays out.

Every rejection is an `InputError` with an HTTP status (4xx), a short code and a message for the client:
the service answers it and carries on. Accepted bodies: ``application/dicom``, ``image/png``,
``image/jpeg`` (``application/octet-stream`` is told apart by its magic bytes), or
``multipart/form-data`` with the image in a part named ``file`` and optional text fields (``sex``).
Multipart is parsed here, in memory, so an upload never touches the disk (Starlette's form parser
spools files over 1 MB to temporary files).

The preprocessing is the training's, step for step (`Recipe`):
- a view model (pretraining) saw shard PNGs: `ingest.imaging.preprocess` with the shard set's parameters, a
  PNG round trip, then `cv2.INTER_AREA` to the model's ``image_size`` when the sizes differ
  (`pedx_ray.data.SampleDecoder`);
- a fine-tuned model saw cached PNGs: `ingest.imaging.preprocess` at ``image_size`` with CLAHE when
  ``enhance`` is ``clahe``, or another `pedx_ray.enhance` chain after it (`pedx_ray.datasets`).
DICOM goes through ``preprocess_dataset`` (as ``preprocess_file`` does for a file), PNG/JPEG through
``cv2.imdecode(..., IMREAD_UNCHANGED)`` + ``preprocess_array`` (as ``cv2.imread`` + ``preprocess_array``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from ingest.imaging.png import encode_png
from ingest.imaging.preprocess import (
    PreprocessError,
    PreprocessParams,
    preprocess_array,
    preprocess_dataset,
)

MEDIA_TYPES = {"application/dicom": "dicom", "image/png": "png", "image/jpeg": "jpeg"}
SNIFFED_TYPES = ("application/octet-stream", "")  # the format is read from the bytes
MULTIPART = "multipart/form-data"
FILE_FIELD = "file"
MAX_FORM_PARTS = 16
MAX_FIELD_BYTES = 1024
# A colour image is a photograph or a screenshot, not a radiograph; grayscale radiographs saved as
# RGB (equal channels, or nearly so after JPEG chroma subsampling) are accepted as training did.
COLOUR_SPREAD = 24  # grey levels (8-bit scale) between a pixel's channels
COLOUR_FRACTION = 0.01  # share of pixels above that spread
MALE, FEMALE = 1.0, 0.0  # the training tables' encoding (pedx_ray.datasets)
SEX_VALUES = {"m": MALE, "male": MALE, "1": MALE, "f": FEMALE, "female": FEMALE, "0": FEMALE}


class InputError(ValueError):
    """A request the service refuses: ``status`` (4xx), a stable ``code``, a message saying why, and
    ``details`` the answer carries beside them (what the view gate saw, the bone-age SD)."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class Upload:
    """The image bytes of a request, their format, and the request's text fields (e.g. ``sex``)."""

    data: bytes
    kind: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decoded:
    """A decoded upload: a DICOM dataset (pixels not decoded yet) or a PNG/JPEG array; the header's sex."""

    kind: str
    dataset: pydicom.Dataset | None = None
    array: np.ndarray | None = None
    header_sex: float | None = None


# ---------------------------------------------------------------- body → Upload


def check_length(declared: str | None, limits: Limits) -> None:
    """Refuse a body whose Content-Length is over the limit before reading it."""
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError as exc:
        raise InputError(400, "bad_content_length", f"Content-Length {declared!r} is not a number") from exc
    if length > limits.max_upload_bytes:
        raise too_large(length, limits)


def too_large(length: int | None, limits: Limits) -> InputError:
    size = f"{length:,} bytes" if length is not None else "more bytes"
    return InputError(
        413, "upload_too_large", f"the upload is {size}; the limit is {limits.max_upload_bytes:,} bytes"
    )


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and its parameters."""
    main, *rest = (content_type or "").split(";")
    params = {}
    for item in rest:
        key, _, value = item.strip().partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), params


def sniff(data: bytes) -> str | None:
    """The format the magic bytes say: a Part 10 preamble (DICM at 128), PNG or JPEG."""
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def parse_body(body: bytes, content_type: str | None) -> Upload:
    """The upload in a request body of the given Content-Type."""
    if not body:
        raise InputError(400, "empty_body", "the request body is empty; send a DICOM, PNG or JPEG file")
    kind, params = media_type(content_type)
    if kind == MULTIPART:
        data, part_type, fields = parse_multipart(body, params.get("boundary", ""))
        return Upload(data, _kind_of(data, part_type), fields)
    return Upload(body, _kind_of(body, content_type))


def _kind_of(data: bytes, content_type: str | None) -> str:
    declared, _ = media_type(content_type)
    found = sniff(data)
    if declared in SNIFFED_TYPES:
        if found is None:
            raise InputError(
                415,
                "unknown_format",
                "the upload is not a DICOM Part 10 file, PNG or JPEG (no known magic bytes); send "
                "application/dicom, image/png or image/jpeg",
            )
        return found
    if declared not in MEDIA_TYPES:
        raise InputError(
            415,
            "unsupported_media_type",
            f"Content-Type {declared!r} is not accepted; send application/dicom, image/png, image/jpeg "
            "or multipart/form-data with the file in a part named 'file'",
        )
    kind = MEDIA_TYPES[declared]
    if found is not None and found != kind:
        raise InputError(
            415, "content_type_mismatch", f"Content-Type says {declared} but the bytes are {found}"
        )
    if found is None and kind == "dicom":
        raise InputError(
            422,
            "not_dicom",
            "the upload is not a DICOM Part 10 file (no 'DICM' after the 128-byte preamble); send the "
            "file as stored by the modality or PACS",
        )
    if found is None:
        raise InputError(422, "not_an_image", f"the upload is not a readable {kind.upper()} image")
    return kind


def parse_multipart(body: bytes, boundary: str) -> tuple[bytes, str, dict[str, str]]:
    """(file bytes, the file part's Content-Type, text fields) of a multipart/form-data body."""
    if not boundary:
        raise InputError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter)  # the first delimiter has no CRLF before it
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise InputError(
            400, "bad_multipart", "the multipart body is malformed or cut short (no closing boundary)"
        )
    if len(chunks) - 2 > MAX_FORM_PARTS:
        raise InputError(400, "bad_multipart", f"more than {MAX_FORM_PARTS} form parts")
    files: dict[str, tuple[bytes, str]] = {}
    fields: dict[str, str] = {}
    for chunk in chunks[1:-1]:
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator or not head.startswith(b"\r\n"):
            raise InputError(400, "bad_multipart", "a multipart part has no header block")
        headers = {}
        for line in head[2:].decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        _, disposition = media_type(headers.get("content-disposition", ""))
        name = disposition.get("name", "")
        if name == FILE_FIELD or "filename" in disposition:
            # the part's filename (often the patient's name) is deliberately not kept
            files.setdefault(name, (content, headers.get("content-type", "")))
        elif name:
            if len(content) > MAX_FIELD_BYTES:
                raise InputError(400, "bad_multipart", f"form field {name!r} is over {MAX_FIELD_BYTES} bytes")
            fields[name] = content.decode("utf-8", "replace").strip()
    file = files.get(FILE_FIELD) or next(iter(files.values()), None)
    if file is None or not file[0]:
        raise InputError(400, "empty_body", f"the form has no (or an empty) file part named {FILE_FIELD!r}")
    return file[0], file[1], fields


# ---------------------------------------------------------------- Upload → Decoded


def decode(upload: Upload, limits: Limits) -> Decoded:
    """Parse the header (DICOM) or decode the image (PNG/JPEG), refusing oversized images first."""
    if upload.kind == "dicom":
        return _decode_dicom(upload.data, limits)
    return _decode_image(upload.data, upload.kind, limits)


def _decode_dicom(data: bytes, limits: Limits) -> Decoded:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise InputError(422, "not_dicom", f"not a DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on a corrupt header; all mean "unreadable"
        raise InputError(422, "unreadable_header", f"unreadable DICOM header ({type(exc).__name__})") from exc
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError) as exc:
        raise InputError(422, "invalid_header", "Rows / Columns are not numbers") from exc
    _check_pixels(columns, rows, limits)
    # Error messages name the dataset by its SOP Instance UID; none of it may reach a client or a log.
    for keyword in ("SOPInstanceUID",):
        if keyword in ds:
            delattr(ds, keyword)
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return Decoded("dicom", dataset=ds, header_sex={"M": MALE, "F": FEMALE}.get(sex))


def _decode_image(data: bytes, kind: str, limits: Limits) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                width, height = header.size
    except Image.DecompressionBombError as exc:
        raise InputError(413, "image_too_large", f"the image is too large to decode ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(422, "not_an_image", f"not a readable {kind.upper()} image") from exc
    _check_pixels(width, height, limits)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise InputError(
            422, "not_an_image", f"the {kind.upper()} image cannot be decoded (damaged or cut short)"
        )
    if array.ndim == 3 and array.shape[2] >= 3 and is_colour(array[:, :, :3]):
        raise InputError(
            422,
            "colour_image",
            "the image is in colour; a radiograph is grayscale (send the DICOM, or a grayscale export)",
        )
    return Decoded(kind, array=array)


def _check_pixels(width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise InputError(
            413,
            "image_too_large",
            f"the image is {width}×{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}",
        )


def is_colour(bgr: np.ndarray) -> bool:
    """True when more than COLOUR_FRACTION of the pixels have channels COLOUR_SPREAD grey levels apart."""
    step = max(1, int(np.sqrt(bgr.shape[0] * bgr.shape[1] / 250_000)))  # ~250k pixels are plenty
    sample = bgr[::step, ::step].astype(np.int32)
    spread = sample.max(axis=2) - sample.min(axis=2)
    threshold = COLOUR_SPREAD * (257 if bgr.dtype == np.uint16 else 1)
    return float((spread > threshold).mean()) > COLOUR_FRACTION


def parse_sex(value: str | None) -> float | None:
    """M/F (male/female, 1/0) → 1.0 / 0.0; None when not given."""
    if value is None or value == "":
        return None
    try:
        return SEX_VALUES[value.strip().lower()]
    except KeyError:
        raise InputError(422, "invalid_sex", f"sex must be M or F, not {value[:20]!r}") from None


# ---------------------------------------------------------------- Decoded → model input


@dataclass(frozen=True)
class Recipe:
    """How training turned a radiograph into a model input (see the module docstring)."""

    params: PreprocessParams
    enhance: str = "none"  # a pedx_ray.enhance chain applied after `params`; "clahe" is in params
    input_size: int = 0  # model input side; 0 = params.size
    source: str = ""  # where the parameters come from, shown by /v1/models

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The preprocessed image (``params.size`` square) → the uint8 model input."""
        if image.dtype != np.uint8:  # a 16-bit shard PNG read back as training read it
            image = cv2.imdecode(np.frombuffer(encode_png(image), np.uint8), cv2.IMREAD_GRAYSCALE)
        if self.enhance not in ("none", "clahe"):
            from pedx_ray.enhance import ENHANCERS

            image = ENHANCERS[self.enhance](image)
        size = self.input_size or self.params.size
        if image.shape != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        return image

    def to_dict(self) -> dict:
        return {
            "preprocessing": self.params.to_dict(),
            "enhance": self.enhance,
            "input_size": self.input_size or self.params.size,
            "source": self.source,
        }


def prepare(decoded: Decoded, recipe: Recipe) -> np.ndarray:
    """The uint8 (input_size, input_size) model input; a preprocessing failure is a 422."""
    try:
        if decoded.dataset is not None:
            image = preprocess_dataset(decoded.dataset, recipe.params)
        else:
            image = preprocess_array(decoded.array, recipe.params)
    except PreprocessError as exc:
        raise InputError(422, exc.reason, str(exc)) from exc
    return recipe.apply(image)

"""DICOM Part 10 files for rendered phantoms: CR and DX (for presentation), several pixel encodings.

``stored_pixels`` quantises a [0, 1] image to the stored bit depth and photometric interpretation; the
writer fills the patient / study / series / image modules as a modality does and compresses with
pydicom's encoders (pylibjpeg-openjpeg, pyjpegls, pylibjpeg-rle). Writes go to a temporary name in the
target directory, are read back, then renamed, so a crash never leaves a truncated file under the real name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from ..files import replacing

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
SOP_CLASS = {"CR": CR_IMAGE_STORAGE, "DX": DX_PRESENTATION_STORAGE}
UNCOMPRESSED = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}
COMPRESSED = {str(JPEG2000Lossless), str(JPEGLSLossless), str(RLELossless), str(HTJ2KLossless)}
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Encoding:
    modality: str
    photometric: str
    bits_stored: int
    transfer_syntax: str
    rescale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.modality not in SOP_CLASS:
            raise ValueError(f"modality must be CR or DX, got {self.modality!r}")
        if self.photometric not in PHOTOMETRICS:
            raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {self.photometric!r}")
        if not 10 <= self.bits_stored <= 16:
            raise ValueError(f"bits_stored must be 10..16, got {self.bits_stored}")
        if self.transfer_syntax not in UNCOMPRESSED | COMPRESSED:
            raise ValueError(
                f"unsupported transfer syntax {self.transfer_syntax}; use one of "
                f"{sorted(UNCOMPRESSED | COMPRESSED)}"
            )


def uid(seed: int, *parts: object) -> str:
    """A UID fixed by the seed and what it names: the 2.25 (UUID-derived) root over 128 bits of a hash."""
    digest = hashlib.sha256("|".join(["pedx-phantom", str(seed), *map(str, parts)]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def stored_pixels(image: np.ndarray, enc: Encoding) -> np.ndarray:
    """Quantise a [0, 1] image (bone bright) to uint16 stored values; MONOCHROME1 stores bone dark."""
    top = (1 << enc.bits_stored) - 1
    values = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    return (top - values).astype(np.uint16) if enc.photometric == "MONOCHROME1" else values


def age_string(birth: dt.date, on: dt.date) -> str:
    """DICOM AS: days under a month, months under two years, else years (as modalities write it)."""
    days = (on - birth).days
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    months = (on.year - birth.year) * 12 + on.month - birth.month - (on.day < birth.day)
    if days < 31:
        return f"{days:03d}D"
    if months < 24:
        return f"{months:03d}M"
    return f"{years:03d}Y"


@dataclass(frozen=True)
class Identity:
    """Who and what an instance is: patient, study, series and instance identifiers and dates."""

    patient_id: str
    patient_name: str
    patient_sex: str
    birth_date: dt.date
    study_date: dt.date
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    series_number: int
    study_time: str  # HHMMSS, from the plan, never the clock


def build_dataset(
    pixels: np.ndarray,
    enc: Encoding,
    who: Identity,
    header,
    *,
    laterality: str | None,
    manufacturer: str,
    institution: str,
    pixel_spacing_mm: float,
) -> Dataset:
    """A complete CR / DX image dataset (uncompressed pixel data; see ``write_instance`` for compression)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[enc.modality]
    meta.MediaStorageSOPInstanceUID = who.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1403.1")
    meta.ImplementationVersionName = "PEDX_PHANTOM_1"
    ds = Dataset()
    ds.file_meta = meta
    date = who.study_date.strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if enc.modality == "CR" else ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = SOP_CLASS[enc.modality]
    ds.SOPInstanceUID = who.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = who.study_time
    ds.AccessionNumber = who.accession
    ds.Modality = enc.modality
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = manufacturer
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.StudyDescription = header.study_description
    ds.SeriesDescription = header.series_description
    code = Dataset()
    code.CodeValue = header.procedure_code
    code.CodingSchemeDesignator = "99PEDX"
    code.CodeMeaning = header.procedure_meaning
    ds.ProcedureCodeSequence = [code]
    performed = Dataset()
    performed.CodeValue = header.protocol_code
    performed.CodingSchemeDesignator = "99PEDX"
    performed.CodeMeaning = header.protocol_name
    ds.PerformedProtocolCodeSequence = [performed]
    ds.PatientName = who.patient_name
    ds.PatientID = who.patient_id
    ds.PatientBirthDate = who.birth_date.strftime("%Y%m%d")
    ds.PatientSex = who.patient_sex
    ds.PatientAge = age_string(who.birth_date, who.study_date)
    if header.body_part is not None:
        ds.BodyPartExamined = header.body_part
    ds.ProtocolName = header.protocol_name
    ds.ViewPosition = header.view_position
    ds.StudyInstanceUID = who.study_uid
    ds.SeriesInstanceUID = who.series_uid
    ds.StudyID = who.accession[-8:]
    ds.SeriesNumber = who.series_number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    if laterality:
        # CR puts the side on the series (Laterality), DX on the image (ImageLaterality)
        if enc.modality == "DX":
            ds.ImageLaterality = laterality
        else:
            ds.Laterality = laterality
    elif enc.modality == "DX":
        ds.ImageLaterality = "U"
    rows, cols = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = enc.photometric
    ds.Rows, ds.Columns = rows, cols
    spacing = f"{pixel_spacing_mm:.4f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = 0
    if enc.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (f"{v:g}" for v in enc.rescale)
        ds.RescaleType = "US"
    top = (1 << enc.bits_stored) - 1
    slope, intercept = enc.rescale or (1.0, 0.0)
    ds.WindowCenter = f"{(top / 2) * slope + intercept:.1f}"
    ds.WindowWidth = f"{top * slope:.1f}"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def encode(ds: Dataset, pixels: np.ndarray, transfer_syntax: str) -> None:
    """Set the transfer syntax, compressing the pixel data losslessly where it asks for it."""
    ts = UID(transfer_syntax)
    if ts == HTJ2KLossless:  # pydicom has no HTJ2K encoder: OpenJPH through imagecodecs
        import imagecodecs

        ds.PixelData = encapsulate([imagecodecs.htj2k_encode(np.ascontiguousarray(pixels), reversible=True)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = ts
    elif str(ts) in COMPRESSED:
        ds.compress(
            ts, pixels, encoding_plugin="pylibjpeg" if ts == RLELossless else "", generate_instance_uid=False
        )
    else:
        ds.file_meta.TransferSyntaxUID = ts


def save_dataset_atomic(ds: Dataset, path: Path) -> None:
    """Save to a temporary file beside ``path``, read it back, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
        check = dcmread(tmp, stop_before_pixels=True)
        if check.SOPInstanceUID != ds.SOPInstanceUID:
            raise OSError(f"read-back of {tmp} does not match the instance written")

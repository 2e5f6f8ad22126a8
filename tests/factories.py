"""Small, valid radiograph DICOM files for tests (a few kB each), with the headers a modality fills."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

PREFIX = "1.2.826.0.1.3680043.10.1337."  # a test-only UID root


def uid(*parts: object) -> str:
    """A deterministic UID from ``parts`` (same parts, same UID)."""
    return generate_uid(PREFIX, entropy_srcs=[str(p) for p in parts])


def radiograph(
    *,
    patient_id: str,
    study_key: str,
    instance: int = 0,
    study_date: date = date(2017, 3, 14),
    body_part: str | None = "CHEST",
    view_position: str | None = "PA",
    study_description: str | None = "XR CHEST PA",
    series_description: str | None = None,
    procedure_code: str | None = None,
    sex: str = "F",
    age: str = "007Y",
    shape: tuple[int, int] = (48, 40),
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
) -> Dataset:
    """A DX For Presentation instance whose pixels are a seeded gradient + disc (not constant)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = uid(study_key, "sop", instance)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(study_key, "study")
    ds.SeriesInstanceUID = uid(study_key, "series", instance)
    ds.Modality = "DX"
    ds.PatientID = patient_id
    ds.PatientName = f"Test^{patient_id}"
    ds.PatientSex = sex
    ds.PatientAge = age
    ds.StudyDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.AccessionNumber = hashlib.sha1(study_key.encode()).hexdigest()[:12]
    ds.SeriesNumber = instance + 1
    ds.InstanceNumber = 1
    for keyword, value in (
        ("BodyPartExamined", body_part),
        ("ViewPosition", view_position),
        ("StudyDescription", study_description),
        ("SeriesDescription", series_description),
    ):
        if value is not None:
            setattr(ds, keyword, value)
    if procedure_code is not None:
        code = Dataset()
        code.CodeValue = procedure_code
        code.CodingSchemeDesignator = "99TEST"
        code.CodeMeaning = study_description or procedure_code
        ds.ProcedureCodeSequence = Sequence([code])
    rng = np.random.default_rng(int(hashlib.sha1(f"{study_key}{instance}".encode()).hexdigest()[:8], 16))
    rows, cols = shape
    yy, xx = np.mgrid[:rows, :cols]
    image = 200 + 10 * xx + 8 * yy + rng.integers(0, 50, shape)
    image[(yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (min(shape) / 4) ** 2] += 1500
    image = np.clip(image, 0, 2**bits_stored - 1).astype(np.uint16)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = image.tobytes()
    return ds


def write(ds: Dataset, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path

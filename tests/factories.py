"""The DICOM test data of the suite: image datasets, radiograph Part 10 files, the synthetic studies the
networking tests serve, and the pixel arrays the preprocessing and serving tests feed in.

Everything is deterministic (seeded pixels, UIDs derived from their parts), small (a few kB per file) and
valid: files carry a File Meta header and save with ``enforce_file_format=True``.
"""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PREFIX = "1.2.826.0.1.3680043.10.1337."  # a test-only UID root


def uid(*parts: object) -> str:
    """A deterministic UID from ``parts`` (same parts, same UID)."""
    return generate_uid(PREFIX, entropy_srcs=[str(p) for p in parts])


# -- pixel arrays --
def ramp(rows: int = 40, cols: int = 30, scale: int = 7) -> np.ndarray:
    """12-bit stored values rising along the rows (uint16), wrapping below 4000."""
    return (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) * scale) % 4000


def textured_pixels(rows: int = 260, cols: int = 210, bits: int = 12, seed: int = 0) -> np.ndarray:
    """Smooth structure plus noise over the whole stored range: many pixels near rounding boundaries."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((rows // 20 + 2, cols // 20 + 2)).astype(np.float32)
    body = cv2.resize(coarse, (cols, rows), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 0.03, (rows, cols))
    return np.clip(body * (2**bits - 1), 0, 2**bits - 1).astype(np.uint16 if bits > 8 else np.uint8)


def gradient_8bit(shape: tuple[int, int] = (90, 70)) -> np.ndarray:
    """A diagonal uint8 gradient: the grey image a PNG or JPEG upload holds."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx * 3 + yy * 2) % 256).astype(np.uint8)


# -- datasets and files --
def image_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool | None = None,
    raw: bytes | None = None,
    *,
    sop_class: str = SecondaryCaptureImageStorage,
    sop_uid: str | None = None,
    **elements: object,
) -> Dataset:
    """An uncompressed Explicit VR Little Endian image dataset holding ``pixels`` (H×W or frames×H×W).

    Integer pixels fill Pixel Data with BitsAllocated from the dtype; float pixels fill Float Pixel Data.
    ``raw`` overrides the pixel bytes (e.g. garbage high bits); ``elements`` are further keywords to set.
    """
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if frames > 1:
        ds.NumberOfFrames = frames
    if pixels.dtype.kind == "f":
        ds.BitsAllocated = 32
        ds.FloatPixelData = pixels.astype("<f4").tobytes()
    else:
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i" if signed is None else signed)
        ds.PixelData = raw if raw is not None else pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


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
    """A DX For Presentation instance with the headers a modality fills; its pixels are a seeded gradient +
    disc (not constant). UIDs derive from ``study_key`` and ``instance``."""
    rng = np.random.default_rng(int(hashlib.sha1(f"{study_key}{instance}".encode()).hexdigest()[:8], 16))
    rows, cols = shape
    yy, xx = np.mgrid[:rows, :cols]
    image = 200 + 10 * xx + 8 * yy + rng.integers(0, 50, shape)
    image[(yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (min(shape) / 4) ** 2] += 1500
    image = np.clip(image, 0, 2**bits_stored - 1).astype(np.uint16)
    ds = image_dataset(
        image,
        photometric,
        bits_stored,
        sop_class=DigitalXRayImageStorageForPresentation,
        sop_uid=uid(study_key, "sop", instance),
        StudyInstanceUID=uid(study_key, "study"),
        SeriesInstanceUID=uid(study_key, "series", instance),
        Modality="DX",
        PatientID=patient_id,
        PatientName=f"Test^{patient_id}",
        PatientSex=sex,
        PatientAge=age,
        StudyDate=study_date.strftime("%Y%m%d"),
        StudyTime="101500",
        AccessionNumber=hashlib.sha1(study_key.encode()).hexdigest()[:12],
        SeriesNumber=instance + 1,
        InstanceNumber=1,
    )
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
    return ds


def write(ds: Dataset, directory: Path) -> Path:
    """Save ``ds`` as ``directory/<SOPInstanceUID>.dcm`` (Part 10)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def make_instance(
    path: Path,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    study_date: str = "20200101",
    study_time: str = "120000",
    modality: str = "CR",
    patient_id: str = "P0",
    seed: int = 0,
) -> Path:
    """Write a ~2 kB CR-storage Part 10 file at ``path`` (32x32 12-bit pixels derived from seed)."""
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(32, 32), dtype=np.uint16)
    ds = image_dataset(
        pixels,
        bits_stored=12,
        sop_class=ComputedRadiographyImageStorage,
        sop_uid=sop_uid,
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        PatientID=patient_id,
        PatientName=f"Phantom^{patient_id}",
        StudyDate=study_date,
        StudyTime=study_time,
        Modality=modality,
        StudyDescription=f"{modality} test study",
        SeriesNumber=1,
        InstanceNumber=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# Small synthetic studies for the networking tests: (StudyDate, StudyTime, modality, instances per series).
# Four studies share 2018-01-01 so a result cap of 3 forces find_studies to split one day by time.
SYNTHETIC_STUDIES = (
    ("20150302", "081500", "CR", (1, 2)),
    ("20151120", "140000", "DX", (2,)),
    ("20160615", "093000", "CR", (1,)),
    ("20170101", "000001", "DX", (1, 1)),
    ("20180101", "080000", "CR", (1,)),
    ("20180101", "101500", "DX", (2,)),
    ("20180101", "133000", "CR", (1,)),
    ("20180101", "235959", "CR", (1,)),
    ("20190704", "120000", "DX", (1, 2)),
    ("20200229", "110000", "CR", (1,)),
    ("20211231", "170000", "DX", (2,)),
    ("20220515", "090000", "MR", (1,)),  # not a radiograph: the default modality filter skips it
)


def write_synthetic_studies(root: Path, studies=SYNTHETIC_STUDIES) -> list[Path]:
    """One file per instance under root; UIDs are unique per study, series and instance."""
    paths = []
    for s, (date_, time_of_day, modality, series_sizes) in enumerate(studies):
        study_uid = f"1.2.826.0.1.3680043.10.999.{s + 1}"
        for n, size in enumerate(series_sizes):
            series_uid = f"{study_uid}.{n + 1}"
            for i in range(size):
                sop_uid = f"{series_uid}.{i + 1}"
                paths.append(
                    make_instance(
                        root / f"{sop_uid}.dcm",
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=sop_uid,
                        study_date=date_,
                        study_time=time_of_day,
                        modality=modality,
                        patient_id=f"P{s % 5}",
                        seed=len(paths),
                    )
                )
    return paths


def identifiable_radiograph(
    *,
    patient_id: str,
    patient_name: str,
    study_key: str,
    study_date: date,
    burned_in_text: bool = False,
) -> Dataset:
    """A chest PA ``radiograph`` carrying what de-identification must remove: the patient's name inside
    the study description, a comment, an institution and a private element; with ``burned_in_text``
    the name and ID are printed into the pixels (``BurnedInAnnotation=YES``) at a known corner."""
    from ingest.phantoms.annotation import burn_in_text

    family = patient_name.split("^")[0]
    ds = radiograph(
        patient_id=patient_id,
        study_key=study_key,
        study_date=study_date,
        study_description=f"XR CHEST PA {family.upper()}",
        shape=(400, 320),
    )
    ds.PatientName = patient_name
    ds.PatientBirthDate = (study_date.replace(year=study_date.year - 7)).strftime("%Y%m%d")
    ds.ImageComments = f"called {family} at home"
    ds.InstitutionName = "ST EXAMPLE CHILDREN'S HOSPITAL"
    ds.add_new(0x00091001, "LO", f"private {patient_id}")
    ds.BurnedInAnnotation = "NO"
    if burned_in_text:
        pixels = ds.pixel_array.copy()
        burn_in_text(pixels, [patient_name.replace("^", " "), f"ID {patient_id}"], "top-left", 4095)
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds.BurnedInAnnotation = "YES"
    return ds

"""De-identification: one pseudonymisation shared by catalogs, shard records and exported DICOM.

The work is done by dicognito (a maintained implementation of the DICOM PS3.15 Basic Application Level
Confidentiality Profile): UIDs become ``2.<digits>`` pseudonyms, names and IDs fake values, dates and
times move back by a fixed offset. dicognito shifts every date of one ``Anonymizer`` by the same
offset, so each patient gets an anonymizer seeded with the site's secret salt and the patient's
pseudonym: the shift is per patient and deterministic, and intervals between a patient's studies are
kept. Catalog and shard values are computed by running the same anonymizer on a dataset that holds only
the values to replace, so a shard sample, a row of an exported catalog and an exported file agree
(the StudyDate inside an exported file moves with its StudyTime, so it can be one day later).

PS3.15 options applied (their CID 7050 codes are written into exported files):

* Basic Application Level Confidentiality Profile (113100);
* Retain Longitudinal Temporal Information with Modified Dates Option (113107);
* Retain Patient Characteristics Option (113108): sex and age stay, for training;
* Clean Descriptors Option (113105): study, series and protocol descriptions are kept, because the
  view labels are read from them, with the patient's own name parts and IDs removed;
* Clean Pixel Data Option (113101): only for files whose burned-in text was masked
  (``ingest export --burned-in mask``).

Not applied: Retain UIDs, Retain Device Identity, Retain Institution Identity, Retain Safe Private
(private elements are removed).
"""

from __future__ import annotations

import hashlib
import re
from datetime import date
from functools import lru_cache

import pandas as pd
import pydicom
from dicognito.anonymizer import Anonymizer
from pydicom.dataset import Dataset, FileMetaDataset

PROFILE = "PS3.15 Basic Application Level Confidentiality Profile"
# What to do with an image whose header says BurnedInAnnotation=YES (shards and exports).
BURNED_IN = ("exclude", "mask", "keep")
# CID 7050 "De-identification Method": (code, meaning); the pixel option is added only when applied.
PROFILE_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113105", "Clean Descriptors Option"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)
OPTIONS_APPLIED = tuple(meaning for _, meaning in PROFILE_CODES[1:])
CLEAN_PIXEL_CODE = ("113101", "Clean Pixel Data Option")
DESCRIPTORS = ("StudyDescription", "SeriesDescription", "ProtocolName")
# Free-text elements dicognito keeps; the Basic Profile removes them and training never reads them.
FREE_TEXT = (
    "AdditionalPatientHistory",
    "ImageComments",
    "PatientComments",
    "RequestedProcedureComments",
    "StudyComments",
    "InterpretationText",
)


def patient_key(patient_id_hash: str | None, study_instance_uid: str | None) -> str:
    """Whose dates move together: the patient, or for an instance without a patient id, its study
    (the same fallback the balancer uses to keep splits patient-disjoint)."""
    return patient_id_hash or f"study:{study_instance_uid or ''}"


@lru_cache(maxsize=4096)
def anonymizer(salt: str, key: str) -> Anonymizer:
    """The patient's anonymizer: same salt and patient, same pseudonyms and date shift on every run."""
    return Anonymizer(seed=f"{salt}\x00{key}")


def salt_fingerprint(salt: str) -> str:
    """Tells two salts apart in indexes without storing the secret itself."""
    return hashlib.sha256(f"pedx-ray-deid\x00{salt}".encode()).hexdigest()[:12]


def pseudonyms(
    salt: str,
    *,
    patient_id_hash: str | None,
    sop_instance_uid: str | None,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    study_date: date | None,
) -> dict:
    """The de-identified values of one catalog row's identifying columns (None stays None)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    for keyword, value in (
        ("SOPInstanceUID", sop_instance_uid),
        ("StudyInstanceUID", study_instance_uid),
        ("SeriesInstanceUID", series_instance_uid),
    ):
        if value:
            setattr(ds, keyword, value)
    if study_date is not None:
        ds.StudyDate = study_date.strftime("%Y%m%d")
    anonymizer(salt, patient_key(patient_id_hash, study_instance_uid)).anonymize(ds)
    shifted = ds.get("StudyDate")
    return {
        "sop_instance_uid": str(ds.SOPInstanceUID) if sop_instance_uid else None,
        "study_instance_uid": str(ds.StudyInstanceUID) if study_instance_uid else None,
        "series_instance_uid": str(ds.SeriesInstanceUID) if series_instance_uid else None,
        "study_date": date(int(shifted[:4]), int(shifted[4:6]), int(shifted[6:8])) if shifted else None,
    }


def identifying_words(ds: pydicom.Dataset) -> set[str]:
    """The patient's name parts and IDs as they could appear inside free text."""
    words: set[str] = set()
    for element in ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName"):
        for name in _values(ds.get(element)):
            words.update(part for part in re.split(r"[\^=\s,]+", str(name)) if len(part) >= 2)
    for element in ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID"):
        words.update(str(v).strip() for v in _values(ds.get(element)) if len(str(v).strip()) >= 2)
    return words


def _values(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]


def clean_descriptor(text: str | None, words: set[str]) -> str | None:
    """``text`` without any of ``words`` (whole words, any case); None when nothing is left."""
    if not text or not words:
        return text
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    pattern = rf"(?<!\w)(?:{alternatives})(?!\w)"
    cleaned = " ".join(re.sub(pattern, " ", text, flags=re.IGNORECASE).split())
    return cleaned or None


def deidentify_dataset(
    ds: pydicom.Dataset, salt: str, patient_id_hash: str | None, *, pixels_cleaned: bool
) -> None:
    """De-identify ``ds`` in place for sharing, consistent with ``pseudonyms`` for the same salt.

    PatientID becomes the catalog's salted patient hash, so shared files, catalogs and shards name a
    patient the same way."""
    words = identifying_words(ds)
    for keyword in DESCRIPTORS:
        if keyword in ds:
            setattr(ds, keyword, clean_descriptor(str(ds.get(keyword) or ""), words) or "")
    for keyword in FREE_TEXT:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    anonymizer(salt, patient_key(patient_id_hash, str(ds.get("StudyInstanceUID") or ""))).anonymize(ds)
    ds.PatientID = patient_id_hash or ""
    ds.PatientIdentityRemoved = "YES" if ds.get("BurnedInAnnotation", "YES") == "NO" else "NO"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    codes = PROFILE_CODES + ((CLEAN_PIXEL_CODE,) if pixels_cleaned else ())
    ds.DeidentificationMethod = ["DICOGNITO", *(meaning for _, meaning in codes)]  # LO: 64 chars each
    ds.DeidentificationMethodCodeSequence = [_code(value, meaning) for value, meaning in codes]


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def pseudonymise_rows(rows: list[dict], salt: str) -> list[dict]:
    """Copies of catalog rows (dicts) with their UIDs and study date replaced by ``pseudonyms``."""
    out = []
    for row in rows:
        study_date = row.get("study_date")  # a date, or its ISO text in shard plans
        out.append(
            row
            | pseudonyms(
                salt,
                patient_id_hash=_present(row.get("patient_id_hash")),
                sop_instance_uid=_present(row.get("sop_instance_uid")),
                study_instance_uid=_present(row.get("study_instance_uid")),
                series_instance_uid=_present(row.get("series_instance_uid")),
                study_date=_as_date(study_date),
            )
        )
    return out


def _present(value) -> str | None:
    """A catalog cell as text, with pandas' missing markers as None."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    return str(value)


def _as_date(value) -> date | None:
    if isinstance(value, date):
        return value
    return date.fromisoformat(value) if isinstance(value, str) and value else None

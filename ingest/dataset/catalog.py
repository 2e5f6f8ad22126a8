"""Catalog: one Parquet row per SOP instance, read from DICOM headers (contract 1 of docs/design.md).

``python -m ingest scan DIR --out CATALOG`` walks DIR, hashes every file, reads its header and
writes the catalog as a Parquet dataset directory (one part file per Dask task), labelled with
the view taxonomy. Files that are not usable radiographs stay in the catalog with
``status=unreadable`` and a reason, so nothing is silently dropped. Patient identifiers are
stored only as a salted hash, and descriptions are cleaned of the patient's own name parts and IDs
(``ingest.dataset.deid``). UIDs, study dates and paths stay real here, because this catalog locates
the site's files and joins its label tables; ``python -m ingest export`` writes the shareable,
de-identified catalog.

Beyond the contract's core columns the catalog keeps ``file_size`` and ``file_mtime_ns`` so a re-scan
reuses the rows of unchanged files instead of hashing them again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.errors import InvalidDicomError

from ingest.dask_runner import add_scheduler_argument, run_tasks
from ingest.dataset.deid import DESCRIPTORS, clean_descriptor, identifying_words
from ingest.dataset.labels import label_catalog
from ingest.dataset.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger("ingest.dataset.catalog")

CATALOG_VERSION = 2
# Parquet schema metadata key: {"version": 2, "deidentified": bool, "paths": "absolute"|"relative"}.
# Version 1 catalogs carry no metadata; they are read (the columns added since as nulls), but a
# re-scan re-reads their files.
METADATA_KEY = b"pedx_catalog"
ADDED_IN_VERSION_2 = ("burned_in_annotation",)
HEADER_COLUMNS = (
    "modality",
    "body_part",
    "view_position",
    "laterality",
    "study_date",
    "study_description",
    "series_description",
    "protocol_name",
    "procedure_code",
)
CATALOG_SCHEMA = pa.schema(
    [
        ("sop_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("modality", pa.string()),
        ("body_part", pa.string()),
        ("view_position", pa.string()),
        ("laterality", pa.string()),
        ("study_date", pa.date32()),
        ("study_description", pa.string()),
        ("series_description", pa.string()),
        ("protocol_name", pa.string()),
        ("procedure_code", pa.string()),
        ("patient_id_hash", pa.string()),
        ("patient_sex", pa.string()),
        ("patient_age_months", pa.float32()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("bits_stored", pa.int16()),
        ("photometric", pa.string()),
        ("transfer_syntax", pa.string()),
        ("burned_in_annotation", pa.string()),
        ("label_68", pa.string()),
        ("label_30", pa.string()),
        ("label_7", pa.string()),
        ("label_source", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("file_size", pa.int64()),
        ("file_mtime_ns", pa.int64()),
    ]
)
CATALOG_COLUMNS = tuple(CATALOG_SCHEMA.names)
DESCRIPTOR_COLUMNS = dict(
    zip(DESCRIPTORS, ("study_description", "series_description", "protocol_name"), strict=True)
)
DEFAULT_ID_SALT_ENV = "PEDX_ID_SALT"
_AGE_UNITS_IN_MONTHS = {"D": 12 / 365.25, "W": 12 / 52.1775, "M": 1.0, "Y": 12.0}


class CatalogError(RuntimeError):
    pass


def hash_patient_id(patient_id: str, salt: str) -> str | None:
    """Pseudonymous, stable per site: the same patient gets the same hash under the same salt."""
    if not patient_id:
        return None
    return hashlib.sha256(f"{salt}\x00{patient_id}".encode()).hexdigest()[:20]


def parse_age_months(age: str | None, birth: str | None, study: date | None) -> float | None:
    """PatientAge (e.g. '012Y', '008M') first; otherwise birth date to study date."""
    age = (age or "").strip().upper()
    if len(age) >= 2 and age[:-1].isdigit() and age[-1] in _AGE_UNITS_IN_MONTHS:
        return round(int(age[:-1]) * _AGE_UNITS_IN_MONTHS[age[-1]], 2)
    born = _parse_da(birth)
    if born and study and study >= born:
        return round((study - born).days * 12 / 365.25, 2)
    return None


def _parse_da(value: object) -> date | None:
    text = str(value or "").strip()
    if len(text) >= 8 and text[:8].isdigit():
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            return None
    return None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return " ".join(str(value).split()) or None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def procedure_codes(ds: pydicom.Dataset) -> str | None:
    """CodeValues of the procedure/protocol code sequences, '|'-joined in a stable order."""
    codes: list[str] = []
    sequences = [
        ds.get("ProcedureCodeSequence"),
        ds.get("RequestedProcedureCodeSequence"),
        ds.get("PerformedProtocolCodeSequence"),
    ]
    for request in ds.get("RequestAttributesSequence") or []:
        sequences.append(request.get("RequestedProcedureCodeSequence"))
    for sequence in sequences:
        for item in sequence or []:
            code = str(item.get("CodeValue", "") or "").strip()
            if code and code not in codes:
                codes.append(code)
    return "|".join(codes) or None


def _expected_pixel_bytes(ds: pydicom.Dataset) -> int | None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * frames * ds.BitsAllocated // 8
    except (AttributeError, TypeError, ValueError):
        return None


def _pixel_problem(ds: pydicom.Dataset, transfer_syntax: str | None) -> str | None:
    """A cheap check for what would make the image unusable; full decoding happens at shard time."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return "no_pixel_data: the file has no Pixel Data element"
    if ds.get("Rows") in (None, 0) or ds.get("Columns") in (None, 0):
        return "invalid_header: Rows/Columns missing or zero"
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"unsupported_photometric: {photometric or 'missing'} (only grayscale radiographs are used)"
    syntax = pydicom.uid.UID(transfer_syntax) if transfer_syntax else None
    if "PixelData" in ds and (syntax is None or not syntax.is_compressed):
        expected = _expected_pixel_bytes(ds)
        actual = len(ds.PixelData or b"")
        if expected is not None and actual < expected:
            return f"truncated: pixel data has {actual} of {expected} bytes"
    return None


def read_header(path: str | Path, *, id_salt: str, data: bytes | None = None) -> dict:
    """One catalog row (labels not yet assigned) for the file at ``path``; never raises on bad input."""
    path = Path(path)
    stat = path.stat()
    if data is None:
        data = path.read_bytes()
    row: dict = {c: None for c in CATALOG_COLUMNS}
    row.update(
        path=str(path),
        sha256=hashlib.sha256(data).hexdigest(),
        file_size=stat.st_size,
        file_mtime_ns=stat.st_mtime_ns,
        label_source="none",
    )
    try:
        # force=True reads files without the 128-byte preamble / file meta, which some PACS exports lack.
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        ds.get("SOPInstanceUID")  # trigger parsing of the first elements; garbage fails here
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, OverflowError) as exc:
        return row | {"status": "unreadable", "reason": f"not_dicom: {type(exc).__name__}: {exc}"[:300]}
    try:
        sop_uid = _text(ds, "SOPInstanceUID")
        if not sop_uid:
            return row | {
                "status": "unreadable",
                "reason": "not_dicom: no SOPInstanceUID (not a DICOM instance)",
            }
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = (
            str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
        )
        study_date = _parse_da(ds.get("StudyDate")) or _parse_da(ds.get("SeriesDate"))
        words = identifying_words(ds)
        row.update(
            sop_instance_uid=sop_uid,
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality"),
            body_part=_text(ds, "BodyPartExamined"),
            view_position=_text(ds, "ViewPosition"),
            laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
            study_date=study_date,
            **{column: clean_descriptor(_text(ds, key), words) for key, column in DESCRIPTOR_COLUMNS.items()},
            procedure_code=procedure_codes(ds),
            patient_id_hash=hash_patient_id(_text(ds, "PatientID") or "", id_salt),
            patient_sex=(_text(ds, "PatientSex") or "").upper()[:1] or None,
            patient_age_months=parse_age_months(
                _text(ds, "PatientAge"), _text(ds, "PatientBirthDate"), study_date
            ),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            bits_stored=_int(ds, "BitsStored"),
            photometric=_text(ds, "PhotometricInterpretation"),
            transfer_syntax=transfer_syntax,
            burned_in_annotation=(_text(ds, "BurnedInAnnotation") or "").upper() or None,
        )
        problem = _pixel_problem(ds, transfer_syntax)
    except Exception as exc:  # a malformed element deep in the header must not stop a million-file scan
        return row | {
            "status": "unreadable",
            "reason": f"unreadable_header: {type(exc).__name__}: {exc}"[:300],
        }
    if problem:
        return row | {"status": "unreadable", "reason": problem}
    return row | {"status": "ok", "reason": ""}


def rows_to_frame(rows: Iterable[dict]) -> pd.DataFrame:
    return pa.Table.from_pylist(list(rows), schema=CATALOG_SCHEMA).to_pandas(types_mapper=pd.ArrowDtype)


def catalog_schema(*, deidentified: bool = False) -> pa.Schema:
    """CATALOG_SCHEMA with the version metadata; a de-identified catalog stores paths relative to
    the directory that holds it, so it can be moved with its files."""
    info = {
        "version": CATALOG_VERSION,
        "deidentified": deidentified,
        "paths": "relative" if deidentified else "absolute",
    }
    return CATALOG_SCHEMA.with_metadata({METADATA_KEY: json.dumps(info).encode()})


def frame_to_table(df: pd.DataFrame, *, deidentified: bool = False) -> pa.Table:
    return pa.Table.from_pandas(
        df[list(CATALOG_COLUMNS)], schema=catalog_schema(deidentified=deidentified), preserve_index=False
    )


def catalog_info(path: str | Path) -> dict:
    """The catalog's version metadata; version 1 catalogs (no metadata) read as such."""
    path = Path(path)
    parts = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not parts:
        raise CatalogError(
            f"catalog {path} holds no Parquet part files; re-create it with python -m ingest scan"
        )
    metadata = pq.read_schema(parts[0]).metadata or {}
    if METADATA_KEY not in metadata:
        return {"version": 1, "deidentified": False, "paths": "absolute"}
    info = json.loads(metadata[METADATA_KEY])
    if info.get("version", 0) > CATALOG_VERSION:
        raise CatalogError(
            f"catalog {path} is version {info['version']}, newer than this code reads ({CATALOG_VERSION}); "
            "update PedX-Ray or re-scan with this version"
        )
    return info


def iter_files(root: str | Path) -> Iterator[Path]:
    """Every regular file under root, depth first, sorted per directory so scans are reproducible."""
    stack = [Path(root)]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            entries = sorted(entries, key=lambda e: e.name, reverse=True)
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith(".partial"):
                continue  # hidden files and in-flight spool writes
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def scan_batch(
    paths: list[str], part_path: str, id_salt: str, taxonomy: Taxonomy, reusable: dict[str, dict]
) -> dict:
    """Dask task: read, label and write one part file; returns counts only, to keep the client light.

    ``reusable`` holds earlier catalog rows by path; one whose file size and mtime are unchanged is
    kept instead of hashing the file again.
    """
    rows = []
    reused = 0
    for p in paths:
        previous = reusable.get(p)
        stat = os.stat(p)
        if (
            previous
            and previous["file_size"] == stat.st_size
            and previous["file_mtime_ns"] == stat.st_mtime_ns
        ):
            rows.append(previous)
            reused += 1
        else:
            rows.append(read_header(p, id_salt=id_salt))
    df = label_catalog(rows_to_frame(rows), taxonomy)
    pq.write_table(frame_to_table(df), part_path)
    counts = df["status"].value_counts().to_dict()
    return {
        "files": len(paths),
        "reused": reused,
        "bytes": int(df["file_size"].sum()),
        **{str(k): int(v) for k, v in counts.items()},
    }


def read_catalog(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise CatalogError(
            f"catalog {path} does not exist; create it with: python -m ingest scan DIR --out {path}"
        )
    info = catalog_info(path)
    wanted = list(columns) if columns is not None else list(CATALOG_COLUMNS)
    absent = [c for c in ADDED_IN_VERSION_2 if c in wanted] if info["version"] < 2 else []
    present = [c for c in wanted if c not in absent]
    df = pq.read_table(path, columns=present if columns is not None or absent else None).to_pandas(
        types_mapper=pd.ArrowDtype
    )
    for column in absent:
        df.insert(wanted.index(column), column, pd.Series([None] * len(df), dtype=pd.ArrowDtype(pa.string())))
    if info.get("paths") == "relative" and "path" in df.columns:
        base = path.resolve().parent
        df["path"] = df["path"].map(lambda p: None if p is None or p is pd.NA else str(base / p))
        df["path"] = df["path"].astype(pd.ArrowDtype(pa.string()))
    return df


def write_catalog(df: pd.DataFrame, path: str | Path, *, deidentified: bool | None = None) -> None:
    """Atomically replace a catalog with one part holding ``df`` (after relabelling, or an export).

    ``deidentified=None`` keeps what the catalog being replaced was; a de-identified catalog stores
    its paths relative to its parent directory."""
    path = Path(path)
    if deidentified is None:
        deidentified = path.exists() and bool(catalog_info(path)["deidentified"])
    if deidentified:
        base = path.resolve().parent
        relative = [None if p is None or p is pd.NA else os.path.relpath(p, base) for p in df["path"]]
        df = df.assign(path=relative)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    pq.write_table(frame_to_table(df, deidentified=deidentified), tmp / "part-00000.parquet")
    _swap_directory(tmp, path)


def _swap_directory(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def mark_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """The same SOP instance under two paths is kept once (first path); the rest are 'excluded'."""
    usable = df["sop_instance_uid"].notna()
    dup = usable & df.duplicated("sop_instance_uid", keep="first")
    if dup.any():
        first_path = df[usable].drop_duplicates("sop_instance_uid").set_index("sop_instance_uid")["path"]
        df.loc[dup, "status"] = "excluded"
        df.loc[dup, "reason"] = "duplicate of " + df.loc[dup, "sop_instance_uid"].map(first_path).astype(str)
    return df


def scan(
    root: str | Path,
    out: str | Path,
    *,
    id_salt: str,
    taxonomy: Taxonomy | None = None,
    scheduler: str | None = None,
    client=None,
    batch_size: int = 500,
    progress: bool = True,
) -> dict:
    """Scan ``root`` into the catalog at ``out`` (a Parquet directory), reusing rows of unchanged files."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise CatalogError(f"{root} is not a directory of DICOM files")
    taxonomy = taxonomy or load_taxonomy()
    previous = None
    if out.exists() and catalog_info(out)["version"] == CATALOG_VERSION:
        # Rows of unchanged files are reused; duplicates are re-derived, so excluded rows are read again.
        # Older catalogs are re-read in full: their descriptions were not cleaned.
        previous = read_catalog(out)
        previous = previous[previous["status"] != "excluded"].set_index("path", drop=False)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    batches = list(_batched((str(p) for p in iter_files(root)), batch_size))

    def tasks():
        for i, batch in enumerate(batches):
            known = {}
            if previous is not None:
                hits = previous.index.intersection(batch)
                known = {r["path"]: r for r in previous.loc[hits].to_dict("records")}
            yield batch, str(tmp / f"part-{i:05d}.parquet"), id_salt, taxonomy, known

    totals: dict[str, int] = {}
    try:
        for result in run_tasks(
            scan_batch,
            tasks(),
            total=len(batches),
            scheduler=scheduler,
            client=client,
            desc="scan",
            unit="batch",
            progress=progress,
        ):
            for k, v in result.items():
                totals[k] = totals.get(k, 0) + v
        if not batches:
            pq.write_table(catalog_schema().empty_table(), tmp / "part-00000.parquet")
        # Duplicate detection needs the whole key column, which is small even for millions of rows.
        keys = pq.read_table(tmp, columns=["sop_instance_uid", "path"]).to_pandas()
        if keys["sop_instance_uid"].dropna().duplicated().any():
            df = mark_duplicates(read_catalog(tmp))
            totals["excluded"] = int((df["status"] == "excluded").sum())
            totals["ok"] = int((df["status"] == "ok").sum())
            for part in tmp.glob("part-*.parquet"):
                part.unlink()
            pq.write_table(frame_to_table(df), tmp / "part-00000.parquet")
        _swap_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return totals


def id_salt_from_env(explicit: str | None) -> str:
    salt = explicit or os.environ.get(DEFAULT_ID_SALT_ENV)
    if not salt:
        log.warning(
            "no patient-id salt given (--id-salt or $%s); using the project default, which "
            "makes hashes comparable across sites that also use it",
            DEFAULT_ID_SALT_ENV,
        )
        return "pedx-ray"
    return salt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory of DICOM files (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="catalog path (a Parquet directory)")
    parser.add_argument(
        "--id-salt", help=f"secret salt for patient-id hashes (default ${DEFAULT_ID_SALT_ENV})"
    )
    parser.add_argument("--code-table", type=Path, help="site protocol-code table, CSV code,label_68")
    parser.add_argument("--batch-size", type=int, default=500, help="files per Dask task")
    add_scheduler_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        totals = scan(
            args.root,
            args.out,
            id_salt=id_salt_from_env(args.id_salt),
            taxonomy=load_taxonomy(code_table=args.code_table),
            scheduler=args.scheduler,
            batch_size=args.batch_size,
        )
    except CatalogError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"catalog {args.out}: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""De-identified DICOM and catalog for sharing: ``python -m ingest export CATALOG --deidentify --out DIR``.

Every usable image of the catalog (status ``ok`` or ``unmapped``) is read, de-identified with
dicognito under the site's salt (``ingest.dataset.deid``: the PS3.15 Basic Profile with the options
named there) and written to ``DIR/dicom/<study>/<series>/<instance>.dcm`` under its pseudonymous
UIDs. ``DIR/catalog`` is the catalog of those files, with the same pseudonyms as shard records, paths
relative to ``DIR``, and marked de-identified, so ``ingest shards`` reads it as it is.
``DIR/export.json`` records the settings, the counts, and what was left out and why (by the source
file's sha256, which the site's own catalog maps back to a path).

Images whose header says ``BurnedInAnnotation=YES`` are left out (``--burned-in exclude``, the
default), have the text the classical detector finds blacked out (``mask``; the Clean Pixel Data
Option is then declared) or are kept as they are (``keep``; PatientIdentityRemoved stays NO).

Files are written under a temporary name, read back and renamed. A re-run with the same settings
skips files already written; other settings rewrite them, and files no longer part of the export
(say, burned-in images after a switch to ``exclude``) are removed. ``export.json`` is written last
(and removed first when the settings change), so an export without it is incomplete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from ingest.dask_runner import add_scheduler_argument, run_tasks
from ingest.dataset.catalog import (
    CatalogError,
    catalog_info,
    id_salt_from_env,
    read_catalog,
    write_catalog,
)
from ingest.dataset.deid import (
    BURNED_IN,
    OPTIONS_APPLIED,
    PROFILE,
    deidentify_dataset,
    pseudonymise_rows,
    salt_fingerprint,
)
from ingest.files import replacing, write_json_atomic
from ingest.imaging.preprocess import pixels_to_unit, quantize
from ingest.imaging.textmask import detect_text, grow_boxes

log = logging.getLogger("ingest.export")

EXPORTED_STATUSES = ("ok", "unmapped")
MANIFEST = "export.json"


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExportConfig:
    catalog: Path
    out: Path
    id_salt: str = field(repr=False)  # a secret: never in a log line or traceback
    burned_in: str = "exclude"
    batch_size: int = 50

    def __post_init__(self) -> None:
        if self.burned_in not in BURNED_IN:
            raise ExportError(f"burned_in must be one of {', '.join(BURNED_IN)}, not {self.burned_in!r}")
        if self.batch_size < 1:
            raise ExportError(f"batch_size must be at least 1, not {self.batch_size}")
        if not self.id_salt:
            raise ExportError("an export needs the site's secret salt (--id-salt or $PEDX_ID_SALT)")
        if Path(self.out).resolve() == Path(self.catalog).resolve():
            raise ExportError(f"--out {self.out} is the catalog itself; export to a new directory")

    @property
    def settings(self) -> dict:
        """What decides the bytes of an exported file; a re-run with other settings rewrites them."""
        return {"burned_in": self.burned_in, "salt": salt_fingerprint(self.id_salt), "profile": PROFILE}


def target_path(out: Path, row: dict) -> Path:
    """Where a pseudonymised catalog row's file goes."""
    return (
        out
        / "dicom"
        / row["study_instance_uid"]
        / row["series_instance_uid"]
        / f"{row['sop_instance_uid']}.dcm"
    )


def is_burned_in(ds: pydicom.Dataset) -> bool:
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def mask_burned_in_text(ds: pydicom.Dataset) -> int:
    """Black out, in place, the text the detector finds in the display image of ``ds``; returns the
    number of boxes. The first frame is searched and every frame masked at those boxes."""
    unit = pixels_to_unit(ds)
    boxes = detect_text(quantize(unit))
    if not boxes:
        return 0
    stored = np.array(ds.pixel_array)
    first = stored[0] if stored.ndim == 3 else stored
    black = first.flat[int(np.argmin(unit))]  # a stored value shown black
    for x0, y0, x1, y1 in grow_boxes(boxes, first.shape):
        stored[..., y0:y1, x0:x1] = black
    ds.set_pixel_data(stored, ds.PhotometricInterpretation, int(ds.BitsStored), generate_instance_uid=False)
    return len(boxes)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_batch(rows: list[dict], out: str, salt: str, burned_in: str, reuse: bool) -> list[dict]:
    """Dask task: de-identify and write one batch; returns one outcome per row, to keep the client light.

    An outcome is ``{"action": "written" | "skipped" | "excluded" | "failed", ...}``; the first two
    carry the exported catalog row, the others the source's sha256 and the reason."""
    outcomes = []
    for source, row in zip(rows, pseudonymise_rows(rows, salt), strict=True):
        target = target_path(Path(out), row)
        if reuse and target.is_file():
            outcomes.append({"action": "skipped", "row": _exported_row(row, target)})
            continue
        try:
            outcome = _export_one(source, row, target, salt, burned_in)
        except (OSError, InvalidDicomError, ValueError, AttributeError, KeyError) as exc:
            # The message, not the exception's text: that names the source path.
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            outcome = {"action": "failed", "reason": f"{type(exc).__name__}: {message}"[:300]}
        outcomes.append(outcome | ({} if "row" in outcome else {"sha256": source["sha256"]}))
    return outcomes


def _export_one(source: dict, row: dict, target: Path, salt: str, burned_in: str) -> dict:
    ds = pydicom.dcmread(source["path"])
    masked = None
    if is_burned_in(ds):
        if burned_in == "exclude":
            return {"action": "excluded", "reason": "burned_in: BurnedInAnnotation is YES"}
        if burned_in == "mask":
            masked = mask_burned_in_text(ds)
            if not masked:  # the header promises text the detector cannot find: not safe to share
                return {"action": "excluded", "reason": "burned_in: no text found to mask"}
            ds.BurnedInAnnotation = "NO"
    deidentify_dataset(ds, salt, source["patient_id_hash"], pixels_cleaned=masked is not None)
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
        if pydicom.dcmread(tmp, stop_before_pixels=True).SOPInstanceUID != row["sop_instance_uid"]:
            raise OSError(f"read-back of {tmp} does not match the instance written")
    return {"action": "written", "masked_boxes": masked or 0, "row": _exported_row(row, target)}


def _exported_row(row: dict, target: Path) -> dict:
    """The exported catalog's row: pseudonyms, and the exported file in place of the source."""
    stat = target.stat()
    header = pydicom.dcmread(target, stop_before_pixels=True, specific_tags=["BurnedInAnnotation"])
    return row | {
        "burned_in_annotation": str(header.get("BurnedInAnnotation") or "").upper() or None,
        "path": str(target),
        "sha256": _sha256(target),
        "file_size": stat.st_size,
        "file_mtime_ns": stat.st_mtime_ns,
    }


def _batched(rows: list[dict], size: int) -> Iterator[list[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _previous_settings(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def export(cfg: ExportConfig, *, scheduler: str | None = None, client=None, progress: bool = True) -> dict:
    """Write the de-identified export of ``cfg.catalog`` into ``cfg.out``; returns the manifest."""
    if catalog_info(cfg.catalog)["deidentified"]:
        raise ExportError(f"{cfg.catalog} is already a de-identified export; share it as it is")
    catalog = read_catalog(cfg.catalog)
    usable = catalog[catalog["status"].isin(EXPORTED_STATUSES)]
    rows = [{k: (None if v is pd.NA else v) for k, v in r.items()} for r in usable.to_dict("records")]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    reuse = _previous_settings(out) == cfg.settings
    if not reuse:
        # Files are about to change under other settings: until this run ends, nothing may be reused.
        (out / MANIFEST).unlink(missing_ok=True)
    counts = dict.fromkeys(("written", "skipped", "excluded", "failed"), 0)
    exported, left_out, masked_boxes = [], [], 0
    batches = list(_batched(rows, cfg.batch_size))
    for outcomes in run_tasks(
        export_batch,
        ((batch, str(out), cfg.id_salt, cfg.burned_in, reuse) for batch in batches),
        total=len(batches),
        scheduler=scheduler,
        client=client,
        desc="export",
        unit="batch",
        progress=progress,
    ):
        for outcome in outcomes:
            counts[outcome["action"]] += 1
            masked_boxes += outcome.get("masked_boxes", 0)
            if "row" in outcome:
                exported.append(outcome["row"])
            else:
                left_out.append({k: outcome[k] for k in ("sha256", "action", "reason")})
    keep = {os.path.normpath(r["path"]) for r in exported}
    for stale in (out / "dicom").rglob("*.dcm") if (out / "dicom").is_dir() else ():
        if os.path.normpath(stale) not in keep:  # from an export with other settings
            stale.unlink()
    frame = pd.DataFrame(exported, columns=list(catalog.columns))
    write_catalog(frame, out / "catalog", deidentified=True)
    manifest = {
        "settings": cfg.settings,
        "options": list(OPTIONS_APPLIED),
        "counts": counts | {"exported": len(exported), "masked_boxes": masked_boxes},
        "left_out": sorted(left_out, key=lambda x: x["sha256"]),
    }
    write_json_atomic(out / MANIFEST, manifest, durable=True)
    if left_out:
        log.warning("%d image(s) left out of the export; see %s", len(left_out), out / MANIFEST)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest export", description=__doc__.split("\n\n")[0])
    parser.add_argument("catalog", type=Path, help="catalog written by `python -m ingest scan`")
    parser.add_argument("--out", type=Path, required=True, help="export directory (created; re-runs resume)")
    parser.add_argument(
        "--deidentify",
        action="store_true",
        help="required: an export is always de-identified; the flag says so on the command line",
    )
    parser.add_argument("--id-salt", help="the site's secret salt (default $PEDX_ID_SALT, as for scan)")
    parser.add_argument(
        "--burned-in",
        choices=BURNED_IN,
        default="exclude",
        help="images with BurnedInAnnotation=YES: leave out (default), mask the text found, or keep",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="files per Dask task")
    add_scheduler_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.deidentify:
        parser.exit(2, "error: export writes de-identified copies only; add --deidentify\n")
    try:
        cfg = ExportConfig(
            args.catalog,
            args.out,
            id_salt_from_env(args.id_salt),
            burned_in=args.burned_in,
            batch_size=args.batch_size,
        )
        manifest = export(cfg, scheduler=args.scheduler)
    except (ExportError, CatalogError) as exc:
        parser.exit(2, f"error: {exc}\n")
    counts = manifest["counts"]
    print(
        f"export {args.out}: {counts['exported']} images ({counts['written']} written, "
        f"{counts['skipped']} already there), {counts['excluded']} left out for burned-in text, "
        f"{counts['failed']} failed; catalog {args.out / 'catalog'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

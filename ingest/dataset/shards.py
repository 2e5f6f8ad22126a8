"""Class-balanced WebDataset shards (contract 3 of docs/design.md).

``python -m ingest shards CATALOG --granularity 7 --out DIR`` balances and splits the catalog
(`ingest.dataset.balance`), preprocesses every selected image as the paper does
(`ingest.imaging.preprocess`) and
writes ``DIR/{split}-{n:06d}.tar`` with ``<key>.png`` + ``<key>.json`` per sample, then
``DIR/manifest.json``. Each shard is written under a temporary name, hashed and renamed, and its
index (the plan it was built from and its sha256) is kept in ``DIR/.index/``: a re-run skips every
shard whose file still matches its index and plan, and rebuilds the rest. Images that fail to
decode are left out of the shard and listed in ``DIR/quarantine.csv`` with the reason. Sample records
and the quarantine list are de-identified (``ingest.dataset.deid``): UIDs are pseudonyms, study dates
are shifted per patient, and no path is written; ``--mask-text`` also blacks out burned-in text that a
classical detector finds in each image (``ingest.imaging.textmask``). ``--out``
may be an ``s3://bucket/prefix`` URI (ingest.storage): each shard is built in a local temporary
file, then uploaded under a temporary key and moved into place.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pandas as pd

from ingest import storage
from ingest.dask_runner import add_scheduler_argument, run_tasks
from ingest.dataset.balance import (
    BALANCE_COLUMNS,
    PAPER_PER_CLASS,
    SHORT_CLASS_POLICIES,
    SPLITS,
    BalanceConfig,
    balance,
)
from ingest.dataset.catalog import DEFAULT_ID_SALT_ENV, catalog_info, id_salt_from_env, read_catalog
from ingest.dataset.deid import BURNED_IN, OPTIONS_APPLIED, PROFILE, pseudonymise_rows, salt_fingerprint
from ingest.dataset.taxonomy import Taxonomy, load_taxonomy
from ingest.imaging.gpu_decode import resolve_gpu_decode
from ingest.imaging.png import encode_png
from ingest.imaging.preprocess import PreprocessError, PreprocessParams, add_decode_arguments, preprocess_file
from ingest.imaging.textmask import mask_text

log = logging.getLogger("ingest.dataset.shards")

MANIFEST_FORMAT = "pedx-ray-shards/1"
# The sample record contract (docs/design.md, contract 3); 2: UIDs and dates are pseudonyms.
RECORD_VERSION = 2
SHARD_COLUMNS = BALANCE_COLUMNS + [
    "series_instance_uid",
    "path",
    "sha256",
    "patient_sex",
    "patient_age_months",
    "burned_in_annotation",
]
SAMPLE_FIELDS = (
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "patient_id_hash",
    "study_date",
    "split",
    "label_7",
    "label_30",
    "label_68",
    "patient_sex",
    "patient_age_months",
    "sha256",
)


class ShardError(RuntimeError):
    pass


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    rows: tuple[dict, ...]
    granularity: int
    class_names: tuple[str, ...]
    params: PreprocessParams
    taxonomy_version: str
    # Secret salt of the pseudonyms; None when the catalog is already de-identified (an export).
    id_salt: str | None = field(default=None, repr=False)  # a secret: never in a log line or traceback
    mask_text: bool = False
    burned_in: str = "exclude"

    @property
    def plan_hash(self) -> str:
        h = hashlib.sha256()
        salt = salt_fingerprint(self.id_salt) if self.id_salt is not None else None
        h.update(
            json.dumps(
                [
                    self.granularity,
                    self.class_names,
                    self.params.to_dict(),
                    self.taxonomy_version,
                    RECORD_VERSION,
                    salt,
                    self.mask_text,
                    self.burned_in,
                ]
            ).encode()
        )
        for r in self.rows:
            h.update(f"{r['sop_instance_uid']}|{r['sha256']}|{r['split']}\n".encode())
        return h.hexdigest()


def sample_key(sop_instance_uid: str) -> str:
    """WebDataset splits a member name at its first dot, so the UID's dots become underscores."""
    return sop_instance_uid.replace(".", "_")


def _json_value(value):
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return None
    if isinstance(value, date):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return value


def sample_record(row: dict, plan: ShardPlan) -> dict:
    """The sample's JSON record: catalog values with UIDs and the study date as pseudonyms."""
    if plan.id_salt is not None:
        row = pseudonymise_rows([row], plan.id_salt)[0]
    record = {f: _json_value(row.get(f)) for f in SAMPLE_FIELDS}
    name = row[f"label_{plan.granularity}"]
    return record | {
        "key": sample_key(row["sop_instance_uid"]),
        "granularity": plan.granularity,
        "label": plan.class_names.index(name),
        "label_name": name,
    }


def _index_path(out_dir: Path | str, name: str) -> Path | str:
    return storage.join(out_dir, ".index", f"{name}.json")


def verified_index(out_dir: Path | str, plan: ShardPlan) -> dict | None:
    """The shard's index if the stored shard was built from this plan and is intact, else None."""
    try:
        index = storage.read_json(_index_path(out_dir, plan.name))
    except (OSError, ValueError):  # StorageError is an OSError
        return None
    shard = storage.join(out_dir, plan.name)
    if (
        index.get("plan_hash") != plan.plan_hash
        or not storage.is_file(shard)
        or storage.sha256(shard) != index.get("sha256")
    ):
        return None
    return index


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shard(plan: ShardPlan, out_dir: str) -> dict:
    """Dask task: build one shard unless a verified one exists; returns its index.

    The tar is built in a local temporary file, hashed, then renamed or uploaded into place."""
    out = storage.join(out_dir)
    index = verified_index(out, plan)
    if index is not None:
        return index | {"skipped": True}
    counts: dict[str, int] = {}
    quarantined = []
    text_regions = 0
    decode_notes: list[str] = []  # reduced decodes that fell back to the full one, with the reason
    with storage.replacing(storage.join(out, plan.name), durable=True) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in plan.rows:
                record = sample_record(row, plan)
                try:
                    image = preprocess_file(row["path"], plan.params, decode_notes)
                except (PreprocessError, OSError) as exc:
                    # The operator finds the file by its sha256 in the catalog; no path leaves the site.
                    reason = (
                        exc.reason
                        if isinstance(exc, PreprocessError)
                        else f"io_error: {exc.strerror or type(exc).__name__}"
                    )
                    quarantined.append(
                        {
                            "sop_instance_uid": record["sop_instance_uid"],
                            "sha256": row["sha256"],
                            "reason": reason,
                        }
                    )
                    continue
                flagged = plan.burned_in == "mask" and row.get("burned_in_annotation") == "YES"
                if plan.mask_text or flagged:
                    image, regions = mask_text(image)
                    text_regions += regions
                    if flagged and not regions:  # the header promises text the detector cannot find
                        quarantined.append(
                            {
                                "sop_instance_uid": record["sop_instance_uid"],
                                "sha256": row["sha256"],
                                "reason": "burned_in: no text found to mask",
                            }
                        )
                        continue
                png = encode_png(image)
                _add_member(tar, f"{record['key']}.png", png)
                _add_member(tar, f"{record['key']}.json", json.dumps(record, sort_keys=True).encode())
                counts[record["label_name"]] = counts.get(record["label_name"], 0) + 1
        digest = storage.sha256(tmp)
    index = {
        "name": plan.name,
        "split": plan.split,
        "samples": sum(counts.values()),
        "counts": counts,
        "sha256": digest,
        "plan_hash": plan.plan_hash,
        "quarantined": quarantined,
        "decode_fallbacks": len(decode_notes),
        "text_regions": text_regions,
    }
    storage.write_bytes(_index_path(out, plan.name), json.dumps(index, sort_keys=True), durable=True)
    return index | {"skipped": False}


def spread_classes(rows: pd.DataFrame, label: str) -> pd.DataFrame:
    """The rows reordered so each class is spread evenly over them (its i-th of n rows at (i + 0.5) / n).

    Every shard, and every stretch a reader's shuffle buffer holds, then has the split's class mix.
    Round-robin would leave the tail to the largest classes once the short ones run out, and a
    training epoch would end on batches of two or three classes.
    """
    by_class = rows.groupby(label)
    position = (by_class.cumcount() + 0.5) / by_class[label].transform("size")
    return rows.assign(_pos=position).sort_values(["_pos", label], kind="stable").drop(columns="_pos")


def plan_shards(
    selected: pd.DataFrame,
    *,
    granularity: int,
    shard_size: int,
    params: PreprocessParams,
    taxonomy: Taxonomy,
    id_salt: str | None = None,
    mask_text: bool = False,
    burned_in: str = "exclude",
) -> list[ShardPlan]:
    class_names = taxonomy.classes(granularity)
    plans = []
    for split in SPLITS:
        rows = selected[selected["split"] == split]
        rows = spread_classes(rows, f"label_{granularity}")
        records = [
            {k: _json_value(v) for k, v in r.items()}
            for r in rows[SHARD_COLUMNS + ["split"]].to_dict("records")
        ]
        for i, start in enumerate(range(0, len(records), shard_size)):
            plans.append(
                ShardPlan(
                    f"{split}-{i:06d}.tar",
                    split,
                    tuple(records[start : start + shard_size]),
                    granularity,
                    class_names,
                    params,
                    taxonomy.version,
                    id_salt,
                    mask_text,
                    burned_in,
                )
            )
    return plans


def write_shards(
    catalog: str | Path,
    out_dir: str | Path,
    *,
    balance_config: BalanceConfig,
    params: PreprocessParams | None = None,
    shard_size: int = 1000,
    taxonomy: Taxonomy | None = None,
    scheduler: str | None = None,
    client=None,
    progress: bool = True,
    id_salt: str | None = None,
    mask_text: bool = False,
    burned_in: str = "exclude",
) -> dict:
    """Balance the catalog and write (or complete) the shard set in ``out_dir`` (a directory or an
    object-store URI, ingest.storage); returns the manifest.

    ``id_salt`` is the site's secret for the pseudonyms (default ``$PEDX_ID_SALT``, as for the scan);
    a catalog that ``ingest export`` already de-identified is used as it is. ``mask_text`` blacks out
    burned-in text found in each image; ``burned_in`` says what happens to images whose header says
    BurnedInAnnotation=YES: left out before balancing (default), masked, or kept."""
    params = params or PreprocessParams()
    if burned_in not in BURNED_IN:
        raise ShardError(f"burned_in must be one of {', '.join(BURNED_IN)}, not {burned_in!r}")
    if catalog_info(catalog)["deidentified"]:
        id_salt = None
    else:
        if not id_salt and not os.environ.get(DEFAULT_ID_SALT_ENV):
            log.warning(
                "shards pseudonymised under the public default salt: anyone who has it can undo the "
                "date shifts; pass --id-salt or set $%s",
                DEFAULT_ID_SALT_ENV,
            )
        id_salt = id_salt_from_env(id_salt)
    taxonomy = taxonomy or load_taxonomy()
    if shard_size < 1:
        raise ShardError(f"shard_size must be at least 1, not {shard_size}")
    out = storage.join(out_dir)
    manifest_path = storage.join(out, "manifest.json")
    if storage.exists(manifest_path):
        existing = storage.read_json(manifest_path)
        if existing.get("granularity") != balance_config.granularity:
            raise ShardError(
                f"{out} holds {existing.get('granularity')}-class shards; write "
                f"{balance_config.granularity}-class shards to another directory"
            )
    rows = read_catalog(catalog, columns=SHARD_COLUMNS)
    flagged = rows["burned_in_annotation"].fillna("") == "YES"
    if burned_in == "exclude":
        rows = rows[~flagged]
    selected, report = balance(rows, balance_config)
    plans = plan_shards(
        selected,
        granularity=balance_config.granularity,
        shard_size=shard_size,
        params=params,
        taxonomy=taxonomy,
        id_salt=id_salt,
        mask_text=mask_text,
        burned_in=burned_in,
    )
    storage.makedirs(storage.join(out, ".index"))
    planned = {p.name for p in plans}
    for stale in storage.list_files(out):
        if stale.endswith(".tar") and "/" not in stale and stale not in planned:  # from a larger plan
            storage.delete_file(storage.join(out, stale))
            storage.delete_file(_index_path(out, stale))
    storage.delete_file(manifest_path)  # an incomplete set must not look whole
    indexes = {}
    for index in run_tasks(
        write_shard,
        ((p, str(out)) for p in plans),
        total=len(plans),
        scheduler=scheduler,
        client=client,
        desc="shards",
        unit="shard",
        progress=progress,
    ):
        indexes[index["name"]] = index
    # A worker killed mid-shard (its task then reruns elsewhere) leaves its temporary file behind.
    for name in storage.list_files(out):
        folder, _, base = name.rpartition("/")
        if folder in ("", ".index") and base.startswith(".") and ".partial" in base:
            storage.delete_file(storage.join(out, name))

    deidentification = {
        "profile": PROFILE,
        "options": list(OPTIONS_APPLIED),
        "mask_text": mask_text,
        "burned_in": burned_in,
        "burned_in_left_out": int(flagged.sum()) if burned_in == "exclude" else 0,
        "text_regions_masked": sum(i.get("text_regions", 0) for i in indexes.values()),
    }
    manifest = build_manifest(plans, indexes, report.to_dict(), balance_config, params, taxonomy)
    manifest["deidentification"] = deidentification
    quarantined = [q for i in indexes.values() for q in i["quarantined"]]
    with io.StringIO() as buf:
        writer = csv.DictWriter(buf, fieldnames=["sop_instance_uid", "sha256", "reason"])
        writer.writeheader()
        writer.writerows(quarantined)
        storage.write_bytes(storage.join(out, "quarantine.csv"), buf.getvalue(), durable=True)
    storage.write_json_atomic(manifest_path, manifest, durable=True)
    return manifest | {"skipped_shards": sum(1 for i in indexes.values() if i["skipped"])}


def build_manifest(plans, indexes, balance_report, balance_config, params, taxonomy) -> dict:
    granularity = balance_config.granularity
    counts = {split: dict.fromkeys(taxonomy.classes(granularity), 0) for split in SPLITS}
    for index in indexes.values():
        for cls, n in index["counts"].items():
            counts[index["split"]][cls] += n
    return {
        "format": MANIFEST_FORMAT,
        "granularity": granularity,
        "classes": list(taxonomy.classes(granularity)),
        "taxonomy_version": taxonomy.version,
        "seed": balance_config.seed,
        "balance": balance_config.to_dict(),
        "balance_report": balance_report,
        "preprocessing": params.to_dict(),
        "counts": counts,
        "samples": {split: sum(c.values()) for split, c in counts.items()},
        "quarantined": sum(len(i["quarantined"]) for i in indexes.values()),
        # samples whose reduced JPEG 2000 decode failed and were decoded at full size (logged with the reason)
        "decode_fallbacks": sum(i.get("decode_fallbacks", 0) for i in indexes.values()),
        "records": RECORD_VERSION,
        "shards": [
            {
                "name": p.name,
                "split": p.split,
                "samples": indexes[p.name]["samples"],
                "sha256": indexes[p.name]["sha256"],
            }
            for p in plans
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest shards", description=__doc__.split("\n\n")[0])
    add_shard_arguments(parser)
    parser.add_argument("catalog", type=Path, help="catalog written by `python -m ingest scan`")
    parser.add_argument("--out", required=True, help="shard directory or s3://bucket/prefix")
    parser.add_argument("--code-table", type=Path, help="site code table used when the catalog was labelled")
    parser.add_argument(
        "--id-salt", help="secret salt of the UID and date pseudonyms (default $PEDX_ID_SALT, as for scan)"
    )
    parser.add_argument(
        "--mask-text", action="store_true", help="black out burned-in text a classical detector finds"
    )
    parser.add_argument(
        "--burned-in",
        choices=BURNED_IN,
        default="exclude",
        help="images with BurnedInAnnotation=YES: leave out (default), mask the text found, or keep",
    )
    add_scheduler_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = write_shards(
            args.catalog,
            args.out,
            balance_config=balance_config_from_args(args),
            params=resolve_gpu_decode(
                PreprocessParams(size=args.image_size, decode=args.decode), args.gpu_fallback
            ),
            shard_size=args.shard_size,
            taxonomy=load_taxonomy(code_table=args.code_table),
            scheduler=args.scheduler,
            id_salt=args.id_salt,
            mask_text=args.mask_text,
            burned_in=args.burned_in,
        )
    except (ShardError, ValueError, storage.StorageError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(format_manifest_summary(manifest, args.out))
    return 0


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--granularity", type=int, choices=sorted(PAPER_PER_CLASS), default=7)
    parser.add_argument(
        "--per-class",
        type=int,
        help="instances per class (default as the paper: "
        + ", ".join(f"{v} for {k}" for k, v in PAPER_PER_CLASS.items())
        + ")",
    )
    parser.add_argument("--finetune-fraction", type=float, default=0.1)
    parser.add_argument(
        "--val-per-class", type=int, help="validation instances per class (default: the fine-tuning share)"
    )
    parser.add_argument(
        "--reference-date",
        type=date.fromisoformat,
        default=date(2018, 7, 1),
        help="studies on/after this date form the validation split (default 2018-07-01)",
    )
    parser.add_argument("--short-class-policy", choices=SHORT_CLASS_POLICIES, default="keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    add_decode_arguments(parser)
    parser.add_argument("--image-size", type=int, default=512, help="side of the square preprocessed image")


def balance_config_from_args(args: argparse.Namespace) -> BalanceConfig:
    return BalanceConfig(
        granularity=args.granularity,
        per_class=args.per_class,
        finetune_fraction=args.finetune_fraction,
        val_per_class=args.val_per_class,
        reference_date=args.reference_date,
        short_class_policy=args.short_class_policy,
        seed=args.seed,
    )


def format_manifest_summary(manifest: dict, out: Path | str) -> str:
    lines = [
        f"shards in {out}: "
        + ", ".join(f"{s}={n}" for s, n in manifest["samples"].items())
        + f" samples in {len(manifest['shards'])} shards ({manifest['skipped_shards']} already verified), "
        f"{manifest['quarantined']} quarantined"
    ]
    shortfall = manifest["balance_report"]["shortfall"]
    if shortfall:
        lines.append(
            f"{len(shortfall)} classes short of --per-class (policy "
            f"{manifest['balance']['short_class_policy']}); see manifest.json balance_report"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

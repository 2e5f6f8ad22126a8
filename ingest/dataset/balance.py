"""Class balancing and patient-disjoint splits, as in PedXnet.

Policy (every step is deterministic for a seed and independent of row order):

1. Only catalog rows with ``status == ok`` and a label at the chosen granularity are used.
2. **Validation** = studies on or after ``reference_date`` (the paper: 2018-07), from patients
   whose first study is on or after that date. A patient seen before the date belongs to the
   training pool, and their studies after it are dropped (reported as ``dropped_straddling``), so
   no patient is in two splits; this keeps all pre-date data for training, where it matters most
   (validation is under-sampled anyway). Rows without a study date cannot be placed in time and
   stay in the training pool (reported as ``undated``).
3. **Fine-tuning split**: from the training pool, whole patients are moved to the fine-tuning split
   until each class has ``finetune_fraction`` of ``per_class`` instances there (classes are visited
   from the rarest up, so scarce classes get their share first). Patients are visited in a seeded
   random order.
4. **Under-sampling**: each class is cut to ``per_class`` instances in total: ``per_class`` minus
   the fine-tuning share in ``train``, the share in ``finetune``; validation is cut to
   ``val_per_class`` per class (default: the fine-tuning share). Which instances survive is decided
   by a seeded hash of the SOP Instance UID.
5. A class with fewer instances than asked is handled by ``short_class_policy``: ``keep`` (default;
   keep all it has and report the shortfall), ``drop`` (no samples of that class at all, reported)
   or ``error`` (stop and list the classes).

Defaults for ``per_class`` follow the paper: 10,000 (7 classes), 2,300 (30), 1,000 (68).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import date

import numpy as np
import pandas as pd

PAPER_PER_CLASS = {7: 10_000, 30: 2_300, 68: 1_000}
SPLITS = ("train", "finetune", "val")
SHORT_CLASS_POLICIES = ("keep", "drop", "error")
BALANCE_COLUMNS = [
    "sop_instance_uid",
    "study_instance_uid",
    "patient_id_hash",
    "study_date",
    "status",
    "label_7",
    "label_30",
    "label_68",
]


class BalanceError(ValueError):
    pass


@dataclass(frozen=True)
class BalanceConfig:
    granularity: int = 7
    per_class: int | None = None
    finetune_fraction: float = 0.1
    val_per_class: int | None = None
    reference_date: date = date(2018, 7, 1)
    short_class_policy: str = "keep"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in PAPER_PER_CLASS:
            raise BalanceError(f"granularity must be 7, 30 or 68, not {self.granularity!r}")
        if self.per_class is None:
            object.__setattr__(self, "per_class", PAPER_PER_CLASS[self.granularity])
        if self.per_class < 1:
            raise BalanceError(
                f"per_class must be at least 1 (got {self.per_class}); it is the instances kept per class"
            )
        if not 0 <= self.finetune_fraction < 1:
            raise BalanceError(
                f"finetune_fraction must be in [0, 1) (got {self.finetune_fraction}); the paper uses 0.1"
            )
        if self.val_per_class is None:
            object.__setattr__(self, "val_per_class", max(1, self.finetune_target))
        if self.short_class_policy not in SHORT_CLASS_POLICIES:
            raise BalanceError(
                f"short_class_policy must be one of {SHORT_CLASS_POLICIES}, not {self.short_class_policy!r}"
            )
        if isinstance(self.reference_date, str):
            object.__setattr__(self, "reference_date", date.fromisoformat(self.reference_date))

    @property
    def finetune_target(self) -> int:
        return round(self.per_class * self.finetune_fraction)

    def to_dict(self) -> dict:
        return asdict(self) | {"reference_date": self.reference_date.isoformat()}


@dataclass
class BalanceReport:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> n
    available: dict[str, int] = field(default_factory=dict)  # class -> instances in the training pool
    shortfall: dict[str, int] = field(default_factory=dict)  # class -> missing to reach per_class
    dropped_classes: list[str] = field(default_factory=list)
    dropped_straddling: int = 0
    undated: int = 0
    not_ok: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{split}: {sum(c.values())} instances in {len(c)} classes" for split, c in self.counts.items()
        ]
        if self.shortfall:
            worst = sorted(self.shortfall.items(), key=lambda kv: -kv[1])[:10]
            lines.append(
                f"{len(self.shortfall)} classes short of per_class: "
                + ", ".join(f"{k} (-{v})" for k, v in worst)
            )
        if self.dropped_classes:
            lines.append("dropped classes: " + ", ".join(self.dropped_classes))
        lines.append(
            f"dropped (patient straddles the reference date): {self.dropped_straddling}; "
            f"undated (kept in training pool): {self.undated}; not usable: {self.not_ok}"
        )
        return "\n".join(lines)


def _rank(values: pd.Series, seed: int, salt: str) -> np.ndarray:
    """A seeded pseudo-random order that depends only on the values, not on row order."""
    key = hashlib.sha256(f"{seed}:{salt}".encode()).hexdigest()[:16]
    return pd.util.hash_array(values.astype(str).to_numpy(dtype=object), hash_key=key)


def balance(catalog: pd.DataFrame, config: BalanceConfig) -> tuple[pd.DataFrame, BalanceReport]:
    """Select and split catalog rows; returns the selected rows with a ``split`` column, and a report."""
    label = f"label_{config.granularity}"
    report = BalanceReport()
    usable = (catalog["status"] == "ok") & catalog[label].notna()
    report.not_ok = int((~usable).sum())
    df = catalog[usable].copy()
    if df.empty:
        raise BalanceError(
            "no usable rows: the catalog has no status=ok rows with a label "
            f"at granularity {config.granularity}; check `python -m ingest labels CATALOG`"
        )
    df[label] = df[label].astype(str)
    patient = df["patient_id_hash"].astype("string").fillna("study:" + df["study_instance_uid"].astype(str))
    df["_patient"] = patient.astype(str)
    df["_patient_rank"] = _rank(df["_patient"], config.seed, "patient")
    df["_rank"] = _rank(df["sop_instance_uid"], config.seed, "instance")
    study_date = pd.to_datetime(df["study_date"].astype("string"), errors="coerce")
    reference = pd.Timestamp(config.reference_date)
    report.undated = int(study_date.isna().sum())

    after = study_date >= reference
    seen_before = set(df.loc[~after, "_patient"])  # undated rows count as "before": they train
    is_val_patient = ~df["_patient"].isin(seen_before)
    report.dropped_straddling = int((~is_val_patient & after).sum())
    val_pool = df[is_val_patient]
    pool = df[~after]

    classes = sorted(df[label].unique())
    report.available = {c: int(n) for c, n in pool[label].value_counts().items()}
    short = {
        c: config.per_class - report.available.get(c, 0)
        for c in classes
        if report.available.get(c, 0) < config.per_class
    }
    if short and config.short_class_policy == "error":
        raise BalanceError(
            f"{len(short)} classes have fewer than {config.per_class} training instances: "
            + ", ".join(f"{c} ({config.per_class - n} available)" for c, n in sorted(short.items()))
            + "; lower --per-class or use --short-class-policy keep/drop"
        )
    report.shortfall = short
    if config.short_class_policy == "drop":
        report.dropped_classes = sorted(short)

    assignment = _assign_finetune_patients(pool, label, config)
    pool = pool.assign(split=pool["_patient"].map(assignment).astype(object).fillna("train"))
    ft_counts = pool.loc[pool["split"] == "finetune", label].value_counts()
    quotas = {
        # train takes what fine-tuning left of per_class (more when fine-tuning came up short).
        "train": {
            c: config.per_class - min(int(ft_counts.get(c, 0)), config.finetune_target) for c in classes
        },
        "finetune": dict.fromkeys(classes, config.finetune_target),
        "val": dict.fromkeys(classes, config.val_per_class),
    }
    parts = []
    for split, rows in (
        ("train", pool[pool["split"] == "train"]),
        ("finetune", pool[pool["split"] == "finetune"]),
        ("val", val_pool.assign(split="val")),
    ):
        if rows.empty:
            continue
        rows = rows.sort_values("_rank", kind="stable")
        within_quota = rows.groupby(label).cumcount() < rows[label].map(quotas[split])
        parts.append(rows[within_quota & ~rows[label].isin(report.dropped_classes)])
    selected = pd.concat(parts, ignore_index=True) if parts else pool.head(0)
    selected = selected.sort_values(["split", label, "_rank"], kind="stable", ignore_index=True)
    for split in SPLITS:
        counts = selected.loc[selected["split"] == split, label].value_counts()
        report.counts[split] = {c: int(counts.get(c, 0)) for c in classes if c not in report.dropped_classes}
    # What a kept class really misses: a patient moved whole to fine-tuning can bring more instances
    # than its quota, and those cannot train (patients stay on one side), so the class ends up shorter
    # than the pool alone says.
    for c in report.counts["train"]:
        missing = config.per_class - report.counts["train"][c] - report.counts["finetune"][c]
        if missing > 0:
            report.shortfall[c] = missing
    return selected.drop(columns=["_patient", "_patient_rank", "_rank"]), report


def _assign_finetune_patients(pool: pd.DataFrame, label: str, config: BalanceConfig) -> dict[str, str]:
    """Greedy, rarest class first: move whole patients to fine-tuning until each class has its share."""
    assignment: dict[str, str] = {}
    if config.finetune_target == 0 or pool.empty:
        return assignment
    per_patient = pool.groupby([label, "_patient"], sort=False).agg(
        n=("_rank", "size"), rank=("_patient_rank", "first")
    )
    for cls, available in pool[label].value_counts(ascending=True).items():
        # A short class gives fine-tuning the same fraction of what it has, not its whole stock.
        need = min(config.finetune_target, round(available * config.finetune_fraction))
        patients = per_patient.loc[cls].sort_values("rank")
        status = patients.index.map(assignment)
        have = int(patients["n"][status == "finetune"].sum())
        free = patients[status.isna()]
        before = free["n"].cumsum() - free["n"]
        to_finetune = free.index[(have + before) < need]
        for p in to_finetune:
            assignment[p] = "finetune"
        for p in free.index.difference(to_finetune):
            assignment[p] = "train"
    return assignment

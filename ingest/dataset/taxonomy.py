"""The 7 / 30 / 68-class radiographic view taxonomy (PedXnet) and site protocol-code tables.

The hierarchy is data (``ingest/data/taxonomy.csv``, one row per 68-class view with its 30- and
7-class parents); this module only loads, validates and answers questions about it. Class indices
are positions in the alphabetically sorted class names of a granularity, so they do not depend on
row order in the file.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

GRANULARITIES = (7, 30, 68)
EXPECTED_COUNTS = {7: 7, 30: 30, 68: 68}
TAXONOMY_COLUMNS = ("label_68", "label_30", "label_7", "body_part", "view_position", "description")
CODE_TABLE_COLUMNS = ("code", "label_68")


class TaxonomyError(ValueError):
    """The taxonomy file or a site code table is malformed; the message says where."""


@dataclass(frozen=True)
class ViewClass:
    """One 68-class view with its parents and the header values a modality typically writes for it."""

    label_68: str
    label_30: str
    label_7: str
    body_part: str
    view_position: str
    description: str

    def label(self, granularity: int) -> str:
        return {68: self.label_68, 30: self.label_30, 7: self.label_7}[_check_granularity(granularity)]


def _check_granularity(granularity: int) -> int:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


@dataclass(frozen=True)
class Taxonomy:
    views: tuple[ViewClass, ...]
    version: str
    code_table: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self.views)

    # -- class names and indices -------------------------------------------------------------
    def classes(self, granularity: int) -> tuple[str, ...]:
        """Class names of a granularity in index order (sorted)."""
        return tuple(sorted({v.label(granularity) for v in self.views}))

    def index(self, name: str, granularity: int) -> int:
        try:
            return self.classes(granularity).index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not a {granularity}-class label") from None

    def name(self, index: int, granularity: int) -> str:
        names = self.classes(granularity)
        if not 0 <= index < len(names):
            raise IndexError(f"class index {index} out of range for {granularity} classes")
        return names[index]

    # -- hierarchy ---------------------------------------------------------------------------
    def view(self, label_68: str) -> ViewClass:
        for v in self.views:
            if v.label_68 == label_68:
                return v
        raise KeyError(f"{label_68!r} is not a 68-class label")

    def parents(self, label_68: str) -> tuple[str, str]:
        """(30-class parent, 7-class grandparent) of a 68-class view."""
        v = self.view(label_68)
        return v.label_30, v.label_7

    def coarsen(self, label_68: str, granularity: int) -> str:
        """The label of a 68-class view at another granularity."""
        return self.view(label_68).label(granularity)

    def children(self, label: str, level: int = 7, granularity: int = 68) -> tuple[str, ...]:
        """Classes at ``granularity`` under the ``level``-class ``label``, sorted.

        The level is explicit because some names (Chest, Abdomen, Upper_Extremity, Lower_Extremity)
        are both a 7- and a 30-class label.
        """
        if _check_granularity(granularity) <= _check_granularity(level):
            raise ValueError(f"{granularity}-class labels are not children of {level}-class labels")
        if label not in self.classes(level):
            raise KeyError(f"{label!r} is not a {level}-class label")
        return tuple(sorted({v.label(granularity) for v in self.views if v.label(level) == label}))

    # -- site code tables --------------------------------------------------------------------
    def with_code_table(self, path: str | Path) -> Taxonomy:
        """A copy with a site's protocol-code table merged in (later entries win over earlier ones)."""
        table = load_code_table(path, self)
        merged = {**self.code_table, **table}
        digest = hashlib.sha256(
            (self.version + "".join(f"{k}={v};" for k, v in sorted(merged.items()))).encode()
        ).hexdigest()[:12]
        return Taxonomy(self.views, version=f"{self.version.split('+')[0]}+codes.{digest}", code_table=merged)


def _validate(views: tuple[ViewClass, ...]) -> None:
    seen: dict[str, int] = {}
    parent_of_30: dict[str, str] = {}
    for row, v in enumerate(views, start=2):  # row 1 is the header
        for column in TAXONOMY_COLUMNS[:3]:
            if not getattr(v, column):
                raise TaxonomyError(f"taxonomy row {row}: empty {column}")
        if v.label_68 in seen:
            raise TaxonomyError(f"taxonomy row {row}: 68-class {v.label_68!r} repeats row {seen[v.label_68]}")
        seen[v.label_68] = row
        earlier = parent_of_30.setdefault(v.label_30, v.label_7)
        if earlier != v.label_7:
            raise TaxonomyError(
                f"taxonomy row {row}: 30-class {v.label_30!r} has two 7-class parents, "
                f"{earlier!r} and {v.label_7!r}"
            )
    for granularity, expected in EXPECTED_COUNTS.items():
        found = len({v.label(granularity) for v in views})
        if found != expected:
            raise TaxonomyError(
                f"taxonomy has {found} {granularity}-class labels; it must have exactly {expected}"
            )


def _read_csv(text: str, columns: tuple[str, ...], what: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise TaxonomyError(
            f"{what}: missing column(s) {', '.join(missing)}; expected header {','.join(columns)}"
        )
    return [{k: (v or "").strip() for k, v in r.items() if k} for r in reader]


def parse_taxonomy(text: str) -> Taxonomy:
    rows = _read_csv(text, TAXONOMY_COLUMNS, "taxonomy")
    views = tuple(ViewClass(**{c: r[c] for c in TAXONOMY_COLUMNS}) for r in rows)
    return Taxonomy(views, version="pedxnet-" + hashlib.sha256(text.encode()).hexdigest()[:12])


@cache
def _packaged_text() -> str:
    return resources.files("ingest.dataset").joinpath("data/taxonomy.csv").read_text(encoding="utf-8")


def load_taxonomy(path: str | Path | None = None, code_table: str | Path | None = None) -> Taxonomy:
    """The packaged taxonomy (or the file at ``path``), optionally with a site code table merged in."""
    text = _packaged_text() if path is None else Path(path).read_text(encoding="utf-8")
    taxonomy = parse_taxonomy(text)
    return taxonomy.with_code_table(code_table) if code_table is not None else taxonomy


def normalize_code(code: str) -> str:
    """Codes match case- and whitespace-insensitively, as sites type them inconsistently."""
    return " ".join(code.split()).upper()


def load_code_table(path: str | Path, taxonomy: Taxonomy) -> dict[str, str]:
    """Read a site CSV ``code,label_68``; an unknown label or a conflicting duplicate is an error naming
    the row."""
    path = Path(path)
    rows = _read_csv(path.read_text(encoding="utf-8-sig"), CODE_TABLE_COLUMNS, str(path))
    known = {v.label_68 for v in taxonomy.views}
    table: dict[str, str] = {}
    for row, r in enumerate(rows, start=2):
        code, label = normalize_code(r["code"]), r["label_68"]
        if not code:
            raise TaxonomyError(f"{path}, row {row}: empty code")
        if label not in known:
            raise TaxonomyError(
                f"{path}, row {row}: unknown label_68 {label!r} for code {r['code']!r}; "
                f"use one of the 68 names in ingest/data/taxonomy.csv"
            )
        if table.get(code, label) != label:
            raise TaxonomyError(
                f"{path}, row {row}: code {r['code']!r} maps to both {table[code]!r} and {label!r}"
            )
        table[code] = label
    return table

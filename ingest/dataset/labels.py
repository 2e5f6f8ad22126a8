"""Header → view label: a site's code table first, then data-driven rules (``data/view_rules.csv``).

A header is labelled in two steps, each a lookup in data, with explicit fallbacks to ``unmapped``:

1. **Code table** (``Taxonomy.code_table``): every procedure code and the ProtocolName are tried
   as codes. One label → ``label_source=code-table``; two different labels → unmapped (conflict).
2. **Rules**: the *region* and the *projection* are each read from the header fields in a fixed
   precedence, and the pair is looked up in the rules' view table. The precedence and the reasons
   for it are in ``data/LABEL_RULES.md``.

``python -m ingest labels CATALOG`` prints per-class counts and the most frequent unmapped header
combinations so a site can extend its code table; ``--relabel`` rewrites the catalog's labels.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ingest.dataset.taxonomy import Taxonomy, TaxonomyError, load_taxonomy, normalize_code

RULE_COLUMNS = ("kind", "name", "projection", "label_68", "refines", "pattern")
RULE_KINDS = ("region", "projection", "view", "default")
ANY_PROJECTION = "*"
# Header fields a label is read from (catalog column names); procedure_code is "|"-joined CodeValues.
LABEL_FIELDS = (
    "body_part",
    "view_position",
    "study_description",
    "series_description",
    "protocol_name",
    "procedure_code",
    "procedure_code_meaning",
)
# Precedence tiers, best first. Fields in one tier are peers: if they disagree, that is a conflict.
REGION_TIERS = (
    ("series_description", "protocol_name"),
    ("study_description",),
    ("body_part",),
    ("procedure_code_meaning", "procedure_code"),
)
PROJECTION_TIERS = (
    ("series_description", "protocol_name"),
    ("view_position",),
    ("study_description",),
    ("procedure_code_meaning", "procedure_code"),
)
UNTOUCHED_STATUSES = ("unreadable", "excluded")
REPORT_FIELDS = ("study_description", "body_part", "protocol_name")


@dataclass(frozen=True)
class LabelResult:
    label_68: str | None
    label_30: str | None
    label_7: str | None
    source: str  # code-table | rule | none
    status: str  # ok | unmapped
    reason: str | None


@dataclass(frozen=True)
class Pattern:
    name: str
    regex: re.Pattern
    refines: frozenset[str]  # names this one is a more specific form of: FINGER refines HAND
    written_as: frozenset[str] = frozenset()  # projections: what ViewPosition says for this view


@dataclass(frozen=True)
class Rules:
    regions: tuple[Pattern, ...]
    projections: tuple[Pattern, ...]
    views: dict  # (region, projection or "*") -> label_68
    defaults: dict  # region -> label_68, used only when no field names a projection

    def __post_init__(self) -> None:
        regions = {p.name for p in self.regions}
        projections = {p.name for p in self.projections} | {ANY_PROJECTION}
        for region, projection in self.views:
            if region not in regions or projection not in projections:
                raise TaxonomyError(
                    f"view rule ({region}, {projection}) names an undefined region or projection; "
                    f"add a 'region'/'projection' row for it in view_rules.csv"
                )
        for region in self.defaults:
            if region not in regions:
                raise TaxonomyError(
                    f"default rule for undefined region {region!r}; add a 'region' row for it"
                )


def normalize_text(text: str | None) -> str:
    """Upper case, punctuation to spaces, digits split from letters ('2VIEWS' → '2 VIEWS')."""
    if not text:
        return ""
    text = re.sub(r"[^A-Z0-9]+", " ", text.upper().replace("&", " AND "))
    return " ".join(re.sub(r"(\d)([A-Z])", r"\1 \2", text).split())


def parse_rules(text: str, taxonomy: Taxonomy, source: str = "view_rules.csv") -> Rules:
    """Parse and validate the rules table; errors name the row and how to fix it."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in RULE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise TaxonomyError(
            f"{source}: missing column(s) {', '.join(missing)}; expected {','.join(RULE_COLUMNS)}"
        )
    known = {v.label_68 for v in taxonomy.views}
    regions, projections, views, defaults = [], [], {}, {}
    for row, raw in enumerate(reader, start=2):
        r = {k: (v or "").strip() for k, v in raw.items() if k}
        kind, name = r["kind"], r["name"]
        if kind not in RULE_KINDS:
            raise TaxonomyError(f"{source}, row {row}: kind {kind!r} is not one of {', '.join(RULE_KINDS)}")
        if not name:
            raise TaxonomyError(f"{source}, row {row}: empty name")
        if kind in ("region", "projection"):
            try:
                regex = re.compile(r["pattern"])
            except re.error as exc:
                raise TaxonomyError(
                    f"{source}, row {row}: bad regular expression {r['pattern']!r}: {exc}"
                ) from None
            if not r["pattern"]:
                raise TaxonomyError(f"{source}, row {row}: a {kind} row needs a pattern")
            (regions if kind == "region" else projections).append(
                Pattern(name, regex, frozenset(r["refines"].split()), frozenset(r["projection"].split()))
            )
            continue
        if r["label_68"] not in known:
            raise TaxonomyError(
                f"{source}, row {row}: unknown label_68 {r['label_68']!r}; "
                "use one of the 68 names in taxonomy.csv"
            )
        if kind == "view":
            key = (name, r["projection"])
            if views.get(key, r["label_68"]) != r["label_68"]:
                raise TaxonomyError(
                    f"{source}, row {row}: {key} maps to both {views[key]!r} and {r['label_68']!r}"
                )
            views[key] = r["label_68"]
        else:
            defaults[name] = r["label_68"]
    return Rules(tuple(regions), tuple(projections), views, defaults)


@cache
def _packaged_rules_text() -> str:
    return resources.files("ingest.dataset").joinpath("data/view_rules.csv").read_text(encoding="utf-8")


_RULES_CACHE: dict[tuple[str, str], Rules] = {}


def load_rules(taxonomy: Taxonomy, path: str | Path | None = None) -> Rules:
    """The packaged rules (or those at ``path``), validated against ``taxonomy``; parsed once per process."""
    text = _packaged_rules_text() if path is None else Path(path).read_text(encoding="utf-8")
    key = (text, taxonomy.version)
    if key not in _RULES_CACHE:
        _RULES_CACHE[key] = parse_rules(text, taxonomy, str(path or "view_rules.csv"))
    return _RULES_CACHE[key]


def _find(patterns: tuple[Pattern, ...], text: str) -> set[str]:
    found = {p.name for p in patterns if p.regex.search(text)}
    refined = set().union(*(p.refines for p in patterns if p.name in found))
    return found - refined


def _mapped(label_68: str, source: str, taxonomy: Taxonomy) -> LabelResult:
    label_30, label_7 = taxonomy.parents(label_68)
    return LabelResult(label_68, label_30, label_7, source, "ok", None)


def _unmapped(reason: str) -> LabelResult:
    return LabelResult(None, None, None, "none", "unmapped", reason)


def _from_code_table(fields: Mapping[str, str | None], taxonomy: Taxonomy) -> LabelResult | None:
    if not taxonomy.code_table:
        return None
    codes = [c for c in (fields.get("procedure_code") or "").split("|") if c.strip()]
    codes += [fields["protocol_name"]] if fields.get("protocol_name") else []
    hits = {
        code: taxonomy.code_table[normalize_code(code)]
        for code in codes
        if normalize_code(code) in taxonomy.code_table
    }
    labels = set(hits.values())
    if len(labels) > 1:
        listed = ", ".join(f"{code}→{label}" for code, label in sorted(hits.items()))
        return _unmapped(f"conflict: code table maps {listed}; fix the site code table")
    return _mapped(labels.pop(), "code-table", taxonomy) if labels else None


def _decide(tiers, candidates: dict[str, set[str]], what: str) -> tuple[str | None, str | None]:
    """The first tier with an unambiguous answer wins; (answer, None) or (None, why not)."""
    ambiguous = []
    for tier in tiers:
        unique = {f: next(iter(candidates[f])) for f in tier if len(candidates.get(f, ())) == 1}
        if len(set(unique.values())) > 1:
            said = ", ".join(f"{f} says {v}" for f, v in unique.items())
            return None, f"conflict: {what}: {said}"
        if unique:
            return next(iter(unique.values())), None
        ambiguous += [
            f"{f} names {'/'.join(sorted(candidates[f]))}" for f in tier if len(candidates.get(f, ())) > 1
        ]
    return None, (f"ambiguous {what}: " + "; ".join(ambiguous)) if ambiguous else None


def _views_named(rules: Rules, region: str, named: dict[str, Pattern]) -> dict[str, str]:
    """projection → label_68 for the projections a field names that exist for ``region``.

    Refinement applies among those only, so 'KNEE STANDING AP' is Knee_AP although STANDING
    refines AP for the abdomen.
    """
    found = {p: rules.views[(region, p)] for p in named if (region, p) in rules.views}
    refined = set().union(*(named[p].refines for p in found))
    return {p: label for p, label in found.items() if p not in refined}


def _prefer_specific_peer(
    found: dict[str, dict[str, str]], named: dict[str, dict[str, Pattern]]
) -> dict[str, dict[str, str]]:
    """Series description and protocol name are peers, but one that names only the generic
    projection a specific view is written as ('KNEE AP' beside 'KNEE SKYLINE', whose ViewPosition is
    AP) does not contradict it: the specific view wins instead of a conflict.
    """
    first, second = PROJECTION_TIERS[0]
    a, b = found.get(first, {}), found.get(second, {})
    if len(a) != 1 or len(b) != 1 or a == b:
        return found
    ((pa, _),), ((pb, _),) = a.items(), b.items()
    if pa in named[second][pb].written_as:
        return {f: v for f, v in found.items() if f != first}
    if pb in named[first][pa].written_as:
        return {f: v for f, v in found.items() if f != second}
    return found


def _decide_projection(
    found: dict[str, dict[str, str]], named: dict[str, dict[str, Pattern]], region: str
) -> tuple[str | None, str | None]:
    """Like _decide, with one exception: ViewPosition can only say AP/PA/LL/...; when it decides,
    a description naming exactly one view that ViewPosition writes that way ('ANKLE MORTISE' with
    ViewPosition AP) gives the more specific label.
    """
    found = _prefer_specific_peer(found, named)
    labels = {f: set(views.values()) for f, views in found.items()}
    label, why = _decide(PROJECTION_TIERS, labels, f"projection for {region}")
    decided_by = found.get("view_position", {})
    if (
        label is None
        or set(decided_by.values()) != {label}
        or any(len(labels.get(f, ())) == 1 for f in PROJECTION_TIERS[0])
    ):
        return label, why
    for field in ("study_description", "procedure_code_meaning"):
        views = found.get(field, {})
        if len(views) == 1:
            ((projection, specific),) = views.items()
            if decided_by.keys() & named[field][projection].written_as:
                return specific, None
    return label, why


def _describe(fields: Mapping[str, str | None]) -> str:
    shown = [f"{f}={fields[f]}" for f in LABEL_FIELDS if fields.get(f)]
    return ", ".join(shown) if shown else "all label fields empty"


def label_header(
    fields: Mapping[str, str | None], taxonomy: Taxonomy, rules: Rules | None = None
) -> LabelResult:
    """The view label of one header (keys as in LABEL_FIELDS; missing keys count as empty)."""
    by_code = _from_code_table(fields, taxonomy)
    if by_code is not None:
        return by_code
    rules = rules or load_rules(taxonomy)
    texts = {f: normalize_text(fields.get(f)) for f in LABEL_FIELDS}
    regions = {f: _find(rules.regions, t) for f, t in texts.items() if t and f != "view_position"}
    region, why = _decide(REGION_TIERS, regions, "region")
    if region is None:
        return _unmapped(why or f"no rule matched: {_describe(fields)}")
    if (region, ANY_PROJECTION) in rules.views:
        return _mapped(rules.views[(region, ANY_PROJECTION)], "rule", taxonomy)
    projection_fields = [f for tier in PROJECTION_TIERS for f in tier if texts[f]]
    named = {f: {p.name: p for p in rules.projections if p.regex.search(texts[f])} for f in projection_fields}
    found = {f: _views_named(rules, region, n) for f, n in named.items()}
    label, why = _decide_projection(found, named, region)
    if label is not None:
        return _mapped(label, "rule", taxonomy)
    if why:
        return _unmapped(why)
    unmatched = [f"{p} ({f})" for f, n in named.items() for p in sorted(n) if (region, p) not in rules.views]
    if unmatched:
        return _unmapped(f"no 68-class view for {region} with projection {', '.join(unmatched)}")
    if region in rules.defaults:
        return _mapped(rules.defaults[region], "rule", taxonomy)
    return _unmapped(f"projection unknown for region {region}: {_describe(fields)}")


# -- catalogs ------------------------------------------------------------------------------------
def _factorize_rows(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One integer per row, equal for rows with equal values in ``columns`` (missing == missing)."""
    key = np.zeros(len(df), dtype=np.int64)
    for column in columns:
        codes, uniques = pd.factorize(df[column], use_na_sentinel=True)
        key, _ = pd.factorize(key * (len(uniques) + 1) + (codes + 1))
    return key


def _string_column(values: np.ndarray, like: pd.Series) -> pd.Series:
    if isinstance(like.dtype, pd.ArrowDtype):
        return pd.Series(pd.array(values, dtype=pd.ArrowDtype(pa.string())), index=like.index)
    return pd.Series(values, index=like.index, dtype=object)


def label_catalog(df: pd.DataFrame, taxonomy: Taxonomy, rules: Rules | None = None) -> pd.DataFrame:
    """Label every row not unreadable/excluded; each distinct header combination is labelled once."""
    rules = rules or load_rules(taxonomy)
    df = df.copy()
    for column in ("label_68", "label_30", "label_7", "label_source", "status", "reason"):
        if column not in df:
            df[column] = None
    fields = [f for f in LABEL_FIELDS if f in df.columns]
    todo = ~df["status"].isin(UNTOUCHED_STATUSES).fillna(False).to_numpy(dtype=bool)
    if not todo.any():
        return df
    subset = df.loc[todo, fields]
    key = _factorize_rows(subset, fields)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    combos = subset.iloc[first].astype(object).where(subset.iloc[first].notna(), None).to_dict("records")
    results = [label_header(c, taxonomy, rules) for c in combos]
    outputs = {
        "label_68": [r.label_68 for r in results],
        "label_30": [r.label_30 for r in results],
        "label_7": [r.label_7 for r in results],
        "label_source": [r.source for r in results],
        "status": [r.status for r in results],
        "reason": [r.reason for r in results],
    }
    for column, values in outputs.items():
        column_values = df[column].astype(object).to_numpy(copy=True)
        column_values[todo] = np.asarray(values, dtype=object)[inverse]
        df[column] = _string_column(column_values, df[column])
    return df


def _counts_table(counts: pd.Series, total: int, title: str) -> list[str]:
    lines = [f"{title}:"]
    width = max([len(str(k)) for k in counts.index] + [5])
    for name, n in counts.items():
        lines.append(f"  {name!s:<{width}}  {n:>9,}  {100 * n / max(total, 1):5.1f}%")
    return lines


def label_report(df: pd.DataFrame, top: int = 20) -> str:
    """Per-class counts at 7/30/68 and the most frequent unmapped header combinations."""
    status = df["status"].astype(object).fillna("none")
    lines = [f"rows: {len(df):,}"]
    lines += _counts_table(status.value_counts(), len(df), "status")
    ok = df[status == "ok"]
    lines += _counts_table(
        ok["label_source"].astype(object).fillna("none").value_counts(), len(ok), "label source (ok rows)"
    )
    for granularity in (7, 30, 68):
        counts = ok[f"label_{granularity}"].astype(object).value_counts().sort_index()
        lines += _counts_table(counts, len(ok), f"{granularity}-class counts ({len(counts)} classes present)")
    unmapped = df[status == "unmapped"]
    lines.append(
        f"top {top} unmapped header combinations ({len(unmapped):,} rows; add their codes to a "
        f"site code table and rerun with --relabel):"
    )
    if unmapped.empty:
        lines.append("  none")
        return "\n".join(lines)
    combos = unmapped[list(REPORT_FIELDS) + ["reason"]].astype(object).fillna("").value_counts().head(top)
    for (study, body, protocol, reason), n in combos.items():
        lines.append(f"  {n:>9,}  study_description={study!r} body_part={body!r} protocol_name={protocol!r}")
        lines.append(f"             reason: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ingest.dataset.catalog import CatalogError, read_catalog, write_catalog

    parser = argparse.ArgumentParser(prog="python -m ingest labels", description=__doc__.split("\n\n")[0])
    parser.add_argument("catalog", type=Path, help="catalog path (a Parquet directory from 'ingest scan')")
    parser.add_argument("--code-table", type=Path, help="site protocol-code table, CSV code,label_68")
    parser.add_argument(
        "--relabel", action="store_true", help="relabel the catalog and write it back (atomic)"
    )
    parser.add_argument("--top", type=int, default=20, help="unmapped header combinations to list")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error("--top must be 0 or more")
    try:
        df = read_catalog(args.catalog)
        taxonomy = load_taxonomy(code_table=args.code_table)
    except (CatalogError, TaxonomyError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    if args.relabel or args.code_table:
        df = label_catalog(df, taxonomy)
    print(label_report(df, top=args.top))
    if args.relabel:
        write_catalog(df, args.catalog)
        print(f"relabelled {args.catalog} ({len(df):,} rows, taxonomy {taxonomy.version})")
    elif args.code_table:
        print("dry run: labels above use the code table; the catalog is unchanged (add --relabel to write)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

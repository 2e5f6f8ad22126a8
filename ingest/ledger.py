"""The instance ledger of a pull: what the PACS promised, what is safely in the spool, what is not.

``ingest pull`` writes ``WORK/ledger.parquet`` after each retrieval, one row per instance that the
C-FIND or QIDO-RS search promised:

* ``state``: ``stored`` (complete in the spool: written atomically, and fsynced unless the pull ran
  with ``--no-fsync``), ``refused`` (the PACS answered the request for it with a failure status,
  e.g. C-MOVE ``0xA702`` or HTTP ``404``), or ``missing`` (still absent after the retries, with no
  refusal: an aborted association, a timeout, a PACS that said success and sent nothing);
* ``status`` (the refusing status, ``0xA702`` / ``HTTP 404``) and ``reason`` (the last error);
* ``study_state``: ``complete`` (every promised instance stored), ``partial`` or ``failed`` (none).

The spool, not a PACS's counters, says what is stored, so a partial transfer reported as complete
still shows as ``missing``. A re-run of the same pull fetches exactly what is not stored and
rewrites the ledger. The ledger is also the plan a re-run starts from: a study it records complete,
with every instance still in the spool, is not searched again (``--requery-complete`` searches it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from ingest.dicom.scp import spool_path
from ingest.dicom.scu import RetrieveFailure
from ingest.files import write_atomic

LEDGER_NAME = "ledger.parquet"
COLUMNS = (
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "state",
    "status",
    "reason",
    "study_state",
)
STATES = ("stored", "refused", "missing")
STUDY_STATES = ("complete", "partial", "failed")
# A failure status the peer answered with: a DIMSE status word or an HTTP status code.
_STATUS_PATTERN = re.compile(r"status (0x[0-9A-F]{4})|HTTP (\d{3})")


def refusal_status(reason: str) -> str:
    """The status a retrieve failure names (``0xA702``, ``HTTP 404``), "" when the peer gave none."""
    match = _STATUS_PATTERN.search(reason)
    if match is None:
        return ""
    return match.group(1) or f"HTTP {match.group(2)}"


def build_ledger(
    promised: Mapping[str, Iterable[Mapping]], spool_dir: str | Path, failures: Iterable[RetrieveFailure]
) -> pd.DataFrame:
    """One row per promised instance (``promised``: study UID → instance dicts with
    SeriesInstanceUID, SOPInstanceUID, SOPClassUID), its state judged by the spool and ``failures``."""
    reasons: dict[str, str] = {}
    for failure in failures:
        for uid in failure.item.sop_instance_uids:
            reasons[uid] = failure.reason
    rows = []
    for study_uid, instances in promised.items():
        for instance in instances:
            uid = instance["SOPInstanceUID"]
            reason = ""
            if spool_path(spool_dir, uid).exists():
                state, status = "stored", ""
            else:
                reason = reasons.get(uid, "not received (no request failed for it)")
                status = refusal_status(reason)
                state = "refused" if status else "missing"
            series_uid, sop_class_uid = instance["SeriesInstanceUID"], instance["SOPClassUID"]
            rows.append((study_uid, series_uid, uid, sop_class_uid, state, status, reason))
    ledger = pd.DataFrame(rows, columns=list(COLUMNS[:-1]))
    stored = (ledger["state"] == "stored").groupby(ledger["study_uid"]).agg(["sum", "size"])
    study_state = pd.Series("partial", index=stored.index)
    study_state[stored["sum"] == stored["size"]] = "complete"
    study_state[stored["sum"] == 0] = "failed"
    ledger["study_state"] = ledger["study_uid"].map(study_state).astype(str)
    return ledger.astype({c: str for c in COLUMNS})


def studies(ledger: pd.DataFrame) -> pd.DataFrame:
    """Per study: instances promised, stored, refused, missing, and its state."""
    if ledger.empty:
        return pd.DataFrame(columns=["study_uid", "instances", *STATES, "study_state"])
    counts = pd.crosstab(ledger["study_uid"], ledger["state"]).reindex(columns=list(STATES), fill_value=0)
    counts.insert(0, "instances", counts.sum(axis=1))
    counts["study_state"] = ledger.groupby("study_uid")["study_state"].first()
    return counts.reset_index()


def incomplete_studies(ledger: pd.DataFrame) -> pd.DataFrame:
    """``studies(ledger)`` rows of the partial and failed studies."""
    table = studies(ledger)
    return table[table["study_state"] != "complete"].reset_index(drop=True)


def write_ledger(ledger: pd.DataFrame, path: str | Path) -> Path:
    """Write the ledger as Parquet, atomically (a reader sees the old file or the new one)."""
    path = Path(path)
    write_atomic(path, ledger.to_parquet(index=False), durable=True)
    return path


def read_ledger(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def completed_studies(path: str | Path, present: set[str]) -> dict[str, list[dict]]:
    """The studies an earlier ledger at ``path`` recorded complete and whose instances are all still
    among ``present`` (the spool's UIDs), with their promised instances as the search gave them.

    A re-run plans these from the ledger instead of asking the PACS again; {} without a ledger.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    ledger = read_ledger(path)
    complete = ledger[ledger["study_state"] == "complete"]
    found: dict[str, list[dict]] = {}
    for study_uid, rows in complete.groupby("study_uid", sort=False):
        if not rows["sop_instance_uid"].isin(present).all():
            continue  # an instance left the spool since: the search runs again for this study
        columns = rows[["series_uid", "sop_instance_uid", "sop_class_uid"]].itertuples(index=False)
        found[study_uid] = [
            {"SeriesInstanceUID": series, "SOPInstanceUID": uid, "SOPClassUID": sop_class}
            for series, uid, sop_class in columns
        ]
    return found

"""Retrieval throughput: images/s and MB/s pulling one set from Orthanc on loopback, ingest vs dcmtk.

    .venv/bin/python bench/retrieval_throughput.py                       # ~190 phantom instances
    .venv/bin/python bench/retrieval_throughput.py --data synthetic      # pydicom DX files instead
    .venv/bin/python bench/retrieval_throughput.py --data DIR            # existing DICOM files

One run starts Orthanc (``ingest.demo.orthanc.OrthancServer``) on free 127.0.0.1 ports, uploads the set
and pulls it the same way several times, each into a fresh, empty directory that is deleted after
its row, with ``os.sync()`` before the next row so none pays for another's writeback:

* ingest C-MOVE (``ingest.dicom.scu.retrieve`` into ``ingest.dicom.scp.StorageSCP``)
  with 1, 2, 4, 8 associations,
  of ``plan_retrieval``'s plan: whole studies, a StudyInstanceUID list per request (up to 50);
* ingest C-GET with 1 and 4 associations, same plan;
* ingest C-GET with 1 and 4 associations and C-MOVE with 2, without fsync (``--no-fsync``), as
  ``storescp`` writes;
* ingest C-GET and C-MOVE on the pynetdicom transport (``--transport pynetdicom``, the fallback
  for a PACS the fast upper layer does not interoperate with) with 4 associations;
* ingest C-GET and C-MOVE spread over several processes (``retrieve(..., processes=P, workers=W)``,
  ``--processes P --workers W``): P x W associations, each process receiving on its own core; for
  C-MOVE every process listens on the same port (SO_REUSEPORT). The rows include starting the
  processes (spawn: ~0.7 s of CPU each to import pydicom/pynetdicom);
* the same C-MOVE with one study per request (``max_studies_per_request=1``, what a PACS without
  UID lists gets), and with the older plan of one IMAGE-level request per series
  (``whole_studies=False``), to show what Orthanc's cost per C-MOVE request amounts to;
* dcmtk ``movescu`` into a background ``storescp``: one association moving every study (a
  backslash-separated StudyInstanceUID list; repeated ``-k`` keys keep only the last value), and
  one ``movescu`` process per study;
* that single ``movescu`` again, received by ingest's ``StorageSCP`` instead of ``storescp``, with and
  without its fsyncs: the same client, so the difference is the receiver's;
* dcmtk ``getscu``, one process per study (Orthanc 1.10 ends a C-GET at the first instance it cannot
  send, and ``getscu`` offers one transfer syntax per storage class);
* ingest DICOMweb: WADO-RS (``ingest.dicomweb.retrieve``) from the same Orthanc's DICOMweb plugin,
  with 1 and 4 keep-alive connections, and 4 without fsync, of ``ingest.dicomweb.plan_retrieval``'s
  plan (QIDO-RS, timed separately like the C-FIND plan); skipped where ``orthanc-dicomweb`` is not
  installed;
* no network: the set's files written straight into a spool by 4 threads with
  ``ingest.dicom.scp.write_spool_file``, with and without its fsyncs: the most this disk lets any
  receiver store, crash-safe or not.

Seconds run from the first retrieve request to the last file on disk; the ingest plan (C-FIND per
series and instance) is made once beforehand and timed separately. The planning rows time that plan
(per-study C-FINDs over 1, 4 and 8 associations, ``plan_retrieval(..., workers=N)``; relational
C-FINDs of 50 studies each over 1 and 4, ``--relational-find``; QIDO-RS over 4 connections)
in studies/s, each the median of ``--repeat`` runs; ``--plan-only`` stops after them. Files and
bytes are counted in each output directory, and a row whose count differs from what Orthanc holds is flagged.
``--repeat N`` runs every row N times, round by round (so a burst of load elsewhere hits all rows
alike), and reports the median and the range of images/s, and each row's rate over dcmtk's
``movescu`` + ``storescp`` (one association) in the same round. The in-process ingest rows also give the
CPU time this process spent per instance (receiving and requesting; Orthanc and child processes
are not counted).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from results import write_results

from ingest import dicomweb
from ingest.demo.orthanc import DICOMWEB_PLUGIN, LOOPBACK, OrthancServer, find_dicom_files, free_port
from ingest.dicom.scp import StorageSCP, spool_path, write_spool_file
from ingest.dicom.scu import PacsConfig, RetrieveItem, find_studies, plan_retrieval, retrieve

PACS_AET = "BENCHPACS"
INGEST_AET = "PEDXRAY"
DCMTK_AET = "DCMTK"
# dcmtk (like the DCMTK inside Orthanc) leaves Nagle on unless told; OrthancServer sets the same.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
# The row every other is set against, round by round.
REFERENCE = ("dcmtk movescu+storescp", "1")
SPOOL_WRITE_THREADS = 4


@dataclass(frozen=True)
class Row:
    method: str
    associations: str
    instances: int
    expected: int
    nbytes: int
    seconds: float
    command: str
    note: str = ""
    # CPU time of this (benchmark) process, for the in-process ingest rows; None where it cannot tell.
    cpu_seconds: float | None = None

    @property
    def complete(self) -> bool:
        return self.instances == self.expected


def output_files(directory: Path) -> tuple[int, int]:
    """(files, bytes) of the regular files under ``directory``, temporary files left out."""
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return len(files), sum(p.stat().st_size for p in files)


def wait_for_files(directory: Path, expected: int, timeout: float, settle: float = 0.5) -> None:
    """storescp may still be closing the last file when movescu exits: wait until all are there,
    or until no file arrived for ``settle`` seconds (an incomplete transfer), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    count, last_change = output_files(directory)[0], time.monotonic()
    while count < expected and time.monotonic() < min(deadline, last_change + settle):
        time.sleep(0.01)
        now_count = output_files(directory)[0]
        if now_count != count:
            count, last_change = now_count, time.monotonic()


# -- data ---------------------------------------------------------------------------------------------


def phantom_set(cache_dir: Path, studies: int, seed: int) -> list[Path]:
    """The phantom PACS from ``ingest.phantoms.generate``, generated once into ``cache_dir``."""
    from ingest.phantoms import generate

    target = cache_dir / f"phantoms-s{studies}-seed{seed}"
    if not (target / "ground_truth.csv").exists():
        print(f"generating {studies} phantom studies into {target} (once; later runs reuse it)", flush=True)
        scratch = Path(tempfile.mkdtemp(prefix=".phantoms-", dir=cache_dir))
        generate(scratch, studies=studies, seed=seed, progress=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    return find_dicom_files(target)


def synthetic_set(cache_dir: Path, studies: int, seed: int) -> list[Path]:
    """DX studies of 1-3 uncompressed 1500x1200 uint16 instances (3.6 MB each), written once."""
    target = cache_dir / f"synthetic-s{studies}-seed{seed}"
    if not (target / "complete").exists():
        scratch = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=cache_dir))
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 4096, size=(1500, 1200), dtype=np.uint16)
        for study in range(studies):
            study_uid, series_uid = generate_uid(), generate_uid()
            for number in range(1, int(rng.integers(1, 4)) + 1):
                write_synthetic_dx(
                    scratch / f"s{study:05d}_{number}.dcm", study, number, study_uid, series_uid, pixels
                )
        (scratch / "complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    return find_dicom_files(target)


def write_synthetic_dx(
    path: Path, study: int, number: int, study_uid: str, series_uid: str, pixels: np.ndarray
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName = f"BENCH{study:05d}", f"Bench^{study}"
    ds.StudyDate, ds.StudyTime, ds.Modality = "20240101", "120000", "DX"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.roll(pixels, number).tobytes()  # distinct content per instance
    ds.save_as(path, enforce_file_format=True)


def load_data(spec: str, cache_dir: Path, studies: int, seed: int) -> tuple[str, list[Path]]:
    if spec == "phantoms":
        try:
            return "phantoms", phantom_set(cache_dir, studies, seed)
        except Exception as error:  # the generator is optional for this benchmark: say so and go on
            print(f"phantom generator failed ({error!r}); falling back to --data synthetic", flush=True)
            spec = "synthetic"
    if spec == "synthetic":
        return "synthetic", synthetic_set(cache_dir, studies, seed)
    files = find_dicom_files(spec)
    if not files:
        raise SystemExit(
            f"--data {spec}: no DICOM Part 10 files found; use phantoms, synthetic or a directory"
        )
    return spec, files


# -- measurements -------------------------------------------------------------------------------------


def run_bounded(function: Callable[[], object], timeout: float) -> object:
    """Run ``function`` on a daemon-like worker and give up after ``timeout`` seconds."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(function).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def ingest_cli(
    cfg: PacsConfig,
    spool: Path,
    method: str,
    workers: int,
    scp_port: int,
    studies_per_request: int = 50,
    processes: int = 1,
    fsync: bool = True,
    transport: str = "fast",
) -> str:
    """The CLI pull that retrieves the same way (it also runs the C-FIND and the plan)."""
    return (
        f"python -m ingest scu --pacs {cfg.called_aet}@{cfg.host}:{cfg.port} pull --spool {spool} "
        f"--method {method} --workers {workers}"
        + (f" --processes {processes}" if processes != 1 else "")
        + ("" if fsync else " --no-fsync")
        + ("" if transport == "fast" else f" --transport {transport}")
        + (f" --studies-per-request {studies_per_request}" if studies_per_request != 50 else "")
        + (f" --scp-host {LOOPBACK} --scp-port {scp_port}" if method == "move" else "")
    )


def measure_ingest(
    label: str,
    cfg: PacsConfig,
    items: list[RetrieveItem],
    method: str,
    workers: int,
    spool: Path,
    scp_port: int,
    expected: int,
    timeout: float,
    studies_per_request: int = 50,
    processes: int = 1,
    fsync: bool = True,
    plan: str = "",
    transport: str = "fast",
) -> Row:
    """One pull timed in this process; the row shows the CLI pull that retrieves the same way
    (``plan`` says how the items were planned, where the CLI would plan them otherwise)."""
    command = ingest_cli(
        cfg, spool, method, workers, scp_port, studies_per_request, processes, fsync, transport
    )
    if plan:
        command = f"{command}  # with {plan}"
    note = ""
    options = {
        "workers": workers,
        "processes": processes,
        "progress": False,
        "max_studies_per_request": studies_per_request,
        "transport": transport,
    }
    started, cpu_started = time.monotonic(), process_cpu_seconds()
    try:
        if method == "move":
            with StorageSCP(
                spool,
                INGEST_AET,
                scp_port,
                [PACS_AET],
                share_port=processes > 1,
                fsync=fsync,
                transport=transport,
            ) as scp:
                summary = run_bounded(
                    lambda: retrieve(cfg, items, method="move", scp=scp, **options), timeout
                )
        else:
            summary = run_bounded(
                lambda: retrieve(cfg, items, method="get", spool_dir=spool, fsync=fsync, **options), timeout
            )
        if summary.failures:
            note = f"{len(summary.failures)} item(s) failed: {summary.failures[0].reason}"
    except FutureTimeout:
        note = f"timed out after {timeout:g} s"
    seconds = time.monotonic() - started
    # Child processes' CPU is not counted, so the multi-process rows get none.
    cpu_seconds = process_cpu_seconds() - cpu_started if processes == 1 else None
    files, nbytes = output_files(spool)
    associations = str(workers) if processes == 1 else f"{processes} x {workers}"
    return Row(label, associations, files, expected, nbytes, seconds, command, note, cpu_seconds)


def measure_dicomweb(
    cfg: dicomweb.DicomwebConfig,
    items: list[RetrieveItem],
    workers: int,
    spool: Path,
    expected: int,
    timeout: float,
    fsync: bool = True,
) -> Row:
    """One WADO-RS pull timed in this process, as ``ingest pull --dicomweb`` retrieves."""
    command = f"python -m ingest pull --dicomweb {cfg.url} --workers {workers}" + (
        "" if fsync else " --no-fsync"
    )
    command += f" --work {spool.parent}  # retrieval part"
    note = ""
    started, cpu_started = time.monotonic(), process_cpu_seconds()
    try:
        summary = run_bounded(
            lambda: dicomweb.retrieve(
                cfg, items, spool_dir=spool, workers=workers, fsync=fsync, progress=False
            ),
            timeout,
        )
        if summary.failures:
            note = f"{len(summary.failures)} item(s) failed: {summary.failures[0].reason}"
    except FutureTimeout:
        note = f"timed out after {timeout:g} s"
    seconds = time.monotonic() - started
    files, nbytes = output_files(spool)
    label = "ingest DICOMweb WADO-RS" + ("" if fsync else ", --no-fsync")
    return Row(
        label,
        f"{workers} HTTP",
        files,
        expected,
        nbytes,
        seconds,
        command,
        note,
        process_cpu_seconds() - cpu_started,
    )


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_command(
    method: str,
    associations: str,
    commands: Sequence[list[str]],
    out_dir: Path,
    expected: int,
    timeout: float,
    receiver_lags: bool,
) -> Row:
    """Run ``commands`` one after another (dcmtk clients); the row covers all of them.

    ``receiver_lags``: another process (storescp) writes the files, so wait for them to land.
    """
    note = ""
    failing = 0
    started = time.monotonic()
    deadline = started + timeout
    for command in commands:
        try:
            result = subprocess.run(
                command,
                env=DCMTK_ENV,
                capture_output=True,
                text=True,
                timeout=max(deadline - time.monotonic(), 0.1),
            )
        except subprocess.TimeoutExpired:
            note = f"timed out after {timeout:g} s"
            break
        if result.returncode != 0 or "E: " in result.stderr:
            failing += 1
            first_error = next((line for line in result.stderr.splitlines() if line.startswith("E:")), "")
            note = note or f"{command[0]} exit {result.returncode}: {first_error or result.stderr[-200:]}"
    if receiver_lags:
        wait_for_files(out_dir, expected, timeout=max(deadline - time.monotonic(), 0.0))
    seconds = time.monotonic() - started
    files, nbytes = output_files(out_dir)
    if failing:
        note = f"{failing} of {len(commands)} {commands[0][0]} process(es) reported errors, first: {note}"
    shown = shell_command(commands[0]) + (f"  (x{len(commands)}, one per study)" if len(commands) > 1 else "")
    return Row(method, associations, files, expected, nbytes, seconds, shown, note)


def measure_spool_write(instances: Sequence[tuple[str, bytes]], out_dir: Path, fsync: bool) -> Row:
    """The spool's own write of every instance (already in memory), by SPOOL_WRITE_THREADS threads."""

    def write(instance: tuple[str, bytes]) -> None:
        uid, data = instance
        write_spool_file(spool_path(out_dir, uid), data, fsync=fsync)

    started, cpu_started = time.monotonic(), process_cpu_seconds()
    with ThreadPoolExecutor(SPOOL_WRITE_THREADS) as pool:
        list(pool.map(write, instances))
    seconds = time.monotonic() - started
    cpu_seconds = process_cpu_seconds() - cpu_started
    files, nbytes = output_files(out_dir)
    method = "no network: spool write alone" + ("" if fsync else ", --no-fsync")
    command = f"ingest.dicom.scp.write_spool_file(..., fsync={fsync}) on {SPOOL_WRITE_THREADS} threads"
    threads = f"{SPOOL_WRITE_THREADS} threads"
    return Row(method, threads, files, len(instances), nbytes, seconds, command, "", cpu_seconds)


def read_instances(files: Sequence[Path]) -> list[tuple[str, bytes]]:
    """(SOPInstanceUID, file bytes) of each file, for the spool-write rows."""
    instances = []
    for path in files:
        with pydicom.dcmread(path, stop_before_pixels=True) as dataset:
            uid = str(dataset.SOPInstanceUID)
        instances.append((uid, path.read_bytes()))
    return instances


def shell_command(command: list[str]) -> str:
    """The command as a shell line, a long StudyInstanceUID list cut short for the table."""
    shown = []
    for argument in command:
        if argument.startswith("StudyInstanceUID=") and argument.count("\\") > 1:
            uids = argument.removeprefix("StudyInstanceUID=").split("\\")
            argument = f"StudyInstanceUID={uids[0]}\\{uids[1]}\\...(all {len(uids)} study UIDs)"
        shown.append(argument)
    return shlex.join(shown)


def movescu_command(pacs_port: int, study_uids: Sequence[str]) -> list[str]:
    return [
        "movescu", "-S", "-aet", DCMTK_AET, "-aec", PACS_AET, "-aem", DCMTK_AET,
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + "\\".join(study_uids),
        LOOPBACK, str(pacs_port),
    ]  # fmt: skip


def getscu_command(pacs_port: int, study_uid: str, out_dir: Path) -> list[str]:
    return [
        "getscu", "-S", "-aet", DCMTK_AET, "-aec", PACS_AET,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "-od", str(out_dir),
        LOOPBACK, str(pacs_port),
    ]  # fmt: skip


class Storescp:
    """dcmtk's storescp in the background, accepting every transfer syntax, writing into ``out_dir``."""

    def __init__(self, port: int, out_dir: Path, log_path: Path) -> None:
        self.command = ["storescp", "-aet", DCMTK_AET, "+xa", "-od", str(out_dir), str(port)]
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Storescp:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command, env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"storescp did not start on port {self.port}; see {self.log_path}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
    except OSError:
        return False


# -- report -------------------------------------------------------------------------------------------


def finish_row(rows: list[Row], row: Row, output: Path, keep: bool) -> None:
    """Record ``row``, then leave the disk as the next row should find it: this row's files gone
    (unless ``keep``) and nothing dirty in the page cache, so no row pays for an earlier row's
    writeback (the --no-fsync rows and storescp leave ~150 MB dirty each)."""
    print(f"  {row.method} x{row.associations}: {row.instances} files in {row.seconds:.2f} s", flush=True)
    rows.append(row)
    if not keep:
        shutil.rmtree(output, ignore_errors=True)
    os.sync()


def row_summaries(runs: Sequence[Sequence[Row]]) -> list[dict]:
    """One dict per row of the first round: the median over rounds and the range of images/s, and the
    median and range of its rate over dcmtk's in the same round."""
    if not runs:
        return []
    reference = next(
        (i for i, row in enumerate(runs[0]) if (row.method, row.associations) == REFERENCE), None
    )
    summaries = []
    for index, row in enumerate(runs[0]):
        measured = [rows[index] for rows in runs]
        rates = [r.instances / r.seconds for r in measured]
        cpu = [1000 * r.cpu_seconds / r.instances for r in measured if r.cpu_seconds and r.instances]
        ratios = None
        if reference is not None and index != reference:
            ratios = [
                (r.instances / r.seconds) / (rows[reference].instances / rows[reference].seconds)
                for r, rows in zip(measured, runs, strict=True)
            ]
        incomplete = [r for r in measured if not r.complete]
        summaries.append(
            {
                "method": row.method,
                "associations": row.associations,
                "instances": incomplete[0].instances if incomplete else row.instances,
                "expected": row.expected,
                "complete": not incomplete,
                "mb": round(row.nbytes / 1e6, 1),
                "seconds": round(statistics.median(r.seconds for r in measured), 3),
                "images_per_s": round(statistics.median(rates), 1),
                "images_per_s_range": [round(min(rates), 1), round(max(rates), 1)],
                "mb_per_s": round(statistics.median(r.nbytes / 1e6 / r.seconds for r in measured), 1),
                "over_dcmtk": round(statistics.median(ratios), 2) if ratios else None,
                "over_dcmtk_range": [round(min(ratios), 2), round(max(ratios), 2)] if ratios else None,
                "cpu_ms_per_instance": round(statistics.median(cpu), 2) if cpu else None,
                "command": row.command,
                "notes": list(dict.fromkeys(r.note for r in measured if r.note)),
            }
        )
    return summaries


def markdown_table(runs: Sequence[Sequence[Row]]) -> str:
    """One line per row of the first round: the median over rounds, and the images/s range."""
    lines = [
        "| method | associations | instances | MB | seconds (median) | images/s (median) | images/s range "
        "| MB/s (median) | ÷ dcmtk (median, range) | our CPU ms/instance (median) | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for s in row_summaries(runs):
        count = f"{s['instances']}" if s["complete"] else f"{s['instances']}/{s['expected']} INCOMPLETE"
        low, high = s["images_per_s_range"]
        spread = f"{low:.1f}–{high:.1f}" if len(runs) > 1 else "–"
        ratio_text = "–"
        if s["over_dcmtk"] is not None:
            low_ratio, high_ratio = s["over_dcmtk_range"]
            ratio_text = f"{s['over_dcmtk']:.2f} ({low_ratio:.2f}–{high_ratio:.2f})"
        cpu_text = "–" if s["cpu_ms_per_instance"] is None else f"{s['cpu_ms_per_instance']:.1f}"
        lines.append(
            f"| {s['method']} | {s['associations']} | {count} | {s['mb']:.1f} | {s['seconds']:.2f} | "
            f"{s['images_per_s']:.1f} | {spread} | {s['mb_per_s']:.1f} | {ratio_text} | {cpu_text} | "
            f"`{s['command']}` |"
        )
        notes += [f"- {s['method']} ({s['associations']}): {note}" for note in s["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def measure_all(
    args: argparse.Namespace,
    work: Path,
    round_number: int,
    orthanc: OrthancServer,
    cfg: PacsConfig,
    items: list[RetrieveItem],
    series_items: list[RetrieveItem],
    study_uids: list[str],
    instances: list[tuple[str, bytes]],
    expected: int,
    ingest_port: int,
    dcmtk_port: int,
    web_cfg: dicomweb.DicomwebConfig | None = None,
    web_items: list[RetrieveItem] | None = None,
) -> list[Row]:
    """Every row once, each into a fresh directory under ``work/round-<n>``."""
    work = work / f"round-{round_number}"
    work.mkdir()
    rows: list[Row] = []
    runs = [("move", workers, 1, True, "fast") for workers in args.move_workers]
    runs += [("get", workers, 1, True, "fast") for workers in args.get_workers]
    # What the fallback costs: the same pulls on pynetdicom's associations.
    runs += [(method, 4, 1, True, "pynetdicom") for method in ("get", "move")]
    for method in ("get", "move"):
        runs += [(method, workers, processes, True, "fast") for processes, workers in args.multi_process]
    # What the two fsyncs per instance cost: the same pulls answering before the data is on disk
    # (one association too, like for like with storescp on movescu's one association).
    no_fsync = [("get", 1, 1, False), ("get", max(args.get_workers), 1, False), ("move", 2, 1, False)]
    runs += dict.fromkeys(run + ("fast",) for run in no_fsync)  # once each, also where --get-workers is 1
    for method, workers, processes, fsync, transport in runs:
        spool = work / f"ingest-{method}-{processes}x{workers}-{'fsync' if fsync else 'nofsync'}-{transport}"
        label = f"ingest C-{method.upper()}" + (f", {processes} processes" if processes > 1 else "")
        label += "" if fsync else ", --no-fsync"
        label += "" if transport == "fast" else f", --transport {transport}"
        row = measure_ingest(
            label,
            cfg,
            items,
            method,
            workers,
            spool,
            ingest_port,
            expected,
            args.timeout,
            processes=processes,
            fsync=fsync,
            transport=transport,
        )
        finish_row(rows, row, spool, args.keep)
    # What UID lists save: one C-MOVE per study, and one per series (the plan before them).
    baselines = [
        ("one study per request", items, 1, ""),
        ("one request per series", series_items, 50, "plan_retrieval(..., whole_studies=False)"),
    ]
    for name, baseline_items, per_request, plan in baselines:
        for workers in args.baseline_workers:
            spool = work / f"ingest-move-{per_request}-{len(baseline_items)}-{workers}"
            row = measure_ingest(
                f"ingest C-MOVE, {name}",
                cfg,
                baseline_items,
                "move",
                workers,
                spool,
                ingest_port,
                expected,
                args.timeout,
                per_request,
                plan=plan,
            )
            finish_row(rows, row, spool, args.keep)

    dcmtk_runs = [
        ("dcmtk movescu+storescp", "1", [movescu_command(orthanc.dicom_port, study_uids)]),
        (
            "dcmtk movescu+storescp",
            f"{len(study_uids)} sequential",
            [movescu_command(orthanc.dicom_port, [uid]) for uid in study_uids],
        ),
    ]
    for index, (method, associations, commands) in enumerate(dcmtk_runs):
        out_dir = work / f"dcmtk-move-{index}"
        out_dir.mkdir()
        # A fresh storescp per run so each writes into its own empty directory.
        with Storescp(dcmtk_port, out_dir, work / "storescp.log") as storescp:
            row = measure_command(
                method, associations, commands, out_dir, expected, args.timeout, receiver_lags=True
            )
        row = Row(**{**row.__dict__, "command": f"{shell_command(storescp.command)} & {row.command}"})
        finish_row(rows, row, out_dir, args.keep)

    # The same single movescu, received by ingest's StorageSCP instead of storescp: the receiver's share.
    for fsync in (True, False):
        out_dir = work / f"dcmtk-move-ingest-scp-{'fsync' if fsync else 'nofsync'}"
        with StorageSCP(out_dir, DCMTK_AET, dcmtk_port, [PACS_AET], fsync=fsync):
            row = measure_command(
                "dcmtk movescu+ingest StorageSCP" + ("" if fsync else ", --no-fsync"),
                "1",
                [movescu_command(orthanc.dicom_port, study_uids)],
                out_dir,
                expected,
                args.timeout,
                receiver_lags=False,  # it answers each C-STORE once the file is in place
            )
        scp_command = (
            f"python -m ingest scp --spool {out_dir} --aet {DCMTK_AET} --port {dcmtk_port} --allow {PACS_AET}"
            if fsync  # the SCP's CLI always fsyncs: a standalone receiver's senders may keep no copy
            else f"StorageSCP({out_dir}, {DCMTK_AET!r}, {dcmtk_port}, [{PACS_AET!r}], fsync=False)"
        )
        row = Row(**{**row.__dict__, "command": f"{scp_command} & {row.command}"})
        finish_row(rows, row, out_dir, args.keep)

    get_dir = work / "dcmtk-get"
    get_dir.mkdir()
    row = measure_command(
        "dcmtk getscu",
        f"{len(study_uids)} sequential",
        [getscu_command(orthanc.dicom_port, uid, get_dir) for uid in study_uids],
        get_dir,
        expected,
        args.timeout,
        receiver_lags=False,
    )
    finish_row(rows, row, get_dir, args.keep)

    if web_cfg is not None:
        for workers, fsync in [*((w, True) for w in args.web_workers), (max(args.web_workers), False)]:
            spool = work / f"dicomweb-{workers}-{'fsync' if fsync else 'nofsync'}" / "spool"
            row = measure_dicomweb(web_cfg, web_items, workers, spool, expected, args.timeout, fsync)
            finish_row(rows, row, spool.parent, args.keep)

    for fsync in (True, False):
        out_dir = work / f"spool-write-{'fsync' if fsync else 'nofsync'}"
        finish_row(rows, measure_spool_write(instances, out_dir, fsync), out_dir, args.keep)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def measure_planning(
    cfg: PacsConfig,
    web_cfg: dicomweb.DicomwebConfig | None,
    empty_spool: Path,
    study_uids: Sequence[str],
    args: argparse.Namespace,
) -> list[dict]:
    """Studies/s of a first pull's plan (nothing spooled yet): median and range over --repeat runs."""
    planners: list[tuple[str, Callable[[], list]]] = [
        (
            f"C-FIND, {workers} association(s)",
            lambda workers=workers: plan_retrieval(cfg, empty_spool, study_uids, workers=workers),
        )
        for workers in args.plan_workers
    ]
    counts = {
        s["StudyInstanceUID"]: s["NumberOfStudyRelatedInstances"] for s in find_studies(cfg, modalities=())
    }
    planners += [
        (
            f"C-FIND relational, 50 studies per query, {workers} association(s)",
            lambda workers=workers: plan_retrieval(
                cfg, empty_spool, study_uids, workers=workers, relational=True, expected_instances=counts
            ),
        )
        for workers in (1, 4)
    ]
    if web_cfg is not None:
        planners.append(
            (
                "QIDO-RS, 4 connection(s)",
                lambda: dicomweb.plan_retrieval(web_cfg, empty_spool, study_uids, workers=4),
            )
        )
    seconds: dict[str, list[float]] = {name: [] for name, _ in planners}
    for _ in range(args.repeat):
        for name, plan in planners:  # alternated, so a burst of load elsewhere hits every row alike
            started = time.monotonic()
            plan()
            seconds[name].append(time.monotonic() - started)
    rows = []
    for name, times in seconds.items():
        rates = [len(study_uids) / t for t in times]
        rows.append(
            {
                "planner": name,
                "studies_per_s": round(statistics.median(rates), 1),
                "range": [round(min(rates), 1), round(max(rates), 1)],
                "seconds": round(statistics.median(times), 3),
            }
        )
    return rows


def markdown_planning_table(rows: list[dict], studies: int) -> str:
    lines = [
        f"Planning {studies} studies:",
        "",
        "| planner | studies/s (median) | range | seconds |",
        "|---|---:|---|---:|",
    ]
    for row in rows:
        low, high = row["range"]
        lines.append(
            f"| {row['planner']} | {row['studies_per_s']:.0f} | {low:.0f}–{high:.0f} | {row['seconds']:.2f} |"
        )
    return "\n".join(lines)


def process_layout(text: str) -> tuple[int, int]:
    """``PxW`` -> (processes, associations per process)."""
    try:
        processes, workers = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write PROCESSESxASSOCIATIONS, e.g. 2x2") from None
    if processes < 2 or workers < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use 2 or more processes and 1 or more associations")
    return processes, workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="phantoms", help="phantoms (default), synthetic, or a directory")
    parser.add_argument("--studies", type=int, default=110, help="studies to generate (~1.8 instances each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pedx-bench-data",
        help="where generated sets are kept between runs",
    )
    parser.add_argument("--move-workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--get-workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--baseline-workers",
        type=int,
        nargs="+",
        default=[4],
        help="associations for the one-study-per-request and per-series C-MOVE rows",
    )
    parser.add_argument(
        "--multi-process",
        type=process_layout,
        nargs="*",
        default=[(2, 1), (2, 2)],
        metavar="PxW",
        help="C-GET and C-MOVE rows with P processes of W associations each (default 2x1 2x2)",
    )
    parser.add_argument(
        "--web-workers", type=int, nargs="+", default=[1, 4], help="HTTP connections for the DICOMweb rows"
    )
    parser.add_argument(
        "--plan-workers", type=int, nargs="+", default=[1, 4, 8], help="associations for the planning rows"
    )
    parser.add_argument("--plan-only", action="store_true", help="measure the planning rows only")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every row (median and range)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds allowed per measurement")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (Orthanc, outputs)")
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/results.py's format)")
    args = parser.parse_args(argv)
    if args.studies < 1 or args.timeout <= 0 or args.repeat < 1:
        parser.error("--studies and --repeat must be >= 1 and --timeout > 0")
    for tool in ("movescu", "getscu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: install dcmtk (apt-get install -y dcmtk or scripts/setup.sh)")

    load_before = f"{os.getloadavg()[0]:.1f}"
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    data_name, files = load_data(args.data, args.cache_dir, args.studies, args.seed)
    work = Path(tempfile.mkdtemp(prefix="retrieval-bench-"))
    ingest_port, dcmtk_port = free_port(), free_port()
    while dcmtk_port == ingest_port:
        dcmtk_port = free_port()
    # Orthanc serves at most DicomThreadsCount associations at once (4 by default): allow the widest run.
    widest_multi = [processes * workers for processes, workers in args.multi_process]
    threads = max(
        [*args.move_workers, *args.get_workers, *args.baseline_workers, *widest_multi, *args.plan_workers, 4]
    )
    runs: list[list[Row]] = []
    try:
        with OrthancServer(
            work / "orthanc",
            aet=PACS_AET,
            modalities={
                "pedxray": (INGEST_AET, LOOPBACK, ingest_port),
                "dcmtk": (DCMTK_AET, LOOPBACK, dcmtk_port),
            },
            extra_options={"DicomThreadsCount": threads},
            dicomweb_plugin=DICOMWEB_PLUGIN if DICOMWEB_PLUGIN.is_file() else None,
        ) as orthanc:
            orthanc.upload(files, progress=False)
            expected = orthanc.instance_count()
            study_uids = orthanc.study_uids()
            source_mb = sum(f.stat().st_size for f in files) / 1e6
            instances = read_instances(files)
            print(
                f"data: {data_name}, {len(files)} files, {expected} instances in {len(study_uids)} studies, "
                f"{source_mb:.1f} MB; Orthanc {PACS_AET} on {LOOPBACK}:{orthanc.dicom_port}",
                flush=True,
            )
            cfg = PacsConfig(LOOPBACK, orthanc.dicom_port, PACS_AET, calling_aet=INGEST_AET, retries=0)
            web_cfg = None
            if orthanc.config.dicomweb_plugin is None:
                print(f"no DICOMweb rows: {DICOMWEB_PLUGIN} missing (apt-get install -y orthanc-dicomweb)")
            else:
                web_cfg = dicomweb.DicomwebConfig(orthanc.dicomweb_url, retries=0)
            planning = measure_planning(cfg, web_cfg, work / "empty-spool", study_uids, args)
            print(markdown_planning_table(planning, len(study_uids)), flush=True)
            items = plan_retrieval(cfg, work / "empty-spool", study_uids, workers=4)
            series_items = plan_retrieval(
                cfg, work / "empty-spool", study_uids, whole_studies=False, workers=4
            )
            web_items = None
            if web_cfg is not None:
                web_items = dicomweb.plan_retrieval(web_cfg, work / "empty-spool", study_uids, workers=4)
            rounds = 0 if args.plan_only else args.repeat
            for round_number in range(rounds):
                print(f"round {round_number + 1} of {rounds}", flush=True)
                runs.append(
                    measure_all(
                        args,
                        work,
                        round_number,
                        orthanc,
                        cfg,
                        items,
                        series_items,
                        study_uids,
                        instances,
                        expected,
                        ingest_port,
                        dcmtk_port,
                        web_cfg,
                        web_items,
                    )
                )
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"Retrieval from Orthanc 1.10 on loopback, {expected} instances / {len(study_uids)} studies "
        f"({data_name}, {source_mb:.1f} MB), {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
        f"{len(runs)} round(s), load average before/after {load_before} / {os.getloadavg()[0]:.1f}"
    )
    if runs:
        print()
        print(markdown_table(runs))
    if args.json:
        results = {
            "data": data_name,
            "instances": expected,
            "studies": len(study_uids),
            "source_mb": round(source_mb, 1),
            "rounds": len(runs),
            "planning_runs": args.repeat,
            "planning": planning,
            "load_average_before_after": [float(load_before), round(os.getloadavg()[0], 2)],
            "rows": row_summaries(runs),
        }
        write_results(args.json, "retrieval_throughput", argv, results)
    rows = [row for rows in runs for row in rows]
    return 0 if all(row.complete for row in rows if row.method.startswith("ingest")) else 1


if __name__ == "__main__":
    raise SystemExit(main())

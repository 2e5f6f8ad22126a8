"""A demo PACS: synthetic pediatric radiographs served by Orthanc on 127.0.0.1.

``python -m ingest demo-pacs --studies 20`` generates phantom studies (or loads the DICOM files
already under ``--data DIR``), starts Orthanc, uploads them, prints how to reach it over DICOM
and HTTP, and runs until Ctrl-C (SIGINT) or SIGTERM, which stop Orthanc cleanly (exit code 0).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from ingest.demo.orthanc import (
    DEFAULT_AET,
    LOOPBACK,
    OrthancConfig,
    OrthancError,
    OrthancServer,
    find_dicom_files,
)

_POLL_SECONDS = 0.5
# SIGTERM ends the demo the same way as Ctrl-C: unwinding stops Orthanc and removes scratch files.
# SIGINT is handled explicitly because a shell without job control starts background jobs ignoring it.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DemoDataError(ValueError):
    """--data cannot be served."""


def findscu_example(aet: str, host: str, port: int) -> str:
    """A dcmtk command line listing the studies of the PACS."""
    return (
        f"findscu -v -S -aet PEDXRAY -aec {aet} -k QueryRetrieveLevel=STUDY -k StudyInstanceUID "
        f"-k StudyDate -k StudyDescription {host} {port}"
    )


def banner(server: OrthancServer, instances: int, studies: int) -> str:
    return "\n".join(
        [
            f"Demo PACS running: {instances} instances in {studies} studies",
            f"  DICOM AE title : {server.aet}",
            f"  DICOM host     : {server.host}",
            f"  DICOM port     : {server.dicom_port}",
            f"  HTTP (REST/UI) : {server.url}/",
            "Query it with:",
            f"  {findscu_example(server.aet, server.host, server.dicom_port)}",
            "Press Ctrl-C to stop.",
        ]
    )


def prepare_data(data_dir: Path, studies: int, seed: int) -> list[Path]:
    """The DICOM files under data_dir, generating phantom studies there when it has none."""
    files = find_dicom_files(data_dir) if data_dir.exists() else []
    if files:
        print(f"Using {len(files)} DICOM files already under {data_dir}", flush=True)
        return files
    if data_dir.exists() and any(data_dir.iterdir()):
        raise DemoDataError(
            f"{data_dir} holds files but none is DICOM Part 10: point --data at DICOM files, "
            "or at an empty or new directory to generate phantoms there"
        )
    from ingest import phantoms  # only needed when generating; keeps --data usable on its own

    print(f"Generating {studies} phantom studies (seed {seed}) under {data_dir}", flush=True)
    phantoms.generate(data_dir, studies=studies, seed=seed, progress=True)
    files = find_dicom_files(data_dir)
    if not files:
        raise DemoDataError(f"phantom generation wrote no DICOM files under {data_dir}")
    return files


def serve(args: argparse.Namespace, config: OrthancConfig, scratch: Path) -> int:
    files = prepare_data(args.data or scratch / "phantoms", args.studies, args.seed)
    with OrthancServer(scratch / "orthanc", config) as server:
        instances = server.upload(files)
        print(banner(server, instances, len(server.study_uids())), flush=True)
        while server.is_running():
            time.sleep(_POLL_SECONDS)
        print(f"Orthanc stopped unexpectedly; last lines of its log:\n{server.log_tail()}", file=sys.stderr)
        return 1


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1..65535)")
    return port


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest demo-pacs",
        description="Serve synthetic radiographs from Orthanc on 127.0.0.1 until Ctrl-C.",
    )
    parser.add_argument("--studies", type=_positive, default=20, help="phantom studies to generate")
    parser.add_argument("--seed", type=int, default=0, help="phantom generator seed")
    parser.add_argument(
        "--data",
        type=Path,
        help="directory of DICOM files to serve; if it is new or empty, phantoms are generated there "
        "(default: a temporary directory removed on exit)",
    )
    parser.add_argument("--aet", default=DEFAULT_AET, help="AE title of the PACS")
    parser.add_argument("--dicom-port", type=_port, help=f"DICOM port on {LOOPBACK} (default: a free one)")
    parser.add_argument("--http-port", type=_port, help=f"HTTP port on {LOOPBACK} (default: a free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = OrthancConfig(aet=args.aet, dicom_port=args.dicom_port, http_port=args.http_port)
    except ValueError as error:
        parser.error(str(error))
    previous = {signum: signal.signal(signum, _raise_keyboard_interrupt) for signum in _STOP_SIGNALS}
    try:
        with tempfile.TemporaryDirectory(prefix="pedx-demo-pacs-") as scratch:
            return serve(args, config, Path(scratch))
    except KeyboardInterrupt:
        print("Demo PACS stopped.", flush=True)
        return 0
    except (OrthancError, DemoDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m ingest COMMAND ...``: the ingest stage's commands, each a module with its own main()."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pull": ("ingest.pull", "PACS → spool → catalog → shards in one run, with Prometheus metrics"),
    "scu": ("ingest.dicom.scu", "C-ECHO / C-FIND / C-MOVE / C-GET against a PACS, one operation at a time"),
    "scp": ("ingest.dicom.scp", "run the Storage SCP that receives studies into the spool"),
    "scan": ("ingest.dataset.catalog", "read every DICOM header under a directory into the Parquet catalog"),
    "labels": (
        "ingest.dataset.labels",
        "per-class counts and the top unmapped descriptions; relabel with a code table",
    ),
    "preview": ("ingest.imaging.preprocess", "write the preprocessed PNG of one DICOM file"),
    "shards": ("ingest.dataset.shards", "balance, split and write WebDataset shards + manifest.json"),
    "export": ("ingest.export", "de-identified DICOM and catalog for sharing (PS3.15 Basic Profile)"),
    "demo-pacs": ("ingest.demo.pacs", "serve phantom studies from a local Orthanc (the demo PACS)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m ingest COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "python -m ingest COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, *rest = argv
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())

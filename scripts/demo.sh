#!/usr/bin/env bash
# Set up (idempotent) and run the embedded demo on this machine: phantom PACS (Orthanc on 127.0.0.1)
# → ingest pull (C-MOVE, catalog, balanced 7-class shards). Results go to ./demo (re-runs resume).
# Extra arguments go to `python -m ingest.demo`, e.g. --studies 100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ingest.demo --work demo "$@"

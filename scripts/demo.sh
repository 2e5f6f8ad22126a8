#!/usr/bin/env bash
# Set up (idempotent) and run the embedded demo on this machine, on the CPU:
#   1. phantom PACS (Orthanc on 127.0.0.1) → ingest pull (C-MOVE, catalog, balanced 7-class shards)
#   2. a short 7-class PedXnet pretraining on Ray Train (configs/pretrain_smoke.yaml)
# Everything goes to ./demo; re-running resumes the ingest and starts a new training run.
# Extra arguments go to `python -m ingest.demo`, e.g. --studies 100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ingest.demo --work demo "$@"
run="smoke-7c-$(date +%Y%m%d-%H%M%S)"
.venv/bin/python -m pedx_ray.pretrain --config configs/pretrain_smoke.yaml --shards demo/ingest/shards-7 \
    --num-workers 1 --cpus-per-worker 1 --storage demo/runs --name "$run"
echo "TensorBoard: .venv/bin/tensorboard --logdir demo/runs/$run/tensorboard"

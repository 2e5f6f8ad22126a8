#!/usr/bin/env bash
# The pipeline on a multi-node cluster, all on this machine and through the cluster's front doors
# (docs/guide/cluster.md explains each step):
#   1. `python -m pedx_ray.cluster up`: a Ray head + 2 worker nodes (token auth on) and a Dask scheduler
#      + 2 workers, each a process of its own
#   2. the demo PACS (Orthanc with phantoms) → `python -m ingest pull --scheduler tcp://...` on Dask
#   3. `ray job submit`: 2-worker pretraining, the workers on two nodes (the run's workers/ record)
#   4. `ray job submit`: a 2-trial Ray Tune sweep, the trials on different nodes
#   5. `serve deploy deploy/config.yaml` on the cluster, then the HTTP endpoints
# then stops everything it started, by pid. Tiny images and epochs: a few minutes on a laptop's CPU.
# Everything goes to ./demo/cluster (runs to ./demo/runs, where deploy/config.yaml looks for them).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$root/demo/cluster
export PATH="$root/.venv/bin:$PATH" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# Poll FILE for PATTERN until DEADLINE seconds pass; fail with the file's end if process PID dies.
wait_for() {
    local file=$1 pattern=$2 pid=$3 deadline=$((SECONDS + $4))
    until grep -q "$pattern" "$file" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
            echo "error: '$pattern' never appeared in $file; it ends:" >&2
            tail -20 "$file" >&2
            exit 1
        fi
        sleep 1
    done
}

step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }

step "1. Ray head + 2 worker nodes, Dask scheduler + 2 workers"
python -m pedx_ray.cluster up --ray-workers 2 --dask-workers 2 --env-file "$work/env.sh" >"$work/cluster.log" 2>&1 &
pids+=($!)
wait_for "$work/cluster.log" "Ctrl-C" "${pids[-1]}" 240
cat "$work/cluster.log"
# shellcheck source=/dev/null
source "$work/env.sh"
ray status --address "$RAY_GCS_ADDRESS" | sed -n '/Active:/,/Pending:/p'

step "2. demo PACS + ingest pull on the Dask cluster"
python -m ingest demo-pacs --studies 60 --data "$work/phantoms" >"$work/pacs.log" 2>&1 &
pids+=($!)
wait_for "$work/pacs.log" "Press Ctrl-C" "${pids[-1]}" 300
dicom_port=$(sed -n 's/ *DICOM port *: //p' "$work/pacs.log")
python -m ingest pull --pacs "127.0.0.1:$dicom_port" --called-aet PEDXPACS --method get \
    --work "$work/ingest" --id-salt cluster-demo --per-class 12 --image-size 64 --shard-size 64 \
    --reference-date 2020-07-01 --scheduler "$DASK_SCHEDULER"
shards=$work/ingest/shards-7

step "3. pretraining job: 2 Ray Train workers"
run="smoke-7c-cluster-$(date +%Y%m%d-%H%M%S)"
ray job submit --runtime-env configs/runtime_env.yaml -- \
    python -m pedx_ray.pretrain --config configs/pretrain_smoke.yaml --shards "$shards" --arch tiny_cnn \
    --image-size 64 --epochs 2 --batch-size 16 --num-workers 2 --cpus-per-worker 1 \
    --storage "$root/demo/runs" --name "$run"
python - "$root/demo/runs/$run" <<'EOF'
import sys
from pedx_ray.cluster.placement import read_worker_starts

for rank, starts in read_worker_starts(sys.argv[1]).items():
    print(f"rank {rank} ran on node {starts[-1]['node_labels']['pedx-node']} ({starts[-1]['node_id'][:12]})")
EOF

# One trial at a time: two at once on 1-CPU nodes can split the free CPU between nodes (0.1 here,
# 0.9 there) so that no node has the whole CPU a Ray Data read task needs, and both trials wait.
step "4. Tune sweep job: 2 trials, one at a time"
ray job submit --runtime-env configs/runtime_env.yaml -- \
    python -m tune_spaces.run pretrain --space CLUSTER_SMOKE --shards "7=$shards" \
    --results "$work/tune" --name "sweep-$run" --max-concurrent 1 --trial-cpus 0.1 --cpus-per-worker 0.9 \
    --set epochs=1 --set warmup_epochs=0 --set arch=tiny_cnn --set image_size=64 --set batch_size=16 \
    --set num_workers=1
python - "$work/tune/sweep-$run" <<'EOF'
import sys
from pathlib import Path
from pedx_ray.cluster.placement import read_worker_starts

for run in sorted(Path(sys.argv[1]).glob("*/run")):
    start = read_worker_starts(run)[0][-1]
    print(f"trial {run.parent.name} trained on node {start['node_labels']['pedx-node']}")
EOF

step "5. serve deploy deploy/config.yaml on the cluster"
serve_port=$(python -c "from ingest.demo.orthanc import free_port; print(free_port())")
# The cluster's HTTP front door is set when Serve starts; the config's http_options are then ignored
# (Serve warns). HeadOnly: one proxy, as every node here shares 127.0.0.1.
serve start --address "$RAY_GCS_ADDRESS" --http-host 127.0.0.1 --http-port "$serve_port" --proxy-location HeadOnly
serve deploy deploy/config.yaml --address "$RAY_DASHBOARD_ADDRESS"
url=http://127.0.0.1:$serve_port
deadline=$((SECONDS + 300))
until [ "$(serve status --address "$RAY_DASHBOARD_ADDRESS" | grep -c 'status: RUNNING')" -ge 1 ] &&
    curl -sf "$url/healthz" >/dev/null; do
    ((SECONDS < deadline)) || { serve status --address "$RAY_DASHBOARD_ADDRESS"; exit 1; }
    sleep 2
done
dcm=$(find "$work/phantoms" -name '*.dcm' -print -quit)  # not | head: SIGPIPE under pipefail
echo "GET /healthz: $(curl -sf "$url/healthz")"
echo "GET /v1/models: $(curl -sf "$url/v1/models" | head -c 300)..."
echo "POST /v1/view: $(curl -sf -X POST "$url/v1/view?granularity=7&top_k=3" \
    -H 'Content-Type: application/dicom' --data-binary @"$dcm")"
serve shutdown --address "$RAY_DASHBOARD_ADDRESS" --yes

step "done; stopping the clusters and the PACS"

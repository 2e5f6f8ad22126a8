#!/usr/bin/env bash
# The PedXnet transfer experiment on phantoms, on the CPU:
#   1. a 7-class PedXnet (the demo's ingest + smoke pretraining), unless a checkpoint is given;
#   2. a phantom bone-age set (hand PA with known bone age);
#   3. bone-age fine-tuning on a small training subset, from scratch and from PedXnet-7C;
#   4. pedx_ray.evaluate on the test split: Table 3 with the paired t-test against scratch.
# Everything goes to ./demo; a re-run skips every finished step (delete demo/runs/<name> to redo one).
# Usage: bash scripts/transfer_demo.sh [PEDXNET_7C_CHECKPOINT_DIR]
# Knobs (environment): TRAIN_SIZE (default 120 training images), HANDS (phantom hand studies, 300),
# EPOCHS (fine-tuning epochs, 8).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
train_size=${TRAIN_SIZE:-120}
hands=${HANDS:-300}
epochs=${EPOCHS:-8}

pedxnet=${1:-demo/runs/transfer-7c/best}
if [ ! -f "$pedxnet/model.pt" ]; then
    if [ -n "${1:-}" ]; then
        echo "transfer_demo: $pedxnet has no model.pt; give a pretraining checkpoint directory" >&2
        exit 2
    fi
    "$py" -m ingest.demo --work demo
    resume=()
    [ -f demo/runs/transfer-7c/config.json ] && resume=(--resume)
    "$py" -m pedx_ray.pretrain --config configs/pretrain_smoke.yaml --shards demo/ingest/shards-7 \
        --num-workers 1 --cpus-per-worker 1 --storage demo/runs --name transfer-7c "${resume[@]}"
fi

"$py" -m ingest.phantoms --task bone_age --studies "$hands" --seed 1 --out demo/bone_age

for init in scratch "pedxnet:$pedxnet"; do
    name="bone-age-${init%%:*}-n$train_size"
    if [ -f "demo/runs/$name/predictions_test.csv" ]; then
        echo "transfer_demo: $name is finished; skipping"
        continue
    fi
    resume=()
    [ -f "demo/runs/$name/config.json" ] && resume=(--resume)
    "$py" -m pedx_ray.finetune --config configs/finetune_smoke.yaml --data phantom:demo/bone_age \
        --init "$init" --train-size "$train_size" --epochs "$epochs" --storage demo/runs --name "$name" \
        --num-workers 1 --cpus-per-worker 2 "${resume[@]}"
done

out=demo/eval-bone-age-n$train_size
"$py" -m pedx_ray.evaluate "demo/runs/bone-age-pedxnet-n$train_size/predictions_test.csv" \
    --compare "demo/runs/bone-age-scratch-n$train_size/predictions_test.csv" --split test --out "$out"
cat "$out/table.md"
echo "plots: $out/predicted_vs_true.png, $out/bland_altman_*.png"

#!/usr/bin/env bash
# XL training-step throughput on one GPU and under DeepSpeed with expert parallelism on all GPUs.
#   bash bench/ep_scaling.sh OUT_DIR "STAGES" [PRESET]
# Writes OUT_DIR/results.jsonl (one JSON line per measurement) and OUT_DIR/*.log.
set -uo pipefail
out=${1:?output dir}; stages=${2:-"1 2"}; preset=${3:-XL}
mkdir -p "$out"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
source "$(dirname "$0")/launcher.sh"
python3 bench/train_step.py --preset "$preset" --stages $stages --steps 12 --json "$out/results.jsonl" \
  2>&1 | tee "$out/single.log" | grep -E '^\{|^\||Error|error'
for s in $stages; do
  for ds in zero3 zero2_ep; do
    "${launcher[@]}" --num_gpus "$gpus" --master_port $((29500 + s)) bench/train_step.py --preset "$preset" \
      --stages "$s" --ds "ds_configs/$ds.json" --ep "$gpus" --steps 12 --json "$out/results.jsonl" \
      2>&1 | tee "$out/$ds-stage$s.log" | grep -E '^\{|^\||Error|error'
  done
done

#!/usr/bin/env bash
# Scaling of the training step over GPU counts at the recipe's global batch (gradient accumulation):
# plain PyTorch on one GPU, and `zero3.json` / `zero2_ep.json` with ep = min(8, GPUs) on every count,
# each with the step-time breakdown (compute / all-to-all / ZeRO collectives / idle) and expert load.
#   bash bench/scaling.sh OUT_DIR "GPU_COUNTS" "STAGES" [GLOBAL_BATCH] [PRESET]
# e.g. bash bench/scaling.sh out "1 2 4 8" "1 2" 2048
# Runs of k GPUs on a machine of G take GPU groups [0, k), [k, 2k), ...: up to G / k of them run side
# by side (each on its own GPUs and NVLink ports; SCALING_SIDE_BY_SIDE=0 runs them one at a time), and
# every count finishes before the next starts. SCALING_FIRST_GPU / SCALING_GPUS restrict the runs to
# the machine's GPUs FIRST .. FIRST+GPUS-1 (physical numbers: leave CUDA_VISIBLE_DEVICES unset).
# Writes OUT_DIR/results.jsonl (one JSON line per run and stage) and one log per run.
set -uo pipefail
out=${1:?output dir}; counts=${2:-"1 2 4 8"}; stages=${3:-"1 2"}; global=${4:-2048}; preset=${5:-XL}
configs=${SCALING_CONFIGS:-"ds_configs/zero3.json ds_configs/zero2_ep.json"}
mkdir -p "$out"
offset=${SCALING_FIRST_GPU:-0}
total=${SCALING_GPUS:-$(($(python3 -c 'import torch; print(torch.cuda.device_count())') - offset))}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
source "$(dirname "$0")/launcher.sh"
common=(--preset "$preset" --stages $stages --global-batch "$global" --warmup 1 --steps 3 --breakdown --moe-load)

run() {  # run NAME FIRST_GPU GPUS PORT [CONFIG]: one measurement on GPUs FIRST_GPU .. FIRST_GPU+GPUS-1
  local name=$1 first=$2 n=$3 port=$4 config=${5:-}
  local gpus; gpus=$(seq -s, "$first" $((first + n - 1)))
  rm -f "$out/$name.jsonl"  # train_step.py appends
  if [ -z "$config" ]; then
    CUDA_VISIBLE_DEVICES=$gpus python3 bench/train_step.py "${common[@]}" --json "$out/$name.jsonl" \
      >"$out/$name.log" 2>&1
  else
    "${launcher[@]}" --include "localhost:$gpus" --master_port "$port" bench/train_step.py \
      "${common[@]}" --ds "$config" --ep $((n < 8 ? n : 8)) --json "$out/$name.jsonl" >"$out/$name.log" 2>&1
  fi
  echo "$name: exit $? ($(date +%T))"
}

for n in $counts; do
  if [ "$n" -gt "$total" ]; then echo "skipping $n GPUs: this machine has $total"; continue; fi
  queue=()
  [ "$n" -eq 1 ] && queue+=("plain-1gpu:")
  for config in $configs; do queue+=("$(basename "$config" .json)-${n}gpu:$config"); done
  groups=$((total / n))
  [ "${SCALING_SIDE_BY_SIDE:-1}" = 0 ] && groups=1
  for ((g = 0; g < groups; g++)); do  # group g runs queue[g], queue[g + groups], ... one after another
    (
      for ((j = g; j < ${#queue[@]}; j += groups)); do
        run "${queue[j]%%:*}" $((offset + g * n)) "$n" $((29500 + 10 * (offset + g) + j)) "${queue[j]#*:}"
      done
    ) &
  done
  wait
done
cat "$out"/*gpu.jsonl >"$out/results.jsonl"
grep -h -E '^\|' "$out"/*gpu.log

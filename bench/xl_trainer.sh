#!/usr/bin/env bash
# The XL preset through the real trainer (launch/stage.py) on all GPUs of this machine, synthetic data,
# one stage's shapes: what the trainer adds to a bare step (metrics, EMA, MoE statistics, checkpoint).
#   [STAGE=N] [PER_GPU=IMAGES] bash bench/xl_trainer.sh OUT_DIR [DS_CONFIG] [STEPS] [--set stage.KEY=VALUE ...]
#   STAGE=2 PER_GPU=256 bash bench/xl_trainer.sh OUT ds_configs/flat_dp.json 40 --set stage.compile=true \
#     --set stage.compile_mode=reduce-overhead
# STAGE (1-4, default 1) picks configs/xl/stageN.yaml, from random weights. PER_GPU (default 128) is the
# images each GPU takes per optimizer step, in micro-batches of the stage's size: 256 is the recipe's
# 2048 on 8 GPUs (DESIGN.md §3), 2 micro-batches at stage 1, 4 at stage 2.
# Expert parallelism spans all GPUs, except with the flat engine (ep = 1).
# Writes OUT_DIR/trainer-<config>-s<STAGE>.log, the run's metrics.jsonl / summary.json beside it, and its
# per-GPU rate as a JSON line for bench/cost_projection.py (-rate.jsonl, by bench/trainer_rate.py).
set -uo pipefail
out=${1:?output dir}; ds=${2:-ds_configs/zero3.json}; steps=${3:-20}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
ep=$gpus
grep -q '"engine": *"flat"' "$ds" && ep=1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 WANDB_MODE=disabled
source "$(dirname "$0")/launcher.sh"
stage=${STAGE:-1}
name=$(basename "$ds" .json)-s$stage
run=/tmp/xl-trainer-$name
"${launcher[@]}" --num_gpus "$gpus" launch/stage.py --config "configs/xl/stage$stage.yaml" --ds "$ds" --ep "$ep" \
  --out "$run" --resume none --set stage.data=synthetic --set stage.global_batch=$((${PER_GPU:-128} * gpus)) \
  --set "stage.init_from=''" \
  --set stage.log_every=5 --set stage.warmup_steps=5 --set stage.steps="$steps" --set stage.sample_every=0 \
  --set stage.checkpoint_every=100000 --set stage.checkpoint_export=false --set stage.ema_decay=0.999 "$@" \
  2>&1 | grep -v -E 'it/s\]|s/it\]' | tee "$out/trainer-$name.log"
status=${PIPESTATUS[0]}
cp "$run/metrics.jsonl" "$out/trainer-$name-metrics.jsonl" 2>/dev/null
cp "$run/summary.json" "$out/trainer-$name-summary.json" 2>/dev/null
gpu_name=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')
python3 "$(dirname "$0")/trainer_rate.py" "$run/metrics.jsonl" --stage "$stage" --world-size "$gpus" \
  --gpu "$gpu_name" --setup "trainer $(basename "$ds"), ${PER_GPU:-128} images per GPU per step${*:+, $*}" \
  > "$out/trainer-$name-rate.jsonl"
exit "$status"

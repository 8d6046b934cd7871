#!/usr/bin/env bash
# The XL preset through the real trainer (launch/stage.py) on all GPUs of this machine, synthetic data,
# one stage's shapes: what the trainer adds to a bare step (metrics, EMA, MoE statistics, checkpoint).
#   [STAGE=N] [PER_GPU=IMAGES] [MB=IMAGES] [GPUS=LIST] bash bench/xl_trainer.sh OUT_DIR [DS_CONFIG] [STEPS] \
#     [--set stage.KEY=VALUE ...]
#   STAGE=2 PER_GPU=256 bash bench/xl_trainer.sh OUT ds_configs/flat_dp.json 40 --set stage.compile=true \
#     --set stage.compile_mode=reduce-overhead
# STAGE (1-4, default 1) picks configs/xl/stageN.yaml, from random weights. PER_GPU (default 128) is the
# images each GPU takes per optimizer step, in micro-batches of the stage's size: 256 is the recipe's
# 2048 on 8 GPUs (DESIGN.md §3), 2 micro-batches at stage 1, 4 at stage 2.
# MB overrides the stage's micro-batch. GPUS (e.g. 0 or 2,3) runs on those GPUs only, so that several
# runs can share a machine. Expert parallelism spans the run's GPUs, except with the flat engine (ep = 1).
# Writes OUT_DIR/trainer-<config>-s<STAGE>-b<PER_GPU>[-m<MB>].log, the run's metrics.jsonl / summary.json /
# config.yaml beside it and, for a run that finished, its per-GPU rate as a JSON line for
# bench/cost_projection.py (-rate.jsonl, by bench/trainer_rate.py).
set -uo pipefail
out=${1:?output dir}; ds=${2:-ds_configs/zero3.json}; steps=${3:-20}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
if [ -n "${GPUS:-}" ]; then
  gpus=$(tr ',' '\n' <<< "$GPUS" | wc -l)
  where=(--include "localhost:$GPUS" --master_port $((29500 + ${GPUS%%,*})))
else
  gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
  where=(--num_gpus "$gpus")
fi
ep=$gpus
grep -q '"engine": *"flat"' "$ds" && ep=1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 WANDB_MODE=disabled
source "$(dirname "$0")/launcher.sh"
stage=${STAGE:-1}; per_gpu=${PER_GPU:-128}
name=$(basename "$ds" .json)-s$stage-b$per_gpu${MB:+-m$MB}
run=/tmp/xl-trainer-$name
rm -rf "$run"  # a fresh run: nothing of an earlier one may be taken for this one's output
"${launcher[@]}" "${where[@]}" launch/stage.py --config "configs/xl/stage$stage.yaml" --ds "$ds" --ep "$ep" \
  --out "$run" --resume none --set stage.data=synthetic --set stage.global_batch=$((per_gpu * gpus)) \
  --set "stage.init_from=''" \
  --set stage.log_every=5 --set stage.warmup_steps=5 --set stage.steps="$steps" --set stage.sample_every=0 \
  --set stage.checkpoint_every=100000 --set stage.checkpoint_export=false --set stage.ema_decay=0.999 \
  ${MB:+--set stage.micro_batch=$MB} "$@" \
  2>&1 | grep --line-buffered -v -E 'it/s\]|s/it\]' | tee "$out/trainer-$name.log"
status=${PIPESTATUS[0]}
for file in metrics.jsonl summary.json config.yaml; do
  cp "$run/$file" "$out/trainer-$name-$file" 2>/dev/null
done
if [ "$status" -eq 0 ]; then  # a rate line only for a run that finished
  first_gpu=${GPUS:-0}
  gpu_name=$(python3 -c "import torch; print(torch.cuda.get_device_name(${first_gpu%%,*}))")
  python3 "$(dirname "$0")/trainer_rate.py" "$out/trainer-$name-metrics.jsonl" --stage "$stage" \
    --config "$out/trainer-$name-config.yaml" --world-size "$gpus" --gpu "$gpu_name" \
    --setup "trainer $(basename "$ds"), $per_gpu images per GPU per step${MB:+, micro-batch $MB}${*:+, $*}" > "$out/trainer-$name-rate.tmp" \
    && mv "$out/trainer-$name-rate.tmp" "$out/trainer-$name-rate.jsonl" || { rm -f "$out/trainer-$name-rate.tmp"; status=1; }
fi
exit "$status"

#!/usr/bin/env bash
# Eager and compiled single-GPU training steps for several stages at once, one stage per GPU:
#   bash bench/compiled_stages.sh OUT_DIR "STAGES" [COMPILE_MODE] [PRESET]
# e.g. bash bench/compiled_stages.sh out "1 2 3 4" reduce-overhead     (a 4-GPU host: all stages in one go)
# Stage k of the list runs on the k-th visible GPU (of CUDA_VISIBLE_DEVICES if set): first all eager runs
# side by side (short and host-sensitive: none shares the host with a compile), then all compiled runs side by side
# (compiling is CPU-bound: each gets an equal share of the cores). Each run has the --breakdown split.
# Writes OUT_DIR/eager-s<k>.jsonl, OUT_DIR/compiled-s<k>.jsonl and a log per run.
set -uo pipefail
out=${1:?output dir}; stages=${2:-"1 2 3 4"}; mode=${3:-reduce-overhead}; preset=${4:-XL}
mkdir -p "$out"
read -ra list <<<"$stages"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())') || {
  echo "compiled_stages.sh: python3 cannot import torch (activate the environment that has it)" >&2
  exit 2
}
if [ "${#list[@]}" -gt "$gpus" ]; then
  echo "compiled_stages.sh: ${#list[@]} stages but $gpus GPUs; run fewer stages at a time" >&2
  exit 2
fi
threads=$(($(nproc) / ${#list[@]})); [ "$threads" -ge 1 ] || threads=1
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$threads}
# the i-th stage takes the i-th visible GPU: of the caller's CUDA_VISIBLE_DEVICES if set, else of all
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
else read -ra devices <<<"$(seq -s ' ' 0 $((gpus - 1)))"; fi

side_by_side() {  # side_by_side KIND [train_step.py arguments]: one run per stage, each on its own GPU
  local kind=$1; shift
  local pids=()
  for i in "${!list[@]}"; do
    local s=${list[$i]}
    rm -f "$out/$kind-s$s.jsonl"
    CUDA_VISIBLE_DEVICES=${devices[$i]} python3 bench/train_step.py --preset "$preset" --stages "$s" --breakdown "$@" \
      --json "$out/$kind-s$s.jsonl" >"$out/$kind-s$s.log" 2>&1 &
    pids+=($!)
  done
  local failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return $failed
}

side_by_side eager || echo "an eager run failed: see $out/eager-s*.log" >&2
side_by_side compiled --compile "$mode" || echo "a compiled run failed: see $out/compiled-s*.log" >&2
python3 - "$out" <<'PY'
import json, pathlib, sys

print("| stage | setup | step ms | img/s | MFU | peak GiB | compile + warm-up s |")
print("|---|---|---|---|---|---|---|")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*-s*.jsonl")):
    for line in path.read_text().splitlines():
        r = json.loads(line)
        print(f"| {r['stage']} | {r['setup']} | {1e3 * r['step_s_median']:.1f} | {r['images_per_s_per_gpu']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {r['peak_memory_gib']:.1f} | {r['warmup_and_compile_s']:.0f} |")
PY

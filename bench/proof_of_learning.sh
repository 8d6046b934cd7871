#!/usr/bin/env bash
# The runs of docs/results.md: the S preset through the four stages (configs/s-64px) on one of the
# built-in datasets, on whatever this machine has (one GPU in docs/results.md). For Fashion-MNIST it
# then samples the prompt-following settings (sedit.eval.prompt_following generate); scoring them
# (classifier, Inception) is a separate CPU step, see docs/results.md.
#   bash bench/proof_of_learning.sh emoji|iconify|fmnist OUT_DIR [pipeline arguments, e.g. --set stage.steps=2]
# Environment:
#   FMNIST_ROOT      folder of the four Fashion-MNIST .gz files (default: Debian's)
#   FMNIST_LIMIT     training images to prepare (default 30000 of 60000: the build's time on the GPU machine)
#   TIME_LIMIT       seconds after which the pipeline is sent SIGTERM: the running stage checkpoints and
#                    stops, and running the script again resumes it (default: none)
#   GENERATE_ARGS    extra arguments of the generate step
# Writes OUT_DIR/{build,pipeline,generate}.log and OUT_DIR/run.tgz (report, grids, metrics, summaries,
# resolved configs, and for fmnist the generated .npz with its grids); the weights stay in runs/.
# Exit status: the pipeline's (75 = stopped at a checkpoint, run again).
set -uo pipefail
dataset=${1:?emoji, iconify or fmnist}
out=${2:?output dir}
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
device=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
root_arg=()
[ -n "${FMNIST_ROOT:-}" ] && root_arg=(--root "$FMNIST_ROOT")
limit=()
[ -n "${TIME_LIMIT:-}" ] && limit=(timeout --preserve-status --signal=TERM "$TIME_LIMIT")

# Build a dataset's shards once, encoders on this machine's device, timed into build.log.
build_once() {  # MODULE [builder arguments]
  [ -f $data/shards/manifest.json ] && return 0
  local start
  start=$(date +%s)
  python3 -m "$1" --out $data --workers 8 --device "$device" --no-progress "${@:2}" 2>&1 \
    | tee "$out/build.log" || exit 1
  echo "build_seconds $(($(date +%s) - start))" | tee -a "$out/build.log"
}

prompts=()
case $dataset in
  emoji) data=data/emoji ;;  # the pipeline builds it when missing
  iconify)  # three styles of each concept; images and encoders may come prepared (npm is not needed then)
    data=data/iconify
    # grid rows: the three styles, columns: eight concepts
    prompts=(--set stage.sample_prompts=configs/s-64px/iconify-prompts.txt --set stage.sample_count=24)
    build_once sedit.data.iconify_emoji ;;
  fmnist)
    data=data/fmnist
    prompts=(--set stage.sample_prompts=configs/s-64px/fmnist-prompts.txt)  # one grid row per class
    build_once sedit.data.fashion_mnist "${root_arg[@]}" --limit "${FMNIST_LIMIT:-30000}" ;;
  *) echo "unknown dataset $dataset (emoji, iconify or fmnist)" >&2; exit 2 ;;
esac

run=runs/$dataset-s
start=$(date +%s)
"${limit[@]}" python3 launch/pipeline.py --configs configs/s-64px/stage{1,2,3,4}.yaml --data $data/shards \
  --out $run "${prompts[@]}" "$@" 2>&1 | tee -a "$out/pipeline.log"
status=${PIPESTATUS[0]}
echo "pipeline_seconds $(($(date +%s) - start)) exit_status $status" | tee -a "$out/pipeline.log"

extra=()
if [ "$dataset" = fmnist ] && [ "$status" = 0 ]; then
  start=$(date +%s)
  # shellcheck disable=SC2086  # GENERATE_ARGS is a list of arguments
  python3 -m sedit.eval.prompt_following generate --ckpt $run/s64-stage4 --out $run/prompt-following/generated.npz \
    "${root_arg[@]}" ${GENERATE_ARGS:-} 2>&1 | tee "$out/generate.log"
  echo "generate_seconds $(($(date +%s) - start))" | tee -a "$out/generate.log"
  extra=(prompt-following)
fi
# Whatever exists so far (a stopped run has metrics and summaries of its finished stages).
(cd $run && tar czf - --ignore-failed-read report.md report.json report ./*/metrics.jsonl ./*/summary.json \
  ./*/config.yaml ./*/samples "${extra[@]}" 2>/dev/null) > "$out/run.tgz"
ls -l "$out"
exit "$status"

#!/usr/bin/env bash
# The whole pipeline of the LatentLens paper: steps 1-6, each skipping work already done.
# Run `reproduce/run_all.sh --help` for the flags; `--tiny` runs everything offline on tiny
# random models in a few minutes on CPU.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'EOF'
Usage: reproduce/run_all.sh [--tiny] [--out DIR] [--steps 1-6] [flags...]

Chains step1_download.sh .. step6_explore.sh; every step skips work already done, so an
interrupted run continues where it stopped when run again with the same flags.

  --tiny                 offline, tiny random models (olmo-vit, qwen-siglip, qwen2vl), a
                         generated corpus and images, the built-in fake judge (default out/tiny)
  --out DIR              run folder (default out/paper, or out/tiny with --tiny)
  --models LIST          comma-separated models (default: the nine connector VLMs and qwen2vl)
  --steps LIST           steps to run, e.g. 3-5 or 1,2 (default 1-6)
  --force                redo the chosen steps even where they are done

Flags passed to the steps that take them (see reproduce/stepN_*.sh --help):
  step 1   --base --no-public-bank --cache-dir DIR --bank-layers LIST
  step 2   --corpus FILE --banks LIST --qwen2vl-bank public|build --bank-layers LIST --cap N
           --bank-batch-size N --device DEV --model-dtype DT
  step 3   --images SRC --num-images N --molmo-split --available FILE --match-captions DIR
           --pixmo-revision REV --image-cache DIR --retry-failed
           --layers LIST --lenses LIST --top-k K --batch-size N --device DEV --model-dtype DT
  step 4   --base-url URL --api chat|responses --judge-model M --api-key-env VAR --fake-judge
           --lenses LIST --patches-per-layer N --seed S --seeding per-layer|once
           --concurrency N --max-retries N --timeout S --backoff S --reasoning-effort E
           --verbosity V --temperature T --max-completion-tokens N --image-detail D
           --price IN,OUT --strict --dry-run
  step 5   --dpi N
  step 6   --max-images N

Examples:
  reproduce/run_all.sh --tiny
  reproduce/run_all.sh --corpus vg_phrases.txt --num-images 100 --judge-model gpt-5
EOF
}

COMMON=() S1=() S2=() S3=() S4=() S5=() S6=()
STEPS="1-6"
TINY=0
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tiny) TINY=1; COMMON+=("$1"); shift; continue ;;
    --force) COMMON+=("$1"); shift; continue ;;
    --base|--no-public-bank) S1+=("$1"); shift; continue ;;
    --molmo-split|--retry-failed) S3+=("$1"); shift; continue ;;
    --fake-judge|--strict|--dry-run) S4+=("$1"); shift; continue ;;
  esac
  v=${2-}
  case "$1" in
    --steps) STEPS="$v" ;;
    --out|--models) COMMON+=("$1" "$v") ;;
    --cache-dir) S1+=("$1" "$v") ;;
    --bank-layers) S1+=("$1" "$v"); S2+=("$1" "$v") ;;
    --corpus|--banks|--qwen2vl-bank|--cap|--bank-batch-size) S2+=("$1" "$v") ;;
    --device|--model-dtype) S2+=("$1" "$v"); S3+=("$1" "$v") ;;
    --images|--num-images|--image-cache|--layers|--top-k|--batch-size|--available|\
    --match-captions|--pixmo-revision) S3+=("$1" "$v") ;;
    --lenses) S3+=("$1" "$v"); S4+=("$1" "$v") ;;
    --base-url|--api|--judge-model|--api-key-env|--patches-per-layer|--seed|--seeding|\
    --concurrency|--max-retries|--timeout|--backoff|--reasoning-effort|--verbosity|\
    --temperature|--max-completion-tokens|--image-detail|--price) S4+=("$1" "$v") ;;
    --dpi) S5+=("$1" "$v") ;;
    --max-images) S6+=("$1" "$v") ;;
    *) echo "run_all.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  if (($# < 2)); then echo "run_all.sh: $1 needs a value (see --help)" >&2; exit 2; fi
  shift 2
done

if ((TINY)); then
  # Nothing may come from the network in a tiny run.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
fi

wanted() {  # is step $1 in $STEPS (e.g. "1,3-5")?
  local part
  IFS=, read -ra parts <<< "$STEPS"
  for part in "${parts[@]}"; do
    if [[ $part == *-* ]]; then
      (($1 >= ${part%-*} && $1 <= ${part#*-})) && return 0
    elif [[ $part == "$1" ]]; then
      return 0
    fi
  done
  return 1
}

run_step() {  # run_step N script args...
  local n=$1 script=$2 start=$SECONDS
  shift 2
  wanted "$n" || return 0
  echo "=== step $n: $script ===" >&2
  bash "$HERE/$script" "$@"
  echo "=== step $n finished in $((SECONDS - start)) s ===" >&2
}

T0=$SECONDS
run_step 1 step1_download.sh ${COMMON[@]+"${COMMON[@]}"} ${S1[@]+"${S1[@]}"}
run_step 2 step2_extract.sh ${COMMON[@]+"${COMMON[@]}"} ${S2[@]+"${S2[@]}"}
run_step 3 step3_lenses.sh ${COMMON[@]+"${COMMON[@]}"} ${S3[@]+"${S3[@]}"}
run_step 4 step4_judge.sh ${COMMON[@]+"${COMMON[@]}"} ${S4[@]+"${S4[@]}"}
run_step 5 step5_aggregate.sh ${COMMON[@]+"${COMMON[@]}"} ${S5[@]+"${S5[@]}"}
run_step 6 step6_explore.sh ${COMMON[@]+"${COMMON[@]}"} ${S6[@]+"${S6[@]}"}
echo "=== all steps finished in $((SECONDS - T0)) s ===" >&2

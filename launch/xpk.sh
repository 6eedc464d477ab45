#!/usr/bin/env bash
# Submit a training job to a GKE TPU cluster with xpk (one pod per TPU host; JAX discovers the
# slice itself). The image must contain the project (e.g. built from this repo's Dockerfile or a
# base jax TPU image plus `pip install -e .`).
#
#   CLUSTER=my-cluster TPU_TYPE=v5litepod-32 IMAGE=us-docker.pkg.dev/p/r/hyperlora:latest \
#     ./launch/xpk.sh d2l-gemma configs/d2l.py:gemma2_2b_qa --workdir gs://b/runs/d2l ...
#
# --dry-run (first argument): print the xpk command and what each TPU host's pod runs (hosts from
# TPU_TYPE x NUM_SLICES), then run the first pod's command here for 2 steps of the tiny preset
# on fake CPU devices (launch/_dry_run.sh); nothing is submitted.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
: "${CLUSTER:?set CLUSTER}" "${TPU_TYPE:?set TPU_TYPE}" "${IMAGE:?set IMAGE}"
NAME="$1"; CONFIG="$2"; shift 2
ARGS=$(printf ' %q' "$@")
TRAIN_CMD="hyperlora-jax train --config $CONFIG$ARGS"
XPK=(xpk workload create
  --cluster "$CLUSTER"
  --workload "$NAME"
  --tpu-type "$TPU_TYPE"
  --num-slices "${NUM_SLICES:-1}"
  --docker-image "$IMAGE"
  --command "$TRAIN_CMD")
if [[ $DRY_RUN == 1 ]]; then
  source "$(dirname "$0")/_dry_run.sh"
  # hosts per slice: v4-N / v5p-N count TensorCores (2 per chip, 4 chips per host); v5e and
  # v6e count chips (up to 8 on one host, else 4 per host)
  chips=${TPU_TYPE##*-}
  case $TPU_TYPE in
    v4-* | v5p-*) hosts=$(((chips + 7) / 8)) ;;
    *) hosts=$((chips <= 8 ? 1 : chips / 4)) ;;
  esac
  total=$((hosts * ${NUM_SLICES:-1}))
  say "would run: $(quoted "${XPK[@]:0:${#XPK[@]}-1}") \"$TRAIN_CMD\""
  for ((h = 0; h < total; h++)); do
    say "pod $h of $total (slice $((h / hosts)), host $((h % hosts))) runs: $TRAIN_CMD"
  done
  dry_run_local "$CONFIG" "$@"
  exit
fi
"${XPK[@]}"

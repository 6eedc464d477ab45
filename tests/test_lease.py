"""The GPU lease's rehearsal: both device calls end to end on this CPU (launch/device/lease.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_lease_dry_run(tmp_path):
    """prepare -> call 1 -> call 2 with the device's layout, real SmolLM2 halves and tiny sizes;
    $OUT within the tool's limits, the params reassemble, a cold call 2 exits 42 at once."""
    out = tmp_path / "dry.json"
    cmd = [sys.executable, "launch/device/lease.py", "dry-run", "--gpu-dir", str(tmp_path / "gpu")]
    cmd += ["--keep-tracked", "--json", str(out)]  # keep the index and .gpu/ of the checkout
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["call1"]["rc"] == 0 and res["call2"]["rc"] == 0
    assert res["cold"]["rc"] == 42 and res["cold"]["s"] < 30
    assert "went cold" in res["cold"]["stderr"]
    assert set(res["call2"]["files"]) == {
        "call2.log",
        "d2l_config.json",
        "params.safetensors.part1",
        "params.safetensors.part2",
        "stage1_metrics.jsonl",
        "stage2_metrics.jsonl",
        "summary.json",
    }
    stages = res["summary"]["stages"]
    for name in ("stage1", "stage2"):
        assert stages[name]["steps"] >= 1 and stages[name]["context_blind_floor"] > 0
    probe = res["summary"]["call1"]["probe"]
    assert probe["rows_per_step"] == 1 and probe["matmul_flops_per_step"] > 0


@pytest.mark.slow
def test_lease_dry_run_t2l(tmp_path):
    """The t2l job: prepare (a 16-task universe subset and its MiniLM embeddings) -> call 1
    (probe on the real step) -> call 2 (T2L-SFT with the carried embeddings, export); the
    checkpoint rebuilt from $OUT loads here with its own encoder against the local SmolLM2 and
    writes adapters; the carried embeddings match that encoder; a cold call 2 exits 42."""
    out = tmp_path / "dry.json"
    cmd = [sys.executable, "launch/device/lease.py", "dry-run", "--job", "t2l", "--tasks", "16"]
    cmd += ["--gpu-dir", str(tmp_path / "gpu"), "--keep-tracked", "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["call1"]["rc"] == 0 and res["call2"]["rc"] == 0
    assert res["cold"]["rc"] == 42 and "went cold" in res["cold"]["stderr"]
    assert set(res["call2"]["files"]) == {
        "call2.log",
        "t2l.json",
        "params.safetensors.part1",
        "params.safetensors.part2",
        "t2l_metrics.jsonl",
        "summary.json",
    }
    manifest = json.loads((tmp_path / "gpu" / "call1" / "manifest.json").read_text())
    assert manifest["job"] == "t2l" and manifest["tasks"] == 16
    assert manifest["descriptions"] == 16 * 16  # every training description, embedded here
    check = res["t2l_check"]
    assert check["modules"] == ["q_proj", "v_proj"] and check["a_shape"] == [1, 30, 8, 576]
    assert check["embedding_max_rel_diff"] < 0.005  # int8 of the same encoder's vectors
    st = res["summary"]["stages"]["t2l"]
    assert st["steps"] >= 1 and st["examples"] == 2 * st["steps"] and st["main_loss_last20"] > 0
    probe = res["summary"]["call1"]["probe"]
    assert probe["rows_per_step"] == 2 and probe["examples_per_step"] == 2


def test_t2l_gpu_preset_compiles_one_program():
    """The probe runs a few steps, call 2 runs until its budget: the warmup (a constant of the
    compiled schedule) must not depend on train.steps, or call 2 would miss the probe's cache."""
    from hyperlora_jax.train import build
    from hyperlora_jax.train.config_file import load_config

    got = []
    for steps in ([], ["--config.train.steps=12"]):
        c = load_config("configs/t2l.py:smollm2_universe_gpu", steps)
        d = build.derive(c)
        got.append((d.warmup_steps, d.global_batch, c.train.schedule, c.train.compute_dtype))
    assert got[0] == got[1] == (100, 64, "constant", "bfloat16")
    cpu = build.derive(load_config("configs/t2l.py:smollm2_universe_sft", []))
    assert cpu.warmup_steps == 200  # warmup_frac x steps where warmup_steps is not set


def test_task_embeddings_are_checked(tmp_path):
    """train.task_embeddings: used as the encoder when made by the config's encoder spec; one
    line naming the fix otherwise."""
    import numpy as np

    from hyperlora_jax.data.feeds import T2LFeed, task_encoder
    from hyperlora_jax.errors import ConfigError
    from hyperlora_jax.hypernet.t2l.task_encoder import PrecomputedEncoder

    spec = {"kind": "sentence_encoder", "model": "m", "dim": 3}
    embs = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = tmp_path / "e.npz"
    np.savez(path, descriptions=np.array(["a.", "b."]), embeddings=embs, encoder=json.dumps(spec))
    feed = T2LFeed("train", 16, 64, spec, "", str(path))
    enc = task_encoder(feed, None)
    assert isinstance(enc, PrecomputedEncoder)
    assert enc.encode(["b."]).tolist() == [[3.0, 4.0, 5.0]]
    # the lease's int8 form: one scale per vector
    q = tmp_path / "q.npz"
    np.savez(
        q,
        descriptions=np.array(["a.", "b."]),
        embeddings=np.int8([[0, 1, 2], [3, 4, 127]]),
        scale=np.float32([0.5, 0.25]),
        encoder=json.dumps(spec),
    )
    assert task_encoder(feed._replace(embeddings=str(q)), None).encode(["b."]).tolist() == [
        [0.75, 1.0, 31.75]
    ]
    with pytest.raises(ConfigError, match="make it again with this encoder"):
        task_encoder(feed._replace(encoder={**spec, "dim": 4}), None)
    with pytest.raises(ConfigError, match="no such .npz file"):
        task_encoder(feed._replace(embeddings=str(tmp_path / "none.npz")), None)


def test_lease_job_arguments(tmp_path):
    """Options of the other job, and a carried folder prepared for the other job: one line
    naming the fix, exit 1, before anything runs."""
    lease = [sys.executable, str(ROOT / "launch/device/lease.py")]
    for args, says in (
        (["prepare", "--tasks", "4"], "pass --job t2l"),
        (["call2", "--job", "t2l", "--stage2-share", "0"], "the t2l job has one"),
    ):
        r = subprocess.run(lease + args, cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.splitlines()) == 1
    # a copy of the harness whose .gpu/call1 was prepared for d2l, called with --job t2l
    (tmp_path / "launch/device").mkdir(parents=True)
    (tmp_path / "launch/device/lease.py").write_text((ROOT / "launch/device/lease.py").read_text())
    (tmp_path / ".gpu/call1").mkdir(parents=True)
    (tmp_path / ".gpu/call1/manifest.json").write_text(json.dumps({"job": "d2l"}))
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "LEASE_TMP": str(tmp_path / "t")}
    r = subprocess.run(
        [sys.executable, "launch/device/lease.py", "call1", "--job", "t2l"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "prepared for the d2l job" in r.stderr, r.stderr

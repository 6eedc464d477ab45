"""Trainer: exact resume after SIGKILL (same losses, same data order), save on SIGTERM then a
non-zero exit, the wall-clock budget, half-written checkpoints ignored, NaN guard (skip + count,
never save a skipped step's state), the step that leaves the context-blind floor."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _train_toy  # noqa: E402

ROOT = Path(__file__).parents[1]
SCRIPT = Path(__file__).parent / "_train_toy.py"


def _losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # later rows win (resumed run)


def _run_sub(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _train(workdir, steps, **kw):
    tr = _train_toy.build(workdir, steps, **kw)
    try:
        rows = tr.run()
    finally:
        tr.close()
    return tr, rows


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_losses(tmp_path):
    full = tmp_path / "full"
    _train(full, 10, save_every=100)
    killed = tmp_path / "killed"
    r = _run_sub(killed, 10, "--kill-at", 5)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (
        sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())[-1] == 5
    )
    # a half-written (uncommitted) newer checkpoint must be ignored
    half = killed / "checkpoints" / "7"
    shutil.copytree(killed / "checkpoints" / "5", half)
    (half / "_CHECKPOINT_METADATA").unlink()
    tmp = killed / "checkpoints" / "8.orbax-checkpoint-tmp-123"
    tmp.mkdir()
    tr, rows = _train(killed, 10)
    assert [r["step"] for r in rows] == [6, 7, 8, 9, 10]  # resumed from 5, not 7
    a, b = _losses(full), _losses(killed)
    for s in range(6, 11):
        assert abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(a[s])), (s, a[s], b[s])


def test_sigterm_saves_checkpoint_then_exits_nonzero(tmp_path):
    r = _run_sub(tmp_path, 50, "--term-at", 3, "--save-every", 1000)
    assert r.returncode != 0
    assert "interrupted by SIGTERM at step 3" in r.stderr, r.stderr[-2000:]
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [3]
    assert json.loads((tmp_path / "rebuild.json").read_text()) == {"kind": "toy"}


def test_time_budget_stops_in_time_with_a_complete_checkpoint(tmp_path):
    import time

    from hyperlora_jax.train.trainer import _complete_steps

    budget = 15.0
    t0 = time.perf_counter()
    tr, rows = _train(tmp_path, 10**6, save_every=10**6, time_budget_s=budget)
    elapsed = time.perf_counter() - t0
    assert tr.stopped_by == "time_budget"
    assert 2 < len(rows) < 10**6
    assert elapsed < budget, elapsed  # the stop leaves room for the final save
    assert _complete_steps(tmp_path / "checkpoints") == [rows[-1]["step"]]
    # resuming with the steps done continues from the saved step
    tr2, rows2 = _train(tmp_path, rows[-1]["step"] + 2, save_every=10**6)
    assert [r["step"] for r in rows2] == [rows[-1]["step"] + 1, rows[-1]["step"] + 2]
    assert tr2.stopped_by == "steps"


def test_lr_time_decay_follows_the_clock(tmp_path):
    """Cosine over the wall-clock budget: full lr after the first step, near 0 at the stop."""
    tr, rows = _train(tmp_path, 10**6, save_every=10**6, time_budget_s=15.0, lr_time_decay=True)
    assert tr.stopped_by == "time_budget"
    lr = np.array([r["lr"] for r in rows])
    peak = 0.05  # the toy's lr; its step-count cosine over 1e6 steps stays at the peak
    assert lr.max() > 0.9 * peak  # full lr right after warmup
    assert np.all(np.diff(lr[3:]) <= 1e-9)  # then it decays with the clock
    assert lr[-1] < 0.25 * peak


def test_first_step_below_the_context_blind_floor_is_recorded(tmp_path):
    from hyperlora_jax.train.trainer import FLOOR_MARGIN, FLOOR_WINDOW

    tr, rows = _train(tmp_path, 60, save_every=10**6, floor=3.0)
    losses = np.array([r["loss"] for r in rows])
    means = np.convolve(losses, np.ones(FLOOR_WINDOW) / FLOOR_WINDOW, "valid")
    first = int(np.argmax(means < FLOOR_MARGIN * 3.0)) + 1  # step of the window's first row
    assert means[0] >= FLOOR_MARGIN * 3.0 and means[-1] < FLOOR_MARGIN * 3.0  # it does cross
    assert tr.left_floor_at == first
    assert rows[first + FLOOR_WINDOW - 2]["left_context_blind_floor_at"] == first
    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(logged[0]) == {"step": 0, "context_blind_floor": 3.0}


def test_nan_gradient_is_skipped_counted_and_never_saved(tmp_path):
    tr, rows = _train(tmp_path, 6, nan_at=2, save_every=1)  # the 3rd update (step index 2)
    finite = [r["finite"] for r in rows]
    assert finite == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert rows[2]["skipped_total"] == 1 and rows[-1]["skipped_total"] == 1
    assert int(jax.device_get(tr.state.bad_total)) == 1
    # restore every saved step: all finite
    for s in tr.manager.all_steps():
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        st = tr.manager.restore(s, args=args)
        for leaf in jax.tree_util.tree_leaves(st["state"]["params"]):
            assert np.all(np.isfinite(np.asarray(leaf)))


def test_too_many_bad_steps_stop_training(tmp_path):
    from hyperlora_jax.train.trainer import Diverged

    tr = _train_toy.build(tmp_path, 10, nan_at=1, max_bad=1)
    with pytest.raises(Diverged, match="1 steps in a row skipped at step 2"):
        tr.run()
    tr.close()

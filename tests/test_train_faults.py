"""Issue 21, "nothing lost, nothing silently wrong": `hyperlora-jax train` under faults. A runaway
learning rate stops the run without saving the diverged state; a damaged newest checkpoint is
detected by its checksums, moved aside, replayed and saved again (export-run falls back too);
SIGTERM exits 143 with a resume line; a torn metrics.jsonl line is repaired on resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from hyperlora_jax.cli import main

ROOT = Path(__file__).parents[1]
# the tiny D2L preset on its built-in synthetic task (no teacher: CE loss)
TINY = ["train", "--config", f"{ROOT}/configs/d2l.py:tiny", "--config.train.loss=ce"]


def _steps(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _params(workdir: Path, step: int) -> list[np.ndarray]:
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as mgr:
        st = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(st["state"]["params"])]


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_divergence_stops_without_saving_the_diverged_state(tmp_path, capsys):
    work = tmp_path / "run"
    args = [
        *TINY,
        "--config.train.learning_rate=1e38",  # the warmup's 2nd step blows the params up
        "--config.train.steps=10",
        "--config.train.save_every=1",
        "--config.train.max_to_keep=2",
        "--config.train.max_bad_steps=3",
        f"--workdir={work}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "training diverged: 3 steps in a row skipped at step 4" in line, err[-2000:]
    assert "last good checkpoint: step 1" in line
    # step 1 (lr 0 in the warmup) is the only state before the divergence; nothing after it
    assert _steps(work) == ["1"]
    params = _params(work, 1)
    assert all(np.all(np.isfinite(p)) for p in params)
    assert max(float(np.max(np.abs(p))) for p in params) < 100.0
    assert [r["finite"] for r in _rows(work) if "loss" in r] == [1.0, 0.0, 0.0, 0.0]


def _truncate_data_files(step_dir: Path) -> None:
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        os.truncate(f, f.stat().st_size // 2)


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# a failed restore's late tensorstore callbacks used to print ~100 "Event loop is closed"
# tracebacks through sys.unraisablehook; pytest turns any that get through into this warning
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_is_moved_aside_replayed_and_saved_again(
    tmp_path, capsys, caplog
):
    work = tmp_path / "run"
    args = [*TINY, "--config.train.steps=4", "--config.train.save_every=2", f"--workdir={work}"]
    assert main(args) == 0
    want = _params(work, 4)
    _truncate_data_files(work / "checkpoints" / "4")

    # export-run falls back to step 2 (and leaves the workdir as it is)
    caplog.clear()
    assert main(["export-run", f"--workdir={work}", f"--out={tmp_path / 'exp'}"]) == 0
    meta = json.loads((tmp_path / "exp" / "d2l_config.json").read_text())
    assert meta["training"]["step"] == 2, meta
    assert len(_warnings(caplog, "checkpoint step 4 is corrupt")) == 1
    assert _steps(work) == ["2", "4"]

    # a torn last metrics line (a crash mid-write) is repaired on resume
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"finite": 1.0, "loss": 5.')
    capsys.readouterr()
    caplog.clear()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    warn = _warnings(caplog, "checkpoint step 4 is corrupt")
    assert len(warn) == 1 and "moved to" in warn[0], warn
    assert len(_warnings(caplog, "dropped a torn last line")) == 1
    assert _steps(work) == ["2", "4", "4.corrupt"]  # replayed from 2, step 4 saved again
    for a, b in zip(_params(work, 4), want, strict=True):  # an exact replay
        np.testing.assert_array_equal(a, b)
    rows = _rows(work)  # parses: whole lines only
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 3, 4]

    # damage without checksums (a crash between Orbax's commit and their write): the failed
    # restore is the check; the same fallback, and no tracebacks
    _truncate_data_files(work / "checkpoints" / "4")
    (work / "checkpoints" / "4" / "sha256.json").unlink()
    caplog.clear()
    assert main(["export-run", f"--workdir={work}", f"--out={tmp_path / 'exp2'}"]) == 0
    meta = json.loads((tmp_path / "exp2" / "d2l_config.json").read_text())
    assert meta["training"]["step"] == 2, meta
    assert "unreadable" in _warnings(caplog, "checkpoint step 4 is corrupt")[0]
    caplog.clear()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    assert _steps(work) == ["2", "4", "4.corrupt", "4.corrupt-2"]
    assert len(_warnings(caplog, "checkpoint step 4 is corrupt")) == 1
    assert main(["export-run", f"--workdir={work}", f"--out={tmp_path / 'exp4'}"]) == 0
    meta = json.loads((tmp_path / "exp4" / "d2l_config.json").read_text())
    assert meta["training"]["step"] == 4


def test_sigterm_exits_143_with_a_resume_line_then_resumes(tmp_path):
    work = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "hyperlora_jax.cli",
        *TINY,
        "--config.train.steps=300",  # ~10 ms a step: SIGTERM lands mid-run
        "--config.train.save_every=1000",
        f"--workdir={work}",
    ]
    # share the test session's compilation cache: the rerun then compiles nothing
    env = {
        "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache"),
        **os.environ,
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (work / "metrics.jsonl").exists() or len(_rows_safe(work)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM at step "), err[-3000:]
    assert "run the same command again to resume" in last
    step = int(last.split("at step ")[1].split()[0])
    assert _steps(work) == [str(step)]
    assert "Traceback" not in err

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [x["step"] for x in _rows(work) if "loss" in x]
    assert steps == list(range(1, 301))  # resumed at step + 1, nothing replayed or lost


def _rows_safe(workdir: Path) -> list[str]:
    return [x for x in (workdir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.parametrize("tail", ['{"step": 3, "loss": 1.', '{"step": 3}'])
def test_repair_jsonl_drops_only_a_torn_last_line(tmp_path, tail):
    from hyperlora_jax.train.trainer import repair_jsonl

    p = tmp_path / "metrics.jsonl"
    whole = '{"step": 1}\n{"step": 2}\n'
    p.write_text(whole + tail)  # no newline: torn even when it parses
    repair_jsonl(p)
    assert p.read_text() == whole
    repair_jsonl(p)  # whole lines are kept
    assert p.read_text() == whole

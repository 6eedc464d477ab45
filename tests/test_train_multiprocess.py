"""Two JAX processes on localhost (jax.distributed, gloo collectives) train the tiny D2L preset
for 3 steps with a global batch built by make_array_from_process_local_data; both report the
same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import XLA_TEST_FLAGS

ROOT = Path(__file__).parents[1]


@pytest.mark.multiprocess
def test_two_processes_agree_on_loss(tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_TEST_FLAGS}  # 1 device each
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "_multiproc_train.py"),
                str(port),
                "2",
                str(i),
                str(tmp_path / "run"),
                "3",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.split("LOSSES ", 1)[1].splitlines()[0]))
    assert sorted(o["process"] for o in outs) == [0, 1]
    assert all(o["devices"] == 2 for o in outs)
    a, b = outs[0]["losses"], outs[1]["losses"]
    assert len(a) == 3 and a == b, (a, b)
    assert (tmp_path / "run" / "checkpoints" / "3").exists()

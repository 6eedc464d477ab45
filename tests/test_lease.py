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

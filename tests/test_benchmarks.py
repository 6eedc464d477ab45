"""Every benchmark runs in quick mode (smoke) and writes JSON + markdown with the matmul peak."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import (  # noqa: E402
    adapter_latency,
    data_throughput,
    harness,
    query_cost,
    train_throughput,
    vs_official,
)


def _report(out, name):
    data = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert data["mode"] == "quick" and data["matmul_peak"]["float32"]["gflops"] > 0
    assert "Matmul peak: float32" in md
    return data, md


def test_harness_table_and_timing():
    assert (
        harness.markdown_table([{"a": 1, "b": 0.123456}])
        == "| a | b |\n|---|---|\n| 1 | 0.1235 |\n"
    )
    t = harness.timeit(lambda: sum(range(1000)), warmup=1, repeats=3)
    assert len(t["times_s"]) == 3 and t["min_s"] <= t["median_s"]
    peak = harness.matmul_peak("float32", n=128, repeats=2)
    assert peak["flops_per_s"] > 1e8


@pytest.mark.slow
def test_adapter_latency_quick(tmp_path, capsys):
    assert adapter_latency.main(["--quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("[matmul peak on")  # printed first
    data, md = _report(tmp_path, "adapter_latency")
    rows = data["tables"]["d2l_internalize"]
    assert {r["mode"] for r in rows} == {"batched", "iterative"}
    assert all(r["chunks"] == 3 and r["median_s"] > 0 and r["adapter_mib"] > 0 for r in rows)
    assert data["tables"]["t2l_generate"][0]["descriptions"] == 8
    assert "## d2l_internalize" in md
    for png in ("adapter_latency_s.png", "adapter_latency_mem.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_query_cost_quick(tmp_path):
    assert query_cost.main(["--quick", "--out", str(tmp_path)]) == 0
    data, _ = _report(tmp_path, "query_cost")
    row = data["tables"]["per_query"][0]
    assert row["kv_cache_mib"] > 0 and row["adapter_mib"] > 0 and row["query_in_prompt_s"] > 0
    assert row["internalize_peak_mib"] >= 0 and row["in_prompt_peak_mib"] >= 0
    assert len(data["tables"]["total_cost_for_N_queries"]) == 3
    for png in ("query_cost_s.png", "query_cost_mem.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vs_official_quick(tmp_path):
    """Every row per precision, with FLOPs, the load before and after, and a fraction of peak
    unless other processes kept the CPUs busy before the row."""
    assert vs_official.main(["--quick", "--out", str(tmp_path)]) == 0
    data, _ = _report(tmp_path, "vs_official")
    rows = data["tables"]["rows"]
    policies = {"f32", "bf16", "bf16-prefill", "bf16-params"}
    assert {r["precision"] for r in rows} == policies and len(rows) == 12
    assert [r["precision"] for r in rows if r["row"].startswith("T2L")] == ["f32"]  # no policy
    assert ["in the prompt" in r["row"] for r in rows if r["precision"] == "bf16-prefill"] == [True]
    low = [r["row"] for r in rows if r["precision"] == "bf16-params"]
    assert [x.rsplit(", ", 1)[1] for x in low] == ["batched", "iterative"]
    for r in rows:
        assert r["median_s"] > 0 and r["gflop"] > 0 and r["other_busy_cpus"] >= 0
        assert r["process_peak_mib"] >= r["peak_mem_mib"] >= 0
        shared = r["other_busy_cpus"] > vs_official.MAX_OTHER_BUSY
        assert (r["frac_of_peak"] is None) if shared else (r["frac_of_peak"] > 0)
        assert r["load1_before"] >= 0 and r["load1_after"] >= 0
    assert data["extra"]["matmul_peak_at_end"]["bfloat16"]["gflops"] > 0


@pytest.mark.slow
def test_train_throughput_quick(tmp_path):
    assert train_throughput.main(["--quick", "--out", str(tmp_path)]) == 0
    data, _ = _report(tmp_path, "train_throughput")
    steps = {r["step"]: r for r in data["tables"]["train_step"]}
    assert set(steps) == {"d2l[tiny]", "t2l_sft[L]"}
    for r in steps.values():
        assert r["tokens_per_s"] > 0 and r["loss"] == pytest.approx(r["loss"])  # finite
        assert r["gflop_per_step"] > 0 and 0 < r["frac_of_peak"] < 5
    (niah,) = data["tables"]["d2l_niah"]
    assert niah["contexts"] > 0 and niah["contexts_per_min"] > 0
    parts = [v for k, v in niah.items() if k.startswith("gflop_") and k != "gflop_per_sample"]
    assert sum(parts) == pytest.approx(niah["gflop_per_sample"]) and niah["gflop_lm_head"] > 0


def test_data_throughput_quick(tmp_path):
    assert data_throughput.main(["--quick", "--out", str(tmp_path)]) == 0
    data, md = _report(tmp_path, "data_throughput")
    tokens = [r for r in data["tables"]["niah_build"] if r["path"] == "tokens"]
    assert [r["workers"] for r in tokens] == [1, 2] and all(r["records"] == 1000 for r in tokens)
    text = [r for r in data["tables"]["niah_build"] if r["path"].startswith("text")]
    assert all(r["records_per_s"] > 0 for r in tokens + text)
    assert 0 < tokens[0]["bytes_per_record"] < text[0]["bytes_per_record"]
    est = data["tables"]["extrapolation"][0]
    assert est["records"] == 640_000 and est["cores"] == 16 and est["token_path_s"] > 0
    reads = {r["data"]: r for r in data["tables"]["train_read"]}
    assert reads["tokens"]["held_bytes_per_record"] < reads["text"]["held_bytes_per_record"]
    assert len(data["tables"]["facts"]) == 3 and "## extrapolation" in md


def test_gpu_check_script_is_valid_and_refuses_cpu(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(
        ["bash", str(script)],
        env={"OUT": str(tmp_path), "PY": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3 and "no accelerator" in r.stderr

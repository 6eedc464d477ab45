"""Stage trackers measure real time and memory; plots are non-empty PNGs with labelled axes."""

import json
import time

import jax.numpy as jnp
import numpy as np

from hyperlora_jax.eval.plots import plot_accuracy_vs_length, plot_loss_curve, plot_memory_vs_length
from hyperlora_jax.eval.trackers import StageTracker


def test_tracker_time_and_peak_memory(tmp_path):
    tr = StageTracker()
    with tr.stage("hypernetwork", example=0):
        time.sleep(0.05)
    with tr.stage("generation", example=0, tokens=3) as s:
        buf = np.ones(96 * 2**20 // 8)  # 96 MiB touched, then freed
        s.done(jnp.asarray(buf[:4]).sum())
        del buf
    recs = {r.stage: r for r in tr.records}
    assert recs["hypernetwork"].seconds >= 0.05
    if recs["generation"].memory_kind == "host_rss":
        assert recs["generation"].peak_bytes >= 80 * 2**20
        assert recs["hypernetwork"].peak_bytes < 80 * 2**20
    summ = tr.summary()
    assert summ["generation"]["count"] == 1 and summ["generation"]["max_peak_bytes"] > 0
    tr.save_csv(tmp_path / "stats.csv")
    lines = (tmp_path / "stats.csv").read_text().splitlines()
    assert lines[0].startswith("example,stage,seconds") and len(lines) == 3


def _check_png(path, fig, xlabel, ylabel):
    import matplotlib.image as mpimg

    assert path.stat().st_size > 5000
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert float(np.std(img[..., :3])) > 0.05  # not a blank canvas
    ax = fig.axes[0]
    assert ax.get_xlabel() == xlabel and ax.get_ylabel() == ylabel


def test_plots_write_labelled_pngs(tmp_path):
    p1 = tmp_path / "acc.png"
    fig = plot_accuracy_vs_length(
        {"D2L": ([256, 1024, 4096], [1.0, 0.9, 0.8]), "no context": ([256, 1024, 4096], [0, 0, 0])},
        p1,
        metric="ROUGE-L F1",
        window=2048,
    )
    _check_png(p1, fig, "context length (tokens)", "ROUGE-L F1")
    p2 = tmp_path / "mem.png"
    fig = plot_memory_vs_length({"KV cache": ([1024, 4096], [49.5, 191.0])}, p2)
    _check_png(p2, fig, "context length (tokens)", "memory (MiB)")
    p3 = tmp_path / "loss.png"
    rows = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 21)] + [{"step": 20, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_loss_curve(tmp_path / "metrics.jsonl", p3)
    _check_png(p3, fig, "step", "loss")
    assert fig.axes[0].lines[0].get_ydata()[-1] == 1.0  # a resumed run's row wins

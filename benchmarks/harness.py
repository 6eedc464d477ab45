"""Shared benchmark plumbing: matmul peak, timing, memory, JSON + markdown reports.

Every benchmark prints the measured matmul peak first, so its FLOP/s numbers can be read as a
fraction of what this machine can actually do.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax.eval.trackers import (
    device_memory,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)

MiB = 2**20


def device_kind() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()}"


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul, f32 accumulation (as our kernels do)."""
    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dt)
    b = jax.random.normal(kb, (n, n), dt)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    flops = 2 * n**3 / best
    return {"dtype": dtype, "n": n, "seconds": best, "flops_per_s": flops, "gflops": flops / 1e9}


def measure_peaks(quick: bool = False) -> dict[str, dict[str, Any]]:
    """f32 and bf16 matmul peaks; printed immediately."""
    n = 512 if quick else (8192 if jax.default_backend() != "cpu" else 2048)
    reps = 3 if quick else 10
    peaks = {dt: matmul_peak(dt, n, reps) for dt in ("float32", "bfloat16")}
    print(
        f"[matmul peak on {device_kind()}] "
        + ", ".join(f"{k}: {v['gflops']:.1f} GFLOP/s (n={n})" for k, v in peaks.items()),
        flush=True,
    )
    return peaks


def other_busy_cpus(seconds: float = 1.0, samples: int = 20) -> float:
    """CPUs other processes keep busy now: the mean of runnable tasks in /proc/loadavg minus this
    reader, sampled while the caller is idle (the 1-minute load average also counts the
    benchmark's own last row, so it cannot say whether someone else shares the machine)."""
    path = Path("/proc/loadavg")
    if not path.exists():
        return float("nan")
    n = []
    for _ in range(samples):
        n.append(int(path.read_text().split()[3].split("/")[0]) - 1)
        time.sleep(seconds / samples)
    return round(statistics.mean(n), 2)


def timeit(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Median/min wall time of fn() (results blocked on), after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def peak_memory_of(fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak memory growth while running fn() once: device allocator peak or host peak RSS (then
    also `process_bytes`, the whole process's peak RSS during the call)."""
    dev = device_memory()
    if dev is not None:
        start = dev[1]
        jax.block_until_ready(fn())
        return {"kind": "device_peak", "bytes": max(0, device_memory()[1] - start)}
    reset_peak_rss()
    start = rss_bytes()
    jax.block_until_ready(fn())
    peak = peak_rss_bytes()
    return {"kind": "host_rss_peak", "bytes": max(0, peak - start), "process_bytes": peak}


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class Report:
    """Rows of one benchmark plus the environment; writes <name>.json and <name>.md."""

    def __init__(self, name: str, peaks: dict, mode: str, notes: str = "") -> None:
        self.name, self.peaks, self.mode, self.notes = name, peaks, mode, notes
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.extra: dict[str, Any] = {}
        self.t0 = time.perf_counter()

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.tables.setdefault(table, []).append(row)
        print(f"  [{table}] " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)

    def env(self) -> dict[str, Any]:
        return {
            "device": device_kind(),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        }

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        runtime = time.perf_counter() - self.t0
        data = {
            "benchmark": self.name,
            "mode": self.mode,
            "runtime_s": runtime,
            "env": self.env(),
            "matmul_peak": self.peaks,
            "tables": self.tables,
            "extra": self.extra,
            "notes": self.notes,
        }
        jpath, mpath = out / f"{self.name}.json", out / f"{self.name}.md"
        jpath.write_text(json.dumps(data, indent=2, default=float))
        md = [f"# {self.name} ({self.mode})", ""]
        md.append(
            f"Device: {data['env']['device']}, jax {jax.__version__}; runtime {runtime:.1f} s."
        )
        md.append(
            "Matmul peak: "
            + ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s" for k, v in self.peaks.items())
            + "."
        )
        if self.notes:
            md += ["", self.notes]
        for table, rows in self.tables.items():
            md += ["", f"## {table}", "", markdown_table(rows)]
        for k, v in self.extra.items():
            md += ["", f"**{k}**: {v}"]
        mpath.write_text("\n".join(md) + "\n")
        print(f"wrote {jpath} and {mpath} ({runtime:.1f} s)", flush=True)
        return jpath, mpath


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v

"""Wall time and peak memory of each stage (context encoding, hypernetwork, composition,
generation) per example, like D2L's `tracker/` (which wraps methods with CUDA sync + peak stats).

On accelerators the peak is the device allocator's `peak_bytes_in_use` (it cannot be reset, so
a stage only reports growth above the peak seen before it); on CPU it is the process's peak RSS
(VmHWM), reset before each stage through /proc/self/clear_refs where the kernel allows it.
Call `tracker.done(x)` (or return arrays from the stage) so asynchronous work is waited for.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax

from hyperlora_jax.paths import as_path


def _read_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 if unknown)."""
    kb = _read_status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) of this process in bytes (0 if unknown)."""
    kb = _read_status_kb("VmHWM")
    return 0 if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def device_memory() -> tuple[int, int] | None:
    """(bytes_in_use, peak_bytes_in_use) of the first local device, or None (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_in_use" not in stats:
        return None
    return stats["bytes_in_use"], stats.get("peak_bytes_in_use", stats["bytes_in_use"])


@dataclass
class StageRecord:
    example: int
    stage: str
    seconds: float
    peak_bytes: int  # peak memory growth above the stage's starting point
    memory_kind: str  # "device" or "host_rss"
    extra: dict[str, Any] = field(default_factory=dict)


class StageTracker:
    """Collects per-example, per-stage timings and peak memory.

    with tracker.stage("hypernetwork", example=i) as s:
        adapter = s.done(hypernet_fn(...))
    """

    def __init__(self) -> None:
        self.records: list[StageRecord] = []

    @contextlib.contextmanager
    def stage(self, name: str, example: int = 0, **extra):
        holder = _Stage()
        dev = device_memory()
        if dev is None:
            reset_peak_rss()
            start, kind = rss_bytes(), "host_rss"
        else:
            start, kind = dev[1], "device"
        t0 = time.perf_counter()
        try:
            yield holder
        finally:
            if holder.result is not None:
                jax.block_until_ready(holder.result)
            seconds = time.perf_counter() - t0
            if kind == "device":
                peak = max(0, device_memory()[1] - start)
            else:
                peak = max(0, peak_rss_bytes() - start)
            self.records.append(StageRecord(example, name, seconds, peak, kind, dict(extra)))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: count, mean/median seconds, max peak bytes."""
        out: dict[str, dict[str, float]] = {}
        for name in dict.fromkeys(r.stage for r in self.records):
            rs = [r for r in self.records if r.stage == name]
            secs = [r.seconds for r in rs]
            out[name] = {
                "count": len(rs),
                "mean_s": statistics.fmean(secs),
                "median_s": statistics.median(secs),
                "total_s": sum(secs),
                "max_peak_bytes": max(r.peak_bytes for r in rs),
            }
        return out

    def to_json(self) -> dict:
        return {"records": [asdict(r) for r in self.records], "summary": self.summary()}

    def save_csv(self, path: str | Path) -> None:
        """One row per (example, stage), as the official `{split}_{ds}_tracked_stats.csv`."""
        f = io.StringIO(newline="")  # epath's open() takes no newline=: csv to memory first
        w = csv.writer(f)
        w.writerow(["example", "stage", "seconds", "peak_bytes", "memory_kind", "extra"])
        for r in self.records:
            w.writerow(
                [
                    r.example,
                    r.stage,
                    f"{r.seconds:.6f}",
                    r.peak_bytes,
                    r.memory_kind,
                    json.dumps(r.extra),
                ]
            )
        path = as_path(path)  # gs:// too
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.getvalue())


class _Stage:
    def __init__(self) -> None:
        self.result = None

    def done(self, x):
        """Register the stage's output so the tracker waits for it; returns x."""
        self.result = x
        return x

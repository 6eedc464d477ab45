"""NIAH evaluation over length bins (official `scripts/niah/2-eval.sh`): the haystack is
internalized in chunks of 1024 tokens and the model is asked for the magic number; baselines get
the haystack in the prompt (middle-truncated to the window) or nothing. Metric: ROUGE-L F1 of the
4-digit answer (effectively exact match), reported per token bin.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from hyperlora_jax.data import niah as niah_data
from hyperlora_jax.errors import InputError
from hyperlora_jax.eval.qa import QAExample


def _example(rec: dict) -> QAExample:
    lo, hi = rec.get("token_bin") or (None, None)
    meta = {"token_len": rec.get("token_len"), "depth_bin": rec.get("depth_bin")}
    if lo is not None:
        meta["bin"] = f"{lo}-{hi}"
    return QAExample(rec["context"], rec["prompt"], [rec["response"]], "rougeL", meta)


def load_niah(paths: Sequence[str | Path], limit_per_bin: int | None = None) -> list[QAExample]:
    """NIAH test files written by `hyperlora-jax data niah` (a file, or a folder of bin folders
    each holding test.jsonl)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*/test.jsonl")) or sorted(p.glob("test.jsonl"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"no NIAH data at {p}; generate it with `hyperlora-jax data niah`")
    if not files:
        raise InputError(f"no test.jsonl found under {list(map(str, paths))}")
    out = []
    for f in files:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        for i, r in enumerate(rows):
            missing = {"context", "prompt", "response"} - set(r)
            if missing:
                raise InputError(f"{f}: row {i} lacks NIAH field(s) {sorted(missing)}")
        out += [_example(r) for r in rows[:limit_per_bin]] if limit_per_bin else map(_example, rows)
    return out


def make_niah(
    tokenizer,
    bins: Sequence[tuple[int, int]],
    per_bin: int,
    seed: int = 0,
) -> list[QAExample]:
    """A small in-memory NIAH test set (test-split needles), lengths measured with `tokenizer`."""
    length_fn = niah_data.LengthFn(tokenizer)
    ranges = niah_data.block_ranges(length_fn, bins)
    pool = niah_data.needle_pools(seed)["test"]
    out = []
    for lo, hi in bins:
        k_lo, k_hi = ranges[(lo, hi)]
        if k_hi <= k_lo:
            raise InputError(f"no haystack size fits token bin {lo}-{hi}")
        rng = random.Random(f"{seed}-{lo}-{hi}-eval")
        recs = niah_data.generate_split(
            per_bin, list(range(max(1, k_lo), k_hi)), pool, rng, length_fn, (lo, hi)
        )
        for r in recs:
            r["token_bin"] = [lo, hi]
        out += [_example(r) for r in recs]
    return out

"""D2L training-data throughput: NIAH and fact documents, today's text path vs token shards.

NIAH (bins 32-128 and 128-256, the official recipe's 2 x 320,000 = 640,000 training records):
* text path = `data niah` (one tokenizer call per example for its bin check, JSONL) followed by
  `train --data` tokenizing every record (`pipeline.text_qa_item`: chat template + tokenizer calls);
* token path = `data niah --format tokens` (`niah_tokens`: pieces derived once, every record
  concatenated from them, shards built by N worker processes, deflated).
Facts: per-record `text_qa_item` tokenization vs batched `pipeline.text_qa_tokens` / shards.
Training read: `data.feeds.d2l_data` (items + pack plan, then packed rows) from shards vs from text;
memory held is what tracemalloc sees (Python objects and numpy buffers).
The 16-core figure is extrapolated: the draws run serially in the parent (measured alone), the
shard building splits over the workers (measured with 1 worker), plus what the N-worker run
spent beyond that (pool start, and CPU contention on a shared machine).

  python -m benchmarks.data_throughput --quick   # smoke: the tiny-gemma2 tokenizer, 1,000 records
  python -m benchmarks.data_throughput           # SmolLM2, 640,000 NIAH records: ~4 min, 2 cores
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "official" / "d2l" / "tiny-gemma2"
BINS = [(32, 128), (128, 256)]
SEED = 42
MiB = 2**20


def _config():
    """configs/d2l.py:smollm2_embedded: the official chunk-count distribution, 1 QA per item."""
    spec = importlib.util.spec_from_file_location("_d2l_presets", ROOT / "configs" / "d2l.py")
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    return presets.smollm2_embedded()


def _timed(fn, repeats: int = 1):
    """(result, best wall time of `repeats` calls)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _size(paths) -> int:
    from hyperlora_jax.data import storage

    return sum(storage.dir_size(p) for p in paths)


def _vm_hwm_mib(status: str) -> float:
    kb = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM")), 0)
    return kb / 1024


def _worker_memory_mib(pieces, specs, tmp: Path) -> float:
    """A shard worker's peak: a fresh interpreter importing niah_tokens, plus one full shard."""
    from hyperlora_jax.data import niah_tokens, token_shards
    from hyperlora_jax.eval.trackers import peak_rss_bytes, reset_peak_rss, rss_bytes

    probe = "import hyperlora_jax.data.niah_tokens; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout
    gc.collect()
    reset_peak_rss()
    start = rss_bytes()
    arrays = niah_tokens.shard_arrays(pieces, niah_tokens.spec_columns(specs))
    token_shards.write_shard(tmp / "probe.npz", arrays, {"vocab_size": pieces.vocab_size}, True)
    return _vm_hwm_mib(out) + (peak_rss_bytes() - start) / MiB


def niah_token_path(rep, a, tok, tmp: Path) -> dict:
    from hyperlora_jax.data import niah, niah_tokens, token_shards
    from hyperlora_jax.eval.trackers import peak_rss_bytes, reset_peak_rss, rss_bytes

    pieces, t_pieces = _timed(lambda: niah_tokens.NiahPieces.from_tokenizer(tok, BINS))
    pieces_bytes = pieces.save(tmp / "pieces.json").stat().st_size
    rep.add("niah_pieces", {"derive_s": t_pieces, "json_bytes": pieces_bytes})

    def draws_only():  # the serial part: the seeded draws of every training example
        pools = niah.needle_pools(SEED)
        jobs = niah.split_jobs(pieces.ranges(BINS), BINS, n_train=a.niah_per_bin, n_val=0,
                               n_test=0, train_max_hi=1024, prefix="x")  # fmt: skip
        return [
            niah.draw_split(
                j.count, j.k_values, pools[j.split], j.rng(SEED), pieces.raw_length, j.token_bin
            )  # fmt: skip
            for j in jobs
        ]

    gc.collect()  # the derivation's garbage would otherwise be collected inside the timing
    specs, t_draw = _timed(draws_only)
    worker_mib = _worker_memory_mib(pieces, specs[0][: niah_tokens.DEFAULT_SHARD_SIZE], tmp)
    del specs
    n = len(BINS) * a.niah_per_bin
    timings = {}
    for workers, compress in [(1, True), (a.workers, True), (a.workers, False)]:
        out = tmp / f"tokens_w{workers}_{'deflate' if compress else 'stored'}"
        gc.collect()
        reset_peak_rss()
        start = rss_bytes()
        _, t = _timed(
            lambda out=out, w=workers, c=compress: niah_tokens.generate_niah_tokens(
                pieces, out, bins=BINS, n_train=a.niah_per_bin, n_val=0, n_test=0, seed=SEED,
                workers=w, compress=c,
            )
        )  # fmt: skip
        timings[(workers, compress)] = t
        shards = token_shards.find_shards(out)
        rep.add("niah_build", {
            "path": "tokens" + ("" if compress else " (stored)"), "workers": workers,
            "records": n, "seconds": t, "records_per_s": n / t,
            "bytes_per_record": _size(shards) / n,
            "peak_rss_growth_mib": (peak_rss_bytes() - start) / MiB,
            "worker_peak_rss_mib": worker_mib if workers > 1 else None,
        })  # fmt: skip
        if (workers, compress) != (1, True):  # the 1-worker shards are read back later
            shutil.rmtree(out)
    return {"t_draw": t_draw, "timings": timings, "n": n}


def niah_text_path(rep, a, tok, config, tmp: Path) -> dict:
    from hyperlora_jax.data import niah, pipeline, storage
    from hyperlora_jax.eval.trackers import peak_rss_bytes, reset_peak_rss, rss_bytes

    n = len(BINS) * a.text_per_bin
    gc.collect()
    reset_peak_rss()
    start = rss_bytes()
    only_train = dict(bins=BINS, n_train=a.text_per_bin, n_val=0, n_test=0, seed=SEED)
    _, t_gen = _timed(lambda: niah.generate_niah(tok, tmp / "text", **only_train))
    peak = (peak_rss_bytes() - start) / MiB
    files = sorted((tmp / "text").rglob("train.jsonl"))
    records = [r for f in files for _, _, r in storage.iter_raw_records(
        f, errors=storage.ErrorLog("raise"))]  # fmt: skip
    t = config.train
    chunk = pipeline.ChunkConfig.for_tokenizer(
        tok,
        max_chunk_len=int(t.max_ctx_chunk_len),
        min_chunk_len=t.min_ctx_chunk_len,
        num_chunk_probs={int(k): float(v) for k, v in dict(t.num_chunk_probs).items()},
    )
    _, t_items = _timed(lambda: pipeline.build_items(
        records, lambda r, rng: pipeline.text_qa_item(r, rng, tok, chunk), seed=0))  # fmt: skip
    rate = 1 / (t_gen / n + t_items / n)
    rep.add("niah_build", {
        "path": "text: data niah (jsonl)", "workers": 1, "records": n, "seconds": t_gen,
        "records_per_s": n / t_gen, "bytes_per_record": _size(files) / n,
        "peak_rss_growth_mib": peak,
    })  # fmt: skip
    rep.add("niah_build", {
        "path": "text: + tokenize at train time", "workers": 1, "records": n,
        "seconds": t_gen + t_items, "records_per_s": rate,
    })  # fmt: skip
    return {"rate": rate, "files": files, "n": n}


def extrapolate(rep, a, tokens: dict, text: dict) -> None:
    n_tok, t_draw = tokens["n"], tokens["t_draw"]
    t1, tw = tokens["timings"][(1, True)], tokens["timings"][(a.workers, True)]
    build_per_record = max(t1 - t_draw, 0.0) / n_tok  # one worker, after the draws
    overhead = max(tw - t_draw - build_per_record * n_tok / a.workers, 0.0)
    n, c = a.target_records, a.target_cores
    draw, build = n * t_draw / n_tok, n * build_per_record
    est = draw + build / c + overhead
    rep.add("extrapolation", {
        "records": n, "cores": c, "serial_draw_s": draw, "build_core_s": build,
        "overhead_s": overhead, "token_path_s": est, "text_path_s_1_core": n / text["rate"],
    })  # fmt: skip
    rep.extra["extrapolation"] = (
        f"{n:,} NIAH records on {c} cores: {est:.1f} s = serial draws {draw:.1f} s + shard "
        f"building {build:.1f} core-s / {c} + {overhead:.1f} s the {a.workers}-worker run spent "
        "beyond draws + building / workers (pool start; CPU contention here), at this machine's "
        f"per-core speed. Today's text path: {n / text['rate'] / 60:.0f} min on one core."
    )


def train_read(rep, tmp: Path, tok, config, parts, tokens: dict, text: dict) -> None:
    from hyperlora_jax.data import feeds

    shard_dirs = [str(f) for f in sorted((tmp / "tokens_w1_deflate").glob("*/train"))]
    text_paths = [str(f) for f in text["files"]]
    for name, paths, tkn, n in (("tokens", shard_dirs, None, tokens["n"]),
                                ("text", text_paths, tok, text["n"])):  # fmt: skip
        make = lambda paths=paths, tkn=tkn: feeds.d2l_data(config, parts, paths, SEED, tkn)  # noqa: E731
        it, t_init = _timed(make)
        _, t_rows = _timed(lambda it=it: list(itertools.islice(it, 50)))
        del it
        gc.collect()
        tracemalloc.start()  # slows allocation: timed apart
        it = make()
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del it
        rep.add("train_read", {
            "data": name, "records": n, "init_s": t_init, "records_per_s_init": n / t_init,
            "rows_per_s": 50 * parts.hp.global_batch / t_rows, "held_mib": held / MiB,
            "held_bytes_per_record": held / n, "peak_mib": peak / MiB,
        })  # fmt: skip


def fact_documents(rep, a, tok, tmp: Path) -> None:
    from hyperlora_jax.data import facts, pipeline, storage, token_shards
    from hyperlora_jax.data.prompts import QA_INSTRUCTION

    rows = facts.training_records(facts.generate_fact_documents(a.facts, "train", 0), 0,
                                  QA_INSTRUCTION, 3)  # fmt: skip
    storage.write_records(tmp / "facts.jsonl", rows)
    n = min(len(rows), 1000)
    no_chunks = pipeline.ChunkConfig()
    _, t_per = _timed(lambda: [pipeline.text_qa_item(r, None, tok, no_chunks) for r in rows[:n]], 2)
    _, t_batch = _timed(lambda: pipeline.text_qa_tokens(rows[:n], tok), 2)
    written, t_shards = _timed(lambda: token_shards.write_text_qa_shards(
        rows, tok, tmp / "facts", meta={"source": "facts"}))  # fmt: skip
    for path, count, t, size in (
        ("per record (text_qa_item)", n, t_per, _size([tmp / "facts.jsonl"]) / len(rows)),
        ("batched (text_qa_tokens)", n, t_batch, None),
        ("batched -> token shards", len(rows), t_shards, written["bytes"] / len(rows)),
    ):
        rep.add("facts", {"path": path, "records": count, "records_per_s": count / t,
                          "bytes_per_record": size})  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokenizer", default=None, help="default: smollm2-135m-instruct")
    p.add_argument("--niah-per-bin", type=int, default=320_000)
    p.add_argument("--text-per-bin", type=int, default=2_000, help="text-path NIAH records/bin")
    p.add_argument("--facts", type=int, default=5_000, help="fact documents")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--target-records", type=int, default=640_000)
    p.add_argument("--target-cores", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.quick:
        a.tokenizer, a.niah_per_bin, a.text_per_bin, a.facts = str(TINY), 500, 100, 100

    # imported here, not at the top: the spawned shard workers re-import this module
    from benchmarks import harness
    from hyperlora_jax.models.load import load_base_tokenizer
    from hyperlora_jax.train import build

    peaks = harness.measure_peaks(quick=True)
    a.tokenizer = a.tokenizer or "smollm2-135m-instruct"
    tok = load_base_tokenizer(a.tokenizer)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    rep = harness.Report(
        "data_throughput",
        peaks,
        "quick" if a.quick else "full",
        notes=f"tokenizer {Path(a.tokenizer).name}; NIAH bins {BINS}; load average at start "
        f"{load} on {os.cpu_count()} cores (shared with other jobs: rates are lower bounds). "
        "Records/s count training records; bytes/record are on disk; the fact rates are the "
        "best of 2.",
    )
    config = _config()
    parts = build.experiment(config)
    tmp = Path(tempfile.mkdtemp(prefix="data_throughput_"))
    try:
        fact_documents(rep, a, tok, tmp)
        tokens = niah_token_path(rep, a, tok, tmp)
        text = niah_text_path(rep, a, tok, config, tmp)
        extrapolate(rep, a, tokens, text)
        train_read(rep, tmp, tok, config, parts, tokens, text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep.write(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

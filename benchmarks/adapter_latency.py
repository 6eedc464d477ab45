"""Adapter generation latency and peak memory.

D2L: internalize a document of N tokens (chunked at 1024 by the official rule), batched (all
chunks in one program, Perceiver over all layers at once) vs iterative (chunk by chunk, Perceiver
layer by layer), for a hypernetwork shape on a base shape, random weights. T2L: adapters for 64
descriptions (official L head, q/v, r 8, embeddings given directly).

  python -m benchmarks.adapter_latency --quick                  # smoke (tiny shapes), ~1 min
  python -m benchmarks.adapter_latency                          # SmolLM2: official + cpu_default
      hypernets, 256/1024/4096 tokens; about 15 min on 2 CPU cores
  python -m benchmarks.adapter_latency --base gemma2_2b --hypernet official \\
      --lengths 256,1024,4096,16384,32768 --dtype bfloat16      # full size (GPU)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, setups
from hyperlora_jax.hypernet.d2l import api as dl
from hyperlora_jax.hypernet.d2l.model import bias_lora, count_params, init_params
from hyperlora_jax.models import transformer

OFFICIAL = {  # reference/official-cpu-timings.md, SmolLM2 + official main architecture, 2 cores
    (256, "batched"): 2.92, (256, "iterative"): 2.37,
    (1024, "batched"): 12.8, (1024, "iterative"): 10.4,
    (4096, "batched"): 59.7, (4096, "iterative"): 32.0,
}  # fmt: skip


def make_internalize(hp, base_params, cfg, base_cfg, dtype):
    bias = bias_lora(hp, cfg)

    def batched(chunks):
        tokens, mask = dl.pad_chunks(chunks, multiple=32)
        a, b = dl.chunk_loras(hp, base_params, jnp.asarray(tokens), jnp.asarray(mask), config=cfg,
                              ctx_config=base_cfg, iterative=False, dtype=dtype)  # fmt: skip
        return dl.compose(a, b, [len(chunks)], cfg.lora_alpha, bias)

    def iterative(chunks):
        parts = []
        for c in chunks:
            tokens, mask = dl.pad_chunks([c], multiple=32)
            parts.append(
                dl.chunk_loras(hp, base_params, jnp.asarray(tokens), jnp.asarray(mask), config=cfg,
                               ctx_config=base_cfg, iterative=True, dtype=dtype)
            )  # fmt: skip
        a = {m: jnp.concatenate([p[0][m] for p in parts]) for m in parts[0][0]}
        b = {m: jnp.concatenate([p[1][m] for p in parts]) for m in parts[0][1]}
        return dl.compose(a, b, [len(chunks)], cfg.lora_alpha, bias)

    return {"batched": batched, "iterative": iterative}


def bench_d2l(rep, base_name, hyper_names, lengths, modes, dtype, repeats, chunk=1024):
    base_cfg = setups.base_config(base_name)
    t0 = time.perf_counter()
    base_params = transformer.init_params(base_cfg, jax.random.key(0), dtype)
    rep.extra[f"{base_name}_init_s"] = round(time.perf_counter() - t0, 2)
    for hname in hyper_names:
        cfg = setups.d2l_config(hname, base_cfg)
        hp = init_params(cfg, jax.random.key(1))
        fns = make_internalize(hp, base_params, cfg, base_cfg, dtype)
        n_params = count_params(cfg)
        for n in lengths:
            chunks = setups.document_chunks(n, base_cfg.vocab_size, chunk)
            for mode in modes:
                fn = lambda f=fns[mode], c=chunks: f(c)  # noqa: E731
                t_first = time.perf_counter()
                ad = jax.block_until_ready(fn())
                first = time.perf_counter() - t_first
                mem = harness.peak_memory_of(fn)
                tm = harness.timeit(fn, warmup=0, repeats=repeats)
                row = {
                    "base": base_name, "hypernet": hname, "hyper_params": n_params,
                    "doc_tokens": n, "chunks": len(chunks), "mode": mode,
                    "first_call_s": first, "median_s": tm["median_s"], "min_s": tm["min_s"],
                    "peak_mem_mib": mem["bytes"] / harness.MiB, "mem_kind": mem["kind"],
                    "adapter_mib": harness.tree_bytes(ad) / harness.MiB,
                }  # fmt: skip
                off = (
                    OFFICIAL.get((n, mode))
                    if (base_name, hname) == ("smollm2", "official")
                    else None
                )
                if off:
                    row["official_s"] = off
                    row["ratio_vs_official"] = tm["median_s"] / off
                rep.add("d2l_internalize", row)
                del ad


def bench_t2l(rep, base_name, n_desc, repeats):
    from hyperlora_jax.hypernet.t2l.model import generate_adapter
    from hyperlora_jax.hypernet.t2l.model import init_params as t2l_init

    cfg = setups.t2l_config(setups.base_config(base_name))
    params = t2l_init(cfg, jax.random.key(0))
    embs = jnp.asarray(np.random.default_rng(0).normal(size=(n_desc, 1024)), jnp.float32)
    fn = jax.jit(lambda p, e: generate_adapter(cfg, p, e))
    tm = harness.timeit(lambda: fn(params, embs), warmup=1, repeats=repeats)
    mem = harness.peak_memory_of(lambda: fn(params, embs))
    row = {"base": base_name, "descriptions": n_desc, "median_s": tm["median_s"],
           "min_s": tm["min_s"], "peak_mem_mib": mem["bytes"] / harness.MiB}  # fmt: skip
    if base_name == "smollm2" and n_desc == 64:
        row["official_s"] = 0.33
        row["ratio_vs_official"] = tm["median_s"] / 0.33
    rep.add("t2l_generate", row)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, smoke test")
    p.add_argument("--base", default="smollm2", choices=sorted(setups.BASES))
    p.add_argument("--hypernet", default="official,cpu_default")
    p.add_argument("--lengths", default="256,1024,4096")
    p.add_argument("--modes", default="batched,iterative")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk", type=int, default=1024, help="official NIAH eval chunk size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--t2l-descriptions", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.quick:
        a.base, a.hypernet, a.lengths, a.repeats = "tiny", "tiny", "300", 1
        a.chunk, a.t2l_descriptions = 128, 8
    peaks = harness.measure_peaks(a.quick)
    rep = harness.Report("adapter_latency", peaks, "quick" if a.quick else "full",
                         notes=f"base={a.base}, dtype={a.dtype}; random weights; compile excluded "
                               "from median_s (first_call_s includes it).")  # fmt: skip
    modes = [m for m in a.modes.split(",") if m]
    bench_d2l(rep, a.base, a.hypernet.split(","), [int(x) for x in a.lengths.split(",")], modes,
              jnp.dtype(a.dtype), a.repeats, a.chunk)  # fmt: skip
    bench_t2l(rep, a.base, a.t2l_descriptions, max(a.repeats, 3))
    rep.write(a.out)
    plot(rep.tables, a.out)
    return 0


def plot(tables: dict, out) -> None:
    """adapter_latency_s.png / adapter_latency_mem.png: time and peak memory vs document length."""
    from hyperlora_jax.eval.plots import line_plot

    rows = tables.get("d2l_internalize", [])
    for key, ylabel, suffix in (("median_s", "seconds", "s"), ("peak_mem_mib", "peak MiB", "mem")):
        series: dict = {}
        for r in rows:
            xs, ys = series.setdefault(f"{r['hypernet']} {r['mode']}", ([], []))
            xs.append(r["doc_tokens"])
            ys.append(r[key])
        path = Path(out) / f"adapter_latency_{suffix}.png"
        line_plot(series, path, "document tokens", ylabel, f"D2L internalize: {ylabel} vs length")


if __name__ == "__main__":
    raise SystemExit(main())

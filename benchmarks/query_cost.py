"""Per-query cost: internalize a document once and ask N questions with the adapter, vs putting
the document in the prompt of every question (re-prefilled each time, as the official baseline).

Queries: a 32-token question, 32 new tokens, greedy (stop tokens disabled so every run decodes
exactly 32). Reports latency per query, KV-cache bytes of the in-prompt document vs adapter
bytes, the transient memory (peak RSS growth) of internalizing and of one in-prompt query, and
the crossover N above which internalizing is cheaper:
    N* = t_internalize / (t_query_in_prompt - t_query_adapter).
Precision: --precision auto runs internalize and the queries in the policies measured fastest
for each (hyperlora_jax.precision.DEFAULTS: bf16 and bf16-prefill). The in-prompt baseline is
skipped for documents past the base model's window (SmolLM2: 8,192 tokens); internalizing has no
such limit.

  python -m benchmarks.query_cost --quick      # smoke
  python -m benchmarks.query_cost              # SmolLM2 shape, cpu_default hypernet, 256 to
      16,384 tokens; ~15 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import numpy as np

from benchmarks import harness, setups
from benchmarks.adapter_latency import make_internalize
from hyperlora_jax.eval.qa import kv_cache_bytes
from hyperlora_jax.hypernet.d2l.model import init_params
from hyperlora_jax.models import decoding, transformer
from hyperlora_jax.precision import get_precision

OFFICIAL = {"query_adapter_s": 2.36, "query_base_s": 2.11, "query_in_prompt_4096_eager_s": 53.1,
            "query_in_prompt_4096_sdpa_s": 14.2}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--base", default="smollm2", choices=sorted(setups.BASES))
    p.add_argument("--hypernet", default="cpu_default", choices=sorted(setups.HYPERNETS))
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192,16384")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto", help="a hyperlora_jax.precision policy or auto")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.quick:
        a.base, a.hypernet, a.lengths, a.repeats = "tiny", "tiny", "256", 1
        a.question_tokens, a.new_tokens = 8, 4
    pol_int, pol_gen = get_precision(a.precision, "internalize"), get_precision(a.precision)
    peaks = harness.measure_peaks(a.quick)
    rep = harness.Report(
        "query_cost", peaks, "quick" if a.quick else "full",
        notes=f"base={a.base} (random weights), hypernet={a.hypernet}; internalize in "
        f"{pol_int.name}, queries in {pol_gen.name}; {a.question_tokens}-token question, "
        f"{a.new_tokens} new tokens greedy; in-prompt baseline re-prefills the document for every "
        "query (no prefix cache), as the official baseline does; *_peak_mib: peak RSS growth "
        "during one call (warm). Empty in-prompt cells: the document is past the window.",
    )  # fmt: skip
    cfg_b = setups.base_config(a.base)
    params = transformer.init_params(cfg_b, jax.random.key(0))
    hcfg = setups.d2l_config(a.hypernet, cfg_b)
    hp = init_params(hcfg, jax.random.key(1))
    internalize = make_internalize(
        pol_int.cast_params(hp), pol_int.cast_params(params), hcfg, cfg_b, pol_int.compute
    )["batched"]
    params = pol_gen.cast_params(params)
    rng = np.random.default_rng(0)
    question = rng.integers(3, cfg_b.vocab_size, a.question_tokens).tolist()

    def ask(prompt, adapter):
        return decoding.generate(params, cfg_b, [prompt], adapter=adapter, stop_ids=(),
                                 max_new_tokens=a.new_tokens,
                                 precision=pol_gen).tokens  # fmt: skip

    base_q = harness.timeit(lambda: ask(question, None), warmup=1, repeats=a.repeats)["median_s"]
    for n in [int(x) for x in a.lengths.split(",")]:
        chunks = setups.document_chunks(n, cfg_b.vocab_size)
        t_int = harness.timeit(lambda c=chunks: internalize(c), warmup=1, repeats=a.repeats)
        mem_int = harness.peak_memory_of(lambda c=chunks: internalize(c))["bytes"]
        ad = internalize(chunks)
        t_ad = harness.timeit(lambda x=ad: ask(question, x), warmup=1, repeats=a.repeats)
        doc = [t for c in chunks for t in c][:n]
        t_ctx = mem_ctx = cross = None
        if n + a.question_tokens + a.new_tokens <= cfg_b.max_position_embeddings:
            t_ctx = harness.timeit(lambda d=doc: ask(d + question, None), warmup=1,
                                   repeats=a.repeats)["median_s"]  # fmt: skip
            mem_ctx = harness.peak_memory_of(lambda d=doc: ask(d + question, None))["bytes"]
            gap = t_ctx - t_ad["median_s"]
            cross = math.ceil(t_int["median_s"] / gap) if gap > 0 else None
        mib = lambda b: None if b is None else b / harness.MiB  # noqa: E731
        rep.add("per_query", {
            "doc_tokens": n, "chunks": len(chunks),
            "internalize_s": t_int["median_s"], "query_adapter_s": t_ad["median_s"],
            "query_base_s": base_q, "query_in_prompt_s": t_ctx,
            "in_prompt_over_adapter": t_ctx and t_ctx / t_ad["median_s"],
            "adapter_overhead_pct": 100 * (t_ad["median_s"] / base_q - 1),
            "crossover_N": cross,
            "internalize_peak_mib": mib(mem_int), "in_prompt_peak_mib": mib(mem_ctx),
            "kv_cache_mib": kv_cache_bytes(cfg_b, n + a.question_tokens + a.new_tokens,
                                           pol_gen.decode_dtype) / harness.MiB,
            "adapter_mib": harness.tree_bytes(ad) / harness.MiB,
        })  # fmt: skip
        for n_q in (1, 10, 100):
            rep.add("total_cost_for_N_queries", {
                "doc_tokens": n, "N": n_q,
                "internalize_once_s": t_int["median_s"] + n_q * t_ad["median_s"],
                "in_prompt_s": t_ctx and n_q * t_ctx,
            })  # fmt: skip
    rep.extra["official_smollm2_2core"] = OFFICIAL
    rep.write(a.out)
    plot(rep.tables, a.out)
    return 0


def plot(tables: dict, out) -> None:
    """query_cost_s.png (seconds vs document length) and query_cost_mem.png (memory)."""
    from hyperlora_jax.eval.plots import line_plot

    rows = tables.get("per_query", [])

    def col(k):  # (x, y) where the row has a value
        pts = [(r["doc_tokens"], r[k]) for r in rows if r.get(k) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    series = {
        "query, document in prompt": col("query_in_prompt_s"),
        "query, internalized (adapter)": col("query_adapter_s"),
        "internalize once": col("internalize_s"),
    }
    line_plot(
        series, Path(out) / "query_cost_s.png", "document tokens", "seconds",
        "Document in the prompt vs internalized: time",
    )  # fmt: skip
    line_plot(
        {"in-prompt query, peak growth": col("in_prompt_peak_mib"),
         "internalize, peak growth": col("internalize_peak_mib"),
         "KV cache of the document": col("kv_cache_mib"), "adapter": col("adapter_mib")},
        Path(out) / "query_cost_mem.png", "document tokens", "MiB",
        "Document in the prompt vs internalized: memory",
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-query cost: internalize a document once and ask N questions with the adapter, vs putting
the document in the prompt of every question (re-prefilled each time, as the official baseline).

Queries: a 32-token question, 32 new tokens, greedy (stop tokens disabled so every run decodes
exactly 32). Reports latency per query, KV-cache bytes of the in-prompt document vs adapter
bytes, and the crossover N above which internalizing is cheaper:
    N* = t_internalize / (t_query_in_prompt - t_query_adapter).

  python -m benchmarks.query_cost --quick      # smoke
  python -m benchmarks.query_cost              # SmolLM2 shape, cpu_default hypernet,
      1K/2K/4K tokens (add --lengths ...,8192,16384 for the long end); ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, setups
from benchmarks.adapter_latency import make_internalize
from hyperlora_jax.eval.qa import kv_cache_bytes
from hyperlora_jax.hypernet.d2l.model import init_params
from hyperlora_jax.models import decoding, transformer

OFFICIAL = {"query_adapter_s": 2.36, "query_base_s": 2.11, "query_in_prompt_4096_eager_s": 53.1,
            "query_in_prompt_4096_sdpa_s": 14.2}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--base", default="smollm2", choices=sorted(setups.BASES))
    p.add_argument("--hypernet", default="cpu_default", choices=sorted(setups.HYPERNETS))
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.quick:
        a.base, a.hypernet, a.lengths, a.repeats = "tiny", "tiny", "256", 1
        a.question_tokens, a.new_tokens = 8, 4
    dtype = jnp.dtype(a.dtype)
    peaks = harness.measure_peaks(a.quick)
    rep = harness.Report(
        "query_cost", peaks, "quick" if a.quick else "full",
        notes=f"base={a.base} (random weights), hypernet={a.hypernet}; {a.question_tokens}-token "
        f"question, {a.new_tokens} new tokens greedy; in-prompt baseline re-prefills the document "
        "for every query (no prefix cache), as the official baseline does.",
    )  # fmt: skip
    cfg_b = setups.base_config(a.base)
    params = transformer.init_params(cfg_b, jax.random.key(0), dtype)
    hcfg = setups.d2l_config(a.hypernet, cfg_b)
    hp = init_params(hcfg, jax.random.key(1))
    internalize = make_internalize(hp, params, hcfg, cfg_b, dtype)["batched"]
    rng = np.random.default_rng(0)
    question = rng.integers(3, cfg_b.vocab_size, a.question_tokens).tolist()

    def ask(prompt, adapter):
        return decoding.generate(params, cfg_b, [prompt], adapter=adapter, stop_ids=(),
                                 max_new_tokens=a.new_tokens, dtype=dtype).tokens  # fmt: skip

    base_q = harness.timeit(lambda: ask(question, None), warmup=1, repeats=a.repeats)["median_s"]
    for n in [int(x) for x in a.lengths.split(",")]:
        chunks = setups.document_chunks(n, cfg_b.vocab_size)
        t_int = harness.timeit(lambda c=chunks: internalize(c), warmup=1, repeats=a.repeats)
        ad = internalize(chunks)
        t_ad = harness.timeit(lambda x=ad: ask(question, x), warmup=1, repeats=a.repeats)
        doc = [t for c in chunks for t in c][:n]
        t_ctx = harness.timeit(lambda d=doc: ask(d + question, None), warmup=1, repeats=a.repeats)
        gap = t_ctx["median_s"] - t_ad["median_s"]
        cross = math.ceil(t_int["median_s"] / gap) if gap > 0 else None
        rep.add("per_query", {
            "doc_tokens": n, "chunks": len(chunks),
            "internalize_s": t_int["median_s"], "query_adapter_s": t_ad["median_s"],
            "query_base_s": base_q, "query_in_prompt_s": t_ctx["median_s"],
            "in_prompt_over_adapter": t_ctx["median_s"] / t_ad["median_s"],
            "adapter_overhead_pct": 100 * (t_ad["median_s"] / base_q - 1),
            "crossover_N": cross,
            "kv_cache_mib": kv_cache_bytes(cfg_b, n + a.question_tokens + a.new_tokens, dtype)
            / harness.MiB,
            "adapter_mib": harness.tree_bytes(ad) / harness.MiB,
        })  # fmt: skip
        for n_q in (1, 10, 100):
            rep.add("total_cost_for_N_queries", {
                "doc_tokens": n, "N": n_q,
                "internalize_once_s": t_int["median_s"] + n_q * t_ad["median_s"],
                "in_prompt_s": n_q * t_ctx["median_s"],
            })  # fmt: skip
    rep.extra["official_smollm2_2core"] = OFFICIAL
    rep.write(a.out)
    plot(rep.tables, a.out)
    return 0


def plot(tables: dict, out) -> None:
    """query_cost_s.png (seconds per query) and query_cost_mem.png (KV cache vs adapter)."""
    from hyperlora_jax.eval.plots import line_plot

    rows = tables.get("per_query", [])
    x = [r["doc_tokens"] for r in rows]
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    series = {
        "document in prompt": (x, col("query_in_prompt_s")),
        "internalized (adapter)": (x, col("query_adapter_s")),
    }
    line_plot(
        series, Path(out) / "query_cost_s.png", "document tokens", "seconds per query",
        "Per-query latency: document in the prompt vs internalized",
    )  # fmt: skip
    line_plot(
        {"KV cache of the document": (x, col("kv_cache_mib")), "adapter": (x, col("adapter_mib"))},
        Path(out) / "query_cost_mem.png", "document tokens", "MiB",
        "Memory per document: KV cache vs adapter",
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

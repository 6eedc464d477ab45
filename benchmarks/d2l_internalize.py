"""D2L internalize latency and peak memory: batched vs iterative Perceiver, one subprocess each.

SmolLM2-135M-Instruct shape (random base weights), configs/d2l.py:smollm2_qa hypernetwork,
a 4096-token document split by the official rule. Peak memory = the subprocess's ru_maxrss.
Mode "floor" runs only the frozen context encoder (the base model's first L-1 layers) over the
same padded chunks: the part no hypernetwork change can remove. CPU time is user+sys of all
threads (robust on a shared machine); wall time is the best of --repeats.

  python benchmarks/d2l_internalize.py [--tokens 4096] [--chunk-size 1024] [--dtype float32]
      [--modes batched,iterative,floor] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(mode: str, n_tokens: int, chunk_size: int, repeats: int, dtype: str) -> dict:
    import importlib.util

    import jax
    import jax.numpy as jnp
    import numpy as np

    from hyperlora_jax.hypernet.d2l.api import DocToLoRA
    from hyperlora_jax.hypernet.d2l.model import configs_from_experiment, count_params, init_params
    from hyperlora_jax.models import transformer
    from hyperlora_jax.models.chat import split_ctx_ids

    spec = importlib.util.spec_from_file_location("d2l_cfg", ROOT / "configs" / "d2l.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base_cfg, cfg = configs_from_experiment(mod.get_config("smollm2_qa"))
    base = jax.jit(transformer.init_params, static_argnums=0)(base_cfg, jax.random.key(0))
    hyper = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))
    jax.block_until_ready((base, hyper))
    rss_setup = _rss_mb()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, base_cfg.vocab_size, n_tokens).tolist()
    prefix, suffix = [1, 9, 13, 2, 13, 1, 4093, 13], [2, 13, 1, 520, 13]  # ChatML-like affixes
    chunks = split_ctx_ids(ids, chunk_size, prefix, suffix)
    d2l = DocToLoRA(cfg, hyper, base, base_cfg, dtype=jnp.dtype(dtype))
    if mode == "floor":
        from hyperlora_jax.hypernet.d2l.api import pad_chunks
        from hyperlora_jax.hypernet.d2l.model import context_features

        tok, msk = (jnp.asarray(x) for x in pad_chunks(chunks, multiple=d2l.pad_multiple))
        enc = jax.jit(
            lambda p, t, m: context_features(p, base_cfg, cfg, t, m, dtype=jnp.dtype(dtype))
        )

        def run():
            return enc(base, tok, msk)
    else:

        def run():
            return d2l.internalize_chunks([chunks], iterative=(mode == "iterative"))

    t0 = time.perf_counter()
    ad = run()
    jax.block_until_ready(ad)
    first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_s()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
    return {
        "mode": mode,
        "dtype": dtype,
        "doc_tokens": n_tokens,
        "chunk_size": chunk_size,
        "n_chunks": len(chunks),
        "chunk_len_max": max(len(c) for c in chunks),
        "padded_len": -(-max(len(c) for c in chunks) // d2l.pad_multiple) * d2l.pad_multiple,
        "adapter_rank": None if mode == "floor" else ad.rank,
        "hypernet_params": count_params(cfg),
        "first_call_s": round(first, 2),
        "steady_s": round(min(times), 3) if times else None,
        "steady_cpu_s": round(min(cpu), 2) if cpu else None,  # user+sys, all threads
        "rss_after_setup_mb": round(rss_setup, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "backend": jax.default_backend(),
        "a_abs_sum": None if mode == "floor" else float(jnp.abs(ad.a["down_proj"]).sum()),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--modes", default="batched,iterative,floor")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.tokens, a.chunk_size, a.repeats, a.dtype)))
        return 0
    results = []
    for mode in a.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--tokens",
            str(a.tokens),
            "--chunk-size",
            str(a.chunk_size),
            "--repeats",
            str(a.repeats),
            "--dtype",
            a.dtype,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

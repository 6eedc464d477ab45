"""Meta-training step time, tokens/s and achieved FLOP/s as a fraction of the measured matmul peak.

D2L (reference/official-cpu-timings.md): one packed row = 512-token context + 128-token QA
(32 prompt + 96 response tokens), random top-16 teacher log-probs, loss = top-16 KL + 0.1 L1,
NEFTune 5, clip 1.0, AdamW lr 4e-5 wd 0.01 (official exclusions). T2L SFT: 8 examples x 128
tokens (first 64 masked), CE with label smoothing 0.1 + 1e-3 L2, NEFTune 5, AdamW lr 2.5e-5.
FLOPs per step are the step's matmul FLOPs counted from its jaxpr (hyperlora_jax/train/flops.py;
XLA's cost analysis counts the scanned layers once).

  python -m benchmarks.train_throughput --quick   # smoke
  python -m benchmarks.train_throughput           # SmolLM2: D2L official + cpu_default, T2L;
      and the D2L NIAH step; about 14 min on 2 CPU cores
  python -m benchmarks.train_throughput --base gemma2_2b --dtype bfloat16 --d2l-hypernet official
      # full size (GPU)
  python -m benchmarks.train_throughput --skip d2l,t2l --out DIR   # only the NIAH step (~5 min)

D2L NIAH (table d2l_niah): the training step of configs/d2l.py:smollm2_embedded (real
SmolLM2-135M-Instruct weights when the model folder is present, random ones otherwise) on packed
rows of NIAH-like samples: a context of 32-256 tokens chunked as in training (1-8 chunks of >= 25
tokens), one 45-token query whose last 5 tokens are the labels. Reports matmul FLOPs per sample
(context), split by where they run, and contexts per minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, setups
from hyperlora_jax.data import feeds, packing
from hyperlora_jax.hypernet.d2l.model import init_params as d2l_init
from hyperlora_jax.models import transformer
from hyperlora_jax.models.fetch import cache_dir
from hyperlora_jax.train import build, optim
from hyperlora_jax.train.d2l_loss import d2l_count, make_d2l_loss
from hyperlora_jax.train.flops import count_flops, count_flops_by_scope
from hyperlora_jax.train.t2l_loss import make_t2l_sft_loss, t2l_count
from hyperlora_jax.train.update import TrainState, make_train_step

OFFICIAL = {"d2l_step_s": 12.6, "t2l_step_s": 7.04}


def d2l_batch(cfg_b, ctx_len, prompt_len, resp_len, seed=0):
    rng = np.random.default_rng(seed)
    v = cfg_b.vocab_size
    ids = rng.integers(3, v, prompt_len + resp_len).tolist()
    labels = [-100] * prompt_len + ids[prompt_len:]
    lp = np.log(np.sort(rng.dirichlet(np.ones(16), resp_len), axis=-1)[:, ::-1] * 0.9)
    item = {
        "ctx_chunks": [rng.integers(3, v, ctx_len).tolist()],
        "input_ids": [ids], "labels": [labels],
        "logprobs_vals": [lp.astype(np.float32)],
        "logprobs_indices": [rng.integers(0, v, (resp_len, 16)).astype(np.int32)],
    }  # fmt: skip
    pc = packing.PackConfig(max_inp_len=prompt_len + resp_len, max_ctx_len=ctx_len,
                            max_contexts=1, max_chunks=1, max_qas=1, top_k=16)  # fmt: skip
    row = packing.pack_row([item], pc)
    return {k: jnp.asarray(x[None]) for k, x in row.items()}


def run_step(rep, name, loss_fn, count_fn, params, base_params, batch, tx, tokens, peak, repeats,
             official=None):  # fmt: skip
    state = TrainState.create(params, tx)
    step_fn = make_train_step(loss_fn, tx, count_fn)
    flops = count_flops(step_fn, state, base_params, batch)
    step = jax.jit(step_fn)
    holder = {"s": state}

    def one():
        holder["s"], m = step(holder["s"], base_params, batch)
        return m["loss"]

    first = harness.timeit(one, warmup=0, repeats=1)["median_s"]
    mem = harness.peak_memory_of(one)
    tm = harness.timeit(one, warmup=0, repeats=repeats)
    row = {
        "step": name, "first_step_s": first, "median_s": tm["median_s"],
        "tokens_per_step": tokens, "tokens_per_s": tokens / tm["median_s"],
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / tm["median_s"] / 1e9,
        "frac_of_peak": flops / tm["median_s"] / peak,
        "peak_mem_mib": mem["bytes"] / harness.MiB,
        "loss": float(one()),
    }  # fmt: skip
    if official:
        row["official_s"] = official
        row["ratio_vs_official"] = tm["median_s"] / official
    rep.add("train_step", row)


# ----------------------------------------------------------------------------- D2L NIAH step
ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = cache_dir() / "models" / "smollm2-135m-instruct"  # used if already fetched
# Where a step's matmul FLOPs run, by the name stack of each matmul (first match wins; the LM
# head sits inside the student's scope, so it is matched first). Anything else is "rest".
FLOP_PARTS = (
    ("lm_head", "lm_head"),
    ("context_encoder", "context_encoder"),
    ("perceiver_projection", "modality_projection"),
    ("perceiver_resampler", "aggregator"),
    ("student_bwd", "transpose(jvp(student"),
    ("student_fwd", "student"),
)


def flop_parts(by_scope: dict[str, float]) -> dict[str, float]:
    """count_flops_by_scope output -> FLOPs per FLOP_PARTS entry (+ "rest")."""
    out = dict.fromkeys([name for name, _ in FLOP_PARTS] + ["rest"], 0.0)
    for scope, f in by_scope.items():
        name = next((n for n, key in FLOP_PARTS if key in scope), "rest")
        out[name] += f
    return out


def d2l_preset(name: str):
    spec = importlib.util.spec_from_file_location("_d2l_presets", ROOT / "configs" / "d2l.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(name)


def niah_batch(pc, rows: int, vocab: int, *, ctx_tokens=(32, 256), query_len=45, label_len=5,
               max_chunk_len=256, min_chunk_len=25, affix=(8, 6), seed=0):  # fmt: skip
    """`rows` full packed rows of NIAH-like samples in the row shapes of pc (a PackConfig).

    Sample: a templated context of ctx_tokens random ids (affix = chat prefix/suffix lengths),
    chunked like NIAH training (official 1-8 chunk distribution, chunks of min..max_chunk_len
    tokens), and one query_len-token query whose last label_len tokens are the labels.
    Returns (batch [rows, ...] as jax arrays, number of contexts in it).
    """
    r, nr = random.Random(seed), np.random.default_rng(seed)
    ids = lambda n: nr.integers(3, vocab, n).tolist()  # noqa: E731
    pc = dataclasses.replace(pc, top_k=0)
    items: list[dict] = []
    while True:
        for _ in range(16 * rows):
            prefix, suffix = ids(affix[0]), ids(affix[1])
            body = ids(r.randrange(*ctx_tokens) - sum(affix))
            chunks = packing.chunk_context(
                prefix + body + suffix, max_chunk_len=max_chunk_len, prefix=prefix,
                suffix=suffix, num_chunk_probs=packing.OFFICIAL_NUM_CHUNK_PROBS,
                min_chunk_len=min_chunk_len, rng=r,
            )  # fmt: skip
            q = ids(query_len)
            labels = [-100] * (query_len - label_len) + q[-label_len:]
            items.append({"ctx_chunks": chunks, "input_ids": [q], "labels": [labels]})
        plan = packing.plan_packs([packing.item_sizes(it) for it in items], pc)
        if len(plan) > rows:  # the first `rows` packs are closed (full)
            break
    packed = [packing.pack_row([items[i] for i in p], pc) for p in plan[:rows]]
    batch = {k: jnp.asarray(np.stack([x[k] for x in packed])) for k in packed[0]}
    return batch, sum(len(p) for p in plan[:rows])


def run_niah(rep, name, config, parts, base_params, batch, contexts, peak, repeats):
    """One D2L training step (parts from build.experiment) on `batch`: FLOPs and speed/sample."""
    params = parts.init_params(jax.random.key(1))
    tx, _ = build.make_tx(config, parts, params)
    state = TrainState.create(params, tx)
    step_fn = make_train_step(parts.loss_fn, tx, parts.count_fn)
    split = flop_parts(count_flops_by_scope(step_fn, state, base_params, batch))
    flops = sum(split.values())
    step = jax.jit(step_fn)
    holder = {"s": state}

    def one():
        holder["s"], m = step(holder["s"], base_params, batch)
        return m["loss"]

    loss0 = float(one())  # compiles; the loss of the initial params, comparable across code
    tm = harness.timeit(one, warmup=0, repeats=repeats)
    row = {
        "step": name, "rows": int(batch["input_ids"].shape[0]), "contexts": contexts,
        "max_label_len": parts.hp.max_label_len or 0, "median_s": tm["median_s"],
        "contexts_per_min": contexts / tm["median_s"] * 60,
        "gflop_per_sample": flops / contexts / 1e9,
        **{f"gflop_{k}": v / contexts / 1e9 for k, v in split.items()},
        "frac_of_peak": flops / tm["median_s"] / peak, "first_loss": loss0,
    }  # fmt: skip
    rep.add("d2l_niah", row)


def d2l_niah(rep, a, peak):
    if a.quick:
        config = d2l_preset("tiny")
        config.train.loss = "ce"  # NIAH trains on the gold answer
        shapes = dict(ctx_tokens=(6, 24), query_len=12, label_len=3, max_chunk_len=12,
                      min_chunk_len=4, affix=(2, 1))  # fmt: skip
    else:
        config = d2l_preset("smollm2_embedded")
        shapes = dict(max_chunk_len=int(config.train.max_ctx_chunk_len),
                      min_chunk_len=int(config.train.min_ctx_chunk_len))  # fmt: skip
    config.train.max_label_len = a.niah_max_label_len
    parts = build.experiment(config)
    if not a.quick and SMOLLM2_DIR.is_dir():
        from hyperlora_jax.models.hf import load_hf_model

        _, base_params = load_hf_model(SMOLLM2_DIR, dtype=jnp.float32)
        weights = "SmolLM2-135M-Instruct weights"
    else:
        base_params = transformer.init_params(parts.base_cfg, jax.random.key(0))
        weights = "random base weights"
    rows = a.niah_rows or parts.hp.global_batch
    pc = feeds.d2l_feed(config, parts).pack
    batch, contexts = niah_batch(pc, rows, parts.base_cfg.vocab_size, **shapes)
    name = f"d2l_niah[{config.name}, {weights}]"
    run_niah(rep, name, config, parts, base_params, batch, contexts, peak, a.repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--base", default="smollm2", choices=sorted(setups.BASES))
    p.add_argument("--d2l-hypernet", default="official,cpu_default")
    p.add_argument("--ctx-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--resp-len", type=int, default=96)
    p.add_argument("--t2l-batch", type=int, default=8)
    p.add_argument("--t2l-len", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of d2l,t2l,niah to skip")
    p.add_argument("--niah-rows", type=int, default=0, help="rows per NIAH step (0: the preset's)")
    p.add_argument(
        "--niah-max-label-len",
        type=int,
        default=40,
        help="train.max_label_len of the NIAH step (0: LM head on every position)",
    )
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.quick:
        a.base, a.d2l_hypernet, a.ctx_len, a.prompt_len, a.resp_len = "tiny", "tiny", 64, 8, 24
        a.t2l_batch, a.t2l_len, a.repeats = 2, 32, 1
    dtype = jnp.dtype(a.dtype)
    peaks = harness.measure_peaks(a.quick)
    peak = peaks["bfloat16" if dtype == jnp.bfloat16 else "float32"]["flops_per_s"]
    rep = harness.Report(
        "train_throughput", peaks, "quick" if a.quick else "full",
        notes=f"train_step: base={a.base} (random weights), compute dtype {a.dtype}; d2l_niah: "
        "the configs/d2l.py preset and weights named in the step, gflop_* per sample (context); "
        "frac_of_peak = matmul FLOPs (jaxpr count) / median step time / measured matmul peak of "
        "that dtype.",
    )  # fmt: skip
    cfg_b = setups.base_config(a.base)
    base_params = transformer.init_params(cfg_b, jax.random.key(0), dtype)
    skip = set(a.skip.split(","))
    if "d2l" not in skip:
        batch = d2l_batch(cfg_b, a.ctx_len, a.prompt_len, a.resp_len)
        for hname in a.d2l_hypernet.split(","):
            hcfg = setups.d2l_config(hname, cfg_b)
            hp = d2l_init(hcfg, jax.random.key(1))
            loss = make_d2l_loss(hcfg, cfg_b, objective="distill", l1_coef=0.1,
                                 neftune_alpha=5.0, dtype=dtype)  # fmt: skip
            tx, _ = optim.make_optimizer(hp, lr=4e-5, total_steps=1000, weight_decay=0.01)
            official = (
                OFFICIAL["d2l_step_s"] if (a.base, hname) == ("smollm2", "official") else None
            )
            run_step(rep, f"d2l[{hname}]", loss, d2l_count, hp, base_params, batch, tx,
                     a.ctx_len + a.prompt_len + a.resp_len, peak, a.repeats, official)  # fmt: skip
    if "t2l" not in skip:
        from hyperlora_jax.hypernet.t2l.model import T2LConfig
        from hyperlora_jax.hypernet.t2l.model import init_params as t2l_init

        mods = ("q_proj", "v_proj")
        tcfg = T2LConfig(
            modules=mods, in_features=tuple(cfg_b.module_dims(m)[0] for m in mods),
            out_features=tuple(cfg_b.module_dims(m)[1] for m in mods),
            num_layers=cfg_b.num_layers, head="L", latent_size=128, head_in_size=512,
        )  # fmt: skip
        tp = t2l_init(tcfg, jax.random.key(2))
        rng = np.random.default_rng(0)
        b, t = a.t2l_batch, a.t2l_len
        tb = {
            "task_embs": jnp.asarray(rng.normal(size=(b, 1024)), jnp.float32),
            "tokens": jnp.asarray(rng.integers(3, cfg_b.vocab_size, (b, t)), jnp.int32),
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "loss_mask": jnp.asarray(np.arange(t)[None].repeat(b, 0) >= t // 2),
            "sample_valid": jnp.ones((b,), bool),
        }  # fmt: skip
        loss = make_t2l_sft_loss(tcfg, cfg_b, label_smoothing=0.1, l2_coef=1e-3,
                                 neftune_alpha=5.0, dtype=dtype)  # fmt: skip
        tx, _ = optim.make_optimizer(tp, lr=2.5e-5, total_steps=1000, weight_decay=1e-2,
                                     no_decay=optim.T2L_NO_DECAY)  # fmt: skip
        official = OFFICIAL["t2l_step_s"] if a.base == "smollm2" else None
        run_step(rep, "t2l_sft[L]", loss, t2l_count, tp, base_params, tb, tx, b * t, peak,
                 a.repeats, official)  # fmt: skip
    if "niah" not in skip:
        d2l_niah(rep, a, peak)
    rep.write(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Analytic per-device memory of one training step, and whether it fits a named chip's HBM.

XLA:CPU's compiled memory (train/plan.py) cannot size TPU/GPU HBM: its buffer assignment keeps
far more temporaries alive than the memory-aware TPU/GPU schedulers. This module counts the
step's buffers from shapes, dtypes, the sharding and the remat policy instead:

* base params, hypernet params, optimizer state, batch: the exact bytes of each argument's
  per-device shard (`NamedSharding.shard_shape`); their sum equals the compiled program's
  argument size (tests/test_train_memory.py checks it).
* gradients: the f32 gradient of the hypernet params (sharded like them), the accumulation
  buffer when grad_accum_steps > 1, and the update optax computes from them.
* activations (an estimate of the peak for one accumulation micro-batch on one device):
  - student (the base model with the generated adapters, differentiated): remat "full" /
    "nothing_saveable" keeps each layer's input and recomputes one layer at a time during the
    backward pass; no remat (or a jax.checkpoint_policies name, counted as no remat: an upper
    bound) keeps every layer's intermediates. One layer's intermediates: the normed inputs, q,
    k, v, the attention output, the MLP's gate / up / activation (compute dtype), the causal
    attention scores (f32) and probabilities (compute dtype), heads and MLP split over `tensor`.
    The LM head's f32 logits and their gradient, at max_label_len positions when set.
  - D2L context encoder (forward only, no gradient): its per-layer features [Lf, Tc, H], and
    one layer's intermediates while it runs (not alive at the same time as the student's).
  - D2L hypernetwork (not rematerialised): the Perceiver's token-wise SwiGLU input projection
    (two 4H-wide intermediates and its output per token and layer) and the gathered chunk slots
    [C, Lf, chunk, latent], kept once per encoder block (each block normalises the context).
  T2L: the student term (its trunk and heads are small MLPs); reconstruction has no base
  forward pass.
"""

from __future__ import annotations

import math

import jax
import numpy as np

GiB = 1024**3
# HBM per chip in GiB (vendor figures: TPU v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB;
# H100 SXM 80 GB, H200 141 GB).
CHIPS: dict[str, float] = {
    "v4": 32.0,
    "v5e": 16.0,
    "v5p": 95.0,
    "v6e": 32.0,
    "H100": 80.0,
    "H200": 141.0,
}
# A plan "fits" when its total is under this fraction of HBM: the runtime, XLA's scratch space
# and fragmentation take the rest.
USABLE = 0.9


def shard_bytes(tree, shardings) -> int:
    """Bytes of one device's shards of an abstract (or concrete) tree under its shardings."""
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if len(leaves) != len(shs):
        raise ValueError(f"{len(leaves)} leaves but {len(shs)} shardings")
    total = 0
    for x, s in zip(leaves, shs):
        total += math.prod(_shard_shape(x.shape, s)) * np.dtype(x.dtype).itemsize
    return int(total)


def _shard_shape(shape, sharding) -> tuple[int, ...]:
    """One device's shard shape; a dimension its mesh axes do not divide is padded (ceil), as
    XLA pads it."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    out = []
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(-(-dim // math.prod(sharding.mesh.shape[a] for a in axes)))
    return tuple(out)


def _layer_bytes(cfg, b: int, t: int, c: int, tensor: int) -> int:
    """One decoder layer's intermediates for b rows of t tokens (compute dtype c bytes)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    heads = lambda n: max(n // tensor, 1)  # noqa: E731 - heads split over the tensor axis
    per_token = 3 * h + (2 * heads(nh) + 2 * heads(nkv)) * hd + 3 * max(f // tensor, 1)
    window = min(t, cfg.sliding_window or t)
    pairs = t * (window + 1) // 2 if window == t else t * window  # causal (or windowed) pairs
    return b * t * per_token * c + b * heads(nh) * pairs * (4 + c)


def activation_terms(config, parts, mesh_shape: dict[str, int], rows: int) -> dict[str, int]:
    """Estimated peak activation bytes of one micro-batch on one device, by term."""
    hp, t = parts.hp, config.train
    cfg = parts.base_cfg
    k = max(int(t.grad_accum_steps), 1)
    batch_devices = mesh_shape["data"] * mesh_shape["fsdp"]
    b = max(math.ceil(rows / k / batch_devices), 1)  # rows per device per micro-batch
    tensor = mesh_shape["tensor"]
    c = np.dtype(hp.dtype).itemsize
    out: dict[str, int] = {}
    if hp.kind == "t2l" and hp.objective == "recon":
        return {"student": 0}
    seq = t.max_packed_inp_len if hp.kind == "d2l" else t.inp_max_len
    layer = _layer_bytes(cfg, b, seq, c, tensor)
    if hp.remat_policy in ("full", "nothing_saveable"):
        saved = cfg.num_layers * b * seq * cfg.hidden_size * c + layer
    else:
        saved = cfg.num_layers * layer
    label = hp.max_label_len or seq
    vocab = max(cfg.vocab_size // tensor, 1)
    logits = 2 * b * label * vocab * 4  # f32 logits and their gradient
    out["student"] = saved + logits
    if hp.kind != "d2l":
        return out
    from hyperlora_jax.hypernet.d2l.model import encoder_layers

    h = parts.hyper_cfg
    tc = t.max_packed_ctx_len
    enc = parts.ctx_cfg or cfg  # cross-model D2L: another model reads the context
    depth = encoder_layers(h, enc)
    lf = depth + 1 if h.layer_to_layer else 1  # feature maps per context token
    feats = b * lf * tc * enc.hidden_size * c
    encoder_working = _layer_bytes(enc, b, tc, c, tensor)
    proj = b * lf * tc * (2 * 4 * h.feature_size + h.latent_size) * c
    chunk = hp.max_chunk_len or tc
    slots = b * t.max_chunks_per_pack * lf * chunk * h.latent_size * c * (h.num_blocks + 1)
    out["context_features"] = feats
    out["hypernet"] = proj + slots
    # the encoder's working layer is gone before the student runs: count the larger of the two
    out["student"] = max(out["student"], encoder_working)
    return out


def fit_table(total_bytes: int) -> dict[str, dict]:
    """{chip: {"hbm_GiB", "used": fraction of HBM, "fits": under USABLE of HBM}}."""
    return {
        name: {
            "hbm_GiB": gib,
            "used": round(total_bytes / (gib * GiB), 3),
            "fits": total_bytes <= USABLE * gib * GiB,
        }
        for name, gib in CHIPS.items()
    }


def analytic(
    config,
    parts,
    mesh_shape: dict[str, int],
    rows: int,
    *,
    base_abs,
    base_sh,
    state_abs,
    state_sh,
    batch,
    batch_sh,
) -> dict:
    """The analytic plan: per-device bytes by term, their total and the chip fit table."""
    k = max(int(config.train.grad_accum_steps), 1)
    hyper = shard_bytes(state_abs.params, state_sh.params)
    f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), state_abs.params)
    grad = shard_bytes(f32, state_sh.params)
    scalars = shard_bytes(
        (state_abs.step, state_abs.rng, state_abs.bad_in_a_row, state_abs.bad_total),
        (state_sh.step, state_sh.rng, state_sh.bad_in_a_row, state_sh.bad_total),
    )
    terms = {
        "base_params": shard_bytes(base_abs, base_sh),
        "hypernet_params": hyper,
        "optimizer_state": shard_bytes(state_abs.opt_state, state_sh.opt_state),
        "batch": shard_bytes(batch, batch_sh),
        "step_counters": scalars,
        "gradients": grad * (3 if k > 1 else 2),
    }
    acts = activation_terms(config, parts, mesh_shape, rows)
    terms.update({f"activations_{n}": v for n, v in acts.items()})
    total = sum(terms.values())
    arguments = sum(
        terms[n]
        for n in ("base_params", "hypernet_params", "optimizer_state", "batch", "step_counters")
    )
    return {
        "bytes": terms,
        "arguments": arguments,
        "total": total,
        "fits": fit_table(total),
    }


def format_analytic(a: dict, chip: str | None = None) -> str:
    """The breakdown in GiB, then the fit per chip (or for `chip` only)."""
    g = lambda v: f"{v / GiB:.2f}"  # noqa: E731
    lines = ["  analytic per-device memory (GiB; activations estimated, see train/memory.py):"]
    for name, v in a["bytes"].items():
        lines.append(f"    {name:<30} {g(v):>8}")
    lines.append(f"    {'total':<30} {g(a['total']):>8}")
    fits = a["fits"] if chip is None else {chip: a["fits"][chip]}
    lines.append(
        f"  fits (total <= {USABLE:.0%} of HBM): "
        + ", ".join(
            f"{n} {f['hbm_GiB']:g} GiB {'yes' if f['fits'] else 'NO'} ({f['used']:.0%})"
            for n, f in fits.items()
        )
    )
    return "\n".join(lines)

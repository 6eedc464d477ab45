"""Loss terms of D2L and T2L meta-training, as pure JAX functions (f32 math whatever the inputs).

Conventions: `logits[b, t]` predicts token `t + 1`; every per-token array handed to these functions
is already aligned with the logits (see `shift_targets`). Averages are written as
`sum / num_items` with `num_items` passed in, so a gradient-accumulated step can divide by the
count of the whole accumulated batch, exactly like the official trainers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperlora_jax.lora.adapter import Adapter

f32 = jnp.float32


def shift_targets(x: jax.Array, fill=0) -> jax.Array:
    """x[:, t] -> x[:, t + 1] (the label predicted at position t), padded with `fill` at the end."""
    pad = jnp.full_like(x[:, :1], fill)
    return jnp.concatenate([x[:, 1:], pad], axis=1)


def topk_distill_ce(
    logits: jax.Array, teacher_logprobs: jax.Array, teacher_indices: jax.Array
) -> jax.Array:
    """Per-token CE from top-k teacher probs to the student's full-vocabulary softmax.

    -sum_k p_k * (z[idx_k] - logsumexp(z)), with p_k = exp(teacher_logprobs) NOT renormalised over
    the k kept tokens and no teacher entropy (official `DistillationTrainer.compute_loss`).
    logits [..., V]; teacher_* [..., K]. Returns [...] in f32.
    """
    z = logits.astype(f32)
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    sel = jnp.take_along_axis(z, teacher_indices.astype(jnp.int32), axis=-1)
    p = jnp.exp(teacher_logprobs.astype(f32))
    return -jnp.sum(p * (sel - lse), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token CE with torch's label smoothing: (1-e) * nll + e * mean_v(-log p_v). f32 [...]."""
    logp = jax.nn.log_softmax(logits.astype(f32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if not label_smoothing:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def segment_means(
    values: jax.Array, mask: jax.Array, segment_ids: jax.Array, num_segments: int
) -> tuple[jax.Array, jax.Array]:
    """Mean of `values` over the masked tokens of each segment -> (means [S], has_tokens [S])."""
    m = mask.astype(f32).reshape(-1)
    ids = segment_ids.reshape(-1).astype(jnp.int32)
    s = jax.ops.segment_sum(values.astype(f32).reshape(-1) * m, ids, num_segments)
    n = jax.ops.segment_sum(m, ids, num_segments)
    return s / jnp.maximum(n, 1.0), n > 0


def per_context_loss_sum(
    token_loss: jax.Array,
    mask: jax.Array,
    qa_ids: jax.Array,
    ctx_ids: jax.Array,
    num_qa: int,
    num_ctx: int,
) -> jax.Array:
    """Sum over contexts of (mean over a context's QAs of (mean over that QA's label tokens)).

    The official `per_ctx_loss_kl/ce` followed by `.sum()`; divide by the number of contexts of the
    (accumulated) batch. `qa_ids`/`ctx_ids` are global ids per token (any value where mask is 0).
    """
    qa_mean, qa_valid = segment_means(token_loss, mask, qa_ids, num_qa)
    # context of every QA: all label tokens of a QA share one context id.
    m = mask.reshape(-1)
    qa_ctx = jax.ops.segment_max(
        jnp.where(m, ctx_ids.reshape(-1), -1).astype(jnp.int32),
        qa_ids.reshape(-1).astype(jnp.int32),
        num_qa,
    )
    qa_ctx = jnp.where(qa_valid, qa_ctx, 0)
    ctx_mean, ctx_valid = segment_means(qa_mean, qa_valid, qa_ctx, num_ctx)
    return jnp.sum(jnp.where(ctx_valid, ctx_mean, 0.0))


def per_sample_loss_sum(
    token_loss: jax.Array, mask: jax.Array, sample_ids: jax.Array, num_samples: int
) -> jax.Array:
    """Sum over samples of the mean over their label tokens (T2L `equally_weight_sample`)."""
    means, valid = segment_means(token_loss, mask, sample_ids, num_samples)
    return jnp.sum(jnp.where(valid, means, 0.0))


def adapter_l1_sum(
    adapter: Adapter, ctx_valid: jax.Array | None = None, rank: jax.Array | None = None
) -> jax.Array:
    """D2L L1 term times n_ctx: sum_m [ |A_m|.sum(ctx).mean() + |B_m|.sum(ctx).mean() ] / n_modules.

    `adapter` holds the combined per-context factors [N, L, R, d] (bias LoRA and zero padding
    included, like the official code); padding contexts are dropped with `ctx_valid` [N]. The
    official batch is padded to its own largest rank; when ours is padded further (static
    shapes), pass that batch rank as `rank` so the mean has the official denominator.
    `ctx_valid` may also count how often each factor occurs in the composed adapters (a shared
    bias LoRA once per context).
    Divide by the number of contexts of the (accumulated) batch.
    """
    total = jnp.zeros((), f32)
    for m in adapter.modules:
        for x in (adapter.a[m], adapter.b[m]):
            n, L, R, d = x.shape  # noqa: N806
            x = jnp.abs(x.astype(f32))
            if ctx_valid is not None:
                x = x * ctx_valid.astype(f32)[:, None, None, None]
            denom = L * d * (R if rank is None else rank)
            total = total + jnp.sum(x) / denom
    return total / len(adapter.modules)


def adapter_l2_sum(adapter: Adapter, sample_valid: jax.Array | None = None) -> jax.Array:
    """T2L L2 term times n_samples: sum_n sum_m (mean(A_nm^2) + mean(B_nm^2)), factors [N, L, R, d].

    Divided by the number of samples this is the official sum_m (mean(A^2) + mean(B^2)).
    """
    total = jnp.zeros((), f32)
    for m in adapter.modules:
        for x in (adapter.a[m], adapter.b[m]):
            per = jnp.mean(jnp.square(x.astype(f32)), axis=tuple(range(1, x.ndim)))
            if sample_valid is not None:
                per = per * sample_valid.astype(f32)
            total = total + jnp.sum(per)
    return total


def neftune_noise(rng: jax.Array, shape: tuple[int, ...], alpha: float, dtype=f32) -> jax.Array:
    """NEFTune noise U(-a, a), a = alpha / sqrt(T * H), for input embeddings of shape [B, T, H].

    T is the padded length, as in the HF/official hook (which adds it to `embed_tokens`' output,
    i.e. before Gemma's sqrt(H) scaling).
    """
    mag = alpha / jnp.sqrt(float(shape[-2] * shape[-1]))
    return jax.random.uniform(rng, shape, f32, -mag, mag).astype(dtype)


def recon_l1_factorized(
    a_pred: jax.Array, b_pred: jax.Array, a_tgt: jax.Array, b_tgt: jax.Array
) -> jax.Array:
    """T2L factorized reconstruction: L1(A)/2 + L1(B)/2 (mean over elements).

    With the official `pred_z_score` option the targets arrive as per-element z-scores over the
    oracle library (the data stream normalises them, `data.feeds.recon_data`).
    """
    la = jnp.mean(jnp.abs(a_pred.astype(f32) - a_tgt.astype(f32)))
    lb = jnp.mean(jnp.abs(b_pred.astype(f32) - b_tgt.astype(f32)))
    return la / 2 + lb / 2


def recon_l1_dense(
    a_pred: jax.Array, b_pred: jax.Array, a_tgt: jax.Array, b_tgt: jax.Array, scaling: float
) -> jax.Array:
    """T2L dense reconstruction: L1(B^ A^, scaling * B_t A_t), mean over elements ([.., R, d])."""
    dw = jnp.einsum("...ro,...ri->...oi", b_pred.astype(f32), a_pred.astype(f32))
    dw_t = jnp.einsum("...ro,...ri->...oi", b_tgt.astype(f32), a_tgt.astype(f32))
    return jnp.mean(jnp.abs(dw - scaling * dw_t))


def label_positions(mask: jax.Array, max_label_len: int | None) -> jax.Array | None:
    """The first max_label_len positions of each row where mask [B, T] is set, in order, [B, P]
    (a row with fewer is padded with unset positions); None if max_label_len is 0 / None.

    A static P lets the LM head run on P positions instead of T (with 5 label tokens per NIAH
    query, a tenth of them); positions past the first P are dropped, see check_label_budget."""
    if not max_label_len:
        return None
    return jnp.argsort(~mask, axis=1, stable=True)[:, :max_label_len]


def take_positions(x: jax.Array, at: jax.Array) -> jax.Array:
    """x [B, T, ...] at positions at [B, P] -> [B, P, ...]."""
    idx = at.reshape(*at.shape, *(1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)

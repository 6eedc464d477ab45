"""The Doc-to-LoRA objectives: top-k distillation from the base model with the document in context
(the official `kl_top16`) or cross-entropy on the answer tokens.

A batch is packed rows of hyperlora_jax.data.packing (see its docstring), stacked [B, ...]:
student side input_ids/positions/segment_ids/labels/qa_index/adapter_index [B, T], teacher
logprobs_vals/logprobs_indices [B, T, K] at label tokens; context side ctx_ids/ctx_positions/
ctx_segment_ids [B, Tc] (several chunks per row, chunk number 1..), chunk_context [B, C],
n_ctx_chunks [B, Cx]. Optional online teacher: teacher_ids/teacher_segment_ids [B, Tt] and
teacher_pos [B, T] (teacher position of the same response token).

Cross-model D2L (another model reads the context, e.g. Gemma-3's language model for a Gemma-2
base): the frozen params are {"base": ..., "ctx": ...} (`frozen_models`); the context side of the
batch is in the context encoder's tokenizer, the student and teacher side in the base's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.hypernet.d2l.model import (
    bias_lora,
    context_features,
    encoder_layers,
    generate_chunk_loras,
    project_features,
)
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models.transformer import forward
from hyperlora_jax.train import losses
from hyperlora_jax.train.losses import label_positions, take_positions
from hyperlora_jax.train.update import LossFn


def gather_chunks(feats: jax.Array, seg: jax.Array, num_chunks: int, chunk_len: int):
    """Packed context features -> one chunk per row.

    feats [B, (L,) Tc, H], seg [B, Tc] (chunk number 1.., 0 = pad; a chunk is contiguous) ->
    [B * num_chunks, (L,) chunk_len, H] and mask [B * num_chunks, chunk_len]. Empty slots get
    one (masked-in) token so the hypernetwork stays finite; their LoRAs are dropped later.
    """
    tc = seg.shape[1]
    hit = seg[:, :, None] == jnp.arange(1, num_chunks + 1)[None, None, :]  # [B, Tc, C]
    length = jnp.sum(hit, axis=1)  # [B, C]
    start = jnp.argmax(hit, axis=1)  # [B, C]
    t = jnp.arange(chunk_len)
    idx = jnp.clip(start[..., None] + t, 0, tc - 1)  # [B, C, Tm]
    mask = (t < length[..., None]) | ((length[..., None] == 0) & (t == 0))
    b = seg.shape[0]
    if feats.ndim == 4:  # [B, L, Tc, H]
        g = jax.vmap(lambda f, i: f[:, i])(feats, idx)  # [B, L, C, Tm, H]
        g = jnp.moveaxis(g, 2, 1)  # [B, C, L, Tm, H]
        g = g.reshape(b * num_chunks, *g.shape[2:])
    else:
        g = jax.vmap(lambda f, i: f[i])(feats, idx)  # [B, C, Tm, H]
        g = g.reshape(b * num_chunks, *g.shape[2:])
    return g, mask.reshape(b * num_chunks, chunk_len)


def frozen_models(frozen, ctx_cfg) -> tuple:
    """(base params, context encoder params) of the frozen params the trainer passes: one model's
    params, or {"base": ..., "ctx": ...} when a separate context encoder (ctx_cfg) reads."""
    return (frozen["base"], frozen["ctx"]) if ctx_cfg is not None else (frozen, frozen)


def d2l_count(batch) -> jax.Array:
    """Contexts in the batch (the official per-context loss normaliser)."""
    return jnp.sum(batch["n_ctx_chunks"] > 0)


def make_d2l_loss(
    hcfg,
    base_cfg,
    *,
    objective: str = "distill",
    l1_coef: float = 0.1,
    neftune_alpha: float = 0.0,
    max_chunk_len: int | None = None,
    dtype=jnp.float32,
    hypernet_dtype=None,
    remat_policy: str | None = None,
    max_label_len: int | None = None,
    ctx_cfg=None,
) -> LossFn:
    """D2L loss: student = base + generated adapter, without the document.

    objective "distill": CE to the top-k teacher probs (stored, or online with teacher_ids);
    "ce": gold-response CE (NIAH). Both: mean per QA, then per context, summed / n_contexts,
    plus l1_coef * L1 of the combined adapter (bias LoRA included), / n_contexts.
    max_chunk_len: longest chunk (static; default the packed context length).
    max_label_len: compute the LM head (and the teacher's) only at the first that many label
    positions of each row (None: every position). A row with more label tokens silently loses
    the rest: the data side must refuse such rows (`check_label_budget`).
    ctx_cfg: the ModelConfig of a separate context encoder (cross-model D2L); the frozen params
    are then {"base": ..., "ctx": ...} (`frozen_models`).
    """

    if objective not in ("distill", "ce"):
        raise ConfigError(f"D2L objective {objective!r}; expected 'distill' or 'ce'")
    hdtype = hypernet_dtype or dtype
    enc_cfg = ctx_cfg if ctx_cfg is not None else base_cfg
    encoder_layers(hcfg, enc_cfg)  # a depth error surfaces here, not inside the traced step

    def adapter_fn(params, frozen, batch):
        """Per-row chunk adapters [B, C + 1, L, r, d] (slot C: the bias LoRA) and token weights
        [B, T, C + 1] selecting the chunks of each token's context plus the bias.

        Weighting the chunk LoRAs of a context by a 0/1 mask equals their official rank
        concatenation (combine_lora), without materialising composed [.., (K+1) r, d] factors;
        everything stays per row, so memory grows with the batch, not with its square."""
        enc_params = frozen_models(frozen, ctx_cfg)[1]
        seg_c = batch["ctx_segment_ids"]
        bsz, tc = seg_c.shape
        n_slots = batch["chunk_context"].shape[1]
        with jax.named_scope("context_encoder"):
            feats = context_features(
                enc_params,
                enc_cfg,
                hcfg,
                batch["ctx_ids"],
                seg_c,
                batch["ctx_positions"],
                dtype=dtype,
                remat_policy=remat_policy,
            )  # [B, (L,) Tc, H], the same encoder as DocToLoRA's
        feats = jax.lax.stop_gradient(feats.astype(hdtype))
        # The Perceiver's input projection (H -> 4H -> latent) is token-wise: run it on the Tc
        # packed tokens, not on the C x max_chunk_len mostly padded chunk rows.
        proj = project_features(params, hcfg, feats, dtype=hdtype)  # [B, (L,) Tc, latent]
        cf, cmask = gather_chunks(proj, seg_c, n_slots, max_chunk_len or tc)
        a, b = generate_chunk_loras(
            params, hcfg, cf, cmask, layer_group=0, dtype=hdtype, projected=True
        )
        ba, bb = bias_lora(params, hcfg)
        if not hcfg.use_bias:
            ba = jax.tree_util.tree_map(jnp.zeros_like, ba)
            bb = jax.tree_util.tree_map(jnp.zeros_like, bb)

        def with_bias(x, bias):  # [B * C, L, r, d] -> [B, C + 1, L, r, d]
            x = x.reshape(bsz, n_slots, *x.shape[1:])
            bias = jnp.broadcast_to(bias.astype(x.dtype), (bsz, 1, *bias.shape))
            return jnp.concatenate([x, bias], axis=1)

        adapter = Adapter(
            {m: with_bias(x, ba[m]) for m, x in a.items()},
            {m: with_bias(x, bb[m]) for m, x in b.items()},
            float(hcfg.lora_alpha),
        )
        # token t uses chunk c when c belongs to t's context; the bias when t has a context
        ctx = batch["adapter_index"]  # [B, T] context slot of each query token
        cc = batch["chunk_context"]  # [B, C] context slot of each chunk (-1 unused)
        has_ctx = jnp.take_along_axis(batch["n_ctx_chunks"], jnp.maximum(ctx, 0), 1) > 0
        has_ctx = has_ctx & (ctx >= 0) & (batch["segment_ids"] > 0)
        chunk_w = (cc[:, None, :] == ctx[:, :, None]) & (cc[:, None, :] >= 0)
        weights = jnp.concatenate([chunk_w & has_ctx[..., None], has_ctx[..., None]], axis=-1)
        return adapter, weights.astype(jnp.float32)

    def loss_fn(params, frozen, batch, rng, num_ctx):
        adapter, weights = adapter_fn(params, frozen, batch)
        base_params = frozen_models(frozen, ctx_cfg)[0]
        bsz, n_ctx_slots = batch["n_ctx_chunks"].shape
        rows = jnp.arange(bsz)[:, None]
        n_chunks = batch["n_ctx_chunks"].reshape(-1)
        tokens = batch["input_ids"]
        noise = None
        if neftune_alpha:
            shape = (*tokens.shape, base_cfg.hidden_size)
            noise = losses.neftune_noise(jax.random.fold_in(rng, 1), shape, neftune_alpha, dtype)
        # Everything per logit position, aligned with the logits (position t predicts t + 1).
        labels = batch["labels"]
        mask = losses.shift_targets(labels >= 0, False)
        n_qa = batch["qa_context"].shape[1]
        targets = losses.shift_targets(jnp.maximum(labels, 0))
        qa_ids = losses.shift_targets(batch["qa_index"] + rows * n_qa)
        ctx_ids = losses.shift_targets(batch["adapter_index"] + rows * n_ctx_slots)
        at = label_positions(mask, max_label_len)  # [B, P] or None (every position)
        if at is not None:
            targets, mask, qa_ids, ctx_ids = (
                take_positions(x, at) for x in (targets, mask, qa_ids, ctx_ids)
            )
        with jax.named_scope("student"):
            logits = forward(
                base_params,
                base_cfg,
                tokens,
                segment_ids=batch["segment_ids"],
                positions=batch["positions"],
                adapter=adapter,
                adapter_index=weights,
                dtype=dtype,
                remat_policy=remat_policy,
                embeddings_noise=noise,
                logits_at=at,
            ).logits  # [B, T or P, V]
        if objective == "ce":
            tok = losses.cross_entropy(logits, targets)
        else:
            vals, idx = _teacher_topk(base_params, base_cfg, batch, dtype, at)
            tok = losses.topk_distill_ce(logits, vals, idx)
        main = losses.per_context_loss_sum(tok, mask, qa_ids, ctx_ids, bsz * n_qa, n_chunks.size)
        rank = (jnp.max(n_chunks) + 1) * hcfg.rank
        # L1 of the composed adapters: every used chunk once, the bias once per used context
        n_ctx = jnp.sum(batch["n_ctx_chunks"] > 0, axis=1, keepdims=True)
        counts = jnp.concatenate([batch["chunk_context"] >= 0, n_ctx], axis=1)
        flat = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), adapter)
        l1 = losses.adapter_l1_sum(flat, counts.reshape(-1), rank)
        main, l1 = main / num_ctx, l1 / num_ctx
        return main + l1_coef * l1, {"main_loss": main, "l1": l1}

    loss_fn.adapter_fn = adapter_fn
    return loss_fn


def _teacher_topk(base_params, base_cfg, batch, dtype, at=None, k: int = 16):
    """Teacher top-k (log-probs, token ids) [B, T, K] aligned with the student's logits (stored,
    or computed online); at [B, P]: only at those student positions, [B, P, K]."""

    if "teacher_ids" not in batch:
        vals = losses.shift_targets(batch["logprobs_vals"])
        idx = losses.shift_targets(batch["logprobs_indices"])
        return (vals, idx) if at is None else (take_positions(vals, at), take_positions(idx, at))
    # student position t predicts token t+1, which the teacher holds at teacher_pos[t+1] and
    # predicts from the position before it.
    pos = jnp.maximum(losses.shift_targets(batch["teacher_pos"]) - 1, 0)
    if at is not None:
        pos = take_positions(pos, at)
    with jax.named_scope("teacher"):
        t_logits = forward(
            base_params,
            base_cfg,
            batch["teacher_ids"],
            segment_ids=batch["teacher_segment_ids"],
            dtype=dtype,
            logits_at=pos,
        ).logits  # [B, T or P, V]
    logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits).astype(jnp.float32), -1)
    return jax.lax.top_k(logp, k)

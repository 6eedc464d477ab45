"""The Text-to-LoRA objectives: SFT through generated adapters, reconstruction of a library of
task LoRAs, and a plain LoRA library (the oracle baseline).

SFT batch: task_embs [N, E] (one description embedding per sample), tokens [B, T],
segment_ids [B, T], loss_mask [B, T] (response tokens), sample_valid [N]; one sample per row
(N == B) or packed rows with adapter_index [B, T] selecting the sample.
Recon batch: task_embs [N, E], target_a.<m> / target_b.<m> [N, L, r, d], sample_valid [N].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hyperlora_jax.hypernet.t2l.model import HyperModulator, postprocess
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models.transformer import forward
from hyperlora_jax.train import losses
from hyperlora_jax.train.losses import label_positions, take_positions
from hyperlora_jax.train.update import LossFn


def t2l_count(batch) -> jax.Array:
    return jnp.sum(batch["sample_valid"])


def make_t2l_sft_loss(
    tcfg,
    base_cfg,
    *,
    label_smoothing: float = 0.1,
    l2_coef: float = 1e-3,
    neftune_alpha: float = 0.0,
    dtype=jnp.float32,
    remat_policy: str | None = None,
    max_label_len: int | None = None,
    task_emb_noise: float = 0.0,
) -> LossFn:
    """T2L SFT: description -> adapter; CE with label smoothing, per-sample mean, + L2 on A/B.

    task_emb_noise (ours; the official adds none): std of Gaussian noise added to each task
    embedding (L2 x sqrt(E) scale: about 1 per entry) in training, so that descriptions between
    the trained ones map to adapters between theirs rather than onto the nearest task."""

    def adapter_fn(params, batch, rng):
        embs = batch["task_embs"]
        if task_emb_noise:
            noise = jax.random.normal(jax.random.fold_in(rng, 2), embs.shape, embs.dtype)
            embs = embs + task_emb_noise * noise
        a, b = HyperModulator(tcfg).apply(
            {"params": params},
            embs,
            deterministic=False,
            rngs={"dropout": jax.random.fold_in(rng, 0)},
        )
        a, b = postprocess(tcfg, a, b, None)
        return Adapter(a, b, tcfg.scale())

    return _adapter_sft_loss(
        adapter_fn,
        base_cfg,
        label_smoothing=label_smoothing,
        l2_coef=l2_coef,
        neftune_alpha=neftune_alpha,
        dtype=dtype,
        remat_policy=remat_policy,
        max_label_len=max_label_len,
    )


def make_lora_library_loss(tcfg, base_cfg, *, max_label_len: int | None = None, **kw) -> LossFn:
    """Plain LoRA fine-tuning of a library of adapters at once: params {"a": {m: [N, L, r, d]},
    "b": ...}; row i uses adapter batch["task_index"][i] (N = 1: one multi-task LoRA). The
    oracle LoRAs of T2L are this with one adapter per task, trained with the SFT loss."""

    def adapter_fn(params, batch, rng):
        del rng
        idx = jnp.minimum(batch["task_index"], params["a"][tcfg.modules[0]].shape[0] - 1)
        take = lambda x: jnp.take(x, idx, axis=0)  # noqa: E731
        return Adapter(
            {m: take(x) for m, x in params["a"].items()},
            {m: take(x) for m, x in params["b"].items()},
            tcfg.scale(),
        )

    return _adapter_sft_loss(adapter_fn, base_cfg, max_label_len=max_label_len, **kw)


def _adapter_sft_loss(
    adapter_fn,
    base_cfg,
    *,
    label_smoothing: float,
    l2_coef: float,
    neftune_alpha: float,
    dtype,
    remat_policy: str | None,
    max_label_len: int | None,
) -> LossFn:
    """CE of the base model + per-row adapter on the response tokens (per-sample mean).

    max_label_len: compute the LM head only at the first that many label positions of each row
    (the data pipeline checks that no response is longer); the head is ~20% of SmolLM2's FLOPs.
    """

    def loss_fn(params, base_params, batch, rng, num_samples):
        adapter = adapter_fn(params, batch, rng)
        tokens = batch["tokens"]
        noise = None
        if neftune_alpha:
            shape = (*tokens.shape, base_cfg.hidden_size)
            noise = losses.neftune_noise(jax.random.fold_in(rng, 1), shape, neftune_alpha, dtype)
        index = batch.get("adapter_index")
        n = batch["sample_valid"].shape[0]
        ids = (
            jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
            if index is None
            else losses.shift_targets(index)
        )
        labels = losses.shift_targets(tokens)
        mask = losses.shift_targets(batch["loss_mask"], False)
        at = label_positions(mask, max_label_len)
        if at is not None:
            labels, mask, ids = (take_positions(x, at) for x in (labels, mask, ids))
        logits = forward(
            base_params,
            base_cfg,
            tokens,
            segment_ids=batch["segment_ids"],
            adapter=adapter,
            adapter_index=index,
            dtype=dtype,
            remat_policy=remat_policy,
            embeddings_noise=noise,
            logits_at=at,
        ).logits
        tok = losses.cross_entropy(logits, labels, label_smoothing)
        main = losses.per_sample_loss_sum(tok, mask, ids, n) / num_samples
        l2 = losses.adapter_l2_sum(adapter, batch["sample_valid"]) / num_samples
        return main + l2_coef * l2, {"main_loss": main, "l2": l2}

    return loss_fn


def make_t2l_recon_loss(tcfg) -> LossFn:
    """T2L reconstruction: L1 to oracle LoRAs, factorized (A and B; z-scored targets with
    `pred_z_score`, normalised by the data stream) or dense (dW). Per-sample losses summed and
    divided by the sample count (= the official mean over equal-size samples), averaged over
    target modules."""

    if tcfg.factorized:
        per_sample = jax.vmap(losses.recon_l1_factorized)
    else:
        per_sample = jax.vmap(
            functools.partial(losses.recon_l1_dense, scaling=tcfg.delta_w_scaling)
        )

    def loss_fn(params, base_params, batch, rng, num_samples):
        del base_params
        a, b = HyperModulator(tcfg).apply(
            {"params": params},
            batch["task_embs"],
            deterministic=False,
            rngs={"dropout": jax.random.fold_in(rng, 0)},
        )
        valid = batch["sample_valid"].astype(jnp.float32)
        total = jnp.zeros((), jnp.float32)
        for m in tcfg.modules:
            err = per_sample(a[m], b[m], batch[f"target_a.{m}"], batch[f"target_b.{m}"])
            total = total + jnp.sum(err * valid)
        loss = total / len(tcfg.modules) / num_samples
        return loss, {"main_loss": loss}

    return loss_fn

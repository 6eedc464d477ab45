"""Pure training steps: gradients w.r.t. the hypernetwork params only, NaN/Inf guard, optional
gradient accumulation. The frozen base params are an argument and never get a gradient.

A loss function has the signature
    loss_fn(params, base_params, batch, rng, num_items) -> (loss, aux: dict of scalars)
where `num_items` is the count its sums are divided by (contexts for D2L, samples for T2L),
computed over the whole (accumulated) batch by `count_fn(batch)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

LossFn = Callable[..., tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    """What a checkpoint restores: hypernet params, optimizer state, step, RNG, guard counters."""

    step: jax.Array  # int32, steps taken (including skipped ones)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data [2]
    bad_in_a_row: jax.Array  # int32, consecutive non-finite steps
    bad_total: jax.Array  # int32, non-finite steps skipped so far

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
        z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 - distinct buffers (donation)
        rng = jax.random.key_data(jax.random.key(seed))
        return cls(z(), params, tx.init(params), rng, z(), z())


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    count_fn: Callable[[dict], jax.Array],
    *,
    grad_accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
    inject_nan_at: int | None = None,
    micro_batch_axes=None,
):
    """step(state, base_params, batch, lr_scale=1.0) -> (state, metrics).

    With grad_accum_steps = k the batch's leading axis is split into k micro-batches whose
    gradients are summed; every loss sum is divided by the count of the whole batch, so the
    result equals one big batch (the official per-context normalisation across accumulation).
    A non-finite loss or gradient skips the update (params and optimizer state unchanged) and
    is counted. `inject_nan_at` (tests only) poisons the gradient at that step.
    micro_batch_axes: mesh axes of the batch (e.g. ("data", "fsdp")), to keep accumulation
    micro-batches sharded (run under jax.set_mesh).
    lr_scale (a traced scalar): multiplies the update, i.e. the learning rate, weight decay
    included; the trainer's wall-clock decay (`TrainOptions.lr_time_decay`) sets it per step, so
    one compiled program serves any run length.
    """

    def grads_of(params, base_params, batch, rng, num_items):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, base_params, batch, rng, num_items)

    def step(state: TrainState, base_params, batch, lr_scale=1.0):
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        step_rng = jax.random.fold_in(step_rng, state.step)
        num_items = jnp.maximum(count_fn(batch).astype(jnp.float32), 1.0)
        base_params = jax.lax.stop_gradient(base_params)
        if grad_accum_steps == 1:
            (loss, aux), grads = grads_of(state.params, base_params, batch, step_rng, num_items)
        else:
            k = grad_accum_steps
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch
            )
            if micro_batch_axes is not None:  # keep each micro-batch split over the batch axes
                micro = jax.tree_util.tree_map(
                    lambda x: jax.lax.with_sharding_constraint(
                        x, jax.sharding.PartitionSpec(None, micro_batch_axes)
                    ),
                    micro,
                )

            def body(carry, xs):
                mb, i = xs
                (lo, a), g = grads_of(
                    state.params, base_params, mb, jax.random.fold_in(step_rng, i), num_items
                )
                acc_g, acc_l, acc_a = carry
                acc_g = jax.tree_util.tree_map(jnp.add, acc_g, g)
                acc_a = jax.tree_util.tree_map(jnp.add, acc_a, a)
                return (acc_g, acc_l + lo, acc_a), None

            zero_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            _, aux0 = jax.eval_shape(
                loss_fn,
                state.params,
                base_params,
                jax.tree_util.tree_map(lambda x: x[0], micro),
                step_rng,
                num_items,
            )
            zero_a = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
            (grads, loss, aux), _ = jax.lax.scan(
                body, (zero_g, jnp.zeros((), jnp.float32), zero_a), (micro, jnp.arange(k))
            )
        if inject_nan_at is not None:
            poison = jnp.where(state.step == inject_nan_at, jnp.nan, 0.0)
            grads = jax.tree_util.tree_map(lambda g: g + poison.astype(g.dtype), grads)
        gnorm = optax.global_norm(grads)
        # One scalar decides: a NaN or inf anywhere makes the gradient's global norm non-finite
        # (so does an f32 overflow of its square, a step clipping could not rescue either). A
        # cond rather than a per-leaf select keeps the compiled step small (fewer kernels).
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)

        def update(_):
            updates, new_opt = tx.update(grads, state.opt_state, state.params)
            updates = jax.tree_util.tree_map(lambda u: u * lr_scale, updates)
            return optax.apply_updates(state.params, updates), new_opt

        new_params, new_opt = jax.lax.cond(
            ok, update, lambda _: (state.params, state.opt_state), None
        )
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            rng=jax.random.key_data(rng),
            bad_in_a_row=jnp.where(ok, 0, state.bad_in_a_row + 1),
            bad_total=state.bad_total + jnp.where(ok, 0, 1),
        )
        metrics = {"loss": loss, "grad_norm": gnorm, "finite": ok, "num_items": num_items, **aux}
        if schedule is not None:
            metrics["lr"] = schedule(optax_count(state.opt_state)) * lr_scale
        return new_state, metrics

    return step


def optax_count(opt_state) -> jax.Array:
    """The update count of the (first) schedule inside an optax state (0 if none)."""
    for leaf in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
    ):
        if isinstance(leaf, optax.ScaleByScheduleState):
            return leaf.count
    for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
    ):
        if isinstance(s, optax.ScaleByAdamState):
            return s.count
    return jnp.zeros((), jnp.int32)


# --------------------------------------------------------------------------- D2L distillation
#
# D2L batch = packed rows of hyperlora_jax.data.packing (see its docstring), stacked [B, ...]:
# student side input_ids/positions/segment_ids/labels/qa_index/adapter_index [B, T], teacher
# logprobs_vals/logprobs_indices [B, T, K] at label tokens; context side ctx_ids/ctx_positions/
# ctx_segment_ids [B, Tc] (several chunks per row, chunk number 1..), chunk_context [B, C],
# n_ctx_chunks [B, Cx]. Optional online teacher: teacher_ids/teacher_segment_ids [B, Tt] and
# teacher_pos [B, T] (teacher position of the same response token).


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
) -> LossFn:
    """D2L loss: student = base + generated adapter, without the document.

    objective "distill": CE to the top-k teacher probs (stored, or online with teacher_ids);
    "ce": gold-response CE (NIAH). Both: mean per QA, then per context, summed / n_contexts,
    plus l1_coef * L1 of the combined adapter (bias LoRA included), / n_contexts.
    max_chunk_len: longest chunk (static; default the packed context length).
    max_label_len: compute the LM head (and the teacher's) only at the first that many label
    positions of each row (None: every position). A row with more label tokens silently loses
    the rest: the data side must refuse such rows (`check_label_budget`).
    """
    from hyperlora_jax.errors import ConfigError
    from hyperlora_jax.hypernet.d2l import bias_lora, generate_chunk_loras, project_features
    from hyperlora_jax.hypernet.doc_to_lora import encoder_layers
    from hyperlora_jax.lora.adapter import Adapter
    from hyperlora_jax.models.transformer import forward
    from hyperlora_jax.train import losses

    if objective not in ("distill", "ce"):
        raise ConfigError(f"D2L objective {objective!r}; expected 'distill' or 'ce'")
    hdtype = hypernet_dtype or dtype
    k_enc = encoder_layers(hcfg, base_cfg)

    def adapter_fn(params, base_params, batch):
        """Per-row chunk adapters [B, C + 1, L, r, d] (slot C: the bias LoRA) and token weights
        [B, T, C + 1] selecting the chunks of each token's context plus the bias.

        Weighting the chunk LoRAs of a context by a 0/1 mask equals their official rank
        concatenation (combine_lora), without materialising composed [.., (K+1) r, d] factors;
        everything stays per row, so memory grows with the batch, not with its square."""
        seg_c = batch["ctx_segment_ids"]
        bsz, tc = seg_c.shape
        n_slots = batch["chunk_context"].shape[1]
        with jax.named_scope("context_encoder"):
            hs = forward(
                base_params,
                base_cfg,
                batch["ctx_ids"],
                segment_ids=seg_c,
                positions=batch["ctx_positions"],
                num_layers=k_enc,
                return_hidden_states=True,
                return_logits=False,
                dtype=dtype,
                remat_policy=remat_policy,
            ).hidden_states  # [B, k+1, Tc, H]
        feats = hs if hcfg.layer_to_layer else hs[:, -1]  # [B, (L,) Tc, H]
        feats = jax.lax.stop_gradient(feats.astype(hdtype))
        # The Perceiver's input projection (H -> 4H -> latent) is token-wise: run it on the Tc
        # packed tokens, not on the C x max_chunk_len mostly padded chunk rows.
        proj = project_features(params, hcfg, feats, dtype=hdtype)  # [B, (L,) Tc, latent]
        cf, cmask = gather_chunks(proj, seg_c, n_slots, max_chunk_len or tc)
        a, b = generate_chunk_loras(params, hcfg, cf, cmask, dtype=hdtype, projected=True)
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

    def loss_fn(params, base_params, batch, rng, num_ctx):
        adapter, weights = adapter_fn(params, base_params, batch)
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
        rank = (jnp.max(n_chunks) + 1) * hcfg.lora_r
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
    from hyperlora_jax.models.transformer import forward
    from hyperlora_jax.train import losses

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


def check_label_budget(batch, max_label_len: int | None) -> None:
    """Host-side check that no row of a batch has more loss positions than the LM head is
    computed for (train.max_label_len; 0 / None: every position, nothing to check).

    batch: numpy rows with "labels" [B, T] (D2L; -100 = no loss) or "loss_mask" [B, T] (T2L).
    Raises InputError naming the row; call it where batches are made (the loss cannot raise).
    """
    from hyperlora_jax.errors import InputError

    if not max_label_len:
        return
    if "labels" in batch:
        supervised = np.asarray(batch["labels"]) >= 0
    else:
        supervised = np.asarray(batch["loss_mask"]).astype(bool)
    # the first token is never predicted (the logits at t predict t + 1)
    counts = supervised[:, 1:].sum(axis=1)
    worst = int(np.argmax(counts))
    if counts[worst] > max_label_len:
        raise InputError(
            f"row {worst} of the batch has {int(counts[worst])} label tokens > "
            f"train.max_label_len={max_label_len} (the LM head runs only at that many positions "
            "per row); raise train.max_label_len (0: every position) or pack fewer queries per row"
        )


# --------------------------------------------------------------------------- T2L
#
# T2L SFT batch: task_embs [N, E] (one description embedding per sample), tokens [B, T],
# segment_ids [B, T], loss_mask [B, T] (response tokens), sample_valid [N]; one sample per row
# (N == B) or packed rows with adapter_index [B, T] selecting the sample.
# T2L recon batch: task_embs [N, E], target_a.<m> / target_b.<m> [N, L, r, d], sample_valid [N].


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
) -> LossFn:
    """T2L SFT: description -> adapter; CE with label smoothing, per-sample mean, + L2 on A/B."""
    from hyperlora_jax.hypernet.t2l import HyperModulator, postprocess
    from hyperlora_jax.lora.adapter import Adapter

    def adapter_fn(params, batch, rng):
        a, b = HyperModulator(tcfg).apply(
            {"params": params},
            batch["task_embs"],
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
    from hyperlora_jax.lora.adapter import Adapter

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
    from hyperlora_jax.models.transformer import forward
    from hyperlora_jax.train import losses

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
    import functools

    from hyperlora_jax.hypernet.t2l import HyperModulator
    from hyperlora_jax.train import losses

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

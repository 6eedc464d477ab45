"""The D2L training loss (train/steps.make_d2l_loss) against its plain formulation.

The loss projects the packed context features before cutting chunk rows out of them and runs
the LM head only at label positions (train.max_label_len). The reference below is the plain
formulation, written out: raw features gathered into chunk rows, the whole Perceiver on them
(HyperLoRA.__call__), logits at every position. Same loss and gradients, fewer FLOPs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.data import packing
from hyperlora_jax.errors import InputError
from hyperlora_jax.hypernet.d2l.model import D2LConfig, HyperLoRA, bias_lora, encoder_layers
from hyperlora_jax.hypernet.d2l.model import init_params as d2l_init
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models import transformer
from hyperlora_jax.models.testing import tiny_config
from hyperlora_jax.train import d2l_loss, losses
from hyperlora_jax.train.flops import count_flops_by_scope

CHUNK_LEN = 8  # chunk row length (longest chunk: 6 tokens)
LABEL_BUDGET = 6  # most label tokens in a row of _batch()
K = 4  # teacher top-k
CFG = tiny_config(hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)


def reference_loss(hyper, base, batch, *, hcfg, objective, l1_coef):
    """The D2L loss without the shortcuts: raw context features gathered into chunk rows, the
    whole Perceiver on the rows, the LM head at every student position."""
    hs = transformer.forward(
        base,
        CFG,
        batch["ctx_ids"],
        segment_ids=batch["ctx_segment_ids"],
        positions=batch["ctx_positions"],
        num_layers=encoder_layers(hcfg, CFG),
        return_hidden_states=True,
        return_logits=False,
    ).hidden_states
    feats = jax.lax.stop_gradient(hs if hcfg.layer_to_layer else hs[:, -1])
    bsz, n_slots = batch["chunk_context"].shape
    rows, chunk_mask = d2l_loss.gather_chunks(feats, batch["ctx_segment_ids"], n_slots, CHUNK_LEN)
    a, b = HyperLoRA(hcfg).apply({"params": hyper}, rows, chunk_mask)
    bias_a, bias_b = bias_lora(hyper, hcfg)

    def with_bias(x, bias):  # [B * C, L, r, d] -> [B, C + 1, L, r, d], slot C: the bias LoRA
        x = x.reshape(bsz, n_slots, *x.shape[1:])
        return jnp.concatenate([x, jnp.broadcast_to(bias, (bsz, 1, *bias.shape))], axis=1)

    adapter = Adapter(
        {m: with_bias(a[m], bias_a[m]) for m in a},
        {m: with_bias(b[m], bias_b[m]) for m in b},
        hcfg.lora_alpha,
    )
    # a token uses the chunks of its context and the bias (a real token of a used context)
    ctx, chunk_ctx, n_chunks = batch["adapter_index"], batch["chunk_context"], batch["n_ctx_chunks"]
    has_ctx = (jnp.take_along_axis(n_chunks, ctx, 1) > 0) & (batch["segment_ids"] > 0)
    uses_chunk = (chunk_ctx[:, None, :] == ctx[..., None]) & has_ctx[..., None]
    weights = jnp.concatenate([uses_chunk, has_ctx[..., None]], -1).astype(jnp.float32)
    logits = transformer.forward(
        base,
        CFG,
        batch["input_ids"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        adapter=adapter,
        adapter_index=weights,
    ).logits
    shift = losses.shift_targets
    labels = batch["labels"]
    if objective == "ce":
        tok = losses.cross_entropy(logits, shift(jnp.maximum(labels, 0)))
    else:
        tok = losses.topk_distill_ce(
            logits, shift(batch["logprobs_vals"]), shift(batch["logprobs_indices"])
        )
    n_qa, n_ctx = batch["qa_context"].shape[1], n_chunks.shape[1]
    row = jnp.arange(bsz)[:, None]
    main = losses.per_context_loss_sum(
        tok,
        shift(labels >= 0, False),
        shift(batch["qa_index"] + row * n_qa),
        shift(ctx + row * n_ctx),
        bsz * n_qa,
        bsz * n_ctx,
    )
    counts = jnp.concatenate([chunk_ctx >= 0, jnp.sum(n_chunks > 0, 1, keepdims=True)], 1)
    flat = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), adapter)
    l1 = losses.adapter_l1_sum(flat, counts.reshape(-1), (jnp.max(n_chunks) + 1) * hcfg.rank)
    return (main + l1_coef * l1) / jnp.sum(n_chunks > 0)


def _hypernet(encoder: str):
    hcfg = D2LConfig.for_base(
        CFG,
        latent_size=8,
        n_latent_queries=4,
        num_blocks=1,
        rank=2,
        ctx_encoder_type=encoder,
        early_exit_layer=1 if encoder == "early_exit" else None,
    )
    params = d2l_init(hcfg, jax.random.key(1))
    # official init has B = 0 (the adapter does nothing, the Perceiver gets no gradient)
    rng = np.random.default_rng(2)

    def perturb(path, x):
        key = jax.tree_util.keystr(path)
        if "scaler_B" in key or "bias_B" in key:
            return x + 0.3 + 0.1 * jnp.asarray(rng.normal(size=x.shape), x.dtype)
        return x

    return hcfg, jax.tree_util.tree_map_with_path(perturb, params)


def _batch():
    """Two packed rows: contexts of 1-3 chunks, 1-2 queries each, unused chunk/context slots."""
    rng = np.random.default_rng(0)
    tok = lambda n: [int(x) for x in rng.integers(3, CFG.vocab_size, n)]  # noqa: E731

    def item(chunk_lens, query_lens, n_labels):
        ids = [tok(n) for n in query_lens]
        labels = [[-100] * (len(q) - k) + q[-k:] for q, k in zip(ids, n_labels)]
        lp = [np.log(rng.dirichlet(np.ones(K), k)).astype(np.float32) for k in n_labels]
        top = [rng.integers(0, CFG.vocab_size, (k, K)).astype(np.int32) for k in n_labels]
        return {
            "ctx_chunks": [tok(n) for n in chunk_lens],
            "input_ids": ids,
            "labels": labels,
            "logprobs_vals": lp,
            "logprobs_indices": top,
        }

    pc = packing.PackConfig(
        max_inp_len=24, max_ctx_len=32, max_contexts=4, max_chunks=8, max_qas=4, top_k=K
    )
    rows = [
        [item([5, 4, 3], [6, 5], [2, 1]), item([6], [7], [3])],  # 6 label tokens
        [item([4, 2], [5], [1]), item([3, 3], [6], [2]), item([5], [4], [2])],
    ]
    packed = [packing.pack_row(r, pc) for r in rows]
    return {k: jnp.asarray(np.stack([p[k] for p in packed])) for k in packed[0]}


@pytest.mark.parametrize("objective", ["ce", "distill"])
@pytest.mark.parametrize("encoder", ["early_exit", "per_layer_activations"])
def test_d2l_loss_and_grads_match_plain_formulation(encoder, objective):
    hcfg, hyper = _hypernet(encoder)
    base = transformer.init_params(CFG, jax.random.key(0))
    batch = _batch()
    n_ctx = d2l_loss.d2l_count(batch).astype(jnp.float32)
    key = jax.random.key(3)
    # LM head everywhere (today's presets) and at label positions only; the distill objective
    # differs from "ce" only in what is gathered at those positions
    budgets = (None, LABEL_BUDGET) if objective == "ce" else (LABEL_BUDGET,)
    fns = [lambda p: reference_loss(p, base, batch, hcfg=hcfg, objective=objective, l1_coef=0.5)]
    for max_label_len in budgets:
        loss = d2l_loss.make_d2l_loss(
            hcfg,
            CFG,
            objective=objective,
            l1_coef=0.5,
            max_chunk_len=CHUNK_LEN,
            max_label_len=max_label_len,
        )
        fns.append(lambda p, f=loss: f(p, base, batch, key, n_ctx)[0])
    # one program for all (compilation is most of this test's time)
    (want, want_g), *got = jax.jit(lambda p: [jax.value_and_grad(f)(p) for f in fns])(hyper)
    for max_label_len, (value, grads) in zip(budgets, got):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=str(max_label_len))
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            w = _at(want_g, path)
            scale = float(jnp.max(jnp.abs(w))) + 1e-12
            np.testing.assert_allclose(
                g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)
            )
    projection_grad = grads["aggregator"]["modality_projection"]["gate_proj"]["kernel"]
    assert jnp.any(projection_grad != 0)  # the perturbed params let every part learn


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_d2l_loss_flops_follow_real_tokens_and_labels():
    """The Perceiver's input projection runs on the packed context (B x Tc tokens), not on the
    chunk rows (B x C x CHUNK_LEN); the LM head runs at max_label_len positions, not at T."""
    hcfg, hyper = _hypernet("early_exit")
    base = transformer.init_params(CFG, jax.random.key(0))
    batch = _batch()
    loss = d2l_loss.make_d2l_loss(
        hcfg, CFG, objective="ce", max_chunk_len=CHUNK_LEN, max_label_len=LABEL_BUDGET
    )

    def parts(fn):
        by_scope = count_flops_by_scope(jax.grad(fn), hyper)
        proj = sum(f for s, f in by_scope.items() if "modality_projection" in s)
        head = sum(f for s, f in by_scope.items() if "lm_head" in s)
        return proj, head

    new_proj, new_head = parts(lambda p: loss(p, base, batch, jax.random.key(0), 1.0)[0])
    ref_proj, ref_head = parts(
        lambda p: reference_loss(p, base, batch, hcfg=hcfg, objective="ce", l1_coef=0.1)
    )
    bsz, tc = batch["ctx_ids"].shape
    n_slots, t = batch["chunk_context"].shape[1], batch["input_ids"].shape[1]
    assert new_proj / ref_proj == pytest.approx(tc / (n_slots * CHUNK_LEN))
    assert new_head / ref_head == pytest.approx(LABEL_BUDGET / t)


def test_check_label_budget():
    batch = {k: np.asarray(v) for k, v in _batch().items()}
    packing.check_label_budget(batch, LABEL_BUDGET)
    packing.check_label_budget(batch, None)  # every position: nothing to check
    with pytest.raises(InputError, match=r"row 0 .* 6 label tokens > train.max_label_len=5"):
        packing.check_label_budget(batch, LABEL_BUDGET - 1)
    t2l = {"loss_mask": np.array([[1, 1, 0, 0], [0, 1, 1, 0]], bool)}
    packing.check_label_budget(t2l, 2)
    with pytest.raises(InputError, match="row 1 .* 2 label tokens"):  # t=0 is never a target
        packing.check_label_budget(t2l, 1)


def test_online_teacher_topk_at_label_positions():
    """The online teacher's LM head also runs only at the gathered positions, same values."""
    base = transformer.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(1)
    online = {
        "teacher_ids": jnp.asarray(rng.integers(3, CFG.vocab_size, (2, 10)), jnp.int32),
        "teacher_segment_ids": jnp.ones((2, 10), jnp.int32),
        "teacher_pos": jnp.asarray(np.stack([np.arange(2, 12) % 10, np.arange(10)]), jnp.int32),
    }
    at = jnp.asarray([[3, 5, 9], [0, 1, 2]], jnp.int32)
    vals, idx = d2l_loss._teacher_topk(base, CFG, online, jnp.float32)
    vals_at, idx_at = d2l_loss._teacher_topk(base, CFG, online, jnp.float32, at)
    assert vals_at.shape == (2, 3, 16)
    np.testing.assert_allclose(vals_at, losses.take_positions(vals, at), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(idx_at, losses.take_positions(idx, at))


def _eqns(jaxpr):
    """Every equation of a jaxpr, nested ones (scan, pjit, custom_vjp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


@pytest.mark.parametrize("encoder", ["early_exit", "per_layer_activations"])
def test_bf16_step_accumulates_every_matmul_in_f32(encoder):
    """compute dtype bf16: every matmul with a bf16 operand (student, context encoder, adapter,
    Perceiver, and their backward) returns f32, i.e. accumulates in f32 (traced, not run)."""
    hcfg, hyper = _hypernet(encoder)
    base = transformer.init_params(CFG, jax.random.key(0))
    loss = d2l_loss.make_d2l_loss(
        hcfg,
        CFG,
        objective="distill",
        max_chunk_len=CHUNK_LEN,
        max_label_len=LABEL_BUDGET,
        dtype=jnp.bfloat16,
    )
    grad = jax.grad(lambda p: loss(p, base, _batch(), jax.random.key(0), 2.0)[0])
    dots = [
        e for e in _eqns(jax.make_jaxpr(grad)(hyper).jaxpr) if e.primitive.name == "dot_general"
    ]
    bf16 = [e for e in dots if any(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert len(bf16) > len(dots) // 2  # the step does run in bf16
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in bf16), [
        str(e.source_info.name_stack) for e in bf16 if e.outvars[0].aval.dtype != jnp.float32
    ]

"""Pieces of the pure training steps: the packed student with masked chunk LoRAs equals the
official combine_lora composition (hypernet/doc_to_lora.compose), packed-context gathering,
gradient accumulation equals one big batch, and the frozen base params receive no update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.hypernet.d2l.api import compose
from hyperlora_jax.train import d2l_loss, optim, update

RNG = np.random.default_rng(0)


@pytest.mark.slow
def test_packed_d2l_student_equals_inference_composition():
    """The training step's masked chunk LoRAs on a packed row give the same student logits as
    inference: each chunk encoded alone, LoRAs composed in the official combine_lora order
    (hypernet/doc_to_lora.compose), each context's query run alone with its adapter."""
    from hyperlora_jax.data import packing
    from hyperlora_jax.hypernet.d2l.api import chunk_loras, pad_chunks
    from hyperlora_jax.hypernet.d2l.model import D2LConfig, bias_lora
    from hyperlora_jax.hypernet.d2l.model import init_params as d2l_init
    from hyperlora_jax.models import transformer
    from hyperlora_jax.models.testing import tiny_model

    small = dict(hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)
    cfg, base = tiny_model(vocab_size=48, **small)
    hcfg = D2LConfig.for_base(
        cfg,
        latent_size=16,
        n_latent_queries=4,
        num_blocks=1,
        rank=2,
        ctx_encoder_type="early_exit",
        early_exit_layer=1,
    )
    hyper = d2l_init(hcfg, jax.random.key(1))
    # the bias LoRA starts at zero: give it values so its once-per-context use is checked too
    hyper = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "bias" in jax.tree_util.keystr(p).lower() else x, hyper
    )
    tok = lambda n: [int(x) for x in RNG.integers(3, 48, size=n)]  # noqa: E731
    items = [  # context 0: two chunks, context 1: one chunk; two queries for context 0
        {
            "ctx_chunks": [tok(5), tok(3)],
            "input_ids": [tok(4), tok(6)],
            "labels": [[-100, -100, 7, 8], [-100] * 5 + [9]],
        },
        {"ctx_chunks": [tok(4)], "input_ids": [tok(5)], "labels": [[-100] * 4 + [5]]},
    ]
    pc = packing.PackConfig(
        max_inp_len=20, max_ctx_len=16, max_contexts=3, max_chunks=4, max_qas=4, top_k=0
    )
    row = {k: jnp.asarray(v)[None] for k, v in packing.pack_row(items, pc).items()}
    loss = d2l_loss.make_d2l_loss(hcfg, cfg, objective="ce", max_chunk_len=8)
    # jitted: op-by-op dispatch would compile every primitive separately
    forward = jax.jit(lambda ids, **kw: transformer.forward(base, cfg, ids, **kw).logits[0])
    adapter, weights = jax.jit(loss.adapter_fn)(hyper, base, row)
    got = forward(
        row["input_ids"],
        segment_ids=row["segment_ids"],
        positions=row["positions"],
        adapter=adapter,
        adapter_index=weights,
    )

    t = 0
    for it in items:
        toks, mask = pad_chunks(it["ctx_chunks"])
        a, b = chunk_loras(hyper, base, toks, mask, config=hcfg, ctx_config=cfg)
        ad = compose(a, b, [len(it["ctx_chunks"])], hcfg.lora_alpha, bias=bias_lora(hyper, hcfg))
        for ids in it["input_ids"]:
            want = forward(jnp.asarray([ids]), adapter=ad)
            np.testing.assert_allclose(got[t : t + len(ids)], want, rtol=1e-4, atol=1e-5)
            t += len(ids)
    # the adapters matter: without them the logits differ
    plain = forward(jnp.asarray([items[1]["input_ids"][0]]))
    assert not np.allclose(got[t - 5 : t], plain, atol=1e-4)


def test_gather_chunks_unpacks_packed_context():
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    feats = np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 6, 2)
    g, mask = d2l_loss.gather_chunks(jnp.asarray(feats), jnp.asarray(seg), 2, 4)
    assert g.shape == (4, 4, 2) and mask.shape == (4, 4)
    np.testing.assert_array_equal(g[0, :3], feats[0, :3])
    np.testing.assert_array_equal(g[1, :2], feats[0, 3:5])
    np.testing.assert_array_equal(g[2], feats[1, :4])
    np.testing.assert_array_equal(
        mask,
        [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]],  # empty slot: 1 token
    )


def _toy():
    def loss_fn(params, base, batch, rng, n):
        pred = batch["x"] @ (params["w"] + base["w0"])
        per = jnp.sum((pred - batch["y"]) ** 2, axis=-1)
        return jnp.sum(per * batch["valid"]) / n, {"sq": jnp.sum(per)}

    params = {"w": jnp.asarray(RNG.normal(size=(4, 2)), jnp.float32)}
    base = {"w0": jnp.asarray(RNG.normal(size=(4, 2)), jnp.float32)}
    batch = {
        "x": jnp.asarray(RNG.normal(size=(8, 4)), jnp.float32),
        "y": jnp.asarray(RNG.normal(size=(8, 2)), jnp.float32),
        "valid": jnp.asarray([1, 1, 1, 0, 1, 1, 1, 1], jnp.float32),  # uneven micro-batches
    }
    return loss_fn, params, base, batch


def test_grad_accumulation_equals_one_batch_and_base_is_frozen():
    loss_fn, params, base, batch = _toy()
    tx, _ = optim.make_optimizer(params, lr=0.1, total_steps=5, schedule="constant")
    count = lambda b: jnp.sum(b["valid"])  # noqa: E731
    outs = []
    for k in (1, 2, 4):
        step = jax.jit(update.make_train_step(loss_fn, tx, count, grad_accum_steps=k))
        st, m = step(update.TrainState.create(params, tx), base, batch)
        outs.append((st, m))
    for st, m in outs[1:]:
        np.testing.assert_allclose(m["loss"], outs[0][1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], outs[0][1]["grad_norm"], rtol=1e-6)
        np.testing.assert_allclose(st.params["w"], outs[0][0].params["w"], rtol=1e-6, atol=1e-7)
    # gradients exist only for the hypernetwork params: the state holds no base params at all
    st = outs[0][0]
    assert set(st.params) == {"w"} and not np.allclose(st.params["w"], params["w"])
    assert int(st.step) == 1 and int(st.bad_total) == 0


@pytest.mark.slow
def test_online_teacher_matches_stored_topk():
    from hyperlora_jax.models import transformer
    from hyperlora_jax.models.testing import tiny_model

    small = dict(hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)
    cfg, base = tiny_model(vocab_size=40, num_layers=1, **small)
    tok = jnp.asarray(RNG.integers(0, 40, size=(2, 6)), jnp.int32)
    seg = jnp.ones_like(tok)
    logp = jax.nn.log_softmax(transformer.forward(base, cfg, tok, segment_ids=seg).logits, -1)
    vals, idx = jax.lax.top_k(logp, 16)  # stored at the *label* token: shift right by one
    stored = {
        "logprobs_vals": jnp.concatenate([jnp.zeros_like(vals[:, :1]), vals[:, :-1]], 1),
        "logprobs_indices": jnp.concatenate([jnp.zeros_like(idx[:, :1]), idx[:, :-1]], 1),
    }
    online = {
        "teacher_ids": tok,
        "teacher_segment_ids": seg,
        "teacher_pos": jnp.broadcast_to(jnp.arange(6), (2, 6)),
    }
    v1, i1 = d2l_loss._teacher_topk(base, cfg, stored, jnp.float32)
    v2, i2 = d2l_loss._teacher_topk(base, cfg, online, jnp.float32)
    np.testing.assert_allclose(v1[:, :-1], v2[:, :-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(i1[:, :-1], i2[:, :-1])

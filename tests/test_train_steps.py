"""Pieces of the pure training steps: chunk composition equals the official combine_lora order
(hypernet/doc_to_lora.compose), packed-context gathering, gradient accumulation equals one big
batch, and the frozen base params receive no update."""

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.hypernet.doc_to_lora import compose
from hyperlora_jax.train import optim
from hyperlora_jax.train import steps as S

RNG = np.random.default_rng(0)


def test_compose_chunks_matches_combine_lora():
    L, r, di, do = 2, 3, 5, 4  # noqa: N806
    n_chunks = [2, 1]
    a = {"down_proj": RNG.normal(size=(3, L, r, di)).astype(np.float32)}
    b = {"down_proj": RNG.normal(size=(3, L, r, do)).astype(np.float32)}
    bias = ({"down_proj": RNG.normal(size=(L, r, di))}, {"down_proj": RNG.normal(size=(L, r, do))})
    want = compose(a, b, n_chunks, 2.0, bias=bias)
    # same chunks, in fixed slots: 4 chunk slots (last unused), 3 context slots (last unused)
    pad = lambda x: np.concatenate([x, 7 + np.zeros_like(x[:1])])  # noqa: E731
    ca, cb = S.compose_chunks(
        {"down_proj": pad(a["down_proj"])},
        {"down_proj": pad(b["down_proj"])},
        *bias,
        np.array([0, 0, 1, -1]),
        np.array([0, 1, 0, 0]),
        np.array([2, 1, 0]),
        2,
    )
    np.testing.assert_allclose(ca["down_proj"][:2], want.a["down_proj"], rtol=1e-6)
    np.testing.assert_allclose(cb["down_proj"][:2], want.b["down_proj"], rtol=1e-6)
    assert not np.any(ca["down_proj"][2]) and not np.any(cb["down_proj"][2])


def test_gather_chunks_unpacks_packed_context():
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    feats = np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 6, 2)
    g, mask = S.gather_chunks(jnp.asarray(feats), jnp.asarray(seg), 2, 4)
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
        step = jax.jit(S.make_train_step(loss_fn, tx, count, grad_accum_steps=k))
        st, m = step(S.TrainState.create(params, tx), base, batch)
        outs.append((st, m))
    for st, m in outs[1:]:
        np.testing.assert_allclose(m["loss"], outs[0][1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], outs[0][1]["grad_norm"], rtol=1e-6)
        np.testing.assert_allclose(st.params["w"], outs[0][0].params["w"], rtol=1e-6, atol=1e-7)
    # gradients exist only for the hypernetwork params: the state holds no base params at all
    st = outs[0][0]
    assert set(st.params) == {"w"} and not np.allclose(st.params["w"], params["w"])
    assert int(st.step) == 1 and int(st.bad_total) == 0


def test_online_teacher_matches_stored_topk():
    from hyperlora_jax.models import transformer
    from hyperlora_jax.models.config import ModelConfig

    cfg = ModelConfig(
        family="llama",
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    base = transformer.init_params(cfg, jax.random.key(0))
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
    v1, i1 = S._teacher_topk(base, cfg, stored, jnp.float32)
    v2, i2 = S._teacher_topk(base, cfg, online, jnp.float32)
    np.testing.assert_allclose(v1[:, :-1], v2[:, :-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(i1[:, :-1], i2[:, :-1])

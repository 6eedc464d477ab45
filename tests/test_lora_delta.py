"""lora_delta, the LoRA applied inside a projection (reference: dense numpy x (scale A^T B))."""

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.models.layers import lora_delta


def test_lora_delta_shared_and_per_example_match_dense():
    x = jax.random.normal(jax.random.key(0), (3, 5, 64))
    a = jax.random.normal(jax.random.key(1), (3, 4, 64))
    b = jax.random.normal(jax.random.key(2), (3, 4, 32))
    out = lora_delta(x, a, b, 0.5)
    ref = np.stack(
        [0.5 * np.asarray(x[i]) @ (np.asarray(a[i]).T @ np.asarray(b[i])) for i in range(3)]
    )
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    shared = lora_delta(x, a[1], b[1], 0.5)
    np.testing.assert_allclose(shared[1], ref[1], atol=1e-5, rtol=1e-5)


def test_lora_delta_adapter_index_global_and_per_row():
    bsz, t, n = 2, 7, 3
    x = jax.random.normal(jax.random.key(0), (bsz, t, 64))
    a = jax.random.normal(jax.random.key(1), (n, 4, 64))
    b = jax.random.normal(jax.random.key(2), (n, 4, 32))
    idx = jnp.array([[0, 0, 1, 1, 1, 2, 2], [2, 2, 2, 0, 1, 1, 1]])
    out = jax.jit(lora_delta, static_argnums=3)(x, a, b, 2.0, idx)
    dw = np.einsum("nrd,nro->ndo", a, b)
    ref = 2.0 * np.einsum("btd,btdo->bto", x, dw[np.asarray(idx)])
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    # Per-row sets [B, N, R, d]: row 1 uses the adapters in reverse order.
    perm = jnp.array([2, 1, 0])
    a_row, b_row = jnp.stack([a, a[perm]]), jnp.stack([b, b[perm]])
    idx_row = idx.at[1].set(perm[idx[1]])
    out_row = lora_delta(x, a_row, b_row, 2.0, idx_row)
    np.testing.assert_allclose(out_row, ref, atol=1e-4, rtol=1e-5)
    # Differentiable w.r.t. the factors (meta-training needs it).
    g = jax.grad(lambda a_: lora_delta(x, a_, b, 2.0, idx).sum())(a)
    assert g.shape == a.shape and bool(jnp.all(jnp.isfinite(g)))


def test_lora_delta_bf16_input_accumulates_in_f32():
    x = jax.random.normal(jax.random.key(0), (1, 3, 64)).astype(jnp.bfloat16)
    a = jax.random.normal(jax.random.key(1), (4, 64))
    b = jax.random.normal(jax.random.key(2), (4, 32))
    out = lora_delta(x, a, b, 1.0)
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float32) @ np.asarray(a).T @ np.asarray(b)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)

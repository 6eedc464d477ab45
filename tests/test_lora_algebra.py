"""The adapter algebra by name: concat / weighted_sum (exact), scale, truncate and from_dense (SVD,
error reported), all pure and jit-able. Reference: numpy on the dense deltas scale * A^T B
(float64 SVD); tolerance 1e-5 absolute (f32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax import lora
from hyperlora_jax.errors import InputError
from hyperlora_jax.lora import adapter as ad
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models.testing import tiny_config

CFG = tiny_config(hidden_size=48, intermediate_size=80, head_dim=12, num_layers=3)


def rand_adapter(seed, modules=("q_proj", "down_proj"), rank=6, batch=(), scale=0.7):
    keys = jax.random.split(jax.random.key(seed), 2 * len(modules))
    a, b = {}, {}
    for i, m in enumerate(modules):
        d_in, d_out = CFG.module_dims(m)
        a[m] = jax.random.normal(keys[2 * i], (*batch, CFG.num_layers, rank, d_in)) * 0.2
        b[m] = jax.random.normal(keys[2 * i + 1], (*batch, CFG.num_layers, rank, d_out)) * 0.2
    return Adapter(a, b, scale)


def dense(x: Adapter) -> dict[str, np.ndarray]:
    return {m: np.asarray(v, np.float64) for m, v in ad.to_dense_delta(x).items()}


def test_concat_and_weighted_sum_are_exact_and_jit():
    x, y, z = rand_adapter(0, rank=2), rand_adapter(1, rank=3, scale=2.0), rand_adapter(2)
    c = jax.jit(ad.concat)([x, y, z])
    assert c.rank == 11 and c.scale == x.scale
    w = jax.jit(lambda ws: ad.weighted_sum([x, y, z], ws))(jnp.array([0.5, -2.0, 1.5]))
    dx, dy, dz, dc, dw = dense(x), dense(y), dense(z), dense(c), dense(w)
    for m in dx:
        np.testing.assert_allclose(dc[m], dx[m] + dy[m] + dz[m], atol=1e-5, rtol=0)
        np.testing.assert_allclose(dw[m], 0.5 * dx[m] - 2 * dy[m] + 1.5 * dz[m], atol=1e-5)
    # linear in the weights: the gradient w.r.t. a weight is that adapter's delta
    g = jax.grad(lambda s: ad.to_dense_delta(ad.weighted_sum([x, y], [s, 1.0]))["q_proj"].sum())
    np.testing.assert_allclose(g(0.3), dx["q_proj"].sum(), rtol=1e-5)
    s = jax.jit(ad.scale)(x, -3.0)
    np.testing.assert_allclose(dense(s)["down_proj"], -3 * dx["down_proj"], atol=1e-5)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_truncate_error_is_the_discarded_singular_values(batch):
    x = rand_adapter(3, rank=6, batch=batch)
    t, err = jax.jit(ad.truncate, static_argnums=1)(x, 2)
    assert t.rank == 2 and t.scale == x.scale and t.batch_shape == x.batch_shape
    dx, dt = dense(x), dense(t)
    for m in dx:
        u, s, vt = np.linalg.svd(dx[m])  # [*batch, L, d_in, d_out], float64
        discarded = np.sqrt(np.sum(s[..., 2:] ** 2, axis=-1))  # [*batch, L]
        assert err[m].shape == (*batch, CFG.num_layers)
        np.testing.assert_allclose(err[m], discarded, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            np.linalg.norm(dx[m] - dt[m], axis=(-2, -1)), discarded, rtol=1e-4, atol=1e-6
        )
        best = np.einsum("...ik,...k,...kj->...ij", u[..., :2], s[..., :2], vt[..., :2, :])
        np.testing.assert_allclose(dt[m], best, atol=1e-5, rtol=0)  # Eckart-Young
    # rank >= R: exact, error 0, zero-padded
    same, err0 = ad.truncate(x, 9)
    assert same.rank == 9
    for m in dx:
        np.testing.assert_allclose(dense(same)[m], dx[m], atol=1e-5, rtol=0)
        np.testing.assert_allclose(err0[m], 0.0, atol=1e-5)


def test_from_dense_recovers_low_rank_and_reports_error():
    x = rand_adapter(4, rank=3, scale=2.0)
    deltas = ad.to_dense_delta(x)
    y, err = ad.from_dense(deltas, rank=3, scale=2.0)
    assert y.scale == 2.0 and y.rank == 3
    for m in deltas:
        np.testing.assert_allclose(dense(y)[m], np.asarray(deltas[m]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(err[m], 0.0, atol=1e-4)
    full = {"o_proj": jax.random.normal(jax.random.key(5), (CFG.num_layers, 48, 48))}
    y, err = ad.from_dense(full, rank=5)
    s = np.linalg.svd(np.asarray(full["o_proj"], np.float64), compute_uv=False)
    np.testing.assert_allclose(err["o_proj"], np.sqrt((s[:, 5:] ** 2).sum(-1)), rtol=1e-4)
    with pytest.raises(InputError, match="rank"):
        ad.truncate(x, 0)


def test_package_namespace_exposes_the_algebra():
    x = rand_adapter(6)
    assert lora.concat is ad.concat and lora.truncate is ad.truncate
    assert callable(lora.apply) and callable(lora.merge)
    both = lora.weighted_sum([x, x], [1.0, -1.0])
    np.testing.assert_allclose(dense(both)["q_proj"], 0.0, atol=1e-6)

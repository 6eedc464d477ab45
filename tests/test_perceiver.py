"""D2L Perceiver: parity with the official aggregator output, and segment isolation.

Reference: tests/fixtures/official/d2l/golden.npz (`ctx_features` -> `agg_out`), produced by the
official ctx_to_lora code in float32. Tolerance from the fixture README: rtol 1e-4, atol 1e-5.
"""

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.convert.official_d2l import read_official
from hyperlora_jax.errors import ConfigError
from hyperlora_jax.hypernet.d2l.model import HyperLoRA
from hyperlora_jax.hypernet.d2l.perceiver import Perceiver, PerceiverConfig, torch_linear_init

D2L = "official/d2l"


@lru_cache(maxsize=1)
def _official(fixtures_dir):
    cfg, params, _ = read_official(fixtures_dir / D2L / "pytorch_model.bin")
    golden = dict(np.load(fixtures_dir / D2L / "golden.npz"))
    return params, cfg, golden


def test_aggregator_matches_official(fixtures_dir):
    params, cfg, g = _official(fixtures_dir)
    mask = jnp.asarray(g["ctx_attn_mask"]).astype(bool)
    out = HyperLoRA(cfg).apply(
        {"params": params}, jnp.asarray(g["ctx_features"]), mask, method=HyperLoRA.aggregate
    )
    assert out.shape == g["agg_out"].shape == (4, 3, 1, 8, 32)
    np.testing.assert_allclose(np.asarray(out), g["agg_out"], rtol=1e-4, atol=1e-5)


def test_segments_are_isolated(fixtures_dir):
    """A chunk's latents depend only on its own unpadded tokens: other chunks and padding don't
    matter (each (layer, chunk) is its own segment, as the official varlen kernel)."""
    params, cfg, g = _official(fixtures_dir)
    pcfg = cfg.perceiver_config()
    p = {"params": params["aggregator"]}
    feats = jnp.asarray(g["ctx_features"][:, 1])  # one layer: [4, 65, 64]
    mask = jnp.asarray(g["ctx_attn_mask"]).astype(bool)
    full = Perceiver(pcfg).apply(p, feats, mask)
    rng = np.random.default_rng(0)
    noisy = np.where(np.asarray(mask)[..., None], np.asarray(feats), 1e3)
    noisy[1:] = rng.normal(size=noisy[1:].shape)  # other chunks: different content
    noisy = jnp.asarray(noisy, jnp.float32)
    again = Perceiver(pcfg).apply(p, noisy, mask)
    n0 = int(mask[0].sum())
    alone = Perceiver(pcfg).apply(p, feats[:1, :n0], mask[:1, :n0])
    np.testing.assert_allclose(np.asarray(again[0]), np.asarray(full[0]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(full[0]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(again[1]), np.asarray(full[1]), atol=1e-3)


def test_official_init_distributions():
    """torch nn.Linear default init U(+-1/sqrt(fan_in)); latents N(0, 1) (checked on the
    initializers the modules use, to keep the test to two small ops)."""
    q = np.asarray(torch_linear_init(jax.random.key(0), (32, 2048)))
    assert np.abs(q).max() <= 1 / np.sqrt(32) and np.abs(q).max() > 0.99 / np.sqrt(32)
    assert abs(q.std() - 1 / np.sqrt(3 * 32)) < 0.01 / np.sqrt(32)


def test_bad_config():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        PerceiverConfig(input_size=8, n_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="num_blocks"):
        PerceiverConfig(input_size=8, num_blocks=0)


def test_blocked_projection_value_and_gradient_equal_unblocked():
    """The modality projection over token blocks (lax.map; its gradient a scan over the blocks)
    equals the unblocked SwiGLU in value and in every gradient (x and the three kernels) to
    1e-5, with a ragged last block (10 tokens in blocks of 4)."""
    from hyperlora_jax.hypernet.d2l.perceiver import SwiGLU

    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    blocked, plain = SwiGLU(16, 6, block_tokens=4), SwiGLU(16, 6)
    params = plain.init(jax.random.key(1), x)

    def loss(m):
        return lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))

    np.testing.assert_allclose(blocked.apply(params, x), plain.apply(params, x), atol=1e-5)
    got = jax.grad(loss(blocked), argnums=(0, 1))(params, x)
    want = jax.grad(loss(plain), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)

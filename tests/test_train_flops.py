"""Matmul FLOPs from the jaxpr: scan bodies times their length (XLA's cost analysis counts a loop
body once), and a tiny transformer forward equal to the hand count of its matmuls."""

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.models import transformer
from hyperlora_jax.models.testing import tiny_config
from hyperlora_jax.train.flops import count_flops


def test_scan_body_counts_length_times_and_cond_its_larger_branch():
    def f(x, w):
        y, _ = jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)
        return jax.lax.cond(y.sum() > 0, lambda: y @ w[0], lambda: y)

    x, w = jnp.ones((4, 8)), jnp.ones((5, 8, 8))
    assert count_flops(f, x, w) == 5 * 2 * 4 * 8 * 8 + 2 * 4 * 8 * 8
    batched = jax.vmap(lambda a, b: a @ b)  # batch dims count once per batch element
    assert count_flops(batched, jnp.ones((3, 4, 8)), jnp.ones((3, 8, 2))) == 3 * 2 * 4 * 8 * 2


def test_transformer_forward_equals_hand_count():
    cfg = tiny_config(num_layers=3)
    params = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
    b, t = 2, 12
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    d, h, kv, hd, i = 32, 4, 2, 8, 64
    per_token_layer = 2 * d * (h + 2 * kv) * hd + 2 * h * hd * d + 3 * 2 * d * i
    attention = 2 * (2 * t * hd * h)  # scores and weighted values over all t keys
    want = b * t * (cfg.num_layers * (per_token_layer + attention) + 2 * d * 64)
    got = count_flops(lambda p, x: transformer.forward(p, cfg, x).logits, params, tokens)
    np.testing.assert_equal(got, want)

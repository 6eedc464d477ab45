"""`lora.apply` / `lora.merge` on Flax models we did not write, PEFT layouts, functional training.

Two independent decoders are written here in other styles than hyperlora_jax.models:
* `GemmaStyle`: google-deepmind/gemma's Linen layout (blocks `layer_{i}`, `Einsum` modules called
  (eqn, x) with param `w`, q_einsum [N, D, H], a stacked kv_einsum 'BSD,CKDH->CBSKH',
  attn_vec_einsum [N, H, D], the MLP's two einsums sharing one scope), Gemma-2 numerics.
* `FusedLlama`: fused projections (one Dense for q|k|v, one for gate|up), a DenseGeneral output
  projection over (heads, head_dim), blocks in a setup list (`blocks_{i}`), Llama numerics.
Our tiny models' weights are mapped into their layouts, so the base logits agree with
`hyperlora_jax.models.transformer.forward`, and an adapter must give the same logits through
`lora.apply`, through `lora.merge`, and through our own forward(adapter=...).

Reference and tolerance: our transformer in f32 at highest matmul precision, 1e-5 absolute on
logits; HF PEFT (PyTorch f32) 1e-4 absolute, as tests/test_peft.py.
"""

from __future__ import annotations

import functools
import math
import sys
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperlora_jax import lora
from hyperlora_jax.errors import InputError
from hyperlora_jax.lora import adapter as ad
from hyperlora_jax.lora import peft as lp
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models import transformer
from hyperlora_jax.models.config import TARGET_MODULES

ATOL = 1e-5
TOKENS = np.array([[5, 17, 33, 2, 90, 41, 7, 64], [9, 9, 100, 3, 54, 12, 77, 1]])


# ----------------------------------------------------------------- independent model 1: Gemma


class Einsum(nn.Module):
    """A parameterised einsum called (eqn, x), as gemma's `_layers.Einsum`."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn: str, x):
        w = self.param(self.weight_name, nn.initializers.normal(0.02), self.shape)
        return jnp.einsum(eqn, x, w)


class GemmaNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * (1 + scale)


def rope_halves(x, positions, theta: float):
    """RoPE written on split halves (x [B, T, N, H], positions [B, T])."""
    half = x.shape[-1] // 2
    frac = 2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1]
    angle = positions[..., None].astype(jnp.float32) / theta**frac  # [B, T, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class GemmaAttention(nn.Module):
    num_heads: int
    num_kv_heads: int
    features: int
    head_dim: int
    query_pre_attn_scalar: float
    softcap: float | None
    theta: float

    def setup(self):
        self.q_einsum = Einsum((self.num_heads, self.features, self.head_dim))
        self.kv_einsum = Einsum((2, self.num_kv_heads, self.features, self.head_dim))
        self.attn_vec_einsum = Einsum((self.num_heads, self.head_dim, self.features))

    def __call__(self, x, positions):
        q = self.q_einsum("BTD,NDH->BTNH", x)
        k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        q = rope_halves(q, positions, self.theta) * self.query_pre_attn_scalar
        k = rope_halves(k, positions, self.theta)
        b, t, n, h = q.shape
        g = n // self.num_kv_heads
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", q.reshape(b, t, self.num_kv_heads, g, h), k)
        if self.softcap is not None:
            logits = jnp.tanh(logits / self.softcap) * self.softcap
        causal = jnp.tril(jnp.ones((t, t), bool))[None, :, None, None, :]
        probs = jax.nn.softmax(jnp.where(causal, logits, -2.3819763e38), axis=-1)
        enc = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
        return self.attn_vec_einsum("BTNH,NHD->BTD", enc)


class GemmaFeedForward(nn.Module):
    features: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        gating = Einsum((2, self.hidden_dim, self.features), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        gate = gating("...F,NHF->...NH", x)
        act = nn.gelu(gate[..., 0, :], approximate=True) * gate[..., 1, :]
        linear = Einsum((self.hidden_dim, self.features), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", act)


class GemmaBlock(nn.Module):
    cfg: dict

    def setup(self):
        c = self.cfg
        self.pre_attention_norm = GemmaNorm()
        self.attn = GemmaAttention(
            c["heads"], c["kv_heads"], c["width"], c["head_dim"], c["qpas"], c["softcap"],
            c["theta"],
        )  # fmt: skip
        self.post_attention_norm = GemmaNorm()
        self.pre_ffw_norm = GemmaNorm()
        self.mlp = GemmaFeedForward(c["width"], c["hidden"])
        self.post_ffw_norm = GemmaNorm()

    def __call__(self, x, positions):
        x = x + self.post_attention_norm(self.attn(self.pre_attention_norm(x), positions))
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))


class GemmaStyle(nn.Module):
    cfg: dict

    def setup(self):
        c = self.cfg
        self.input_embedding = self.param(
            "input_embedding", nn.initializers.normal(), (c["vocab"], c["width"])
        )
        self.blocks = [GemmaBlock(c, name=f"layer_{i}") for i in range(c["layers"])]
        self.final_norm = GemmaNorm()

    def __call__(self, tokens):
        x = self.input_embedding[(tokens,)] * jnp.sqrt(self.cfg["width"]).astype(jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        for block in self.blocks:
            x = block(x, positions)
        logits = self.final_norm(x) @ self.input_embedding.T
        cap = self.cfg["final_softcap"]
        return logits if cap is None else jnp.tanh(logits / cap) * cap


def to_gemma_style(config, params):
    """Our gemma2 (config, params) -> (GemmaStyle cfg, its params)."""
    c = config
    n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    cfg = dict(
        vocab=c.vocab_size, width=d, layers=c.num_layers, heads=n, kv_heads=k, head_dim=h,
        hidden=c.intermediate_size, qpas=c.query_pre_attn_scalar**-0.5,
        softcap=c.attn_logit_softcap, final_softcap=c.final_logit_softcap, theta=c.rope_theta,
    )  # fmt: skip
    lay, out = params["layers"], {"input_embedding": params["embedding"]}
    for i in range(c.num_layers):
        ker = {m: lay[g][m]["kernel"][i] for g in ("attn", "mlp") for m in lay[g]}
        kv = [ker[m].reshape(d, k, h).transpose(1, 0, 2) for m in ("k_proj", "v_proj")]
        out[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": lay["attn_norm"]["scale"][i]},
            "post_attention_norm": {"scale": lay["post_attn_norm"]["scale"][i]},
            "pre_ffw_norm": {"scale": lay["mlp_norm"]["scale"][i]},
            "post_ffw_norm": {"scale": lay["post_mlp_norm"]["scale"][i]},
            "attn": {
                "q_einsum": {"w": ker["q_proj"].reshape(d, n, h).transpose(1, 0, 2)},
                "kv_einsum": {"w": jnp.stack(kv)},
                "attn_vec_einsum": {"w": ker["o_proj"].reshape(n, h, d)},
            },
            "mlp": {
                "gating_einsum": jnp.stack([ker["gate_proj"].T, ker["up_proj"].T]),
                "linear": ker["down_proj"],
            },
        }
    out["final_norm"] = {"scale": params["final_norm"]["scale"]}
    return cfg, out


# ----------------------------------------------------------------- independent model 2: fused


class RMS(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        return w * (x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))


class FusedAttention(nn.Module):
    heads: int
    kv_heads: int
    head_dim: int
    width: int
    theta: float

    def setup(self):
        n, k, h = self.heads, self.kv_heads, self.head_dim
        self.wqkv = nn.Dense((n + 2 * k) * h, use_bias=False)
        self.wo = nn.DenseGeneral(self.width, axis=(-2, -1), use_bias=False)

    def __call__(self, x):
        b, t, _ = x.shape
        n, k, h = self.heads, self.kv_heads, self.head_dim
        q, kk, v = jnp.split(self.wqkv(x), [n * h, (n + k) * h], axis=-1)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        q = rope_halves(q.reshape(b, t, n, h), pos, self.theta)
        kk = rope_halves(kk.reshape(b, t, k, h), pos, self.theta)
        kk, v = jnp.repeat(kk, n // k, axis=2), jnp.repeat(v.reshape(b, t, k, h), n // k, axis=2)
        s = jnp.einsum("bqnh,bknh->bnqk", q, kk) / math.sqrt(h)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, axis=-1), v)
        return self.wo(o)


class FusedMLP(nn.Module):
    width: int
    hidden: int

    def setup(self):
        self.w13 = nn.Dense(2 * self.hidden, use_bias=False)
        self.w2 = nn.Dense(self.width, use_bias=False)

    def __call__(self, x):
        gate, up = jnp.split(self.w13(x), 2, axis=-1)
        return self.w2(nn.silu(gate) * up)


class FusedBlock(nn.Module):
    cfg: dict

    def setup(self):
        c = self.cfg
        self.norm1, self.norm2 = RMS(c["eps"]), RMS(c["eps"])
        self.attn = FusedAttention(c["heads"], c["kv_heads"], c["head_dim"], c["width"], c["theta"])
        self.ffn = FusedMLP(c["width"], c["hidden"])

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class FusedLlama(nn.Module):
    cfg: dict

    def setup(self):
        c = self.cfg
        self.tok_embeddings = nn.Embed(c["vocab"], c["width"])
        self.blocks = [FusedBlock(c) for _ in range(c["layers"])]
        self.norm = RMS(c["eps"])
        self.output = nn.Dense(c["vocab"], use_bias=False)

    def __call__(self, tokens):
        x = self.tok_embeddings(tokens)
        for block in self.blocks:
            x = block(x)
        return self.output(self.norm(x))


def to_fused_llama(config, params):
    """Our llama (config, params) -> (FusedLlama cfg, its params)."""
    c = config
    cfg = dict(
        vocab=c.vocab_size, width=c.hidden_size, layers=c.num_layers, heads=c.num_heads,
        kv_heads=c.num_kv_heads, head_dim=c.head_dim, hidden=c.intermediate_size,
        eps=c.rms_norm_eps, theta=c.rope_theta,
    )  # fmt: skip
    lay = params["layers"]
    out = {"tok_embeddings": {"embedding": params["embedding"]}}
    for i in range(c.num_layers):
        ker = {m: lay[g][m]["kernel"][i] for g in ("attn", "mlp") for m in lay[g]}
        qkv = jnp.concatenate([ker["q_proj"], ker["k_proj"], ker["v_proj"]], axis=-1)
        out[f"blocks_{i}"] = {
            "norm1": {"weight": lay["attn_norm"]["scale"][i]},
            "norm2": {"weight": lay["mlp_norm"]["scale"][i]},
            "attn": {
                "wqkv": {"kernel": qkv},
                "wo": {"kernel": ker["o_proj"].reshape(c.num_heads, c.head_dim, -1)},
            },
            "ffn": {
                "w13": {"kernel": jnp.concatenate([ker["gate_proj"], ker["up_proj"]], axis=-1)},
                "w2": {"kernel": ker["down_proj"]},
            },
        }
    out["norm"] = {"weight": params["final_norm"]["scale"]}
    out["output"] = {"kernel": params["lm_head"]}
    return cfg, out


def fused_llama_targets(cfg: dict) -> tuple[lora.Target, ...]:
    blk = r"blocks_(?P<layer>\d+)"
    q, kv, i = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"], cfg["hidden"]
    return (
        lora.fused("q_proj", f"{blk}/attn/wqkv", 0, q),
        lora.fused("k_proj", f"{blk}/attn/wqkv", q, q + kv),
        lora.fused("v_proj", f"{blk}/attn/wqkv", q + kv, q + 2 * kv),
        lora.Target("o_proj", f"{blk}/attn/wo", kernel_layout="n h o -> (n h) o"),
        lora.fused("gate_proj", f"{blk}/ffn/w13", 0, i),
        lora.fused("up_proj", f"{blk}/ffn/w13", i, 2 * i),
        lora.Target("down_proj", f"{blk}/ffn/w2"),
    )


# ----------------------------------------------------------------- fixtures


def rand_adapter(config, seed, rank=4, batch=(), scale=1.5, modules=TARGET_MODULES, std=0.1):
    keys = jax.random.split(jax.random.key(seed), 2 * len(modules))
    a, b = {}, {}
    for j, m in enumerate(modules):
        d_in, d_out = config.module_dims(m)
        a[m] = jax.random.normal(keys[2 * j], (*batch, config.num_layers, rank, d_in)) * std
        b[m] = jax.random.normal(keys[2 * j + 1], (*batch, config.num_layers, rank, d_out)) * std
    return Adapter(a, b, scale)


def ours(config, params, tokens, adapter=None):
    return transformer.forward(params, config, jnp.asarray(tokens), adapter=adapter).logits


def max_diff(x, y) -> float:
    return float(jnp.abs(jnp.asarray(x) - jnp.asarray(y)).max())


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny HF Llama (default RoPE, so a Phi-3 twin exists), our (config, params) of it."""
    from tiny_models import make_tiny_hf, to_jax

    folder = tmp_path_factory.mktemp("llama")
    model, _ = make_tiny_hf("llama", rope_parameters=dict(rope_type="default", rope_theta=1e4))
    config, params = to_jax(model, folder)
    return model, folder, config, params


@pytest.fixture(scope="module")
def fused(hf_llama):
    _, _, config, params = hf_llama
    cfg, fparams = to_fused_llama(config, params)
    model = FusedLlama(cfg)
    fn = jax.jit(lambda v, t: model.apply(v, t))
    return model, cfg, {"params": fparams}, fn, fused_llama_targets(cfg)


@pytest.fixture(scope="module")
def hf_gemma2(tmp_path_factory):
    """A tiny HF Gemma-2 (window longer than the test sequences) and our (config, params)."""
    from tiny_models import make_tiny_hf, to_jax

    folder = tmp_path_factory.mktemp("gemma2")
    model, _ = make_tiny_hf("gemma2", sliding_window=64)
    config, params = to_jax(model, folder)
    return model, folder, config, params


@pytest.fixture(scope="module")
def gemma(hf_gemma2):
    _, _, config, params = hf_gemma2
    cfg, gparams = to_gemma_style(config, params)
    model = GemmaStyle(cfg)
    return model, {"params": gparams}, lora.presets.gemma()


# ----------------------------------------------------------------- parity with our transformer


def test_gemma_style_adapter_equals_merged_and_ours(hf_gemma2, gemma):
    _, _, config, params = hf_gemma2
    model, variables, targets = gemma
    assert max_diff(model.apply(variables, TOKENS), ours(config, params, TOKENS)) <= ATOL
    x = rand_adapter(config, 0)
    ref = ours(config, params, TOKENS, x)
    assert max_diff(ref, ours(config, params, TOKENS)) > 1e-2  # the adapter matters
    run = jax.jit(lambda v, a: lora.apply(model.apply, v, a, targets, TOKENS))
    assert max_diff(run(variables, x), ref) <= ATOL
    merged = lora.merge(variables, x, targets)
    assert max_diff(model.apply(merged, TOKENS), ref) <= ATOL
    back = lora.unmerge(merged, x, targets)
    for p, q in zip(jax.tree.leaves(variables), jax.tree.leaves(back), strict=True):
        np.testing.assert_allclose(q, p, atol=1e-6, rtol=0)
    # merge is a pure function of arrays: jit it
    jmerged = jax.jit(lambda v, a: lora.merge(v, a, targets))(variables, x)
    assert max_diff(model.apply(jmerged, TOKENS), ref) <= ATOL


def test_fused_llama_adapter_equals_merged_and_ours(hf_llama, fused):
    _, _, config, params = hf_llama
    _, _, variables, fn, targets = fused
    assert max_diff(fn(variables, TOKENS), ours(config, params, TOKENS)) <= ATOL
    x = rand_adapter(config, 1, rank=3)
    ref = ours(config, params, TOKENS, x)
    assert max_diff(ref, ours(config, params, TOKENS)) > 1e-2
    got = jax.jit(lambda v, a: lora.apply(fn, v, a, targets, TOKENS))(variables, x)
    assert max_diff(got, ref) <= ATOL
    merged = lora.merge(variables, x, targets)
    assert max_diff(fn(merged, TOKENS), ref) <= ATOL
    back = lora.unmerge(merged, x, targets)
    for p, q in zip(jax.tree.leaves(variables), jax.tree.leaves(back), strict=True):
        np.testing.assert_allclose(q, p, atol=1e-6, rtol=0)
    # a subset of the modules (q and v of the fused qkv only) leaves k untouched
    qv = rand_adapter(config, 2, modules=("q_proj", "v_proj"))
    got = lora.apply(fn, variables, qv, targets, TOKENS)
    assert max_diff(got, ours(config, params, TOKENS, qv)) <= ATOL


def test_our_transformer_through_apply_is_forward_with_adapter(hf_llama):
    """The preset for our own decoder: layers scanned, the layer index is the scan's."""
    _, _, config, params = hf_llama
    x = rand_adapter(config, 3)
    fwd = lambda p, t: transformer.forward(p, config, t).logits
    got = lora.apply(fwd, params, x, lora.presets.hyperlora(), jnp.asarray(TOKENS))
    assert max_diff(got, ours(config, params, TOKENS, x)) <= ATOL
    remat = lambda p, t: transformer.forward(p, config, t, remat_policy="full").logits
    got = lora.apply(remat, params, x, lora.presets.hyperlora(), jnp.asarray(TOKENS))
    assert max_diff(got, ours(config, params, TOKENS, x)) <= ATOL  # through nn.remat too
    merged = ad.merge_into(params, x, lora.presets.hyperlora())
    ref = ad.merge_into(params, x, config)
    for p, q in zip(jax.tree.leaves(ref), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(p, q)


def test_apply_inside_nn_jit_follows_each_adapter(hf_gemma2, gemma):
    """A model whose __call__ is wrapped in nn.jit (as gemma's Transformer): traces cached by
    nn.jit are reused across adapters, so the factors and the scale must be data, not constants."""
    _, _, config, params = hf_gemma2
    model, variables, targets = gemma

    class Jitted(GemmaStyle):
        @functools.partial(nn.jit, static_argnames=("self",))
        def __call__(self, tokens):
            return GemmaStyle.__call__(self, tokens)

    jitted = Jitted(model.cfg)
    x = rand_adapter(config, 20, modules=("q_proj", "down_proj"))
    y = Adapter(rand_adapter(config, 21, modules=("q_proj", "down_proj")).a, x.b, 4.0)
    for a in (x, y, x):
        got = lora.apply(jitted.apply, variables, a, targets, TOKENS)
        assert max_diff(got, ours(config, params, TOKENS, a)) <= ATOL
    assert max_diff(jitted.apply(variables, TOKENS), ours(config, params, TOKENS)) <= ATOL


# ----------------------------------------------------------------- batches of adapters


def test_per_example_adapters_and_vmap_equal_separate_calls(hf_llama, fused):
    _, _, config, _ = hf_llama
    model, _, variables, fn, targets = fused
    parts = [rand_adapter(config, 10 + i, rank=2 + i) for i in range(2)]
    batch = ad.stack(parts)  # [2, L, R, d], ranks zero-padded
    together = lora.apply(fn, variables, batch, targets, TOKENS)
    mapped = jax.vmap(lambda a, t: lora.apply(model.apply, variables, a, targets, t[None])[0])(
        batch, jnp.asarray(TOKENS)
    )
    for i, part in enumerate(parts):
        alone = lora.apply(fn, variables, part, targets, TOKENS[i : i + 1])[0]
        assert max_diff(together[i], alone) <= ATOL
        assert max_diff(mapped[i], alone) <= ATOL
    assert max_diff(together[0], together[1]) > 1e-2
    with pytest.raises(InputError, match="per-example adapters"):
        lora.apply(fn, variables, ad.stack(parts * 2), targets, TOKENS)


def test_grad_through_apply_matches_grad_through_ours(hf_llama, fused):
    """d loss / d adapter through the foreign model equals it through our transformer."""
    _, _, config, params = hf_llama
    _, _, variables, fn, targets = fused
    x = rand_adapter(config, 4, rank=2)

    def loss(logits):
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    g1 = jax.grad(lambda a: loss(lora.apply(fn, variables, a, targets, TOKENS)))(x)
    g2 = jax.grad(lambda a: loss(ours(config, params, TOKENS, a)))(x)
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------- training a LoRA functionally


def test_train_lora_functionally_loss_falls(hf_llama, fused):
    """jax.grad w.r.t. the adapter alone (base params frozen) through lora.apply, with optax."""
    _, _, config, _ = hf_llama
    _, _, variables, fn, targets = fused
    rng = np.random.default_rng(0)
    seqs = rng.integers(3, 120, size=(16, 12))
    inputs, labels = jnp.asarray(seqs[:, :-1]), jnp.asarray((seqs[:, :-1] * 7 + 3) % 128)

    adapter = ad.init(jax.random.key(0), config, ["q_proj", "v_proj", "down_proj"], 8, scale=2.0)
    opt = optax.adam(1e-2)

    def loss_fn(adapter, variables, x, y):
        logits = lora.apply(fn, variables, adapter, targets, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(adapter, state, variables, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, variables, x, y)  # adapter only
        updates, state = opt.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss

    state = opt.init(adapter)
    losses = []
    for _ in range(60):
        adapter, state, loss = step(adapter, state, variables, inputs, labels)
        losses.append(float(loss))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0], losses
    # the base params were never touched; the trained adapter is an ordinary Adapter
    assert isinstance(adapter, Adapter) and adapter.scale == 2.0


# ----------------------------------------------------------------- PEFT round trips


def test_peft_round_trip_gemma_style_matches_hf_peft(hf_gemma2, gemma, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, folder, config, _ = hf_gemma2
    model, variables, targets = gemma
    x = rand_adapter(config, 5, rank=4, scale=16 / math.sqrt(4))
    out = lp.export_peft(x, folder, tmp_path / "peft", rslora=True, layout=lp.hf_layout())
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, out).eval()(torch.tensor(TOKENS)).logits.numpy()
    mine = lora.apply(model.apply, variables, x, targets, TOKENS)
    np.testing.assert_allclose(np.asarray(mine), theirs, atol=1e-4, rtol=0)
    back = lora.load(out, layout=lp.hf_layout())
    assert back.scale == pytest.approx(x.scale, rel=1e-12)
    for m in TARGET_MODULES:
        np.testing.assert_allclose(back.a[m], x.a[m], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(back.b[m], x.b[m])
    assert max_diff(lora.apply(model.apply, variables, out, targets, TOKENS), mine) <= ATOL


def test_peft_fused_layout_loads_in_phi3_with_same_logits(hf_llama, fused, tmp_path):
    """Our adapter exported for a fused-projection torch model (Phi-3: qkv_proj, gate_up_proj)
    gives HF PEFT's logits on a Phi-3 holding the Llama's weights; importing it back gives the
    same delta, and the same logits through the fused Flax model."""
    import torch
    import transformers
    from peft import PeftModel

    llama, _, config, params = hf_llama
    _, _, variables, fn, targets = fused
    hc = llama.config
    phi3 = transformers.Phi3ForCausalLM(
        transformers.Phi3Config(
            vocab_size=hc.vocab_size, hidden_size=hc.hidden_size,
            intermediate_size=hc.intermediate_size, num_hidden_layers=hc.num_hidden_layers,
            num_attention_heads=hc.num_attention_heads,
            num_key_value_heads=hc.num_key_value_heads, rms_norm_eps=hc.rms_norm_eps,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters=dict(rope_type="default", rope_theta=1e4),
            tie_word_embeddings=False, attn_implementation="eager",
        )
    ).eval()  # fmt: skip
    sd = llama.state_dict()
    new = {}
    for k in phi3.state_dict():
        if k.endswith("qkv_proj.weight"):
            p = k.removesuffix("qkv_proj.weight")
            new[k] = torch.cat([sd[p + f"{m}.weight"] for m in ("q_proj", "k_proj", "v_proj")])
        elif k.endswith("gate_up_proj.weight"):
            p = k.removesuffix("gate_up_proj.weight")
            new[k] = torch.cat([sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"]])
        else:
            new[k] = sd[k]
    phi3.load_state_dict(new)
    with torch.no_grad():
        base_pt = phi3(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(base_pt, np.asarray(ours(config, params, TOKENS)), atol=1e-4)

    x = rand_adapter(config, 6, rank=3, scale=2.0)
    layout = lp.fused_layout(config)
    out = lp.export_peft(x, None, tmp_path / "phi3_peft", layout=layout, base_model_id="phi3")
    cfg = __import__("json").loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert cfg["r"] == 9  # q|k|v of rank 3 each, block-diagonal: exact at rank 9
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(phi3, out).eval()(torch.tensor(TOKENS)).logits.numpy()
    ref = np.asarray(ours(config, params, TOKENS, x))
    np.testing.assert_allclose(theirs, ref, atol=1e-4, rtol=0)
    back = lp.import_peft(out, layout=layout, model_config=config)
    assert back.modules == x.modules and back.rank == 9
    dx, db = ad.to_dense_delta(x), ad.to_dense_delta(back)
    for m in TARGET_MODULES:
        np.testing.assert_allclose(db[m], dx[m], atol=1e-5, rtol=0)
    assert max_diff(lora.apply(fn, variables, back, targets, TOKENS), ref) <= ATOL
    # only q and v in the fused qkv: k's rows stay zero and k is not imported back
    qv = rand_adapter(config, 7, modules=("q_proj", "v_proj"))
    out2 = lp.export_peft(qv, None, tmp_path / "qv", layout=layout)
    assert lp.import_peft(out2, layout=layout).modules == ("q_proj", "v_proj")


# ----------------------------------------------------------------- errors


def test_mapping_errors_name_the_problem(hf_llama, fused):
    _, _, config, _ = hf_llama
    _, cfg, variables, fn, targets = fused
    x = rand_adapter(config, 8, modules=("q_proj", "o_proj"))
    with pytest.raises(InputError, match="no Target for it"):
        lora.apply(fn, variables, x, targets[1:], TOKENS)
    with pytest.raises(InputError, match="no module path matches"):
        bad = [lora.Target("q_proj", r"layers_(?P<layer>\d+)/q"), *targets[1:]]
        lora.apply(fn, variables, x, bad, TOKENS)
    wrong = [t.replace(out="...,0:16", kernel_index="...,0:16") if t.module == "q_proj" else t
             for t in targets]  # fmt: skip
    with pytest.raises(InputError, match=r"q_proj at blocks_0/attn/wqkv: kernel"):
        lora.apply(fn, variables, x, wrong, TOKENS)
    fewer = {"params": {k: v for k, v in variables["params"].items() if k != "blocks_1"}}
    with pytest.raises(InputError, match=r"no module matched layer\(s\) \[1\]"):
        lora.merge(fewer, x, targets)
    with pytest.raises(InputError, match="group"):
        lora.Target("q_proj", "blocks_0/attn/wqkv")  # no layer group and not scanned
    with pytest.raises(InputError, match="kernel_layout"):
        lora.Target("o_proj", r"blocks_(?P<layer>\d+)/attn/wo", kernel_layout="n h o -> n o")
    with pytest.raises(InputError, match="batch shape"):
        lora.merge(variables, ad.stack([x, x]), targets)


# ----------------------------------------------------------------- docs and notebook

DOCS = Path(__file__).resolve().parents[1] / "docs" / "lora.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block of a markdown text."""
    out, start, body = [], None, []
    for i, line in enumerate(text.splitlines(), 1):
        if start is None and line.strip() == "```python":
            start, body = i + 1, []
        elif start is not None and line.strip() == "```":
            out.append((start, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
    assert start is None, f"a ```python block opened at line {start - 1} is never closed"
    return out


def test_docs_lora_md_runs(tmp_path, monkeypatch, capsys):
    """docs/lora.md's python blocks, in order, as one script (they share a namespace)."""
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOCS.read_text())
    assert len(blocks) >= 9
    module = types.ModuleType("docs_lora")  # Flax modules are dataclasses: give them a module
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for start, src in blocks:  # padded so tracebacks give docs/lora.md's line numbers
        code = compile("\n" * (start - 1) + src, str(DOCS), "exec", dont_inherit=True)
        exec(code, module.__dict__)
    out = capsys.readouterr().out
    assert "per-example and vmapped adapters equal separate calls" in out
    assert "loss" in out and "truncation error" in out


@pytest.mark.slow
def test_notebook_lora_any_flax_model(tmp_path):
    from test_notebooks import run_notebook

    out, _ = run_notebook("lora_any_flax_model.ipynb", tmp_path)
    assert "adapter: rank 8 on ['q_proj', 'v_proj']" in out
    assert "max |logits difference|, other vs ours" in out
    assert "answers agree on 2/2 inputs" in out

"""Decoder building blocks: RMSNorm, RoPE, projections that accept a LoRA, attention, MLP.

Every family difference is a `ModelConfig` field; per-layer differences (sliding or global
attention, RoPE frequencies) arrive as scanned arrays, never as Python branches.
Matmuls accumulate in f32 (`preferred_element_type`) and softmax runs in f32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.models.config import ModelConfig
from hyperlora_jax.precision import matmul

F32 = jnp.float32
# Finite "minus infinity": fully masked rows (padding) give a uniform softmax, never NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _param(mod: nn.Module, name: str, init, shape, names, dtype):
    return mod.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


class RMSNorm(nn.Module):
    """HF RMSNorm: Llama multiplies `w * x_normed.astype(dtype)`, Gemma `(x_normed * (1 + w))`."""

    dim: int
    eps: float
    plus_one: bool
    axis_name: str = "embed"
    param_dtype: jnp.dtype = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        w = _param(self, "scale", init, (self.dim,), (self.axis_name,), self.param_dtype)
        xf = x.astype(F32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + w.astype(F32))).astype(x.dtype)
        return w.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(config: ModelConfig, theta: float, scaled: bool) -> np.ndarray:
    """Inverse frequencies [head_dim/2] in f32 as HF computes them, with llama3/linear scaling."""
    dim = config.head_dim
    inv = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(
        np.float32
    )
    rs = config.rope_scaling_dict if scaled else None
    if rs is None:
        return inv
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / np.float32(rs["factor"])).astype(np.float32)
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old / lo, old / hi
        out = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        return np.where(medium, smoothed, out).astype(np.float32)

    raise ConfigError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


def layer_rope_table(config: ModelConfig) -> np.ndarray:
    """[L, head_dim/2] inverse frequencies per layer (Gemma-3 local layers use rope_local_theta)."""
    glob = rope_inv_freq(config, config.rope_theta, scaled=True)
    if config.rope_local_theta is None:
        return np.stack([glob] * config.num_layers)
    loc = rope_inv_freq(config, config.rope_local_theta, scaled=False)
    return np.stack([loc if s else glob for s in config.sliding_layers])


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, N, D], positions: [B, T], inv_freq: [D/2]."""
    freqs = positions.astype(F32)[..., None] * inv_freq.astype(F32)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def lora_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    adapter_index: jax.Array | None = None,
) -> jax.Array:
    """scale * (x A^T) B for one layer's factors, accumulated in f32, cast back to x.dtype.

    x: [B, T, d_in]. a/b: [R, d] (one adapter for all), [B, R, d] (one per sequence), or, with
    `adapter_index` [B, T] of ints, [N, R, d] (each token uses adapter adapter_index[b, t]) or
    [B, N, R, d] (each row has its own N adapters, index within the row; cheaper when packing, as
    the work per token grows with N, not with the batch). Used for packed rows where each segment
    has its own adapter. `adapter_index` may instead be weights [B, T, N]: each token gets the
    weighted sum of the N adapters' outputs; a 0/1 mask over several adapters equals their
    rank concatenation (how D2L training applies a context's chunk LoRAs without composing them).
    Never forms W + dW, never gathers per-token factors.
    """
    f32 = jnp.float32
    xa_dtype = jnp.promote_types(x.dtype, a.dtype)
    x_ = x.astype(xa_dtype)
    a_ = a.astype(xa_dtype)
    if adapter_index is not None:
        n = a.shape[-3]
        # One GEMM against all N adapters' A ([B, T, N, R]), zero every adapter but the token's
        # own, then one GEMM over (N, R): exact, and no per-token copy of the factors.
        if jnp.issubdtype(adapter_index.dtype, jnp.integer):
            select = jax.nn.one_hot(adapter_index, n, dtype=f32)[..., None]
        else:
            select = adapter_index.astype(f32)[..., None]
        if a.ndim == 3:
            xa = jnp.einsum("btd,nrd->btnr", x_, a_, preferred_element_type=f32) * select
            out = jnp.einsum("btnr,nro->bto", xa, b.astype(f32), preferred_element_type=f32)
        else:
            xa = jnp.einsum("btd,bnrd->btnr", x_, a_, preferred_element_type=f32) * select
            out = jnp.einsum("btnr,bnro->bto", xa, b.astype(f32), preferred_element_type=f32)
    elif a.ndim == 2:
        xa = jnp.einsum("btd,rd->btr", x_, a_, preferred_element_type=f32)
        out = jnp.einsum("btr,ro->bto", xa, b.astype(f32), preferred_element_type=f32)
    else:
        xa = jnp.einsum("btd,brd->btr", x_, a_, preferred_element_type=f32)
        out = jnp.einsum("btr,bro->bto", xa, b.astype(f32), preferred_element_type=f32)
    return (scale * out).astype(x.dtype)


class Proj(nn.Module):
    """y = x W (+ b) + LoRA delta; W is stored [d_in, d_out] (HF's transpose)."""

    d_in: int
    d_out: int
    names: tuple[str, str]
    use_bias: bool = False
    param_dtype: jnp.dtype = F32

    @nn.compact
    def __call__(self, x, lora=None, scale: float = 1.0, adapter_index=None):
        init = nn.initializers.normal(0.02)
        w = _param(self, "kernel", init, (self.d_in, self.d_out), self.names, self.param_dtype)
        y = matmul(x, w, x.dtype)  # f32 accumulation; a bf16 backward at the bf16 rate
        if self.use_bias:
            b = _param(
                self, "bias", nn.initializers.zeros, (self.d_out,), self.names[1:], self.param_dtype
            )
            y = y + b.astype(F32)
        y = y.astype(x.dtype)
        if lora is not None:
            y = y + lora_delta(x, lora[0], lora[1], scale, adapter_index)
        return y


def _lora(lora: dict | None, name: str):
    if lora is None or name not in lora["a"]:
        return None
    return lora["a"][name], lora["b"][name]


class MaskInputs(NamedTuple):
    """What decides who attends to whom: slot indices and segment ids (0 = padding)."""

    q_idx: jax.Array  # [B, T] query slots
    q_seg: jax.Array  # [B, T]
    k_idx: jax.Array  # [B, S] key slots
    k_seg: jax.Array  # [B, S]
    sliding: jax.Array  # [] bool: this layer uses the sliding window


def attention_mask(m: MaskInputs, window: int | None):
    """[B, 1, 1, T, S] bool: causal by index, same non-zero segment, and inside the window."""
    q_idx, q_seg, k_idx, k_seg, sliding = m
    allowed = (k_idx[:, None, :] <= q_idx[:, :, None]) & (q_seg[:, :, None] == k_seg[:, None, :])
    allowed &= (k_seg != 0)[:, None, :]
    if window is not None:
        in_win = (q_idx[:, :, None] - k_idx[:, None, :]) < window
        allowed &= in_win | jnp.logical_not(sliding)
    return allowed[:, None, None]


# Query and key block length of the flash-style path (prefill, encoding, training). The f32
# prefill of a 4,120-token prompt on SmolLM2: 9.9 s at 256, 8.7 s at 512, 11.4 s at 1,024.
ATTN_BLOCK = 512


def _logit_scale(c: ModelConfig, hd: int) -> float:
    qpas = c.query_pre_attn_scalar
    return qpas**-0.5 if qpas is not None else hd**-0.5


def _scale_logits(logits, c: ModelConfig, hd: int):
    """Without a soft-cap the scale is already folded into the queries (`Attention`): one
    multiply per query instead of one per logit."""
    if c.attn_logit_softcap is None:
        return logits
    logits = logits * _logit_scale(c, hd)
    return jnp.tanh(logits / c.attn_logit_softcap) * c.attn_logit_softcap


def _attend(qg, k, v, mask: MaskInputs, c: ModelConfig) -> jax.Array:
    """Softmax attention core. qg [b, kv, g, tq, d], k/v [b, kv, s, d] -> [b, kv, g, tq, d] f32."""
    b, nkv, g, tq, hd = qg.shape
    s = k.shape[2]
    logits = jnp.einsum(
        "bkqd,bksd->bkqs", qg.reshape(b, nkv, g * tq, hd), k, preferred_element_type=F32
    ).reshape(b, nkv, g, tq, s)
    logits = _scale_logits(logits, c, hd)
    allowed = attention_mask(mask, c.sliding_window)  # [b, 1, 1, tq, s]
    logits = jnp.where(allowed, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, nkv, g * tq, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=F32)
    return out.reshape(b, nkv, g, tq, hd)


def _flash_attend(qg, k, v, mask: MaskInputs, c: ModelConfig, block: int) -> jax.Array:
    """Causal attention when key j sits at index j (no cache slots): query block [s0, s1) visits
    key blocks below s1 only, with a running max and sum (no T x T scores; each block's logits
    stay in cache). Same shapes as `_attend`; rows with no allowed key come out finite. The key
    blocks before the diagonal run in a fori_loop, so the program grows linearly with T."""
    b, nkv, g, t, hd = qg.shape

    def step(q, q_m, k0, kb, state):
        """Fold key block [k0, k0 + kb) into the running (max, sum, out) of query rows q."""
        m, run, acc = state
        tq = q_m.q_idx.shape[1]
        kblk = jax.lax.dynamic_slice_in_dim(k, k0, kb, axis=2)
        vblk = jax.lax.dynamic_slice_in_dim(v, k0, kb, axis=2)
        logits = jnp.einsum("bkqd,bksd->bkqs", q, kblk, preferred_element_type=F32)
        logits = _scale_logits(logits.reshape(b, nkv, g, tq, kb), c, hd)
        km = q_m._replace(
            k_idx=jax.lax.dynamic_slice_in_dim(mask.k_idx, k0, kb, axis=1),
            k_seg=jax.lax.dynamic_slice_in_dim(mask.k_seg, k0, kb, axis=1),
        )
        logits = jnp.where(attention_mask(km, c.sliding_window), logits, MASK_VALUE)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum(
            "bkqs,bksd->bkqd",
            p.astype(v.dtype).reshape(b, nkv, g * tq, kb),
            vblk,
            preferred_element_type=F32,
        ).reshape(b, nkv, g, tq, hd)
        return m_new, run * corr + p.sum(-1), acc * corr[..., None] + pv

    outs = []
    for s0 in range(0, t, block):
        s1 = min(s0 + block, t)
        tq = s1 - s0
        q = qg[:, :, :, s0:s1].reshape(b, nkv, g * tq, hd)
        q_m = MaskInputs(mask.q_idx[:, s0:s1], mask.q_seg[:, s0:s1], None, None, mask.sliding)
        state = (
            jnp.full((b, nkv, g, tq), MASK_VALUE, F32),
            jnp.zeros((b, nkv, g, tq), F32),
            jnp.zeros((b, nkv, g, tq, hd), F32),
        )
        if s0:  # full key blocks before the diagonal

            def body(i, st, q=q, q_m=q_m):
                return step(q, q_m, i * block, block, st)

            state = jax.lax.fori_loop(0, s0 // block, body, state)
        m, run, acc = step(q, q_m, s0, tq, state)  # the diagonal block
        outs.append(acc / run[..., None])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


class Attention(nn.Module):
    """GQA self-attention with optional q/k norm, soft-cap, sliding window and a KV cache.

    `cache`: None, or this layer's {"k", "v": [B, kv_heads, S, head_dim], "end": [B]} (read
    only). Returns (out, new K/V [B, kv_heads, T, head_dim] for the caller to write at `end`, or
    None without a cache); the heads-first cache layout lets a decode step attend over it with no
    transpose."""

    config: ModelConfig
    param_dtype: jnp.dtype = F32
    # The cache is empty and `mask` covers this call's own tokens: attend over them (flash path)
    # instead of over every cache slot.
    prefill: bool = False
    # Keys may lie after their query (Gemma-3 image blocks): the full-mask path, not the blocks.
    full_keys: bool = False

    @nn.compact
    def __call__(self, x, positions, inv_freq, mask: MaskInputs, lora, scale, adapter_index, cache):
        c = self.config
        nh, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        h = c.hidden_size
        kw = dict(param_dtype=self.param_dtype)
        q = Proj(h, nh * hd, ("embed", "heads"), c.attention_bias, name="q_proj", **kw)(
            x, _lora(lora, "q_proj"), scale, adapter_index
        )
        k = Proj(h, nkv * hd, ("embed", "kv_heads"), c.attention_bias, name="k_proj", **kw)(
            x, _lora(lora, "k_proj"), scale, adapter_index
        )
        v = Proj(h, nkv * hd, ("embed", "kv_heads"), c.attention_bias, name="v_proj", **kw)(
            x, _lora(lora, "v_proj"), scale, adapter_index
        )
        b, t = x.shape[:2]
        q, k, v = q.reshape(b, t, nh, hd), k.reshape(b, t, nkv, hd), v.reshape(b, t, nkv, hd)
        if c.qk_norm:
            norm = dict(dim=hd, eps=c.rms_norm_eps, plus_one=c.norm_plus_one, axis_name="head_dim")
            q = RMSNorm(**norm, **kw, name="q_norm")(q)
            k = RMSNorm(**norm, **kw, name="k_norm")(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if c.attn_logit_softcap is None:  # see _scale_logits
            q = q * jnp.asarray(_logit_scale(c, hd), q.dtype)

        g = nh // nkv
        # [b, kv, g, t, d]: batch dims leading so each einsum is a plain batched matmul
        # (XLA:CPU runs "btkgd,bskd->bkgts" as a slow generic loop, ~3x slower).
        qg = q.reshape(b, t, nkv, g, hd).transpose(0, 2, 3, 1, 4)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        new_kv = None
        if cache is not None:
            new_kv = (kt.astype(cache["k"].dtype), vt.astype(cache["v"].dtype))
        if cache is not None and not self.prefill:  # a decode step attends to every slot
            upd = jax.vmap(lambda buf, new, e: jax.lax.dynamic_update_slice_in_dim(buf, new, e, 1))
            k_all = upd(cache["k"], new_kv[0], cache["end"]).astype(x.dtype)
            v_all = upd(cache["v"], new_kv[1], cache["end"]).astype(x.dtype)
            out = _attend(qg, k_all, v_all, mask, c)
        elif self.full_keys:
            out = _attend(qg, kt, vt, mask, c)
        else:  # key j at index j: causal blocks, running softmax
            out = _flash_attend(qg, kt, vt, mask, c, ATTN_BLOCK)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, nh * hd).astype(x.dtype)
        out = Proj(nh * hd, h, ("heads", "embed"), name="o_proj", **kw)(  # no bias in any family
            out, _lora(lora, "o_proj"), scale, adapter_index
        )
        return out, new_kv


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act = SiLU or tanh-GELU."""

    config: ModelConfig
    param_dtype: jnp.dtype = F32

    @nn.compact
    def __call__(self, x, lora, scale, adapter_index):
        c = self.config
        kw = dict(param_dtype=self.param_dtype)
        h, i = c.hidden_size, c.intermediate_size
        gate = Proj(h, i, ("embed", "mlp"), name="gate_proj", **kw)(
            x, _lora(lora, "gate_proj"), scale, adapter_index
        )
        up = Proj(h, i, ("embed", "mlp"), name="up_proj", **kw)(
            x, _lora(lora, "up_proj"), scale, adapter_index
        )
        if c.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh"):
            act = jax.nn.gelu(gate.astype(F32), approximate=True).astype(x.dtype)
        else:
            act = jax.nn.silu(gate.astype(F32)).astype(x.dtype)
        return Proj(i, h, ("mlp", "embed"), name="down_proj", **kw)(
            act * up, _lora(lora, "down_proj"), scale, adapter_index
        )
